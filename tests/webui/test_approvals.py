"""The approvals API through Flask's test client, with real tokens from a real dev issuer over HTTPS.

Requests are opened the way the proxy opens them — through an ApprovalService of its own on
the same SQLite file — and decided through the API.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from appliance.holds.broker import HoldBroker
from appliance.holds.service import ApprovalService
from appliance.holds.store import ApprovalStore
from appliance.lab.oidc_issuer import DevIssuer
from appliance.model.identity import Identity
from tests.holds import (
    AGENT,
    APPROVER_CLIENTS,
    CARD_UPDATE,
    PAYMENT_DELETE,
    T0,
    Clock,
    approvals_issuer,
    client_token,
    decision,
    open_request,
)
from tests.identity.dev_flows import AUDIENCE, id_token
from tests.identity.tls_helpers import TlsFiles, make_tls_files
from tests.webui import Appliance, make_appliance
from webui import create_app


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def issuer(tls: TlsFiles) -> Iterator[DevIssuer]:
    issuer = approvals_issuer(tls)
    yield issuer
    issuer.stop()


@pytest.fixture(scope="module")
def tokens(issuer: DevIssuer, tls: TlsFiles) -> dict[str, str]:
    found = {name: client_token(issuer, tls, name) for name in APPROVER_CLIENTS}
    found["alice"] = id_token(issuer, tls)  # a person's ID token works as well as an access token
    return found


@pytest.fixture
def appliance(tmp_path: Path, issuer: DevIssuer, tls: TlsFiles) -> Appliance:
    return make_appliance(tmp_path, issuer.url, tls.ca_file)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def app(appliance: Appliance, clock: Clock) -> Iterator[Flask]:
    service = ApprovalService(ApprovalStore(appliance.state_dir / "approvals.db"), max_grant_minutes=60, clock=clock)
    app = create_app(appliance.config(), approvals=service)
    yield app
    app.extensions["tollgate.approvals"].close()
    app.extensions["tollgate.enroll"].close()


@pytest.fixture
def proxy(appliance: Appliance, clock: Clock) -> Iterator[ApprovalService]:
    """The proxy's own view of the approvals database."""
    service = ApprovalService(ApprovalStore(appliance.state_dir / "approvals.db"), clock=clock)
    yield service
    service.close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def vote(client: FlaskClient, token: str, request_id: str, verb: str = "approve", **body: Any) -> Any:
    return client.post(f"/api/v1/approvals/{request_id}/{verb}", json=body, headers=bearer(token))


# --- reading ------------------------------------------------------------------------------

def test_list_and_show(client: FlaskClient, proxy: ApprovalService, tokens: dict[str, str], clock: Clock) -> None:
    first = open_request(proxy)
    clock.advance(1)
    second = open_request(proxy, PAYMENT_DELETE, params=None)
    proxy.decide(first.id, Identity("dba-2", "agent", ("payments-dbas",)), False, "no")
    response = client.get("/api/v1/approvals", headers=bearer(tokens["agent-ci"]))  # the requester sees its own
    assert response.status_code == 200
    assert response.json["count"] == 2
    assert [r["id"] for r in response.json["approvals"]] == [second.id, first.id]
    pending = client.get("/api/v1/approvals?status=pending", headers=bearer(tokens["dba-1"])).json
    assert [r["id"] for r in pending["approvals"]] == [second.id]
    assert client.get("/api/v1/approvals?limit=1", headers=bearer(tokens["dba-1"])).json["count"] == 1

    shown = client.get(f"/api/v1/approvals/{first.id.lower()}", headers=bearer(tokens["dba-1"]))
    assert shown.status_code == 200
    body = shown.json
    assert list(body)[:4] == ["id", "status", "status_reason", "created_at"]
    assert body["id"] == first.id and body["status"] == "denied"
    assert body["created_at"] == "2025-03-01T02:00:00.000Z" and body["expires_at"] == "2025-03-01T02:10:00.000Z"
    assert body["requester"] == {"subject": "agent-ci", "display": "agent-ci", "kind": "agent",
                                 "groups": ["payments-agents"]}
    assert (body["target"], body["database"], body["sql"], body["params"]) == (
        "payments", "payments", CARD_UPDATE, ["blocked", "42"])
    assert body["classes"] == ["write"] and body["statements"][0]["relations"] == ["public.cards"]
    assert body["rule"] == {"name": "card-changes-need-a-dba", "line": 3,
                            "message": "changes to cards need a payments DBA's approval"}
    assert body["votes"][0]["verdict"] == "deny" and body["votes"][0]["approver"]["subject"] == "dba-2"
    assert shown.headers["Cache-Control"] == "no-store"


def test_bad_list_queries_are_400(client: FlaskClient, tokens: dict[str, str]) -> None:
    for query, detail in (("status=open", "status must be one of"), ("limit=0", "limit must be"),
                          ("limit=abc", "limit must be"), ("limit=1001", "limit must be")):
        response = client.get(f"/api/v1/approvals?{query}", headers=bearer(tokens["dba-1"]))
        assert response.status_code == 400 and response.json["error"] == "bad_request"
        assert response.json["detail"].startswith(detail)


def test_unknown_request_is_404(client: FlaskClient, tokens: dict[str, str]) -> None:
    for request_id in ("apr-000000", "not-an-id"):
        response = client.get(f"/api/v1/approvals/{request_id}", headers=bearer(tokens["dba-1"]))
        assert response.status_code == 404 and response.json["error"] == "unknown_request"
        assert vote(client, tokens["dba-1"], request_id, reason="ok").status_code == 404


def test_overdue_requests_show_as_expired(client: FlaskClient, proxy: ApprovalService, tokens: dict[str, str],
                                          clock: Clock) -> None:
    opened = open_request(proxy, timeout_seconds=60)
    clock.advance(61)
    assert client.get(f"/api/v1/approvals/{opened.id}", headers=bearer(tokens["dba-1"])).json["status"] == "expired"


# --- who sees what --------------------------------------------------------------------------

def _ids(client: FlaskClient, token: str, query: str = "") -> list[str]:
    response = client.get(f"/api/v1/approvals{query}", headers=bearer(token))
    assert response.status_code == 200, response.json
    assert response.json["count"] == len(response.json["approvals"])
    return [r["id"] for r in response.json["approvals"]]


def _hold_for(proxy: ApprovalService, approvers: tuple[str, ...], requester: Identity = AGENT) -> Any:
    from appliance.model.decision import Action, Decision, HoldSpec
    return proxy.request(requester=requester, target="payments", database="payments",
                         sql="TRUNCATE public.audit_tmp", params=None, fingerprint="fp-t",
                         decision=Decision(Action.HOLD, "review", hold=HoldSpec(approvers)))


def test_list_shows_only_what_the_caller_may_decide_or_asked_for(client: FlaskClient, proxy: ApprovalService,
                                                                 tokens: dict[str, str], clock: Clock) -> None:
    card = open_request(proxy)                            # approvers: payments-dbas
    clock.advance(1)
    payment = open_request(proxy, PAYMENT_DELETE)         # approvers: payments-dbas, security
    clock.advance(1)
    dba_only = _hold_for(proxy, ("dba",))                 # alice's group
    clock.advance(1)
    by_dba1 = _hold_for(proxy, ("payments-dbas",), Identity("dba-1", "agent", ("payments-dbas",)))
    clock.advance(1)
    for_ops = _hold_for(proxy, ("ops",), Identity("someone", "person", ()))

    assert _ids(client, tokens["agent-ci"]) == [dba_only.id, payment.id, card.id]  # its own, whoever decides
    assert _ids(client, tokens["dba-1"]) == [by_dba1.id, payment.id, card.id]      # its groups' and its own
    assert _ids(client, tokens["dba-2"]) == [by_dba1.id, payment.id, card.id]
    assert _ids(client, tokens["sec-1"]) == [payment.id]
    assert _ids(client, tokens["alice"]) == [dba_only.id]
    assert _ids(client, tokens["ops-bot"]) == [for_ops.id]
    assert _ids(client, tokens["sec-1"], "?status=approved") == []


def test_the_filter_applies_before_the_limit(client: FlaskClient, proxy: ApprovalService, tokens: dict[str, str],
                                             clock: Clock) -> None:
    mine = _hold_for(proxy, ("security",))
    for _ in range(3):  # newer requests sec-1 may not see
        clock.advance(1)
        open_request(proxy)
    assert _ids(client, tokens["sec-1"], "?limit=1") == [mine.id]
    assert _ids(client, tokens["sec-1"], "?status=pending&limit=2") == [mine.id]


def test_a_request_the_caller_may_not_see_is_404_like_one_that_does_not_exist(
        client: FlaskClient, proxy: ApprovalService, tokens: dict[str, str]) -> None:
    opened = open_request(proxy)  # agent-ci asks, payments-dbas decide
    for name in ("ops-bot", "sec-1", "alice"):
        hidden = client.get(f"/api/v1/approvals/{opened.id}", headers=bearer(tokens[name]))
        missing = client.get("/api/v1/approvals/apr-000000", headers=bearer(tokens[name]))
        assert hidden.status_code == missing.status_code == 404, name
        assert hidden.json == {"error": "unknown_request", "detail": f"there is no approval request {opened.id}"}
        assert missing.json == {"error": "unknown_request", "detail": "there is no approval request apr-000000"}
        assert CARD_UPDATE not in hidden.get_data(as_text=True)
    for name in ("agent-ci", "dba-1", "dba-2"):  # the requester, and those who may decide
        shown = client.get(f"/api/v1/approvals/{opened.id}", headers=bearer(tokens[name]))
        assert shown.status_code == 200 and shown.json["sql"] == CARD_UPDATE, name
    assert proxy.get(opened.id).pending and proxy.get(opened.id).votes == ()


# --- authentication ------------------------------------------------------------------------

def test_no_token_is_401(client: FlaskClient, proxy: ApprovalService) -> None:
    opened = open_request(proxy)
    for response in (client.get("/api/v1/approvals"), client.get(f"/api/v1/approvals/{opened.id}"),
                     client.post(f"/api/v1/approvals/{opened.id}/approve", json={"reason": "ok"})):
        assert response.status_code == 401
        assert response.json["error"] == "missing_token"
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="tollgate-approvals"'
    assert proxy.get(opened.id).pending


@pytest.mark.parametrize("header, detail", [
    ("Basic ZGJhLTE6ZGJhLTEtc2VjcmV0", "the Authorization header must be 'Bearer <token>'"),
    ("Bearer ", "the Authorization header must be 'Bearer <token>'"),
    ("Bearer not.a.jwt", "malformed token: "),
])
def test_malformed_authorization_is_401(client: FlaskClient, header: str, detail: str) -> None:
    response = client.get("/api/v1/approvals", headers={"Authorization": header})
    assert response.status_code == 401
    assert response.json["error"] == "invalid_token" and response.json["detail"].startswith(detail)


def test_refused_tokens_are_401_with_the_reason(client: FlaskClient, issuer: DevIssuer, proxy: ApprovalService) -> None:
    opened = open_request(proxy)
    cases = {
        issuer.mint(issuer.base_claims("dba-1", client_id="dba-1", groups=["payments-dbas"], ttl=-3600)):
            "token expired at ",
        issuer.mint(issuer.base_claims("dba-1", client_id="dba-1", aud="billing")):
            f"audience mismatch: expected '{AUDIENCE}', got 'billing'",
        issuer.mint(issuer.base_claims("dba-1", client_id="dba-1"), alg="none"):
            "algorithm 'none' is not allowed",
    }
    for token, reason in cases.items():
        response = vote(client, token, opened.id, reason="ok")
        assert response.status_code == 401, response.json
        assert response.json["detail"].startswith(reason)
        assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    assert proxy.get(opened.id).pending


def test_a_forged_group_claim_does_not_verify(client: FlaskClient, tokens: dict[str, str],
                                              proxy: ApprovalService) -> None:
    import base64
    import json
    head, payload, signature = tokens["agent-ci"].split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["groups"] = ["payments-dbas"]
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    response = vote(client, f"{head}.{forged}.{signature}", open_request(proxy).id, reason="ok")
    assert response.status_code == 401 and response.json["detail"] == "signature verification failed"


def test_unreachable_issuer_is_503(tmp_path: Path, tls: TlsFiles) -> None:
    gone = DevIssuer(("127.0.0.1", 0), tls_cert=tls.cert_file, tls_key=tls.key_file, audience=AUDIENCE).start()
    gone.stop()
    appliance = make_appliance(tmp_path, gone.url, tls.ca_file)
    app = create_app(appliance.config())  # the approvals service from the config, too
    try:
        response = app.test_client().get("/api/v1/approvals", headers=bearer(gone.mint(gone.base_claims("x"))))
    finally:
        app.extensions["tollgate.approvals"].close()
        app.extensions["tollgate.enroll"].close()
    assert response.status_code == 503 and response.json["error"] == "issuer_unavailable"
    assert response.headers["Retry-After"] == "30"
    assert (appliance.state_dir / "approvals.db").exists()


# --- deciding ------------------------------------------------------------------------------

def test_approve(client: FlaskClient, proxy: ApprovalService, tokens: dict[str, str]) -> None:
    opened = open_request(proxy)
    response = vote(client, tokens["dba-1"], opened.id, reason="CHG-1234")
    assert response.status_code == 200, response.json
    assert response.json["status"] == "approved" and response.json["grant"] is None
    approver = response.json["votes"][0]["approver"]
    assert approver == {"subject": "dba-1", "display": "dba-1", "kind": "agent", "groups": ["payments-dbas"]}
    assert proxy.get(opened.id).status == "approved"  # the proxy's own view


def test_approve_with_a_grant(client: FlaskClient, proxy: ApprovalService, tokens: dict[str, str]) -> None:
    opened = open_request(proxy)
    response = vote(client, tokens["dba-1"], opened.id, reason="nightly fix", grant_minutes=30)
    assert response.status_code == 200
    assert response.json["grant"] == {"subject": "agent-ci", "target": "payments", "fingerprint": "fp-card-update",
                                      "scope": "exact", "created_at": "2025-03-01T02:00:00.000Z",
                                      "expires_at": "2025-03-01T02:30:00.000Z", "request_id": opened.id}
    assert proxy.active_grant("agent-ci", "payments", "fp-card-update") is not None


def test_a_shape_grant_is_chosen_explicitly_and_the_request_shows_what_varies(
        client: FlaskClient, proxy: ApprovalService, tokens: dict[str, str]) -> None:
    opened = open_request(proxy, fingerprint="exact:1", shape="shape:1", free=("'blocked'", "42"))
    shown = client.get(f"/api/v1/approvals/{opened.id}", headers={"Authorization": f"Bearer {tokens['dba-1']}"})
    assert (shown.json["fingerprint"], shown.json["shape"], shown.json["free"]) == ("exact:1", "shape:1",
                                                                                    ["'blocked'", "42"])
    response = vote(client, tokens["dba-1"], opened.id, reason="r", grant_minutes=30, grant_scope="rows")
    assert (response.status_code, response.json["error"]) == (400, "invalid_grant")
    response = vote(client, tokens["dba-1"], opened.id, reason="any card", grant_minutes=30, grant_scope="shape")
    assert response.status_code == 200
    assert (response.json["grant"]["scope"], response.json["grant"]["fingerprint"]) == ("shape", "shape:1")
    assert response.json["votes"][0]["grant_scope"] == "shape"


def test_deny(client: FlaskClient, proxy: ApprovalService, tokens: dict[str, str]) -> None:
    opened = open_request(proxy)
    response = vote(client, tokens["dba-2"], opened.id, "deny", reason="not during the freeze")
    assert response.status_code == 200
    assert response.json["status"] == "denied"
    assert response.json["votes"][0]["reason"] == "not during the freeze"


def test_a_person_with_an_id_token_can_be_an_approver_of_their_groups(
        client: FlaskClient, proxy: ApprovalService, tokens: dict[str, str]) -> None:
    from appliance.model.decision import Action, Decision, HoldSpec
    opened = proxy.request(requester=Identity("agent-ci", "agent", ()), target="payments", database="payments",
                           sql="TRUNCATE public.audit_tmp", params=None, fingerprint="fp-t",
                           decision=Decision(Action.HOLD, "dba-review", hold=HoldSpec(("dba",))))
    response = vote(client, tokens["alice"], opened.id, reason="reviewed")
    assert response.status_code == 200
    assert response.json["votes"][0]["approver"]["display"] == "alice@example.test"


def test_refusals_and_their_status_codes(client: FlaskClient, proxy: ApprovalService, tokens: dict[str, str]) -> None:
    own = open_request(proxy, requester=Identity("dba-1", "agent", ("payments-dbas",)))
    response = vote(client, tokens["dba-1"], own.id, reason="mine, fine")
    assert (response.status_code, response.json["error"]) == (403, "self_approval")

    opened = open_request(proxy)
    response = vote(client, tokens["agent-ci"], opened.id, reason="approving my own statement")
    assert (response.status_code, response.json["error"]) == (403, "self_approval")
    # Neither an approver nor the requester: for them the request does not exist (404, not 403).
    response = vote(client, tokens["ops-bot"], opened.id, reason="looks harmless")
    assert (response.status_code, response.json) == (404, {"error": "unknown_request",
                                                           "detail": f"there is no approval request {opened.id}"})
    response = vote(client, tokens["sec-1"], opened.id, "deny", reason="security says no")
    assert (response.status_code, response.json["error"]) == (404, "unknown_request")

    for body, code in (({}, "reason_required"), ({"reason": "  "}, "reason_required"),
                       ({"reason": "ok", "grant_minutes": 61}, "grant_too_long"),
                       ({"reason": "ok", "grant_minutes": 0}, "invalid_grant"),
                       ({"reason": "ok\x07"}, "invalid_reason")):
        response = vote(client, tokens["dba-1"], opened.id, **body)
        assert (response.status_code, response.json["error"]) == (400, code), body
    assert proxy.get(opened.id).votes == ()

    two = open_request(proxy, PAYMENT_DELETE)
    assert vote(client, tokens["dba-1"], two.id, reason="first").json["status"] == "pending"
    response = vote(client, tokens["dba-1"], two.id, reason="again")
    assert (response.status_code, response.json["error"]) == (409, "duplicate_vote")
    assert vote(client, tokens["sec-1"], two.id, reason="second").json["status"] == "approved"
    response = vote(client, tokens["dba-2"], two.id, "deny", reason="late")
    assert (response.status_code, response.json["error"]) == (409, "already_decided")


def test_deciding_after_expiry_is_409(client: FlaskClient, proxy: ApprovalService, tokens: dict[str, str],
                                      clock: Clock) -> None:
    opened = open_request(proxy, timeout_seconds=60)
    clock.advance(60)
    response = vote(client, tokens["dba-1"], opened.id, reason="sorry, asleep")
    assert (response.status_code, response.json["error"]) == (409, "expired")
    assert proxy.get(opened.id).status == "expired"


@pytest.mark.parametrize("data, detail", [
    (b"{not json", "the request body is not JSON: "),
    (b"[1]", "the request body must be a JSON object, not list"),
    (b'{"reason": 5}', "'reason' must be a string, not int"),
    (b'{"reason": "ok", "grant_minute": 5}', "unknown field(s) for approve: grant_minute"),
])
def test_malformed_decision_bodies_are_400(client: FlaskClient, proxy: ApprovalService, tokens: dict[str, str],
                                           data: bytes, detail: str) -> None:
    opened = open_request(proxy)
    response = client.post(f"/api/v1/approvals/{opened.id}/approve", data=data, content_type="application/json",
                           headers=bearer(tokens["dba-1"]))
    assert response.status_code == 400 and response.json["detail"].startswith(detail)


def test_a_denial_with_grant_minutes_is_400(client: FlaskClient, proxy: ApprovalService,
                                            tokens: dict[str, str]) -> None:
    response = vote(client, tokens["dba-1"], open_request(proxy).id, "deny", reason="no", grant_minutes=5)
    assert response.status_code == 400 and response.json["detail"].startswith("unknown field(s) for deny")


def test_wrong_method_is_a_json_405(client: FlaskClient, proxy: ApprovalService, tokens: dict[str, str]) -> None:
    response = client.get(f"/api/v1/approvals/{open_request(proxy).id}/approve", headers=bearer(tokens["dba-1"]))
    assert response.status_code == 405 and response.json["error"] == "method_not_allowed"


def test_tokens_never_reach_the_logs(client: FlaskClient, proxy: ApprovalService, tokens: dict[str, str],
                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    opened = open_request(proxy)
    vote(client, tokens["ops-bot"], opened.id, reason="nope")
    vote(client, tokens["dba-1"], opened.id, reason="fine")
    assert "refused for tollgate:identity:agent:ops-bot: not_an_approver" in caplog.text
    assert f"approval {opened.id}: agent dba-1 voted to approve" in caplog.text
    for token in (tokens["ops-bot"], tokens["dba-1"]):
        assert token.split(".")[2] not in caplog.text


# --- with the proxy's broker waiting ---------------------------------------------------------

def test_an_approval_through_the_api_releases_the_waiting_statement(appliance: Appliance, client: FlaskClient,
                                                                   tokens: dict[str, str]) -> None:
    async def main() -> None:
        broker = HoldBroker(ApprovalService(ApprovalStore(appliance.state_dir / "approvals.db")), 0.02,
                            owns_service=True)
        await broker.start()
        request = broker.open(requester=Identity("agent-ci", "agent", ("payments-agents",)), target="payments",
                              database="payments", sql=CARD_UPDATE, params=["x", "1"],
                              decision=decision(CARD_UPDATE),
                              fingerprint="fp")
        outcome = broker.decision(request)  # the request's own timeout: minutes, never reached here
        done = asyncio.get_running_loop().create_future()

        def approve() -> None:
            status = vote(client, tokens["dba-1"], request.id, reason="go").status_code
            done.get_loop().call_soon_threadsafe(done.set_result, status)
        threading.Thread(target=approve).start()
        assert await asyncio.wait_for(done, 60) == 200  # 60 s: a safety net against a hang, never a bound
        assert await asyncio.wait_for(outcome, 60) is None
        await broker.close()
    asyncio.run(main())


def test_times_are_utc(proxy: ApprovalService) -> None:
    assert open_request(proxy).created_at == T0
