"""The session layer alone: microseconds per simple and per extended statement, no sockets.

A ready session is driven through the same short exchange many times — a one-row result
for ``Query``, and ``Parse/Bind/Describe/Execute/Sync`` with its answers for the extended
protocol — with an IO object that only counts bytes. What it measures is the per-message
work of framing, request tracking and hook dispatch, the part of the proxy's CPU per
transaction that the session layer owns. Run it with ``python -m bench.session_trace``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from appliance.config import Credential, Endpoint, Target
from appliance.pgwire import messages as m
from appliance.proxy.hooks import AddonManager, SessionInfo
from appliance.proxy.session import CancelRegistry, Session

DB = Endpoint.parse("127.0.0.1:5432")
AGENT = Endpoint.parse("127.0.0.1:40000")


class CountingIO:
    """A SessionIO that keeps nothing: the cost measured is the session's own."""

    def __init__(self) -> None:
        self.sent = 0

    def send_client(self, data: bytes | memoryview) -> None:
        self.sent += len(data)

    def send_server(self, data: bytes | memoryview) -> None:
        self.sent += len(data)

    def open_upstream(self, target: Target, endpoint: Endpoint) -> None:
        pass

    def start_upstream_tls(self, target: Target) -> None:
        raise AssertionError("the trace bench runs without TLS")

    def start_client_tls(self, context: Any) -> None:
        raise AssertionError("the trace bench runs without TLS")

    def pause_client(self) -> None:
        pass

    def resume_client(self) -> None:
        pass

    def wait(self, awaitable: Awaitable[Any], done: Callable[[Any, BaseException | None], None]) -> Callable[[], None]:
        raise AssertionError("nothing in the trace bench waits")

    def cancel_upstream(self, endpoint: Endpoint, process_id: int, secret_key: bytes) -> None:
        pass

    def close(self) -> None:
        raise AssertionError("the session closed during the trace bench")


def _frames(*messages: Any) -> bytes:
    return b"".join(message.encode() for message in messages)


def ready_session(addons: list[Any]) -> tuple[Session, CountingIO]:
    io = CountingIO()
    target = Target("bench", (DB,), {"app": Credential("app", "pw")}, tls="disable")  # type: ignore[arg-type]
    session = Session(io, SessionInfo(client=AGENT, destination=DB), target, AddonManager(addons),
                      CancelRegistry(), max_client_message=1 << 24, stream_threshold=1 << 20)
    session.client_data(m.StartupMessage(196608, {"user": "app", "database": "bench"}).encode())
    session.upstream_connected()
    session.server_data(_frames(m.AuthenticationOk(), m.ParameterStatus("server_version", "15.0"),
                                m.BackendKeyData(1, b"\0\0\0\1"), m.ReadyForQuery(b"I")))
    return session, io


SIMPLE_SQL = "SELECT abalance FROM pgbench_accounts WHERE aid = 4217;"
EXTENDED_SQL = "SELECT abalance FROM pgbench_accounts WHERE aid = $1"
ROW_DESCRIPTION = m.RowDescription((m.FieldDescription("abalance", 16400, 3, 23, 4, -1, 0),))
SIMPLE_CLIENT = m.Query(SIMPLE_SQL).encode()
SIMPLE_SERVER = _frames(ROW_DESCRIPTION, m.DataRow((b"-2387",)), m.CommandComplete("SELECT 1"),
                        m.ReadyForQuery(b"I"))
EXTENDED_CLIENT = _frames(m.Parse("", EXTENDED_SQL, ()), m.Bind("", "", (0,), (b"4217",), (0,)),
                          m.Describe(b"P", ""), m.Execute("", 0), m.Sync())
EXTENDED_SERVER = _frames(m.ParseComplete(), m.BindComplete(), ROW_DESCRIPTION, m.DataRow((b"-2387",)),
                          m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"I"))


def per_statement_us(client: bytes, server: bytes, addons: list[Any], statements: int, repeats: int) -> float:
    """The best of ``repeats`` runs of ``statements`` round trips, in µs per statement."""
    best = float("inf")
    for _ in range(repeats):
        session, _io = ready_session(addons)
        client_data, server_data = session.client_data, session.server_data
        start = time.perf_counter_ns()
        for _ in range(statements):
            client_data(client)
            server_data(server)
        best = min(best, (time.perf_counter_ns() - start) / statements / 1000)
    return best


def measure(statements: int = 20_000, repeats: int = 5) -> dict[str, float]:
    from appliance.masking.addon import MaskingAddon
    cases = {
        "simple": (SIMPLE_CLIENT, SIMPLE_SERVER, []),
        "extended": (EXTENDED_CLIENT, EXTENDED_SERVER, []),
        "simple+masking": (SIMPLE_CLIENT, SIMPLE_SERVER, [MaskingAddon("pci", None)]),
        "extended+masking": (EXTENDED_CLIENT, EXTENDED_SERVER, [MaskingAddon("pci", None)]),
    }
    return {name: round(per_statement_us(c, s, a, statements, repeats), 2) for name, (c, s, a) in cases.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.session_trace", description=__doc__.splitlines()[0])
    parser.add_argument("--statements", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    figures = measure(args.statements, args.repeats)
    if args.json:
        print(json.dumps(figures))
    else:
        for name, us in figures.items():
            print(f"{name:<18} {us:7.2f} µs/statement")
    return 0


if __name__ == "__main__":
    sys.exit(main())
