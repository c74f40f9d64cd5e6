"""The approval rules, each on its own, against a real SQLite store and a settable clock."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from appliance.config import load_config
from appliance.holds.service import ApprovalError, ApprovalService, may_see
from appliance.holds.store import ApprovalStore, Requester
from appliance.model.decision import Action, Decision, HoldSpec
from tests.holds import (
    AGENT,
    APPROVERS,
    CARD_UPDATE,
    DBA1,
    DBA2,
    OUTSIDER,
    PAYMENT_DELETE,
    SEC,
    T0,
    Clock,
    decision,
    open_request,
)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def service(state_where, clock: Clock) -> Iterator[ApprovalService]:  # on SQLite and on PostgreSQL
    service = ApprovalService(ApprovalStore(state_where("approvals")), max_grant_minutes=60, clock=clock)
    yield service
    service.close()


def refused(code: str, fn: Any, *args: Any, **kwargs: Any) -> ApprovalError:
    with pytest.raises(ApprovalError) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, info.value.message
    return info.value


# --- opening ---------------------------------------------------------------------------------

def test_request_is_pending_until_the_holds_timeout(service: ApprovalService) -> None:
    opened = open_request(service)
    assert opened.pending and opened.id.startswith("apr-")
    assert opened.expires_at - opened.created_at == timedelta(minutes=10)
    assert service.get(opened.id) == opened
    assert service.get(opened.id.lower()) == opened  # as someone might type it


def test_request_timeout_can_be_given(service: ApprovalService) -> None:
    opened = open_request(service, timeout_seconds=30)
    assert opened.timeout_seconds == 30


@pytest.mark.parametrize("hold, message", [
    (None, "names no approver groups"),
    (HoldSpec(()), "names no approver groups"),
    (HoldSpec(("dba",), min_approvals=0), "asks for 0 approvals"),
])
def test_a_hold_nobody_could_approve_is_refused(service: ApprovalService, hold: HoldSpec | None,
                                                message: str) -> None:
    held = Decision(Action.HOLD, "broken-rule", hold=hold)
    error = refused("invalid_request", service.request, requester=AGENT, target="payments", database="payments",
                    sql="UPDATE t SET a = 1", params=None, decision=held, fingerprint="fp")
    assert message in error.message
    assert service.list() == []


def test_non_positive_timeout_is_refused(service: ApprovalService) -> None:
    refused("invalid_request", open_request, service, timeout_seconds=0)


def test_unidentified_requester_is_recorded_as_such(service: ApprovalService) -> None:
    who = Requester("unidentified@10.0.0.9", "unidentified (10.0.0.9:4000)", "unidentified")
    assert open_request(service, requester=who).requester == who


# --- reasons ---------------------------------------------------------------------------------

@pytest.mark.parametrize("reason", ["", "   ", "\n\t", None])
def test_reason_is_required(service: ApprovalService, reason: Any) -> None:
    opened = open_request(service)
    refused("reason_required", service.decide, opened.id, DBA1, True, reason)
    refused("reason_required", service.decide, opened.id, DBA1, False, reason)
    assert service.get(opened.id).votes == ()


@pytest.mark.parametrize("reason", ["ok\x1b[2Jfake line", "ok\u202eevil", "x" * 2001])
def test_reason_with_control_characters_or_too_long_is_refused(service: ApprovalService, reason: str) -> None:
    refused("invalid_reason", service.decide, open_request(service).id, DBA1, True, reason)


def test_reason_is_kept_trimmed_with_its_newlines(service: ApprovalService) -> None:
    opened = open_request(service)
    decided = service.decide(opened.id, DBA1, True, "  ticket CHG-1234\n\tapproved in standup  ")
    assert decided.votes[0].reason == "ticket CHG-1234\n\tapproved in standup"


def test_reasons_are_pan_scrubbed_when_configured_from_the_appliance_config(tmp_path: Path) -> None:
    path = tmp_path / "tollgate.toml"
    path.write_text('[identity]\nstate_dir = "state"\n')
    service = ApprovalService.from_config(load_config(path), clock=Clock())
    try:
        assert service.store.path == tmp_path / "state" / "approvals.db"
        opened = open_request(service)
        decided = service.decide(opened.id, DBA1, False, "customer 4111 1111 1111 1111 disputes this")
        assert "4111 1111 1111 1111" not in decided.votes[0].reason
        assert decided.votes[0].reason.endswith("1111 disputes this")
    finally:
        service.close()


# --- who may decide --------------------------------------------------------------------------

def test_requester_can_never_decide_their_own_request(service: ApprovalService) -> None:
    # A DBA's own change, held like anyone's: being an approver doesn't let them wave it through.
    opened = open_request(service, requester=DBA1)
    error = refused("self_approval", service.decide, opened.id, DBA1, True, "it's fine, trust me")
    assert "cannot approve their own request" in error.message
    refused("self_approval", service.decide, opened.id, DBA1, False, "changed my mind")
    assert service.get(opened.id).pending
    assert service.decide(opened.id, DBA2, True, "reviewed").status == "approved"


def test_same_subject_with_other_groups_is_still_the_requester(service: ApprovalService) -> None:
    opened = open_request(service, requester=Requester("dba-1", "dba-1", "agent", ("ci",)))
    refused("self_approval", service.decide, opened.id, DBA1, True, "same subject, other hat")


def test_approver_must_be_in_an_approver_group(service: ApprovalService) -> None:
    opened = open_request(service)
    error = refused("not_an_approver", service.decide, opened.id, OUTSIDER, True, "looks fine")
    assert error.message == (f"eve@example.test is not in an approver group of {opened.id} (payments-dbas); "
                             "your groups: marketing")
    refused("not_an_approver", service.decide, opened.id, OUTSIDER, False, "no")
    refused("not_an_approver", service.decide, opened.id, SEC, True, "security is not on this rule")
    assert service.get(opened.id).votes == ()


def test_any_one_of_several_approver_groups_will_do(service: ApprovalService) -> None:
    opened = open_request(service, PAYMENT_DELETE)
    assert opened.approver_groups == (APPROVERS, "security")
    assert service.decide(opened.id, SEC, True, "security ok").pending
    assert service.decide(opened.id, DBA1, True, "dba ok").status == "approved"


# --- settling ----------------------------------------------------------------------------------

def test_one_approval_settles_a_single_approver_hold(service: ApprovalService, clock: Clock) -> None:
    opened = open_request(service)
    clock.advance(42)
    decided = service.decide(opened.id, DBA1, True, "CHG-1")
    assert decided.status == "approved"
    assert decided.decided_at == T0 + timedelta(seconds=42)
    vote = decided.votes[0]
    assert (vote.approver_subject, vote.approver_display, vote.approver_kind, vote.approver_groups,
            vote.verdict, vote.reason, vote.at) == ("dba-1", "dba1@example.test", "person", (APPROVERS,),
                                                    "approve", "CHG-1", T0 + timedelta(seconds=42))
    assert decided.grant is None


def test_min_approvals_needs_that_many_different_approvers(service: ApprovalService) -> None:
    opened = open_request(service, PAYMENT_DELETE)
    assert opened.min_approvals == 2
    first = service.decide(opened.id, DBA1, True, "first look")
    assert first.pending and first.approvals == 1 and first.decided_at is None
    second = service.decide(opened.id, DBA2, True, "second look")
    assert second.status == "approved" and second.approvals == 2


def test_one_vote_per_approver(service: ApprovalService) -> None:
    opened = open_request(service, PAYMENT_DELETE)
    service.decide(opened.id, DBA1, True, "first look")
    error = refused("duplicate_vote", service.decide, opened.id, DBA1, True, "me again")
    assert "already voted to approve" in error.message
    refused("duplicate_vote", service.decide, opened.id, DBA1, False, "actually no")
    assert service.get(opened.id).approvals == 1 and service.get(opened.id).pending


def test_any_deny_denies_even_after_approvals(service: ApprovalService) -> None:
    opened = open_request(service, PAYMENT_DELETE)
    service.decide(opened.id, DBA1, True, "fine by me")
    decided = service.decide(opened.id, SEC, False, "no deletes during the audit")
    assert decided.status == "denied"
    assert decided.denial.approver_subject == "sec-1" and decided.denial.reason == "no deletes during the audit"


def test_settled_requests_cannot_be_decided_again(service: ApprovalService) -> None:
    approved = open_request(service)
    service.decide(approved.id, DBA1, True, "ok")
    error = refused("already_decided", service.decide, approved.id, DBA2, False, "too late")
    assert error.message.startswith(f"{approved.id} was already approved at 2025-03-01T02:00:00.000Z")
    denied = open_request(service)
    service.decide(denied.id, DBA1, False, "no")
    error = refused("already_decided", service.decide, denied.id, DBA2, True, "yes")
    assert f"{denied.id} was already denied by dba1@example.test" in error.message
    withdrawn = open_request(service)
    service.withdraw(withdrawn.id, "client went away")
    error = refused("already_decided", service.decide, withdrawn.id, DBA1, True, "ok")
    assert error.message.endswith("was withdrawn at 2025-03-01T02:00:00.000Z: client went away")


def test_a_request_past_its_time_expires_instead_of_being_decided(service: ApprovalService, clock: Clock) -> None:
    opened = open_request(service)
    clock.advance(600)  # exactly at expires_at: too late
    error = refused("expired", service.decide, opened.id, DBA1, True, "sorry, was asleep")
    assert "expired at 2025-03-01T02:10:00.000Z without a decision" in error.message
    stored = service.get(opened.id)
    assert stored.status == "expired" and stored.votes == ()  # the expiry is committed, the vote is not
    assert stored.status_reason == "no decision within 600 s"
    refused("expired", service.decide, opened.id, DBA2, False, "also late")


def test_unknown_requests(service: ApprovalService) -> None:
    refused("unknown_request", service.decide, "apr-000000", DBA1, True, "ok")
    error = refused("unknown_request", service.decide, "DROP TABLE cards", DBA1, True, "ok")
    assert "is not an approval request id" in error.message
    refused("unknown_request", service.get, "apr-ZZZZZZ")
    refused("unknown_request", service.expire, "apr-ZZZZZZ")
    refused("unknown_request", service.withdraw, "apr-ZZZZZZ", "why")


def test_decide_accepts_the_id_as_typed(service: ApprovalService) -> None:
    opened = open_request(service)
    assert service.decide(opened.id.lower().replace("apr-", ""), DBA1, True, "ok").status == "approved"


def test_concurrent_deciders_settle_a_request_exactly_once(service: ApprovalService) -> None:
    opened = open_request(service)
    outcomes: list[str] = []
    start = threading.Barrier(8)

    def vote(i: int) -> None:
        approver = DBA1 if i % 2 else DBA2
        start.wait()
        try:
            outcomes.append(service.decide(opened.id, approver, bool(i % 3), f"vote {i}").status)
        except ApprovalError as exc:
            outcomes.append(exc.code)

    threads = [threading.Thread(target=vote, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    settled = service.get(opened.id)
    assert len(settled.votes) == 1
    assert sorted(outcomes) == sorted([settled.status] + ["already_decided"] * 7)


# --- grants ------------------------------------------------------------------------------------

def test_approval_with_grant_minutes_makes_a_grant(service: ApprovalService, clock: Clock) -> None:
    opened = open_request(service)
    decided = service.decide(opened.id, DBA1, True, "batch fix, 30 min", grant_minutes=30)
    grant = decided.grant
    assert (grant.subject, grant.target, grant.fingerprint, grant.request_id) == (
        "agent-ci", "payments", "fp-card-update", opened.id)
    assert grant.expires_at == T0 + timedelta(minutes=30)
    assert service.active_grant("agent-ci", "payments", "fp-card-update") == grant
    clock.advance(30 * 60 - 1)
    assert service.active_grant("agent-ci", "payments", "fp-card-update") == grant
    clock.advance(1)
    assert service.active_grant("agent-ci", "payments", "fp-card-update") is None
    assert service.active_grants() == []


def test_a_grant_revoked_ends_at_once_and_only_its_approvers_may_revoke_it(service: ApprovalService) -> None:
    opened = open_request(service)
    service.decide(opened.id, DBA1, True, "batch fix", grant_minutes=30)
    revision = service.store.revision()
    refused("not_an_approver", service.revoke_grant, opened.id, OUTSIDER)
    assert service.active_grant("agent-ci", "payments", "fp-card-update") is not None
    service.revoke_grant(opened.id, DBA2)
    assert service.active_grant("agent-ci", "payments", "fp-card-update") is None
    assert service.active_grants() == []
    assert service.store.revision() > revision  # the proxy's broker reads the grants again
    refused("no_grant", service.revoke_grant, opened.id, DBA1)
    refused("no_grant", service.revoke_grant, open_request(service, sql=PAYMENT_DELETE).id, DBA1)
    refused("unknown_request", service.revoke_grant, "apr-ZZZZZZ", DBA1)


def test_grants_are_for_that_identity_target_and_shape_only(service: ApprovalService) -> None:
    service.decide(open_request(service).id, DBA1, True, "ok", grant_minutes=10)
    assert service.active_grant("agent-ci", "payments", "fp-card-update") is not None
    assert service.active_grant("agent-other", "payments", "fp-card-update") is None
    assert service.active_grant("agent-ci", "billing", "fp-card-update") is None
    assert service.active_grant("agent-ci", "payments", "fp-something-else") is None


def test_grant_longer_than_allowed_is_refused(service: ApprovalService) -> None:
    opened = open_request(service)
    error = refused("grant_too_long", service.decide, opened.id, DBA1, True, "ok", grant_minutes=61)
    assert error.message == "a grant may last at most 60 minutes ([approvals] max_grant_minutes), not 61"
    assert service.get(opened.id).pending  # nothing recorded: the approver asks again with less
    assert service.decide(opened.id, DBA1, True, "ok", grant_minutes=60).grant is not None


def test_grants_can_be_turned_off(service: ApprovalService) -> None:
    service.max_grant_minutes = 0
    error = refused("grant_too_long", service.decide, open_request(service).id, DBA1, True, "ok", grant_minutes=1)
    assert "turned off" in error.message


@pytest.mark.parametrize("minutes", [0, -5, True, 1.5, "30"])
def test_grant_minutes_must_be_a_positive_whole_number(service: ApprovalService, minutes: Any) -> None:
    refused("invalid_grant", service.decide, open_request(service).id, DBA1, True, "ok", grant_minutes=minutes)


def test_a_denial_grants_nothing(service: ApprovalService) -> None:
    error = refused("invalid_grant", service.decide, open_request(service).id, DBA1, False, "no", grant_minutes=5)
    assert "a denial grants nothing" in error.message


def test_multi_approver_grant_needs_every_approver_and_takes_the_shortest(service: ApprovalService) -> None:
    both = open_request(service, PAYMENT_DELETE, fingerprint="fp-a")
    service.decide(both.id, DBA1, True, "ok", grant_minutes=45)
    decided = service.decide(both.id, SEC, True, "ok", grant_minutes=15)
    assert decided.grant.expires_at == T0 + timedelta(minutes=15)
    one = open_request(service, PAYMENT_DELETE, fingerprint="fp-b")
    service.decide(one.id, DBA1, True, "ok", grant_minutes=45)
    decided = service.decide(one.id, SEC, True, "this once only")
    assert decided.status == "approved" and decided.grant is None
    assert service.active_grant("agent-ci", "payments", "fp-b") is None


def test_a_grant_covers_the_exact_statement_unless_the_approver_chooses_its_shape(service: ApprovalService) -> None:
    exact = open_request(service, fingerprint="exact:1", shape="shape:1", free=("'blocked'", "42"))
    grant = service.decide(exact.id, DBA1, True, "this one", grant_minutes=10).grant
    assert (grant.scope, grant.fingerprint) == ("exact", "exact:1")
    assert service.active_grant("agent-ci", "payments", "shape:1") is None
    shaped = open_request(service, fingerprint="exact:2", shape="shape:2", free=("'blocked'", "42"))
    decided = service.decide(shaped.id, DBA1, True, "any card", grant_minutes=10, grant_scope="shape")
    assert (decided.grant.scope, decided.grant.fingerprint) == ("shape", "shape:2")
    assert decided.votes[0].grant_scope == "shape" and decided.free == ("'blocked'", "42")
    assert service.active_grant("agent-ci", "payments", "exact:2") is None


def test_a_shape_grant_needs_every_approver_to_choose_it(service: ApprovalService) -> None:
    both = open_request(service, PAYMENT_DELETE, fingerprint="exact:d", shape="shape:d")
    service.decide(both.id, DBA1, True, "ok", grant_minutes=45, grant_scope="shape")
    decided = service.decide(both.id, SEC, True, "just this", grant_minutes=15)
    assert (decided.grant.scope, decided.grant.fingerprint) == ("exact", "exact:d")


@pytest.mark.parametrize("minutes, scope, says", [
    (None, "shape", "needs grant minutes"), (10, "table", "not 'table'"), (10, "", "not ''")])
def test_a_grant_scope_is_exact_or_shape_and_comes_with_minutes(service: ApprovalService, minutes: Any, scope: Any,
                                                                 says: str) -> None:
    opened = open_request(service, fingerprint="exact:1", shape="shape:1")
    error = refused("invalid_grant", service.decide, opened.id, DBA1, True, "ok", grant_minutes=minutes,
                    grant_scope=scope)
    assert says in error.message
    assert service.get(opened.id).pending


def test_a_request_without_a_shape_key_gets_only_exact_grants(service: ApprovalService) -> None:
    opened = open_request(service)  # as opened before shape keys existed: shape ""
    error = refused("invalid_grant", service.decide, opened.id, DBA1, True, "ok", grant_minutes=5,
                    grant_scope="shape")
    assert "only an exact grant" in error.message
    assert service.decide(opened.id, DBA1, True, "ok", grant_minutes=5).grant.scope == "exact"


# --- ending without a decision ---------------------------------------------------------------------

def test_expire_and_withdraw_settle_pending_requests(service: ApprovalService, clock: Clock) -> None:
    expiring, leaving = open_request(service), open_request(service)
    clock.advance(5)
    expired = service.expire(expiring.id)
    assert expired.status == "expired" and expired.decided_at == T0 + timedelta(seconds=5)
    assert expired.status_reason == "no decision within 600 s"
    assert service.expire(open_request(service).id, "waited 5 s").status_reason == "waited 5 s"
    withdrawn = service.withdraw(leaving.id, "the client disconnected")
    assert withdrawn.status == "withdrawn" and withdrawn.status_reason == "the client disconnected"
    refused("reason_required", service.withdraw, open_request(service).id, " ")


def test_expire_and_withdraw_leave_a_settled_request_as_it_was(service: ApprovalService) -> None:
    # The race a waiter's deadline runs against an approval: whichever commits first wins.
    opened = open_request(service)
    approved = service.decide(opened.id, DBA1, True, "just in time")
    assert service.expire(opened.id) == approved
    assert service.withdraw(opened.id, "client left") == approved


def test_expire_overdue_expires_only_what_is_due(service: ApprovalService, clock: Clock) -> None:
    short = open_request(service, timeout_seconds=60)
    long = open_request(service, timeout_seconds=3600)
    decided = open_request(service, timeout_seconds=60)
    service.decide(decided.id, DBA1, True, "ok")
    revision = service.store.revision()
    assert service.expire_overdue() == []
    assert service.store.revision() == revision  # nothing due: nothing written
    clock.advance(61)
    assert [r.id for r in service.expire_overdue()] == [short.id]
    assert service.get(short.id).status == "expired"
    assert service.get(long.id).pending and service.get(decided.id).status == "approved"


# --- reading -------------------------------------------------------------------------------------

def test_list_by_status(service: ApprovalService) -> None:
    a, b = open_request(service), open_request(service)
    service.decide(b.id, DBA1, False, "no")
    assert {r.id for r in service.list()} == {a.id, b.id}
    assert [r.id for r in service.list("pending")] == [a.id]
    assert [r.id for r in service.list("denied")] == [b.id]
    with pytest.raises(ValueError, match="unknown status 'open'"):
        service.list("open")
    with pytest.raises(ValueError, match="limit must be between 1 and"):
        service.list(limit=0)


def test_decisions_are_visible_to_another_process_view(service: ApprovalService) -> None:
    # The proxy and the web service each open the file: what one writes, the other reads.
    opened = open_request(service, CARD_UPDATE)
    web = ApprovalService(ApprovalStore(service.store.path), clock=service.clock)
    try:
        web.decide(opened.id, DBA1, True, "ok")
    finally:
        web.close()
    assert service.get(opened.id).status == "approved"


def test_decision_helper_really_comes_from_the_policy() -> None:
    held = decision(CARD_UPDATE)
    assert held.hold is not None and held.hold.approver_groups == (APPROVERS,)


def test_viewers_see_what_they_may_decide_and_what_they_asked_for(service: ApprovalService, clock: Clock) -> None:
    card = open_request(service)                        # AGENT asks; payments-dbas decide
    clock.advance(1)
    payment = open_request(service, PAYMENT_DELETE)     # payments-dbas or security decide
    assert may_see(AGENT, card) and may_see(DBA1, card) and not may_see(SEC, card) and not may_see(OUTSIDER, card)
    assert [r.id for r in service.list(viewer=AGENT)] == [payment.id, card.id]
    assert [r.id for r in service.list(viewer=DBA2)] == [payment.id, card.id]
    assert [r.id for r in service.list(viewer=SEC)] == [payment.id]
    assert service.list(viewer=OUTSIDER) == []
    assert [r.id for r in service.list()] == [payment.id, card.id]  # no viewer: the proxy's and operator's view

    assert service.get(card.id, viewer=DBA1).id == card.id
    error = refused("unknown_request", service.get, card.id, viewer=SEC)
    assert error.message == f"there is no approval request {card.id}" and error.request is None
    refused("unknown_request", service.get, card.id, viewer=OUTSIDER)
