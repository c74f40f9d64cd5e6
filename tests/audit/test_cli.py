"""``tollgate audit …``, ``tollgate replay``: through ``appliance.cli.main`` with a temporary config."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from appliance.audit.cli import UsageError, parse_when
from appliance.audit.keys import KeyRing
from appliance.audit.reader import AuditReader
from appliance.audit.store import AuditLog
from appliance.cli import main
from appliance.config import load_config
from tests.audit.records import session_records

ORIGIN = "tollgate.test/cli"


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    path = tmp_path / "tollgate.toml"
    path.write_text(f'[audit]\ndir = "audit"\norigin = "{ORIGIN}"\n')
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def populate(config_path: Path) -> None:
    audit = load_config(config_path).audit
    assert audit is not None
    log = AuditLog.open(audit, version="t")
    for sid, n in (("A", 3), ("B", 5)):
        for record in session_records(sid, n, approval="apr-1" if sid == "B" else None):
            log.append(record)
    log.append({"type": "approval.decision", "user": "dba-1", "outcome": "success", "origin": "10.0.0.1:443",
                "object": "payments/cards", "approval": "apr-1", "decision": "deny", "approver": "dba-1",
                "reason": "not today"})
    log.close()


def test_init_status_export_verify(capsys: pytest.CaptureFixture[str], config_path: Path, tmp_path: Path) -> None:
    code, out, _ = run(capsys, "audit", "init", "-c", str(config_path))
    assert code == 0
    root_pub = (tmp_path / "audit" / "keys" / "root.pub").read_text().strip()
    assert root_pub in out and "move it off this box" in out
    code, _, err = run(capsys, "audit", "init", "-c", str(config_path))
    assert code == 1 and "already exists" in err

    populate(config_path)
    code, out, _ = run(capsys, "audit", "status", "-c", str(config_path))
    assert code == 0
    size = AuditReader(tmp_path / "audit").size()
    assert f"size        {size} records" in out and "writer      none" in out
    assert "warning     the root private key is on this box" in out
    code, out, _ = run(capsys, "audit", "status", "-c", str(config_path), "--json")
    assert json.loads(out)["size"] == size

    bundle = tmp_path / "out.tar.gz"
    code, out, err = run(capsys, "audit", "export", "-c", str(config_path), "--session", "B", "-o", str(bundle),
                         "--progress")
    assert code == 0, err
    assert "wrote" in out and "left out" in out and "via direct" in out
    assert "\r[" in err and "records" in err and err.endswith("\n")  # the bar, then a newline

    code, out, err = run(capsys, "audit", "verify", str(bundle), "-c", str(config_path))
    assert code == 0, out + err
    assert "Bundle verified" in out and "should pin their own copy" in err
    records = [json.loads(e.line) for e in AuditReader(tmp_path / "audit").records()]
    assert [r["action"] for r in records if r["type"] == "admin"] == ["audit.export", "audit.verify"]

    pinned = tmp_path / "pinned-root.pub"
    pinned.write_text(root_pub + "\n")
    code, out, _ = run(capsys, "audit", "verify", str(bundle), "--root-key", str(pinned))
    assert code == 0 and "Bundle verified" in out
    code, out, _ = run(capsys, "audit", "verify", str(bundle), "--root-key",
                       KeyRing.load(load_config(config_path).audit).signing_key.verifier_key())  # type: ignore[arg-type]
    assert code != 0  # not the root key: the trust file does not verify


def test_export_time_range_and_bad_times(capsys: pytest.CaptureFixture[str], config_path: Path,
                                         tmp_path: Path) -> None:
    assert run(capsys, "audit", "init", "-c", str(config_path))[0] == 0
    populate(config_path)
    today = datetime.now(UTC).date().isoformat()
    bundle = tmp_path / "today.tar.gz"
    code, out, err = run(capsys, "audit", "export", "-c", str(config_path), "--from", today, "--to", today,
                         "-o", str(bundle), "--no-progress")
    assert code == 0, err
    assert err == "" and "(0 left out" in out
    code, _, err = run(capsys, "audit", "export", "-c", str(config_path), "--from", "yesterday", "-o", str(bundle))
    assert code == 2 and "not an ISO 8601" in err


def test_rotate_key(capsys: pytest.CaptureFixture[str], config_path: Path, tmp_path: Path) -> None:
    assert run(capsys, "audit", "init", "-c", str(config_path))[0] == 0
    keys = tmp_path / "audit" / "keys"
    before = (keys / "current").read_text().strip()
    code, out, err = run(capsys, "audit", "rotate-key", "-c", str(config_path))
    assert code == 0, err
    after = (keys / "current").read_text().strip()
    assert after != before and f"now {after}" in out

    offline = tmp_path / "root.pem"
    os.rename(keys / "root.key", offline)
    code, _, err = run(capsys, "audit", "rotate-key", "-c", str(config_path))
    assert code == 1 and "give --root-key FILE" in err
    assert (keys / "current").read_text().strip() == after
    code, _, err = run(capsys, "audit", "rotate-key", "-c", str(config_path), "--root-key", str(offline))
    assert code == 0, err
    rotations = [json.loads(e.line) for e in AuditReader(tmp_path / "audit").records()
                 if b'"type":"key.rotate"' in e.line]
    assert len(rotations) == 2 and rotations[0]["key"] == after and rotations[0]["origin"] == f"cli:{os.getuid()}"


def test_sessions_and_replay(capsys: pytest.CaptureFixture[str], config_path: Path) -> None:
    assert run(capsys, "audit", "init", "-c", str(config_path))[0] == 0
    populate(config_path)
    code, out, _ = run(capsys, "audit", "sessions", "-c", str(config_path))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("SESSION") and [line.split()[0] for line in lines[1:]] == ["A", "B"]
    assert lines[2].split()[-3:] == ["5", "0", "0"] and "agent-B" in lines[2]
    code, out, _ = run(capsys, "audit", "sessions", "-c", str(config_path), "--limit", "1")
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["B"]
    code, out, _ = run(capsys, "audit", "sessions", "-c", str(config_path), "--user", "agent-A", "--json")
    assert [s["session"] for s in json.loads(out)] == ["A"]
    code, out, _ = run(capsys, "audit", "sessions", "-c", str(config_path), "--since", "2001-01-01T00:00:00+02:00")
    assert code == 0 and len(out.splitlines()) == 3
    code, out, _ = run(capsys, "audit", "sessions", "-c", str(config_path), "--since", "0s")
    assert out.strip() == "no sessions recorded in that range"

    code, top, _ = run(capsys, "sessions", "-c", str(config_path))  # `tollgate sessions`: the recorded ones
    assert code == 0 and top == run(capsys, "audit", "sessions", "-c", str(config_path))[1]
    code, _, err = run(capsys, "sessions", "-c", str(config_path), "--live")  # the proxy's, over its socket
    assert code == 2 and "control_socket" in err

    code, out, _ = run(capsys, "replay", "B", "-c", str(config_path))
    assert code == 0
    assert "session B started" in out and "#5 query  ALLOW" in out and "SELECT 5" in out
    assert "approval apr-1 requested by agent-B" in out
    assert "approval apr-1: DENY by dba-1 — not today" in out  # decided with no session field: still shown
    assert "session ended: client closed — 5 statements, 0 values masked, 5ms" in out
    assert out.index("session ended") < out.index("DENY by dba-1")  # in log order
    assert "session A" not in out
    code, _, err = run(capsys, "replay", "nope", "-c", str(config_path))
    assert code == 2 and "no records of session 'nope'" in err


def test_config_without_audit(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "bare.toml"
    path.write_text("")
    code, _, err = run(capsys, "audit", "status", "-c", str(path))
    assert code == 2 and "has no [audit] section" in err


def test_parse_when() -> None:
    assert parse_when("2024-05-01") == datetime(2024, 5, 1, tzinfo=UTC)
    assert parse_when("2024-05-01", end=True) == datetime(2024, 5, 1, 23, 59, 59, 999999, tzinfo=UTC)
    assert parse_when("2024-05-01T12:30:00Z") == datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
    assert parse_when("2024-05-01T12:30:00+02:00") == datetime(2024, 5, 1, 10, 30, tzinfo=UTC)
    assert parse_when("2024-05-01T12:30") == datetime(2024, 5, 1, 12, 30, tzinfo=UTC)  # naive = UTC
    now = datetime(2024, 5, 2, tzinfo=UTC)
    assert parse_when("12h", now=now) == datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert parse_when("7d", now=now) == datetime(2024, 4, 25, tzinfo=UTC)
    for bad in ("tomorrow", "2024-13-01", "12x"):
        with pytest.raises(UsageError):
            parse_when(bad)
