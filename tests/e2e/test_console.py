"""The web console in a real browser (Debian's chromium, driven by selenium), in the lab.

The acceptance flow of issue 16: the agent's UPDATE on ``cards`` is held and psql prints the
notice at once; an approver signs in through the dev issuer's login page, sees the request
appear in the inbox without reloading, approves it with a reason; the statement completes
once; the replay page shows it with the approver and the verified mark. And the refusals:
deny, self-approval, a POST without the CSRF token, an auditor who is not an approver, an
expired sign-in. Every page is saved as a screenshot at 1280×800 and at 390 px wide, under
``build/screenshots/`` (``TOLLGATE_SCREENSHOTS`` moves it).

The browser runs in the root namespace and reaches the lab through
:class:`~appliance.lab.console.LabConnectProxy`, which dials from inside the lab: the URLs,
certificates and OIDC redirects are the lab's own. Chromium trusts exactly the console's and
the issuer's certificates (by their public keys), nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from appliance.lab import Lab
from appliance.lab import identity as lab_identity
from appliance.lab.console import LabConnectProxy, console_targets
from tests.e2e.conftest import superuser_sql

pytestmark = pytest.mark.lab


CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = Path(os.environ.get("TOLLGATE_SCREENSHOTS", REPO / "build" / "screenshots"))
WAIT = 30  # seconds: a safety net for a page that never comes, never a bound on how fast it comes


def _spki_hash(cert_file: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.fixture(scope="module")
def console(lab: Lab) -> Iterator[LabConnectProxy]:
    with LabConnectProxy(lab.namespace("gw"), console_targets()) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def browser(lab: Lab, console: LabConnectProxy) -> Iterator[Any]:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            pytest.fail(f"{path} is missing: `make host-deps` installs chromium and chromium-driver")
    profile = tempfile.mkdtemp(prefix="tollgate-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    served = (lab.paths.identity_dir / "servers" / "enroll.crt", lab.paths.issuer_cert)
    trusted = ",".join(_spki_hash(p) for p in served)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,800",
                f"--user-data-dir={profile}", f"--proxy-server={console.url}", "--proxy-bypass-list=<-loopback>",
                f"--ignore-certificate-errors-spki-list={trusted}", "--disable-features=HttpsUpgrades"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def shoot(driver: Any, name: str) -> None:
    """Save the page at 1280×800 and at 390 px wide (the full page's height)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for width, label in ((1280, "wide"), (390, "narrow")):
        driver.set_window_size(width, 800)
        height = driver.execute_script("return Math.max(document.documentElement.scrollHeight, 800)")
        driver.set_window_size(width, min(height + 140, 6000))
        driver.save_screenshot(str(SCREENSHOTS / f"{name}-{label}.png"))
    driver.set_window_size(1280, 800)


def url(path: str = "") -> str:
    return lab_identity.console_url() + path


def test_the_lab_status_names_the_console_and_next_steps_say_how_to_open_it(lab: Lab) -> None:
    from appliance.lab.cli import next_steps
    status = lab.status()
    assert status["console_url"] == lab_identity.console_url()
    steps = next_steps(status)
    tollgate = str(Path(sys.executable).with_name("tollgate"))
    assert f"{tollgate} lab console --name {lab.name}" in steps
    # Every command printed is the venv's, by path: they work as printed.
    assert not [line for line in steps.splitlines() if line.strip().startswith("tollgate ")]


def sign_in(driver: Any, user: str, path: str = "/approvals", shot: str | None = None) -> None:
    driver.delete_all_cookies()
    driver.get(url(path))
    button = WebDriverWait(driver, WAIT).until(lambda d: d.find_element(By.ID, "sign-in"))
    if shot:
        shoot(driver, shot)
    button.click()
    choice = WebDriverWait(driver, WAIT).until(
        lambda d: d.find_element(By.CSS_SELECTOR, f'button[name="user"][value="{user}"]'))
    if shot:
        shoot(driver, "issuer-login")
    choice.click()
    WebDriverWait(driver, WAIT).until(lambda d: d.current_url.startswith(url(path)))


def heading_says(driver: Any, text: str) -> None:
    """Wait for the page's heading to say ``text`` (the page may be in the middle of loading
    after a form was sent: an element of the page that is going away is looked up again)."""
    WebDriverWait(driver, WAIT, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda d: text in d.find_element(By.TAG_NAME, "h1").text)


def start_psql(lab: Lab, sql: str) -> subprocess.Popen[bytes]:
    return lab.popen("agent", ["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", lab.conninfo(), "-c", sql],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def notice_of(proc: subprocess.Popen[bytes]) -> tuple[str, str]:
    """psql's notice lines (message and hint), read while the statement still waits."""
    assert proc.stderr is not None
    lines: list[str] = []
    while line := proc.stderr.readline().decode():
        lines.append(line)
        if line.startswith("HINT:"):
            return next((seen for seen in lines if seen.startswith("NOTICE:")), ""), line
    raise AssertionError(f"psql ended without a notice: {''.join(lines)}")


def finish(proc: subprocess.Popen[bytes]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, out.decode(), err.decode()


def brand(lab: Lab, card_id: int) -> str:
    return superuser_sql(lab, f"SELECT brand FROM cards WHERE id = {card_id}").strip()


@pytest.fixture
def card(lab: Lab) -> Iterator[tuple[int, str]]:
    card_id = 11
    before = brand(lab, card_id)
    yield card_id, before
    superuser_sql(lab, f"UPDATE cards SET brand = '{before}' WHERE id = {card_id}")


def test_an_approver_approves_a_held_update_in_the_browser_and_the_replay_verifies_it(lab, browser, card):
    card_id, before = card
    sign_in(browser, "dba@lab.tollgate", shot="login")
    # The inbox is open before the hold: the request must appear in it without a reload.
    WebDriverWait(browser, WAIT).until(lambda d: d.find_element(By.ID, "live-state").text == "(live)")
    browser.execute_script("window.tollgateNotReloaded = true")
    proc = start_psql(lab, f"UPDATE cards SET brand = brand || '*' WHERE id = {card_id}")
    try:
        message, hint = notice_of(proc)
        assert "statement held for approval apr-" in message and "card-changes-need-a-dba" in message
        request_id = message.split("approval ", 1)[1].split()[0]
        assert url(f"/approvals/{request_id}") in hint
        WebDriverWait(browser, WAIT).until(lambda d: d.find_element(By.LINK_TEXT, request_id))
        assert browser.execute_script("return window.tollgateNotReloaded") is True
        shoot(browser, "approvals-inbox")
        # The live sessions: the held one, on this approval, with the statement.
        browser.get(url("/sessions"))
        held = WebDriverWait(browser, WAIT).until(lambda d: d.find_element(By.LINK_TEXT, request_id))
        row = held.find_element(By.XPATH, "./ancestor::tr").text
        assert "held" in row and f"WHERE id = {card_id}" in row and "lab-agent" in row
        shoot(browser, "sessions-live")
        browser.get(url(f"/approvals/{request_id}"))
        WebDriverWait(browser, WAIT).until(lambda d: d.find_element(By.ID, "approve"))
        page = browser.find_element(By.TAG_NAME, "main").text
        assert f"WHERE id = {card_id}" in page and "lab-agent" in page and "payments-dbas" in page
        shoot(browser, "approval-request")
        browser.find_element(By.ID, "reason").send_keys("ticket CHG-2001, checked in the console")
        browser.find_element(By.ID, "approve").click()
        heading_says(browser, "approved")
        shoot(browser, "approval-decided")
        code, _, err = finish(proc)
    finally:
        proc.kill()
    assert code == 0, err
    assert brand(lab, card_id) == before + "*"  # exactly once
    # The session's replay: the statement, its approval and approver, and the verified mark.
    browser.find_element(By.CSS_SELECTOR, 'a[href^="/sessions/"]').click()

    def verified(d: Any) -> bool:
        if d.find_elements(By.ID, "verified"):
            return True
        d.refresh()  # the next checkpoint signs the newest records: look again
        return False
    WebDriverWait(browser, WAIT, poll_frequency=0.5).until(verified)
    page = browser.find_element(By.TAG_NAME, "main").text
    assert request_id in page and "dba@lab.tollgate" in page and f"WHERE id = {card_id}" in page
    shoot(browser, "session-replay")
    # The sign-in and the decision are in the audit log, through the proxy (its only writer).
    from tests.e2e.test_audit import records
    admin = [r for r in records(lab) if r["type"] == "admin" and r.get("user") == "dba@lab.tollgate"]
    assert any(r["action"] == "console.signin" and r["outcome"] == "success" for r in admin)
    assert any(r["action"] == "console.decision" and r["object"] == f"approval:{request_id}"
               and r.get("decision") == "approve" for r in admin)


def test_a_denied_request_refuses_the_statement(lab, browser, card):
    card_id, before = card
    sign_in(browser, "dba@lab.tollgate")
    proc = start_psql(lab, f"UPDATE cards SET brand = 'x' WHERE id = {card_id}")
    try:
        message, _ = notice_of(proc)
        request_id = message.split("approval ", 1)[1].split()[0]
        browser.get(url(f"/approvals/{request_id}"))
        WebDriverWait(browser, WAIT).until(lambda d: d.find_element(By.ID, "deny"))
        browser.find_element(By.ID, "deny").click()  # no reason: the browser's required field stops it
        assert browser.find_elements(By.ID, "deny") and proc.poll() is None
        # With the keyboard alone: Tab from the top of the page to the reason, type it, Tab on
        # to Deny, press Enter.
        browser.get(url(f"/approvals/{request_id}"))
        WebDriverWait(browser, WAIT).until(lambda d: d.find_element(By.ID, "deny"))
        visited = keyboard_to(browser, "deny", typing={"reason": "not during the freeze"})
        assert visited[0] == "skip" and "reason" in visited  # the skip link first, every control reachable
        browser.switch_to.active_element.send_keys(Keys.ENTER)
        heading_says(browser, "denied")
        code, _, err = finish(proc)
    finally:
        proc.kill()
    assert code != 0 and f"approval {request_id} was denied by dba@lab.tollgate: not during the freeze" in err
    assert brand(lab, card_id) == before


def keyboard_to(driver: Any, target: str, typing: dict[str, str], limit: int = 60) -> list[str]:
    """Press Tab until the element with id ``target`` has the focus, typing ``typing[id]`` into
    each field on the way; the ids (or classes) of what got the focus, in order."""
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
    visited: list[str] = []
    for _ in range(limit):
        active = driver.switch_to.active_element
        name = active.get_attribute("id") or active.get_attribute("class") or active.tag_name
        visited.append(name)
        if name in typing:
            active.send_keys(typing[name])
        if name == target:
            return visited
        active.send_keys(Keys.TAB)
    raise AssertionError(f"{target} is not reachable with Tab: {visited}")


def _post(driver: Any, path: str, fields: dict[str, str]) -> int:
    """POST a form from the page's own origin (fetch), as a forged or a scripted form would."""
    return driver.execute_async_script(
        "const [path, fields, done] = arguments;"
        "fetch(path, {method: 'POST', body: new URLSearchParams(fields), redirect: 'manual',"
        " credentials: 'same-origin'}).then(r => done(r.status), e => done(String(e)));", path, fields)


def _get_status(driver: Any, href: str) -> int:
    return driver.execute_async_script(
        "const [href, done] = arguments;"
        "fetch(href, {credentials: 'same-origin'}).then(r => done(r.status), e => done(String(e)));", href)


def _csrf(driver: Any) -> str:
    return driver.find_element(By.CSS_SELECTOR, 'input[name="csrf"]').get_attribute("value")


def _request_by(lab: Lab, subject: str, groups: tuple[str, ...]) -> str:
    """A pending request whose requester is ``subject`` (a person holding a statement of their own)."""
    from appliance.config import load_config
    from appliance.holds.service import ApprovalService
    from appliance.holds.store import Requester
    from appliance.policy.engine import Policy
    config = load_config(lab.config_path)
    policy = Policy.load(config.policy.file)
    sql = "UPDATE cards SET brand = brand WHERE id = 12"
    # As the lab's agents are held: the decision names the approvers (payments-dbas).
    decision = policy.decide(["payments-agents"], "payments", sql)
    service = ApprovalService.from_config(config)
    try:
        request = service.request(requester=Requester(subject, subject, "person", groups), target="payments",
                                  database="payments", sql=sql, params=None, decision=decision,
                                  fingerprint=f"fp-{time.time_ns()}", timeout_seconds=300)
    finally:
        service.close()
    return request.id


def test_an_approver_cannot_approve_their_own_request(lab, browser):
    request_id = _request_by(lab, "dba@lab.tollgate", ("payments-dbas",))
    sign_in(browser, "dba@lab.tollgate")
    browser.get(url(f"/approvals/{request_id}"))
    own = WebDriverWait(browser, WAIT).until(lambda d: d.find_element(By.ID, "own-request"))
    assert "another approver must decide" in own.text and not browser.find_elements(By.ID, "approve")
    status = _post(browser, f"/approvals/{request_id}/decide",
                   {"csrf": _csrf(browser), "action": "approve", "reason": "it is mine"})
    assert status == 403
    browser.get(url(f"/approvals/{request_id}"))
    assert "pending" in browser.find_element(By.TAG_NAME, "h1").text


def test_a_post_without_the_csrf_token_is_refused(lab, browser):
    request_id = _request_by(lab, "lab-dba-1", ("payments-dbas",))
    sign_in(browser, "dba@lab.tollgate")
    browser.get(url(f"/approvals/{request_id}"))
    WebDriverWait(browser, WAIT).until(lambda d: d.find_element(By.ID, "approve"))
    assert _post(browser, f"/approvals/{request_id}/decide", {"action": "approve", "reason": "no token"}) == 403
    assert _post(browser, f"/approvals/{request_id}/decide",
                 {"csrf": "forged", "action": "approve", "reason": "wrong token"}) == 403
    browser.refresh()
    assert "pending" in browser.find_element(By.TAG_NAME, "h1").text


def test_an_auditor_reads_but_cannot_decide(lab, browser):
    request_id = _request_by(lab, "lab-dba-2", ("payments-dbas",))
    sign_in(browser, "auditor@lab.tollgate", path="/sessions")
    shoot(browser, "sessions")
    browser.get(url(f"/approvals/{request_id}"))
    WebDriverWait(browser, WAIT).until(lambda d: d.find_element(By.TAG_NAME, "h1"))
    assert not browser.find_elements(By.ID, "approve") and "not an approver" in browser.page_source
    assert _post(browser, f"/approvals/{request_id}/decide",
                 {"csrf": _csrf(browser), "action": "approve", "reason": "auditor"}) == 403
    for path, name in (("/approvals/history", "approvals-history"), ("/grants", "grants"), ("/audit", "audit"),
                       ("/policy", "policy-tester")):
        browser.get(url(path))
        WebDriverWait(browser, WAIT).until(lambda d: d.find_element(By.TAG_NAME, "h1"))
        assert "Forbidden" not in browser.find_element(By.TAG_NAME, "h1").text, path
        shoot(browser, name)
    # An export of the whole log: it runs in the background, its page shows progress, then the bundle.
    browser.get(url("/audit"))
    WebDriverWait(browser, WAIT).until(lambda d: d.find_element(By.ID, "export")).click()
    done = WebDriverWait(browser, WAIT).until(lambda d: d.find_elements(By.ID, "export-done")
                                              or d.find_elements(By.ID, "export-failed"))
    assert done[0].get_attribute("id") == "export-done", done[0].text
    shoot(browser, "audit-export")
    href = browser.find_element(By.ID, "export-download").get_attribute("href")
    assert _get_status(browser, href) == 200
    browser.get(url("/policy"))
    WebDriverWait(browser, WAIT).until(lambda d: d.find_element(By.ID, "sql"))
    browser.find_element(By.ID, "sql").send_keys("UPDATE cards SET brand = 'x' WHERE id = 1")
    browser.find_element(By.ID, "groups").send_keys("payments-agents")
    browser.find_element(By.CSS_SELECTOR, "form.stack button[type=submit]").click()
    outcome = WebDriverWait(browser, WAIT).until(lambda d: d.find_element(By.ID, "outcome"))
    assert "HOLD by rule card-changes-need-a-dba" in outcome.text
    shoot(browser, "policy-tester-result")


def test_an_expired_sign_in_is_sent_back_to_sign_in(lab, browser):
    from flask import Flask
    from flask.sessions import SecureCookieSessionInterface

    from appliance.config import load_config
    from webui.console import COOKIE_KEY_NAME
    sign_in(browser, "dba@lab.tollgate")
    config = load_config(lab.config_path)
    app = Flask("forge")
    app.secret_key = bytes.fromhex((config.identity.state_dir / COOKIE_KEY_NAME).read_text().strip())
    serializer = SecureCookieSessionInterface().get_signing_serializer(app)
    idle = config.webui.idle_minutes * 60
    # The same person's sign-in, last used longer ago than the idle limit.
    stale = serializer.dumps({"user": {"subject": "dba@lab.tollgate", "kind": "person", "groups": ["payments-dbas"],
                                       "roles": ["approver"]}, "seen": int(time.time()) - idle - 60, "csrf": "x"})
    browser.delete_all_cookies()
    browser.add_cookie({"name": "__Host-tollgate", "value": stale, "path": "/", "secure": True})
    browser.get(url("/approvals"))
    WebDriverWait(browser, WAIT).until(lambda d: d.find_element(By.ID, "sign-in"))
    assert "expired" in browser.find_element(By.TAG_NAME, "main").text
    shoot(browser, "login-expired")
