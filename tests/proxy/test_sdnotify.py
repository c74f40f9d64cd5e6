"""The notify protocol against a real AF_UNIX datagram socket standing in for systemd:
READY only after the listener answers and the ruleset is applied, STATUS, STOPPING, and a
watchdog that a wedged event loop stops feeding."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.composition import Assembly, serve
from appliance.config import Endpoint, normalize_address, parse_config
from appliance.proxy.agent_auth import TrustAuthenticator
from appliance.proxy.hooks import AddonManager
from appliance.proxy.sdnotify import Notifier, Watchdog
from tests.proxy.real_proxy import LoopbackIntercept, free_port

RECV_TIMEOUT = 30.0  # a safety net: a message that never comes fails the test, it is not a measure


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """The service manager's end: a bound datagram socket and its path."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(RECV_TIMEOUT)
    yield sock, path
    sock.close()


def fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().split("\n"))


def test_no_notify_socket_is_a_no_op() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.ready("x") is False
    assert notifier.watchdog_interval is None


def test_messages_reach_the_socket(manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.ready("ready: two\nlines")
    assert fields(sock.recv(4096)) == {"READY": "1", "STATUS": "ready: two lines"}
    assert notifier.stopping()
    assert fields(sock.recv(4096)) == {"STOPPING": "1", "STATUS": "shutting down"}
    notifier.close()


def test_abstract_socket_name() -> None:
    name = f"tollgate-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(RECV_TIMEOUT)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.status("hello")
        assert fields(sock.recv(4096)) == {"STATUS": "hello"}
        notifier.close()


def test_a_vanished_manager_does_not_raise(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody")})
    assert notifier.ready("x") is False  # logged once, never raised


@pytest.mark.parametrize("env, interval", [
    ({"WATCHDOG_USEC": "4000000"}, 2.0),
    ({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}, 2.0),
    ({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}, None),  # another process's
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
])
def test_watchdog_interval(env: dict[str, str], interval: float | None) -> None:
    assert Notifier(env).watchdog_interval == interval


def test_a_wedged_loop_stops_feeding_the_watchdog(manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    notifier = Notifier({"NOTIFY_SOCKET": path})
    count = iter(range(1000))
    seen_during_wedge: list[bytes] = []

    async def main() -> None:
        watchdog = Watchdog(notifier, 0.01, lambda: f"{next(count) // 1000} sessions")
        watchdog.start()
        first = fields(await asyncio.to_thread(sock.recv, 4096))
        assert first == {"WATCHDOG": "1", "STATUS": "0 sessions"}
        assert fields(await asyncio.to_thread(sock.recv, 4096)) == {"WATCHDOG": "1"}  # unchanged: no STATUS
        # Wedge the loop: this callback blocks it while it waits for keep-alives. Whatever
        # was sent before is drained first; during the wedge none may arrive, however
        # many intervals pass (the window is 50 intervals).
        sock.setblocking(False)
        while True:
            try:
                sock.recv(4096)
            except BlockingIOError:
                break
        sock.settimeout(0.5)
        with contextlib.suppress(TimeoutError):
            seen_during_wedge.append(sock.recv(4096))
        sock.settimeout(RECV_TIMEOUT)
        # Unwedged: keep-alives resume.
        assert fields(await asyncio.to_thread(sock.recv, 4096))["WATCHDOG"] == "1"
        watchdog.stop()

    asyncio.run(main())
    notifier.close()
    assert seen_during_wedge == []


class RecordingIntercept(LoopbackIntercept):
    def __init__(self, destination: Endpoint) -> None:
        super().__init__(destination)
        self.applied = threading.Event()

    def setup(self, config) -> None:  # type: ignore[no-untyped-def]
        self.applied.set()


def test_serve_reports_ready_after_listening_and_the_ruleset(tmp_path: Path,
                                                             manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    port = free_port()
    config = parse_config(f"""
[proxy]
listen_port = {port}
listen_addresses = ["127.0.0.1"]
agent_auth = "trust"
[intercept]
method = "redirect"
agent_subnets = ["127.0.0.0/8"]
[[targets]]
name = "db"
addresses = ["127.0.0.1:1"]
[masking]
enabled = false
""", tmp_path / "tollgate.toml")
    intercept = RecordingIntercept(Endpoint(normalize_address(ipaddress.ip_address("127.0.0.1")), 1))
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "60000000"})
    observed: dict[str, object] = {}

    def service_manager() -> None:
        while True:
            message = fields(sock.recv(4096))
            observed.setdefault("statuses", []).append(message.get("STATUS"))  # type: ignore[union-attr]
            if message.get("READY") == "1":
                observed["ready"] = message
                observed["applied"] = intercept.applied.is_set()
                with socket.create_connection(("127.0.0.1", port), timeout=RECV_TIMEOUT):
                    observed["listening"] = True
                os.kill(os.getpid(), signal.SIGTERM)
            if message.get("STOPPING") == "1":
                observed["stopping"] = True
                return

    thread = threading.Thread(target=service_manager, daemon=True)
    thread.start()
    assembly = Assembly(AddonManager(), TrustAuthenticator())
    assert asyncio.run(serve(config, intercept, assembly, intercept=True, notifier=notifier)) == 0
    thread.join(RECV_TIMEOUT)
    assert observed["applied"] is True and observed["listening"] is True
    assert observed["ready"]["STATUS"].startswith("ready: port")  # type: ignore[index]
    assert "applying the intercept ruleset" in observed["statuses"]  # type: ignore[operator]
    assert observed.get("stopping") is True
