"""``/metrics``: counted from the records a real audit log appends, served over HTTP,
scraped and read back with prometheus-client's own text parser."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance.audit.store import AuditLog
from appliance.composition import build
from appliance.config import ConfigError, load_config
from appliance.metrics import Metrics, serve_metrics
from tests.audit.records import make_config, session_records, statement


def scrape(server: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``/metrics``, by name and labels."""
    host, port = server.server_address[:2]
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def served() -> Iterator[tuple[Metrics, Any]]:
    metrics = Metrics()
    server = serve_metrics(metrics, "127.0.0.1:0")
    yield metrics, server
    server.shutdown()


def admin(action: str, **extra: str) -> dict[str, Any]:
    return {"type": "admin", "action": action, "user": "ops", "origin": "local", "object": "x",
            "outcome": "success", **extra}


def test_records_of_a_real_log_are_counted_and_scraped(tmp_path: Path, served: tuple[Metrics, Any]) -> None:
    metrics, server = served
    log = AuditLog.open(make_config(tmp_path), version="t")
    log.observe(metrics)
    try:
        for record in session_records("A", 3):  # start, 3 statements (allow) with results, end
            log.append(record)
        log.append(statement(9, decision="block", outcome="failure", sqlstate="42501", message="refused"))
        log.append(statement(10, decision="hold"))
        log.append({"type": "result", "user": "a", "outcome": "success", "origin": "o", "object": "p",
                    "session": "A", "stmt": 3, "rows": 5, "masked": 7})
        for approval in ("apr-1", "apr-2", "apr-3"):
            log.append({"type": "approval.request", "user": "a", "outcome": "success", "origin": "o",
                        "object": "p", "approval": approval})
        log.append({"type": "approval.decision", "user": "a", "outcome": "failure", "origin": "o", "object": "p",
                    "approval": "apr-1", "decision": "deny"})
        log.append({"type": "auth.failure", "user": "unknown", "outcome": "failure", "origin": "o", "object": "p",
                    "reason": "bad certificate"})
        log.append({"type": "session.end", "user": "a", "outcome": "success", "origin": "o", "object": "p",
                    "session": "B", "reason": "Tollgate failed closed: RuntimeError: boom"})
        log.append(admin("certificate.issue"))
        log.append(admin("identity.revoke", serials="AA,BB"))
        log.append({"type": "flow.unmatched", "user": "unknown", "outcome": "failure", "origin": "o",
                    "object": "flow:x"})
        log.append_durable(admin("audit.export"))  # made durable here: one fdatasync, a group commit
        samples = scrape(server)
    finally:
        log.close()

    assert samples[("tollgate_sessions_total", ())] == 1
    assert samples[("tollgate_sessions_open", ())] == 0  # A ended; B's end came without its start here
    assert samples[("tollgate_statements_total", (("decision", "allow"),))] == 3
    assert samples[("tollgate_statements_total", (("decision", "block"),))] == 1
    assert samples[("tollgate_statements_total", (("decision", "hold"),))] == 1
    assert samples[("tollgate_masked_values_total", ())] >= 7
    assert samples[("tollgate_holds_total", ())] == 3
    assert samples[("tollgate_hold_decisions_total", (("decision", "deny"),))] == 1
    assert samples[("tollgate_holds_pending", ())] == 2
    assert samples[("tollgate_holds_oldest_age_seconds", ())] >= 0
    assert samples[("tollgate_failures_total", (("kind", "authentication"),))] == 1
    assert samples[("tollgate_failures_total", (("kind", "fail_closed"),))] == 1
    assert samples[("tollgate_failures_total", (("kind", "flow_unmatched"),))] == 1
    assert samples[("tollgate_certificates_total", (("event", "issued"),))] == 1
    assert samples[("tollgate_certificates_total", (("event", "revoked"),))] == 2
    assert samples[("tollgate_admin_actions_total", (("action", "audit.export"),))] == 1
    # log.start and key.generate of the open came before observe(): every record after is counted
    appended = samples[("tollgate_audit_records_total", ())]
    assert appended == samples[("tollgate_audit_append_seconds_count", ())] == len(list(session_records("A", 3))) + 13
    assert samples[("tollgate_audit_fsync_seconds_count", ())] >= 1
    assert samples[("tollgate_audit_group_commit_records_count", ())] >= 1
    assert samples[("tollgate_audit_group_commit_records_sum", ())] >= 1


def test_holds_pending_empty_is_zero(served: tuple[Metrics, Any]) -> None:
    metrics, server = served
    metrics.recorded({"type": "approval.request", "approval": "a"})
    metrics.recorded({"type": "approval.decision", "approval": "a", "decision": "timeout"})
    samples = scrape(server)
    assert samples[("tollgate_holds_pending", ())] == 0 and samples[("tollgate_holds_oldest_age_seconds", ())] == 0
    assert samples[("tollgate_hold_decisions_total", (("decision", "timeout"),))] == 1


def write_config(tmp_path: Path, metrics: str) -> Path:
    make_config(tmp_path)
    path = tmp_path / "tollgate.toml"
    path.write_text(f'[audit]\ndir = "audit"\norigin = "tollgate.test/audit"\n\n[flows]\nmode = "off"\n\n'
                    f'[masking]\nenabled = true\n\n[metrics]\n{metrics}\n')
    return path


def test_the_composition_root_has_the_proxys_log_counted(tmp_path: Path) -> None:
    assembly = build(load_config(write_config(tmp_path, 'listen = "127.0.0.1:0"')))
    assert assembly.metrics is not None and assembly.audit is not None

    async def run() -> None:
        await assembly.addons.open()
        try:
            assembly.audit.policy_reloaded("/etc/policy.toml", None, 1, "bad rule")
        finally:
            await assembly.addons.close()

    asyncio.run(run())
    registry = assembly.metrics.registry
    assert registry.get_sample_value("tollgate_policy_reloads_total", {"outcome": "failure"}) == 1
    assert registry.get_sample_value("tollgate_failures_total", {"kind": "policy_reload"}) == 1


@pytest.mark.parametrize("listen", ['listen = "9464"', 'listen = "host:port"', 'listen = ":0"', 'other = 1'])
def test_a_bad_metrics_section_is_refused(tmp_path: Path, listen: str) -> None:
    with pytest.raises(ConfigError, match="metrics"):
        load_config(write_config(tmp_path, listen))
