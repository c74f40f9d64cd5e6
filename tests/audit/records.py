"""Audit directories to write to, and records to write: statements and whole sessions.

For the tests of the writer, the reader, export and the CLI (the bundle and verifier tests
use :mod:`tests.audit.synthetic_log` instead: a log made without the writer).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from appliance.audit.keys import init_audit_dir
from appliance.config import AuditConfig

ORIGIN = "tollgate.test/audit"


def make_config(tmp_path: Path, **overrides: Any) -> AuditConfig:
    """An initialised audit directory under ``tmp_path``; quiet cadence unless overridden."""
    settings: dict[str, Any] = {"origin": ORIGIN, "checkpoint_records": 1_000_000, "checkpoint_seconds": 3600.0,
                                "heartbeat_seconds": 3600.0}
    settings.update(overrides)
    config = AuditConfig(tmp_path / "audit", **settings)
    init_audit_dir(config)
    return config


def statement(i: int, session: str = "s-1", **extra: Any) -> dict[str, Any]:
    return {"type": "statement", "user": "agent@example.com", "outcome": "success", "origin": "10.0.0.7:40000",
            "object": "payments/cards", "session": session, "stmt": i, "kind": "query",
            "text": f"SELECT * FROM cards WHERE id = {i}", "decision": "allow", "classes": [], **extra}


def session_records(sid: str, n: int, approval: str | None = None) -> Iterator[dict[str, Any]]:
    base = {"user": f"agent-{sid}", "origin": "10.0.0.9:5555", "object": "payments/cards", "session": sid}
    yield {"type": "session.start", "outcome": "success", **base, "groups": ["agents"], "target": "payments",
           "database": "cards", "db_user": "app", "client_tls": "TLSv1.3", "upstream_tls": "TLSv1.3"}
    for i in range(1, n + 1):
        extra = {"approval": approval} if approval and i == 2 else {}
        yield {"type": "statement", "outcome": "success", **base, "stmt": i, "kind": "query",
               "text": f"SELECT {i}", "decision": "allow", "classes": [], **extra}
        yield {"type": "result", "outcome": "success", **base, "stmt": i, "tag": "SELECT 1", "rows": 1,
               "masked": 0, "duration_us": 120}
    if approval:
        yield {"type": "approval.request", "outcome": "success", **base, "approval": approval, "stmt": 2,
               "requester": f"agent-{sid}", "target": "payments", "sql": "SELECT 2", "classes": ["pan"],
               "rule": "hold-pan", "approvers": ["dba"], "min_approvals": 1}
    yield {"type": "session.end", "outcome": "success", **base, "reason": "client closed", "statements": n,
           "masked": 0, "duration_us": 5000}
