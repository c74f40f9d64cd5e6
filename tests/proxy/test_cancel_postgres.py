"""The backend's real pid and Tollgate's cancel secret, against a real PostgreSQL.

A real ProxyServer (on a loop thread, reached through the loopback intercept) in front of
the throwaway cluster of tests/masking/conftest.py. Through it a driver must see what it
sees directly: ``pg_backend_pid()`` equal to the pid of its BackendKeyData, that pid in
``pg_stat_activity``, a notification's sender pid equal to the sender's, and
``pg_terminate_backend`` of it ending that session. A CancelRequest with the issued key
cancels the running statement; one with the right pid and a wrong secret cancels nothing.
Every wait is on an event (pg_stat_activity's state, EOF, a counter), never a sleep.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from appliance.config import Endpoint
from appliance.pgwire import messages as m
from appliance.proxy.hooks import AddonManager
from tests.masking.conftest import Postgres, postgres  # noqa: F401 -- the real server, as a fixture
from tests.proxy.loop_thread import SAFETY_NET, LoopThread
from tests.proxy.real_proxy import READ_TIMEOUT, Client, postgres_proxy_config, start_proxy


class Harness(LoopThread):
    """A ProxyServer protecting the real PostgreSQL on 127.0.0.1."""

    def __init__(self, pg: Postgres) -> None:
        super().__init__()
        self.pg = pg
        self.server, self.port = start_proxy(self, lambda port: postgres_proxy_config(port, pg.port),
                                             Endpoint.parse(f"127.0.0.1:{pg.port}"), AddonManager())

    def connect(self, **kw: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(host="127.0.0.1", port=self.port, user="agent", dbname="postgres",
                               sslmode="disable", autocommit=True, **kw)

    def close(self) -> None:
        self.stop(lambda: asyncio.wait_for(self.server.close(), READ_TIMEOUT))


@pytest.fixture(scope="module")
def harness(postgres: Postgres) -> Iterator[Harness]:  # noqa: F811 -- the imported fixture
    h = Harness(postgres)
    yield h
    h.close()


def test_the_agent_sees_the_backends_real_pid(harness: Harness) -> None:
    with harness.connect(application_name="pid-probe") as conn, harness.pg.connect() as direct:
        pid = conn.info.backend_pid
        assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] == pid
        row = direct.execute("SELECT application_name, usename FROM pg_stat_activity WHERE pid = %s",
                             (pid,)).fetchone()
        assert row == ("pid-probe", "postgres")
        listed = harness.call(lambda: [s["backend_pid"] for s in harness.server.snapshot()])
        assert pid in listed


def test_a_notifications_sender_pid_is_the_senders(harness: Harness) -> None:
    with harness.connect() as listener, harness.connect() as talker:
        listener.execute("LISTEN tollgate_pid")
        talker.execute("NOTIFY tollgate_pid, 'hello'")
        notes = list(listener.notifies(timeout=SAFETY_NET, stop_after=1))  # the timeout is a safety net
        assert [(n.channel, n.payload, n.pid) for n in notes] == [("tollgate_pid", "hello", talker.info.backend_pid)]


def test_pg_terminate_backend_of_the_agents_pid_ends_its_session(harness: Harness) -> None:
    with harness.connect() as victim, harness.connect() as killer:
        assert killer.execute("SELECT pg_terminate_backend(%s)", (victim.info.backend_pid,)).fetchone()[0] is True
        with pytest.raises(psycopg.OperationalError, match="terminating connection"):
            victim.execute("SELECT 1")


def _active(watcher: psycopg.Connection[Any], pid: int, until: bool | None = None) -> bool:
    """Whether pid runs the sleep; with ``until``, poll pg_stat_activity until it says so
    (the wait is on the server's state; SAFETY_NET only bounds a hang)."""
    deadline = time.monotonic() + SAFETY_NET
    while True:
        running = watcher.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND state = 'active' "
                                  "AND query = 'SELECT pg_sleep(3600)'", (pid,)).fetchone()[0] == 1
        if until is None or running == until or time.monotonic() > deadline:
            return running
        time.sleep(0.01)


def _send_cancel(port: int, pid: int, secret: bytes) -> bytes:
    """A raw CancelRequest to the proxy; what came back before it closed (nothing, ever)."""
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT) as sock:
        sock.sendall(m.CancelRequest(pid, secret).encode())
        got = b""
        while chunk := sock.recv(4096):
            got += chunk
        return got


def test_cancel_with_the_issued_key_cancels_and_a_wrong_secret_does_not(harness: Harness) -> None:
    client = Client(harness.port)
    try:
        got = client.login(user="agent", database="postgres")
        key = next(msg for msg in got if isinstance(msg, m.BackendKeyData))
        pid, secret = key.process_id, key.secret_key
        with harness.pg.connect() as watcher:
            client.send(m.Query("SELECT pg_sleep(3600)").encode())
            assert _active(watcher, pid, until=True), f"pid {pid} never ran the sleep: not the backend's real pid?"
            unmatched = harness.call(lambda: harness.server.cancels.unmatched)

            # The right pid with a wrong secret: closed without a word, nothing forwarded.
            assert _send_cancel(harness.port, pid, bytes(b ^ 0x5A for b in secret)) == b""
            assert harness.call(lambda: harness.server.cancels.unmatched) == unmatched + 1
            assert _active(watcher, pid), "a cancel with a wrong secret stopped the statement"

            # The issued key: the proxy closes once the database has taken the real one.
            assert _send_cancel(harness.port, pid, secret) == b""
            reply = client.read_until_ready()
            errors = [msg for msg in reply if isinstance(msg, m.ErrorResponse)]
            assert [e.sqlstate for e in errors] == ["57014"], reply
            assert client.query("SELECT pg_backend_pid()")[1].values == (str(pid).encode(),)
    finally:
        client.close()
