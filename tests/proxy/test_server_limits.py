"""Bounded resources through a real ProxyServer on loopback sockets (issue 13, item 2).

The harness is test_server_fuzz.py's — a fake PostgreSQL (tests/proxy/fake_server.py) and
the proxies on an event loop in a background thread, blocking clients in the main thread —
with proxies configured for the limits under test:

* ``deadline``: startup_timeout 0.5 s, max_client_message 8 MiB, max_buffered_total 32 MiB;
* ``sources``: max_connections 5, max_connections_per_source 3;
* ``memory``: the defaults for messages (64 MiB, 256 MiB), to see RSS go back down.

Every flood is bounded. Tests synchronise on what the sockets and the proxy say (EOF, a
FATAL, a session count), with READ_TIMEOUT as a safety net only; nothing asserts on time.
The normal client's latency during the message flood is measured and reported, not judged.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import os
import socket
import statistics
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from appliance.config import Endpoint
from appliance.pgwire import messages as m
from appliance.proxy.hooks import AddonManager
from appliance.proxy.server import ProxyServer, source_of
from tests.proxy.fake_server import FakeBackend, Script
from tests.proxy.loop_thread import LoopThread
from tests.proxy.real_proxy import (
    READ_TIMEOUT,
    Client,
    decode_clean,
    is_fatal,
    proxy_config,
    start_proxy,
    startup_bytes,
)

log = logging.getLogger("tollgate.test.limits")
u32 = struct.Struct("!I")
MiB = 1 << 20

PROXIES = {
    "deadline": """startup_timeout = 0.5
max_client_message = 8388608
max_buffered_total = 33554432
max_connections = 400
max_connections_per_source = 300""",
    "sources": """max_connections = 5
max_connections_per_source = 3""",
    # The defaults: its logins must not race a short startup deadline on a loaded machine.
    "memory": "",
}


class Harness(LoopThread):
    def __init__(self) -> None:
        super().__init__()
        self.backend = FakeBackend()
        backend_port = self.run(self.backend.start())
        destination = Endpoint.parse(f"127.0.0.1:{backend_port}")
        self.proxies: dict[str, tuple[ProxyServer, int]] = {}
        for name, extra in PROXIES.items():
            self.proxies[name] = start_proxy(self, lambda port, extra=extra: proxy_config(port, backend_port, extra),
                                             destination, AddonManager())

    def close(self) -> None:
        async def closing() -> None:
            for server, _ in self.proxies.values():
                await asyncio.wait_for(server.close(), READ_TIMEOUT)
            await self.backend.close()
        self.stop(closing)


@pytest.fixture(scope="module")
def harness():
    h = Harness()
    yield h
    h.close()


def sessions(h: Harness, name: str) -> int:
    return h.call(lambda: len(h.proxies[name][0].sessions))


def check_healthy(h: Harness, name: str, others: int = 0) -> None:
    """A fresh session works; nothing else is left open or counted; the loop saw no error."""
    server, port = h.proxies[name]
    client = Client(port)
    try:
        client.login(h.backend.script(Script()))
        assert client.query("SELECT 1")[1].values == (b"1",)
        client.send(m.Terminate().encode())
        client.read_until_eof()
    finally:
        client.close()
    h.wait_for(lambda: len(server.sessions) == others, f"{name}: sessions to drop to {others}")
    h.wait_for(lambda: server.connections == others and len(server.per_source) == min(others, 1),
               f"{name}: connection counts to drop to {others}")
    h.wait_for(lambda: server.budget.used == 0, f"{name}: the buffer budget to be returned")
    assert not h.loop_errors, f"the event loop reported errors: {h.loop_errors}"


# ---- the startup deadline --------------------------------------------------------------------------

def test_flood_of_idle_connections_each_closed_by_the_deadline(harness):
    """200 connections that never finish starting: silent ones are closed without a word,
    ones that began a startup packet (or asked for TLS) get a FATAL, one whose database
    never answers the login gets a FATAL blaming the database. Each is read to EOF."""
    _, port = harness.proxies["deadline"]
    hold = harness.backend.script(Script("hold"))
    kinds = ["silent", "partial", "ssl"] * 66 + ["login"] * 2
    clients: list[tuple[str, Client]] = []
    try:
        for kind in kinds:
            # Each sends at once on connecting: its deadline runs from the proxy's accept.
            client = Client(port)
            clients.append((kind, client))
            if kind == "partial":
                client.send(startup_bytes()[:11])
            elif kind == "ssl":
                client.send(m.SSLRequest().encode())
            elif kind == "login":
                client.send(startup_bytes(hold))
        for kind, client in clients:
            received = client.read_until_eof()  # the deadline's doing: nobody else closes them
            if kind == "silent":
                assert received == b"", f"a silent connection was sent {received!r}"
                continue
            got = decode_clean(received[1:] if kind == "ssl" else received)
            if kind == "ssl":
                assert received[:1] == b"N"
            assert len(got) >= 1 and is_fatal(got[-1]), (kind, got)
            error = got[-1]
            if kind == "login":
                assert error.sqlstate == "08006" and "within 0.5 s (still authenticating)" in error.message, error
            else:
                assert error.sqlstate == "08P01" and "did not complete its startup within 0.5 s" in error.message, \
                    error
    finally:
        for _, client in clients:
            client.close()
    for upstream in harness.backend.connections_for(hold):
        assert upstream.eof.wait(READ_TIMEOUT), "the upstream of a timed-out login was left open"
    check_healthy(harness, "deadline")


def test_a_session_that_became_ready_outlives_the_deadline(harness):
    _, port = harness.proxies["deadline"]
    client = Client(port)
    try:
        client.login(harness.backend.script(Script()))
        # A silent connection accepted after it is closed by its own deadline, which is
        # due after the ready session's: by then that one has passed too (synchronised
        # on that EOF, not on a clock). It was cancelled at ReadyForQuery: still served.
        later = Client(port)
        try:
            assert later.read_until_eof() == b""
        finally:
            later.close()
        assert client.query("SELECT 1")[1].values == (b"1",)
    finally:
        client.close()
    check_healthy(harness, "deadline")


# ---- a bounded flood of partial huge messages --------------------------------------------------------

def test_flood_of_partial_huge_messages_is_refused_while_a_normal_client_is_served(harness, capsys):
    """40 logged-in clients each announce a message and send a few bytes of it: those above
    max_client_message are refused on the header (54000); of those within it, only as many
    as max_buffered_total holds keep buffering (three of 8 MiB in 32 MiB), the rest are
    refused on the header too (53200). A normal client keeps querying throughout."""
    server, port = harness.proxies["deadline"]
    normal = Client(port)
    normal.login(harness.backend.script(Script()))
    announced = {"within": 8 * MiB, "above": 64 * MiB}
    kinds = ["within"] * 30 + ["above"] * 10
    flood = [(kind, Client(port), harness.backend.script(Script())) for kind in kinds]
    latencies: list[float] = []
    try:
        for _, client, key in flood:
            client.login(key)

        def announce(item: tuple[str, Client, str]) -> None:
            kind, client, _ = item
            client.send(b"Q" + u32.pack(announced[kind]) + b"SELECT '")
        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(announce, item) for item in flood]
            for _ in range(50):  # the normal client, while they announce
                start = time.perf_counter()
                assert normal.query("SELECT 1")[1].values == (b"1",)
                latencies.append(time.perf_counter() - start)
            for f in futures:
                f.result(READ_TIMEOUT)
        # Every header has been judged once only the holders and the normal client are left.
        harness.wait_for(lambda: len(server.sessions) == 1 + 3, "the refused sessions to end")
        holders = harness.call(lambda: {s.info.application_name for s in server.sessions.values()})
        refused = {"53200": 0, "54000": 0}
        for kind, client, key in flood:
            if key in holders:
                assert kind == "within"
                continue
            client.read_until_eof()
            [error] = decode_clean(client.after_login())
            assert is_fatal(error), error
            refused[error.sqlstate] += 1
            if kind == "above":
                assert error.sqlstate == "54000" and "exceeds Tollgate's limit of 8388608 bytes" in error.message
            else:
                assert error.sqlstate == "53200" and "out of memory" in error.message, error
        assert refused == {"53200": 27, "54000": 10}, refused
        assert harness.call(lambda: server.budget.used) == 3 * (8 * MiB + 1)
        for _ in range(50):  # and while the budget is spent
            start = time.perf_counter()
            assert normal.query("SELECT 1")[1].values == (b"1",)
            latencies.append(time.perf_counter() - start)
    finally:
        for _, client, _ in flood:
            client.close()
        normal.close()
    ms = sorted(x * 1000 for x in latencies)
    report = (f"normal client during the flood: {len(ms)} queries, median {statistics.median(ms):.2f} ms, "
              f"p95 {ms[int(len(ms) * 0.95) - 1]:.2f} ms, max {ms[-1]:.2f} ms")
    log.warning(report)
    with capsys.disabled():
        print(f"\n{report}")
    check_healthy(harness, "deadline")


# ---- memory goes back ------------------------------------------------------------------------------

def rss() -> int:
    """This process's resident set: the proxy runs in it, on the loop thread."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_memory_of_large_partial_messages_is_returned_when_their_connections_close(harness):
    """The issue's case, scaled to the new cap: two connections each send 60 MiB of a
    64 MiB Query and stop. RSS grows by about that, and goes back once they close —
    without waiting for the garbage collector."""
    server, port = harness.proxies["memory"]
    gc.collect()
    baseline = rss()
    chunk = b"x" * MiB
    clients = [Client(port), Client(port)]
    try:
        for client in clients:
            client.login(harness.backend.script(Script()))
            client.send(b"Q" + u32.pack(64 * MiB) + b"SELECT '")
            for _ in range(60):
                assert client.send(chunk)

        def buffered() -> int:
            return sum(len(s.pipeline.buffer) for s in server.sessions.values())
        harness.wait_for(lambda: buffered() >= 2 * 60 * MiB, "the proxy to buffer both partial messages")
        grown = rss() - baseline
        assert grown >= 100 * MiB, f"RSS grew by only {grown / MiB:.0f} MiB: is the test measuring anything?"
    finally:
        for client in clients:
            client.close()
    harness.wait_for(lambda: not server.sessions, "both sessions to end")
    left = rss() - baseline
    log.warning("RSS: %.0f MiB above the baseline while buffering, %.0f MiB after the close",
                grown / MiB, left / MiB)
    assert left < 24 * MiB, f"{left / MiB:.0f} MiB were not returned after the connections closed"
    assert harness.call(lambda: server.budget.used) == 0
    check_healthy(harness, "memory")


# ---- connections per source --------------------------------------------------------------------------

class SourcedClient(Client):
    """A client connecting from a chosen loopback address (all of 127/8 is local)."""

    def __init__(self, port: int, source: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT, source_address=(source, 0))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.raw = bytearray()
        self.mark = 0
        self.eof = False


def refused_at_accept(client: Client) -> m.ErrorResponse:
    """What a refused connection reads without having sent anything: one FATAL, then EOF."""
    [error] = decode_clean(client.read_until_eof())
    assert is_fatal(error) and error.sqlstate == "53300", error
    return error


def test_connections_are_limited_per_source_and_in_all(harness):
    server, port = harness.proxies["sources"]
    opened: list[Client] = []
    try:
        for _ in range(3):
            opened.append(SourcedClient(port, "127.0.0.2"))
            opened[-1].login(harness.backend.script(Script()))
        fourth = SourcedClient(port, "127.0.0.2")
        try:
            error = refused_at_accept(fourth)
            assert "too many connections from 127.0.0.2" in error.message, error
        finally:
            fourth.close()
        for _ in range(2):  # another source still gets in, up to max_connections
            opened.append(SourcedClient(port, "127.0.0.3"))
            opened[-1].login(harness.backend.script(Script()))
        sixth = SourcedClient(port, "127.0.0.4")
        try:
            error = refused_at_accept(sixth)
            assert "too many clients already" in error.message, error
        finally:
            sixth.close()
        for client in opened:  # the ones let in are served all along
            assert client.query("SELECT 1")[1].values == (b"1",)
        # A connection closing frees its place.
        opened.pop(0).close()
        harness.wait_for(lambda: server.per_source.get("127.0.0.2") == 2, "the closed connection to count off")
        again = SourcedClient(port, "127.0.0.2")
        opened.append(again)
        again.login(harness.backend.script(Script()))
    finally:
        for client in opened:
            client.close()
    harness.wait_for(lambda: server.connections == 0 and not server.per_source, "every connection to count off")
    check_healthy(harness, "sources")


@pytest.mark.parametrize("address, source", [
    ("127.0.0.2", "127.0.0.2"),
    ("2001:db8:77::7", "2001:db8:77::/64"),
    ("2001:db8:77::ffff:1", "2001:db8:77::/64"),  # another address of the same host's /64
    ("2001:db8:78::7", "2001:db8:78::/64"),
    ("::ffff:198.18.1.10", "198.18.1.10"),
])
def test_connections_count_against_an_ipv4_address_or_an_ipv6_prefix(address, source):
    assert source_of(ipaddress.ip_address(address), 64) == source
