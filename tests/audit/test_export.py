"""``export``: whole logs, sessions and time ranges make bundles the verifier accepts; the
export is recorded; with the proxy running it goes through the control socket."""

from __future__ import annotations

import json
import re
import tarfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from appliance.audit.export import ExportError, export
from appliance.audit.keys import init_audit_dir
from appliance.audit.reader import AuditReader
from appliance.audit.store import AuditLog
from appliance.audit.store_errors import AuditError
from appliance.audit.verifier import verify_bundle
from appliance.config import Config, load_config
from tests.audit.records import session_records
from tests.audit.running import running_proxy

ORIGIN = "tollgate.test/export"


def write_config(tmp_path: Path, control: bool = False) -> Config:
    text = f'[audit]\ndir = "audit"\norigin = "{ORIGIN}"\ncheckpoint_records = 40\nsegment_bytes = 8192\n'
    if control:
        text = f'[proxy]\ncontrol_socket = "{tmp_path / "control.sock"}"\n' + text
    path = tmp_path / "tollgate.toml"
    path.write_text(text)
    config = load_config(path)
    assert config.audit is not None
    init_audit_dir(config.audit)
    return config


def fill(config: Config) -> None:
    """Three interleaved sessions; an approval decided after its session ended (no session field)."""
    assert config.audit is not None
    log = AuditLog.open(config.audit, version="t")
    streams = [session_records("A", 30), session_records("B", 30, approval="apr-B1"), session_records("C", 30)]
    live = list(streams)
    while live:
        for stream in list(live):
            record = next(stream, None)
            if record is None:
                live.remove(stream)
            else:
                log.append(record)
    log.append({"type": "approval.decision", "user": "dba-1", "outcome": "success", "origin": "10.0.0.1:443",
                "object": "payments/cards", "approval": "apr-B1", "decision": "approve", "approver": "dba-1",
                "reason": "ok"})
    log.close()


def root_key(config: Config) -> str:
    assert config.audit is not None
    return (config.audit.keys_dir / "root.pub").read_text().strip()


def bundle_records(path: Path) -> list[dict[str, Any]]:
    out = []
    with tarfile.open(path) as tar:
        for member in sorted(tar.getnames()):
            if member.startswith("records/") and member.endswith(".jsonl"):
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                out += [json.loads(line) for line in data.splitlines()]
    return out


def last_admin(config: Config) -> dict[str, Any]:
    assert config.audit is not None
    records = [json.loads(e.line) for e in AuditReader(config.audit.dir).records()]
    return [r for r in records if r["type"] == "admin"][-1]


def test_whole_log(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    fill(config)
    out = tmp_path / "all.tar.gz"
    seen: list[tuple[int, int]] = []
    summary = export(config, out, progress=lambda done, total: seen.append((done, total)))
    assert summary.left_out == 0 and summary.records == summary.log_size > 190
    assert seen[-1] == (summary.log_size, summary.log_size)
    report = verify_bundle(out, root_key(config))
    assert report.ok, report.failures
    assert report.records_valid == summary.records
    admin = last_admin(config)
    assert admin["action"] == "audit.export" and admin["outcome"] == "success"
    assert admin["object"] == "audit-log" and admin["origin"].startswith("cli:")
    assert admin["out"] == str(out) and admin["records"] == summary.records and admin["sha256"] == summary.sha256
    assert admin["seq"] == summary.admin_seq >= summary.log_size  # after what it exported


def test_one_session_with_its_late_approval(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    fill(config)
    out = tmp_path / "b.tar.gz"
    summary = export(config, out, session="B")
    records = bundle_records(out)
    assert {r["type"] for r in records} >= {"session.start", "statement", "result", "approval.request",
                                            "approval.decision", "session.end"}
    assert all(r.get("session") == "B" for r in records if r["type"] != "approval.decision")
    assert [r["approval"] for r in records if r["type"] == "approval.decision"] == ["apr-B1"]
    assert summary.records == len(records) == 1 + 60 + 1 + 1 + 1
    assert summary.left_out == summary.log_size - summary.records
    report = verify_bundle(out, root_key(config))
    assert report.ok, report.failures
    assert report.left_out == summary.left_out
    assert last_admin(config)["session"] == "B"


def test_time_range(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    fill(config)
    assert config.audit is not None
    times = [json.loads(e.line)["time"] for e in AuditReader(config.audit.dir).records()]
    lo, hi = times[60], times[120]
    frm = datetime.fromisoformat(lo)
    to = datetime.fromisoformat(hi)
    out = tmp_path / "range.tar.gz"
    summary = export(config, out, frm, to)
    records = bundle_records(out)
    assert records and all(lo <= r["time"] <= hi for r in records)
    assert summary.records == sum(1 for t in times if lo <= t <= hi)
    report = verify_bundle(out, root_key(config))
    assert report.ok, report.failures

    empty = tmp_path / "none.tar.gz"  # nothing selected: still a bundle that verifies
    summary = export(config, empty, datetime(2001, 1, 1, tzinfo=UTC), datetime(2001, 1, 2, tzinfo=UTC))
    assert summary.records == 0 and summary.checkpoints == 1
    assert verify_bundle(empty, root_key(config)).ok

    with pytest.raises(ExportError, match="is before"):
        export(config, tmp_path / "x.tar.gz", to, to - timedelta(seconds=1))


def test_through_a_running_proxy(tmp_path: Path) -> None:
    """The proxy holds the log: export asks it for a checkpoint and records through it."""
    config = write_config(tmp_path, control=True)
    fill(config)
    with running_proxy(config) as log:
        size_before = log.size
        out = tmp_path / "live.tar.gz"
        summary = export(config, out, session="A")
        assert summary.via == "proxy"
        assert summary.log_size >= size_before  # the proxy's fresh checkpoint
        assert log.size == summary.admin_seq + 1  # appended by the proxy, the writer
        assert verify_bundle(out, root_key(config)).ok
    admin = last_admin(config)
    assert admin["action"] == "audit.export" and admin["session"] == "A"


def _damaged_log(config: Config) -> tuple[int, int]:
    """A log whose live segment was cut under the writer, into what its last checkpoint
    covers: (records left whole on disk, the last checkpoint's size)."""
    assert config.audit is not None
    log = AuditLog.open(config.audit, version="t")
    try:
        for n, record in enumerate(session_records("A", 60)):
            log.append(record)
            if n % 10 == 9:
                log.checkpoint_now()
        signed = log.checkpoint_now()["size"]
        start, path = AuditReader(config.audit.dir).segments()[-1]
        lines = path.read_bytes().splitlines(keepends=True)
        keep = len(lines) // 2
        path.write_bytes(b"".join(lines[:keep]))  # opened anew, cut: the writer's file, shorter
        with pytest.raises(AuditError, match="was cut to"):
            log.checkpoint_now()
    finally:
        log.close()
    return start + keep, signed


def test_a_damaged_log_exports_up_to_the_damage_and_names_it(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    assert config.audit is not None
    whole, signed = _damaged_log(config)
    assert AuditReader(config.audit.dir).last_checkpoint()["size"] == signed  # nothing signed after
    out = tmp_path / "before.tar.gz"
    summary = export(config, out, session="A")
    assert summary.via == "read-only" and summary.admin_seq is None
    sound = max(c["size"] for c in AuditReader(config.audit.dir).checkpoints() if c["size"] <= whole)
    assert summary.log_size == sound < signed
    assert summary.damaged is not None
    assert re.search(r"segments/\d{12}\.jsonl was cut to \d+ bytes while it was being written .*"
                     rf"\(recorded as seq \d+, .*\); the bundle ends at the last checkpoint the records on disk "
                     rf"still match \(size {sound}\): records from seq {sound} on are not in it$", summary.damaged)
    assert summary.warnings[0] == f"the audit log is damaged: {summary.damaged}"
    assert any("could not be recorded" in w for w in summary.warnings)
    report = verify_bundle(out, root_key(config))
    assert report.ok, [str(f) for f in report.failures]
    assert report.log_size == sound and report.records_total > 0


def test_a_running_proxy_with_a_cut_segment_refuses_to_sign_and_export_stops_before(tmp_path: Path) -> None:
    # The case: the live segment cut under the running proxy. It signs nothing over
    # the cut; export through its control socket falls back to what the disk still proves.
    config = write_config(tmp_path, control=True)
    fill(config)
    assert config.audit is not None
    with running_proxy(config) as log:
        signed = AuditReader(config.audit.dir).last_checkpoint()["size"]
        _start, path = AuditReader(config.audit.dir).segments()[-1]
        data = path.read_bytes()
        path.write_bytes(data[:data.rstrip(b"\n").rfind(b"\n") + 1])  # its last record gone
        out = tmp_path / "cut.tar.gz"
        summary = export(config, out)
        assert summary.via == "proxy" and summary.admin_seq is None
        assert "the proxy refused audit.append" in summary.warnings[-1]
        assert log.status()["failure"]["error"] in (summary.damaged or "")
        assert summary.log_size <= signed - 1
    assert AuditReader(config.audit.dir).last_checkpoint()["size"] == signed
    report = verify_bundle(out, root_key(config))
    assert report.ok, [str(f) for f in report.failures]
