"""The audit log end to end: what the lab's appliance records, exports and proves.

The agent works through Tollgate as usual; the records are read back from the appliance's
audit directory, exported as a bundle with ``tollgate audit export`` and verified with the
standalone ``tollgate-verify`` against the root key pinned from the lab (as an auditor
would pin it out of band).
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from appliance.lab import Lab
from tests.e2e.conftest import proxy_request, psql, python, run, wait_for

pytestmark = pytest.mark.lab

PAN = "4111111111111111"
PAN_MASKED = "411111******1111"


def records(lab: Lab) -> list[dict[str, Any]]:
    """Every record in the appliance's audit log, in order (the live segment included)."""
    out = []
    for segment in sorted((lab.audit_dir / "segments").glob("*.jsonl")):
        out.extend(json.loads(line) for line in segment.read_bytes().split(b"\n") if line)
    return out


def tollgate(lab: Lab, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    return run(lab, "gw", [sys.executable, "-m", "appliance.cli", *args], check=check)


def audit_records_for(lab: Lab, marker: str) -> list[dict[str, Any]]:
    """The records of the session whose statements carry ``marker``."""
    every = records(lab)
    sessions = {r["session"] for r in every if r.get("type") == "statement"
                and (marker in r.get("text", "") or marker in (r.get("params") or []))}
    return [r for r in every if r.get("session") in sessions]


def test_a_session_leaves_a_complete_record_of_who_did_what(lab: Lab):
    marker = f"tg-{secrets.token_hex(4)}"
    psql(lab, f"SELECT '{marker}' AS marker, pan FROM cards ORDER BY id LIMIT 3")
    failed = run(lab, "agent", ["psql", "-X", "-v", "ON_ERROR_STOP=1", lab.conninfo(), "-c",
                                f"SELECT '{marker}'", "-c", "TRUNCATE cards"], check=False)
    assert failed.returncode != 0
    mine = wait_for(lambda: [r for r in audit_records_for(lab, marker) if r["type"] == "session.end"] and
                    audit_records_for(lab, marker), "both sessions' records, to their ends")
    for record in mine:  # PCI DSS 10.2.2: in every record
        for field in ("user", "type", "time", "outcome", "origin", "object"):
            assert isinstance(record.get(field), str) and record[field], (field, record)
    starts = [r for r in mine if r["type"] == "session.start"]
    assert len(starts) == 2
    start = starts[0]
    assert start["user"] == "lab-agent" and "payments-agents" in start["groups"]
    assert start["identity_source"] == "certificate" and start["cert_serial"]
    assert start["client_tls"].startswith("TLS") and start["target"] == "payments"
    assert start["origin"].startswith("198.18.")
    auth = [r for r in mine if r["type"] == "auth.success"]
    assert len(auth) == 2

    select = next(r for r in mine if r["type"] == "statement" and "pan FROM cards" in r["text"])
    assert select["decision"] in ("allow", "mask") and select["rule"] == "agents-read-and-work-with-masked-data"
    assert "read" in select["classes"] and select["outcome"] == "success"
    result = next(r for r in mine if r["type"] == "result" and r["session"] == select["session"]
                  and r["stmt"] == select["stmt"])
    assert result["rows"] == 3 and result["tag"] == "SELECT 3" and result["masked"] >= 3
    assert result["sample"]["columns"] == ["marker", "pan"]
    assert all(row[0] == marker and "*" in row[1] for row in result["sample"]["rows"])  # masked as sent

    truncate = next(r for r in mine if r["type"] == "statement" and r["text"] == "TRUNCATE cards")
    assert truncate["decision"] == "block" and truncate["outcome"] == "failure"
    assert truncate["sqlstate"] == "42501" and truncate["rule"] == "no-destructive-ddl-on-cardholder-data"
    assert not [r for r in mine if r["type"] == "result" and r["stmt"] == truncate["stmt"]
                and r["session"] == truncate["session"]]


def test_card_numbers_never_reach_the_records(lab: Lab):
    marker = f"tg-{secrets.token_hex(4)}"
    run(lab, "agent", ["psql", "-X", lab.conninfo(), "-c", f"SELECT '{marker}', '{PAN}' AS pan"], check=True)
    python(lab, """
        import sys, psycopg
        with psycopg.connect(sys.argv[1]) as conn:
            conn.execute("SELECT %s::text || ' ' || %s::text", (sys.argv[2], sys.argv[3])).fetchall()
    """, lab.conninfo(), marker, PAN)
    mine = wait_for(lambda: len([r for r in audit_records_for(lab, marker) if r["type"] == "session.end"]) == 2
                    and audit_records_for(lab, marker), "the records of both sessions")
    text = json.dumps(mine)
    assert PAN not in text
    simple = next(r for r in mine if r["type"] == "statement" and r["kind"] == "query")
    assert PAN_MASKED in simple["text"]
    execute = next(r for r in mine if r["type"] == "statement" and r["kind"] == "execute")
    assert execute["params"] == [marker, PAN_MASKED]


def test_an_export_verifies_with_the_standalone_verifier(lab: Lab, tmp_path: Path):
    marker = f"tg-{secrets.token_hex(4)}"
    psql(lab, f"SELECT '{marker}'")
    bundle = lab.dir / f"bundle-{marker}.tar.gz"
    tollgate(lab, "audit", "export", "-c", str(lab.config_path), "-o", str(bundle), "--no-progress")
    root_key = (lab.audit_dir / "keys" / "root.pub").read_text().strip()
    verified = run(lab, "gw", [sys.executable, "-m", "appliance.audit.verifier", str(bundle), "--root-key", root_key,
                               "--offbox", str(lab.offbox_dir), "--json", str(lab.dir / "report.json")])
    out = verified.stdout.decode()
    assert "checkpoints valid" in out and "records valid" in out
    report = json.loads((lab.dir / "report.json").read_text())
    assert report["ok"] is True
    # Reading the log is itself recorded (PCI DSS 10.2.1.3).
    exported = [r for r in records(lab) if r["type"] == "admin" and r.get("action") == "audit.export"]
    assert exported and exported[-1]["outcome"] == "success"


def test_the_evidence_report_from_a_lab_bundle(lab: Lab):
    """Issue 19: the PCI DSS report, made by the standalone verifier from a lab bundle,
    holds that bundle's evidence in each requirement's section, and opens in the browser."""
    from tests.audit.test_evidence import SECTIONS, open_in_browser, section
    marker = f"tg-{secrets.token_hex(4)}"
    # From now on: the lab is shared, and the report samples the first blocked statements
    # of its bundle, which would be other tests' without a time range.
    since = datetime.now(UTC).isoformat()
    psql(lab, f"SELECT '{marker}' AS marker, pan FROM cards ORDER BY id LIMIT 3")
    run(lab, "agent", ["psql", "-X", lab.conninfo(), "-c", "TRUNCATE cards"], check=False)
    wait_for(lambda: [r for r in audit_records_for(lab, marker) if r["type"] == "session.end"], "the session's end")
    bundle = lab.dir / f"evidence-{marker}.tar.gz"
    tollgate(lab, "audit", "export", "-c", str(lab.config_path), "-o", str(bundle), "--from", since, "--no-progress")
    root_key = (lab.audit_dir / "keys" / "root.pub").read_text().strip()
    page = lab.dir / f"evidence-{marker}.html"
    run(lab, "gw", [sys.executable, "-m", "appliance.audit.verifier", str(bundle), "--root-key", root_key,
                    "--offbox", str(lab.offbox_dir), "--report", str(page), "--quiet"])
    text = page.read_text()
    masked = section(text, "3.4.1")
    assert re.search(r"\b\d{6}\*{6}\d{4}\b", masked) and "card number(s) masked" in masked
    assert "clear PANs found: 0" in section(text, "3.5.1")
    assert "agents-read-and-work-with-masked-data" in section(text, "7.2")
    assert "TRUNCATE cards" in section(text, "7.2")
    assert "lab-agent" in section(text, "8.2.1") and "payments-agents" in section(text, "8.2.1")
    assert "10.2.1.6 audit log started, stopped" in section(text, "10.2.1")
    assert " 0 without all six fields" in section(text, "10.2.2")
    assert "verified: everything holds" in section(text, "10.3")
    for ident in SECTIONS:
        assert "Evidence from this bundle" in section(text, ident)
    headings = open_in_browser(page, "evidence-report-lab")
    assert [h.split(" — ")[0] for h in headings] == list(SECTIONS)


def test_sessions_and_replay_in_the_terminal(lab: Lab):
    marker = f"tg-{secrets.token_hex(4)}"
    psql(lab, f"SELECT '{marker}' AS marker, brand FROM cards ORDER BY id LIMIT 2")
    session = wait_for(lambda: next((r["session"] for r in audit_records_for(lab, marker)
                                     if r["type"] == "session.end"), None), "the session to end")
    listing = tollgate(lab, "sessions", "-c", str(lab.config_path)).stdout.decode()
    assert session in listing and "lab-agent" in listing
    replay = tollgate(lab, "replay", session, "-c", str(lab.config_path)).stdout.decode()
    assert marker in replay and "marker" in replay and "SELECT 2" in replay


def test_policy_reloads_are_recorded(lab: Lab, lab_policy):
    from appliance.lab.policy import POLICIES
    from tests.e2e.conftest import set_policy
    before = len(records(lab))
    set_policy(lab, POLICIES["lab"] + "\n# touched by test_policy_reloads_are_recorded\n")
    reload = wait_for(lambda: next((r for r in records(lab)[before:] if r["type"] == "policy.reload"), None),
                      "the policy.reload record")
    assert reload["outcome"] == "success" and reload["sha256"] and reload["user"] == "tollgate"
    broken = lab.policy_path.with_suffix(".broken")
    broken.write_text("[[rule]]\nname = 3\n")
    broken.replace(lab.policy_path)
    failed = wait_for(lambda: next((r for r in records(lab)[before:] if r["type"] == "policy.reload"
                                    and r["outcome"] == "failure"), None), "the failed reload's record")
    assert "policy" in failed["object"] and failed["error"]


def test_the_running_proxy_reports_its_log(lab: Lab):
    status = proxy_request(lab, {"op": "audit"})
    assert status["ok"] and status["audit"]["size"] > 0
