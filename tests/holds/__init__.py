"""Tests of ``appliance.holds``, and the helpers they and the approvals API tests share.

Decisions come from the real policy engine reading :data:`POLICY`; identities are real
:class:`Identity` objects; the clock is a settable one, so expiry is tested without sleeping.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from appliance.holds.service import ApprovalService
from appliance.holds.store import ApprovalRequest, Requester
from appliance.lab.oidc_issuer import DevClient, DevIssuer
from appliance.model.decision import Action, Decision
from appliance.model.identity import Identity
from appliance.policy.engine import Policy
from tests.identity.tls_helpers import TlsFiles, https_json

APPROVERS = "payments-dbas"
POLICY_TEXT = f"""\
default = "deny"

[[rule]]
name = "card-changes-need-a-dba"
classes = ["write"]
relations = ["public.cards"]
action = "hold"
approvers = ["{APPROVERS}"]
timeout = "10m"
message = "changes to cards need a payments DBA's approval"

[[rule]]
name = "two-person-rule"
classes = ["write"]
relations = ["public.payments"]
action = "hold"
approvers = ["{APPROVERS}", "security"]
min_approvals = 2
timeout = "5m"

[[rule]]
name = "reads"
classes = ["read"]
action = "allow"
"""
POLICY = Policy.parse(POLICY_TEXT)

AGENT = Identity("agent-ci", "agent", ("payments-agents",))
DBA1 = Identity("dba-1", "person", (APPROVERS,), "dba1@example.test")
DBA2 = Identity("dba-2", "person", (APPROVERS, "ops"), "dba2@example.test")
SEC = Identity("sec-1", "person", ("security",), "sec1@example.test")
OUTSIDER = Identity("eve", "person", ("marketing",), "eve@example.test")

CARD_UPDATE = "UPDATE public.cards SET status = $1 WHERE id = $2"
PAYMENT_DELETE = "DELETE FROM public.payments WHERE id = 7"
T0 = datetime(2025, 3, 1, 2, 0, 0, tzinfo=UTC)


class Clock:
    """A UTC clock tests move by hand (thread-safe: the API and broker read it from threads)."""

    def __init__(self, start: datetime = T0):
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += timedelta(seconds=seconds)


def decision(sql: str, groups: Sequence[str] = ("payments-agents",)) -> Decision:
    """What the policy decides for ``sql``: a hold, checked, so a test can't silently run on an allow."""
    decided = POLICY.decide(groups, "payments", sql)
    assert decided.action is Action.HOLD, decided
    return decided


def open_request(service: ApprovalService, sql: str = CARD_UPDATE, *, requester: Identity | Requester = AGENT,
                 params: Sequence[str] | None = ("blocked", "42"), fingerprint: str = "fp-card-update",
                 target: str = "payments", **kwargs: Any) -> ApprovalRequest:
    """A request as the proxy opens one."""
    return service.request(requester=requester, target=target, database="payments", sql=sql, params=params,
                           decision=decision(sql), fingerprint=fingerprint, session_id=17,
                           client="10.0.0.2:50123", role="app", **kwargs)


# Clients of the dev issuer for the API and CLI tests: approvers get their tokens with the
# client-credentials grant, as the lab's approvers do.
APPROVER_CLIENTS = {
    "dba-1": DevClient(secret="dba-1-secret", groups=(APPROVERS,)),
    "dba-2": DevClient(secret="dba-2-secret", groups=(APPROVERS,)),
    "sec-1": DevClient(secret="sec-1-secret", groups=("security",)),
    "agent-ci": DevClient(secret="agent-secret", groups=("payments-agents",)),
    "ops-bot": DevClient(secret="ops-secret", groups=("ops",)),
}


def client_token(issuer: DevIssuer, tls: TlsFiles, client_id: str) -> str:
    """A client-credentials access token, got the way a real client gets one."""
    status, body = https_json(f"{issuer.url}/token", tls.ca_file,
                              basic=(client_id, APPROVER_CLIENTS[client_id].secret),
                              form={"grant_type": "client_credentials"})
    assert status == 200, body
    return body["access_token"]


def approvals_issuer(tls: TlsFiles) -> DevIssuer:
    """A started dev issuer that knows the agents, people and approvers of these tests."""
    from tests.identity.dev_flows import AUDIENCE
    from tests.webui import CLIENTS, USERS
    return DevIssuer(("127.0.0.1", 0), tls_cert=tls.cert_file, tls_key=tls.key_file, audience=AUDIENCE,
                     clients={**CLIENTS, **APPROVER_CLIENTS}, users=USERS).start()
