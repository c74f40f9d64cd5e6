"""The session layer alone: microseconds per simple and per extended statement, no sockets.

A ready session is driven through the same short exchange many times — a one-row result
for ``Query``, and ``Parse/Bind/Describe/Execute/Sync`` with its answers for the extended
protocol — with an IO object that only counts bytes. What it measures is the per-message
work of framing, request tracking and hook dispatch, the part of the proxy's CPU per
transaction that the session layer owns. Run it with ``python -m bench.session_trace``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
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
    """The best of ``repeats`` runs of ``statements`` round trips, in CPU µs per statement
    (the process's CPU time, so that other work on a shared machine counts less)."""
    best = float("inf")
    for _ in range(repeats):
        session, _io = ready_session(addons)
        client_data, server_data = session.client_data, session.server_data
        start = time.process_time_ns()
        for _ in range(statements):
            client_data(client)
            server_data(server)
        best = min(best, (time.process_time_ns() - start) / statements / 1000)
    return best


@contextlib.contextmanager
def audit_addon() -> Iterator[Any]:
    """The audit addon as shipped (sampling result rows, scrubbing with the PAN scanner)
    over a real log on /var/tmp with ``durability = "write"``: every record encoded,
    hashed and written, none waited for (the trace can't wait; the sync is the disk's)."""
    from appliance import __version__
    from appliance.audit.addon import SamplingAuditAddon
    from appliance.audit.keys import init_audit_dir
    from appliance.audit.store import AuditLog
    from appliance.config import load_config
    from appliance.pan.scanner import scrub

    workdir = Path(tempfile.mkdtemp(prefix="tollgate-trace-audit-", dir="/var/tmp"))
    try:
        config_path = workdir / "tollgate.toml"
        config_path.write_text(f'[proxy]\n[intercept]\n[audit]\ndir = "{workdir / "audit"}"\n'
                               'origin = "tollgate.bench/trace"\ndurability = "write"\n')
        config = load_config(config_path)
        assert config.audit is not None
        init_audit_dir(config.audit)
        audit_log = AuditLog.open(config.audit, version=__version__)
        audit_log.start()
        try:
            yield SamplingAuditAddon(audit_log, lambda text: scrub(text, "pci"))
        finally:
            audit_log.close("trace bench")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def measure(statements: int = 20_000, repeats: int = 5, audit: bool = True) -> dict[str, float]:
    from appliance.masking.addon import MaskingAddon
    cases = {
        "simple": (SIMPLE_CLIENT, SIMPLE_SERVER, []),
        "extended": (EXTENDED_CLIENT, EXTENDED_SERVER, []),
        "simple+masking": (SIMPLE_CLIENT, SIMPLE_SERVER, [MaskingAddon("pci", None)]),
        "extended+masking": (EXTENDED_CLIENT, EXTENDED_SERVER, [MaskingAddon("pci", None)]),
    }
    out = {name: round(per_statement_us(c, s, a, statements, repeats), 2) for name, (c, s, a) in cases.items()}
    if audit:
        with audit_addon() as addon:
            for name, (client, server) in (("simple+masking+audit", (SIMPLE_CLIENT, SIMPLE_SERVER)),
                                           ("extended+masking+audit", (EXTENDED_CLIENT, EXTENDED_SERVER))):
                addons = [MaskingAddon("pci", None), addon]
                out[name] = round(per_statement_us(client, server, addons, statements, repeats), 2)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.session_trace", description=__doc__.splitlines()[0])
    parser.add_argument("--statements", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--no-audit", action="store_true", help="leave out the cases with the audit addon")
    args = parser.parse_args(argv)
    figures = measure(args.statements, args.repeats, audit=not args.no_audit)
    if args.json:
        print(json.dumps(figures))
    else:
        for name, us in figures.items():
            print(f"{name:<24} {us:7.2f} µs/statement")
    return 0


if __name__ == "__main__":
    sys.exit(main())
