"""AgentTLS, the agent leg's TLS through memory BIOs: every byte the agent sends reaches the
session whatever way its TLS records are cut into reads — several in one read, one split
over reads, a message larger than a record — with a real in-memory TLS client."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import pytest

from appliance.proxy.server import AgentTLS
from bench.tls_trace import server_context as tls_server_context


@pytest.fixture(scope="module")
def server_context(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    """A self-signed server certificate, made as the TLS trace bench makes it."""
    return tls_server_context(tmp_path_factory.mktemp("agent-tls"))


class Session:
    def __init__(self) -> None:
        self.data = bytearray()
        self.reads = 0
        self.ready: str | None = None

    def client_data(self, data: bytes) -> None:
        self.data += data
        self.reads += 1

    def client_tls_ready(self, version: str, cert: Any) -> None:
        self.ready = version

    def client_tls_failed(self, reason: str) -> None:
        raise AssertionError(reason)


class Transport:
    def __init__(self) -> None:
        self.out = bytearray()

    def write(self, data: bytes) -> None:
        self.out += data


class Conn:
    def __init__(self) -> None:
        self.session = Session()
        self.transport = Transport()


def _connected(server_context: ssl.SSLContext) -> tuple[Conn, AgentTLS, ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    conn = Conn()
    agent_tls = AgentTLS(conn, server_context)  # type: ignore[arg-type]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing)
    while True:
        try:
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            agent_tls.received(outgoing.read())
            incoming.write(bytes(conn.transport.out))
            conn.transport.out.clear()
    agent_tls.received(outgoing.read())
    assert conn.session.ready is not None
    return conn, agent_tls, client, incoming, outgoing


def test_every_byte_reaches_the_session_however_the_records_are_cut(server_context: ssl.SSLContext) -> None:
    async def scenario() -> None:
        conn, agent_tls, client, _incoming, outgoing = _connected(server_context)
        messages = [b"Q" + bytes([i]) * 40 for i in range(6)] + [b"L" * 70_000]  # the last spans records
        stream = bytearray()
        for message in messages:
            client.write(message)
            stream += outgoing.read()
        agent_tls.received(bytes(stream[:150]))  # a record cut short: nothing yet, no error
        agent_tls.received(bytes(stream[150:151]))
        agent_tls.received(bytes(stream[151:]))  # the rest: several records in one read
        assert bytes(conn.session.data) == b"".join(messages)
        agent_tls.deadline.cancel()

    asyncio.run(scenario())


def test_what_the_session_sends_reaches_the_agent_in_order(server_context: ssl.SSLContext) -> None:
    async def scenario() -> None:
        conn, agent_tls, client, incoming, _outgoing = _connected(server_context)
        for i in range(3):
            agent_tls.send(b"D" + bytes([i]) * 1000)
        incoming.write(bytes(conn.transport.out))  # the session tickets first, then the data
        got = bytearray()
        while True:
            try:
                got += client.read(1 << 16)
            except ssl.SSLWantReadError:
                break
        assert bytes(got) == b"".join(b"D" + bytes([i]) * 1000 for i in range(3))
        agent_tls.deadline.cancel()

    asyncio.run(scenario())
