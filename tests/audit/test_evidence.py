"""``tollgate-verify --report``: the PCI DSS evidence report, made by the standalone
verifier from a bundle, holds each requirement's evidence from that bundle; opened in
Debian's chromium (as the console tests drive it) and screenshotted."""

from __future__ import annotations

import html
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from appliance.audit.export import export
from appliance.audit.keys import init_audit_dir
from appliance.audit.store import AuditLog
from appliance.audit.verifier import main as verifier_main
from appliance.config import load_config
from tests.audit.records import session_records

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = Path(os.environ.get("TOLLGATE_SCREENSHOTS", REPO / "build" / "screenshots"))
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SECTIONS = ("3.4.1", "3.5.1", "7.2", "8.2.1", "10.2.1", "10.2.2", "10.3", "10.4.1.1", "10.5.1", "10.7",
            "change approval")


def base(**fields: object) -> dict[str, object]:
    return {"user": "tollgate", "origin": "local", "object": "x", "outcome": "success", **fields}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("evidence")
    path = tmp / "tollgate.toml"
    path.write_text('[audit]\ndir = "audit"\norigin = "tollgate.test/evidence"\n')
    config = load_config(path)
    assert config.audit is not None
    init_audit_dir(config.audit)
    log = AuditLog.open(config.audit, version="t")
    log.append(base(type="policy.reload", object="policy:/etc/tollgate/policy.toml", file="/etc/tollgate/policy.toml",
                    sha256="ab" * 32, generation=1))
    for sid in ("A", "B"):
        for record in session_records(sid, 3, approval=f"apr-{sid}"):
            if record["type"] == "session.start":
                record.update(identity_source="certificate", cert_serial=f"SERIAL-{sid}")
            if record["type"] == "statement" and record["stmt"] == 1:
                record.update(rule="agents-read")
            log.append(record)
    log.append(base(type="result", user="agent-A", session="A", stmt=3, rows=2, masked=2, tag="SELECT 2",
                    sample={"columns": ["id", "pan"], "rows": [["1", "411111******1111"], ["2", "550000******0004"]],
                            "truncated": False}))
    log.append(base(type="statement", user="agent-B", session="B", stmt=9, kind="query", text="TRUNCATE cards",
                    decision="block", rule="no-destruction", classes=["ddl"], outcome="failure", sqlstate="42501",
                    message="blocked"))
    log.append(base(type="approval.decision", user="agent-A", approval="apr-A", decision="approve",
                    approver="dba-1", reason="ticket CHG-1234", votes=[{"approver": "dba-1", "verdict": "approve",
                                                                        "reason": "ticket CHG-1234"}]))
    log.append(base(type="approval.decision", user="agent-B", approval="apr-B", decision="deny", outcome="failure",
                    approver="dba-2", reason="not in a change window", votes=[]))
    log.append(base(type="auth.failure", user="unknown", origin="198.18.0.66:5000", object="payments/cards",
                    outcome="failure", reason="certificate revoked"))
    log.append(base(type="admin", action="certificate.issue", user="alice@issuer", object="0A0B", subject="alice"))
    log.append(base(type="admin", action="certificate.revoke", user="ops", object="0A0B", reason="laptop lost"))
    log.append(base(type="review", action="audit.review", user="ops", object="audit-log", from_seq=0, to_seq=20,
                    verified=True, findings=2, counts={"auth_failure": 1, "blocked_statement": 1}))
    log.append(base(type="admin", action="audit.retain", user="ops", object="audit-log", sealed="2025-01",
                    expired="", pruned_through=0))
    log.append(base(type="audit.unrecorded", outcome="failure", object="audit-log", reason="disk full for 2 s"))
    log.close()
    bundle = tmp / "lab.tar.gz"
    export(config, bundle)
    out = tmp / "report.html"
    root = config.audit.keys_dir / "root.pub"
    assert verifier_main([str(bundle), "--root-key", str(root), "--report", str(out), "--quiet"]) == 0
    return out, out.read_text()


def section(text: str, ident: str) -> str:
    match = re.search(rf'<section id="req-{re.escape(html.escape(ident))}">(.*?)</section>', text, re.S)
    assert match, f"no section for {ident}"
    return html.unescape(match.group(1))


def test_each_requirement_has_its_section_with_evidence_from_the_bundle(report: tuple[Path, str]) -> None:
    _, text = report
    for ident in SECTIONS:
        body = section(text, ident)
        assert "Evidence from this bundle" in body and "What this bundle cannot show" in body
    assert "411111******1111" in section(text, "3.4.1") and "2 card number(s) masked" in section(text, "3.4.1")
    assert "clear PANs found: 0" in section(text, "3.5.1")
    assert "no-destruction" in section(text, "7.2") and "TRUNCATE cards" in section(text, "7.2")
    identities = section(text, "8.2.1")
    assert "agent-A" in identities and "SERIAL-B" in identities and "2 distinct identit" in identities
    events = section(text, "10.2.1")
    assert "certificate.revoke" in events and "laptop lost" in events and "certificate revoked" in events
    assert "without all six fields" in section(text, "10.2.2")
    assert "verified: everything holds" in section(text, "10.3")
    assert '"auth_failure": 1' in section(text, "10.4.1.1")
    assert "2025-01" in section(text, "10.5.1")
    assert "disk full for 2 s" in section(text, "10.7")
    approvals = section(text, "change approval")
    assert "ticket CHG-1234" in approvals and "dba-2" in approvals and "not in a change window" in approvals
    assert "ab" * 32 in approvals


def open_in_browser(page: Path, name: str) -> list[str]:
    """Open ``page`` in headless chromium, screenshot it whole as ``name``.png, print it to
    PDF; the section headings the browser shows."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            pytest.fail(f"{path} is missing: `make host-deps` installs chromium and chromium-driver")
    profile = tempfile.mkdtemp(prefix="tollgate-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,800",
                f"--user-data-dir={profile}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(page.as_uri())
        headings = [h.text for h in driver.find_elements(By.CSS_SELECTOR, "section h2")]
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1280, min(height + 140, 8000))
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))
        pdf = driver.print_page()  # the browser's print: the report as a PDF
        assert pdf and len(pdf) > 1000
        return headings
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_the_report_opens_in_the_browser_and_prints(report: tuple[Path, str]) -> None:
    headings = open_in_browser(report[0], "evidence-report-synthetic")
    assert [h.split(" — ")[0] for h in headings] == list(SECTIONS)
