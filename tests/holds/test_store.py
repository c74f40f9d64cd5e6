"""The approvals database: schema, ids, round trips, the revision counter, grants — real SQLite files."""

from __future__ import annotations

import stat
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from appliance.holds.service import ApprovalService
from appliance.holds.store import (
    ID_ALPHABET,
    ApprovalStore,
    Grant,
    StoreError,
    Vote,
    new_request_id,
    normalize_request_id,
)
from appliance.state.db import CONSTRAINT_ERRORS
from tests.holds import AGENT, CARD_UPDATE, DBA1, T0, Clock, open_request


@pytest.fixture
def store(state_where) -> ApprovalStore:  # once on SQLite, once on PostgreSQL (tests/conftest.py)
    store = ApprovalStore(state_where("approvals"))
    yield store
    store.close()


@pytest.fixture
def service(store: ApprovalStore) -> ApprovalService:
    return ApprovalService(store, clock=Clock())


def test_new_database_is_private_and_migrated(store: ApprovalStore) -> None:
    assert store.db.schema_version == 2
    assert store.revision() == 0
    if store.db.dialect == "sqlite":
        assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
        sql = "SELECT name FROM sqlite_master WHERE type = 'table'"
    else:  # its own schema in the shared database
        sql = f"SELECT table_name FROM information_schema.tables WHERE table_schema = '{store.db.schema}'"
    tables = {r[0] for r in store.db.connection().execute(sql)}
    assert {"requests", "decisions", "grants", "revision"} <= tables


def test_reopening_keeps_data_and_a_missing_file_is_an_error_without_create(tmp_path: Path,
                                                                              service: ApprovalService) -> None:
    opened = open_request(service)
    again = ApprovalStore(service.store.path, create=False)
    try:
        assert again.get(opened.id) == opened
    finally:
        again.close()
    with pytest.raises(StoreError, match="does not exist"):
        ApprovalStore(tmp_path / "nope.db", create=False)


def test_a_version_1_database_is_migrated_and_its_grants_keep_their_shape_scope(tmp_path: Path) -> None:
    from appliance.holds.store import MIGRATIONS
    from appliance.state.db import Database
    path = tmp_path / "approvals.db"
    old = Database(path, MIGRATIONS[:1])
    old.connection().executescript(
        "INSERT INTO requests (id, created_at, requester_subject, requester_display, requester_kind,"
        " requester_groups, target, database, sql, classification, rule, approver_groups, min_approvals,"
        " expires_at, fingerprint) VALUES ('apr-000001', 0, 'agent-ci', 'agent-ci', 'agent', '[]', 'payments',"
        " 'payments', 'UPDATE t SET a = 1', '[]', 'r', '[\"dba\"]', 1, 1, 'e966626db63ce24a');"
        "INSERT INTO decisions (request_id, approver_subject, approver_display, approver_kind, approver_groups,"
        " verdict, reason, grant_minutes, at) VALUES ('apr-000001', 'dba-1', 'dba-1', 'person', '[]', 'approve',"
        " 'ok', 5, 0);"
        "INSERT INTO grants (subject, target, fingerprint, created_at, expires_at, request_id)"
        " VALUES ('agent-ci', 'payments', 'e966626db63ce24a', 0, 1, 'apr-000001');")
    old.close()
    store = ApprovalStore(path)
    try:
        assert store.db.schema_version == 2
        migrated = store.get("apr-000001")
        assert (migrated.shape, migrated.free, migrated.grant.scope) == ("", None, "shape")
        assert migrated.votes[0].grant_scope == "shape"
    finally:
        store.close()


def test_ids_are_short_unambiguous_and_normalised() -> None:
    ids = {new_request_id() for _ in range(2000)}
    assert len(ids) == 2000
    for request_id in ids:
        assert request_id.startswith("apr-") and len(request_id) == 10
        assert all(c in ID_ALPHABET for c in request_id[4:])
    assert not set("ILOU") & set("".join(ids))
    assert normalize_request_id("apr-7F3K2Q") == "apr-7F3K2Q"
    assert normalize_request_id("  APR-7f3k2q ") == "apr-7F3K2Q"
    assert normalize_request_id("7f3k2q") == "apr-7F3K2Q"
    assert normalize_request_id("apr-7F3K2O") == "apr-7F3K20"  # O read as zero
    assert normalize_request_id("apr-1IL0O0") == "apr-111000"
    for bad in ("", "apr-", "apr-7F3K2", "apr-7F3K2QQ", "apr-7F3K2U", "apr-7F3K2!", "x" * 100):
        assert normalize_request_id(bad) is None


def test_request_round_trips_every_field(service: ApprovalService) -> None:
    opened = open_request(service)
    stored = service.store.get(opened.id)
    assert stored == opened
    assert stored.created_at == T0 and stored.created_at.tzinfo is not None
    assert stored.expires_at == T0 + timedelta(minutes=10)
    assert stored.requester.subject == "agent-ci" and stored.requester.kind == "agent"
    assert stored.requester.groups == ("payments-agents",)
    assert stored.params == ("blocked", "42")
    assert stored.session_id == "17" and stored.client == "10.0.0.2:50123" and stored.role == "app"
    assert stored.rule == "card-changes-need-a-dba" and stored.rule_line == 3
    assert stored.message == "changes to cards need a payments DBA's approval"
    assert stored.approver_groups == ("payments-dbas",) and stored.min_approvals == 1
    assert stored.classification == ({"command": "UPDATE", "classes": ["write"], "relations": ["public.cards"],
                                       "columns": ["public.cards.id", "public.cards.status"], "functions": []},)
    assert stored.classes == ["write"]
    assert stored.status == "pending" and stored.votes == () and stored.grant is None


def test_no_parameters_is_not_empty_parameters(service: ApprovalService) -> None:
    none = open_request(service, params=None)
    empty = open_request(service, params=())
    assert service.store.get(none.id).params is None
    assert service.store.get(empty.id).params == ()


def test_classification_keeps_no_statement_text(service: ApprovalService) -> None:
    # The classifier's copy of the SQL is unscrubbed: it must not reach the store.
    opened = open_request(service, "UPDATE public.cards SET pan = '4111111111111111' WHERE id = 1",
                          params=None)
    raw = service.store.db.connection().execute("SELECT classification FROM requests WHERE id = ?",
                                                (opened.id,)).fetchone()[0]
    assert "4111" not in raw


def test_colliding_id_is_replaced(service: ApprovalService) -> None:
    first = open_request(service)
    with service.store.write() as tx:
        second = tx.insert_request(replace(first, session_id="99"))
    assert second.id != first.id
    assert service.store.get(second.id).session_id == "99"
    assert service.store.get(first.id).session_id == "17"


def test_revision_moves_once_per_write_transaction_and_never_on_reads(service: ApprovalService) -> None:
    store = service.store
    assert store.revision() == 0
    opened = open_request(service)
    assert store.revision() == 1
    store.get(opened.id), store.list(), store.get_many([opened.id]), store.active_grants(T0)
    assert store.revision() == 1
    with store.write() as tx:  # a vote, a settlement and a grant in one transaction: one step
        tx.add_vote(opened.id, Vote("dba-1", "dba1@example.test", "person", ("payments-dbas",), "approve", "ok", T0))
        tx.settle(opened.id, "approved", T0)
        tx.add_grant(Grant("agent-ci", "payments", "fp", T0, T0 + timedelta(minutes=5), opened.id))
    assert store.revision() == 2
    with store.write():
        pass  # a transaction that wrote nothing
    assert store.revision() == 2


def test_revision_is_seen_by_another_connection(service: ApprovalService) -> None:
    watcher = ApprovalStore(service.store.path)
    try:
        before = watcher.revision()
        open_request(service)
        assert watcher.revision() == before + 1
    finally:
        watcher.close()


def test_a_failed_transaction_changes_nothing(service: ApprovalService) -> None:
    opened = open_request(service)
    revision = service.store.revision()
    vote = Vote("dba-1", "dba1", "person", (), "approve", "ok", T0)

    def vote_twice() -> None:
        with service.store.write() as tx:
            tx.add_vote(opened.id, vote)
            tx.add_vote(opened.id, vote)  # the database itself refuses a second vote

    with pytest.raises(CONSTRAINT_ERRORS):
        vote_twice()
    assert service.store.get(opened.id).votes == ()
    assert service.store.revision() == revision


def test_settled_requests_are_never_settled_again(service: ApprovalService) -> None:
    opened = open_request(service)
    with service.store.write() as tx:
        tx.settle(opened.id, "denied", T0)
    with pytest.raises(StoreError, match="is not pending"), service.store.write() as tx:
        tx.settle(opened.id, "approved", T0)
    with pytest.raises(ValueError, match="a request is settled to approved"), service.store.write() as tx:
        tx.settle(opened.id, "pending", T0)
    assert service.store.get(opened.id).status == "denied"
    with pytest.raises(CONSTRAINT_ERRORS):  # the CHECK constraint, below the code
        service.store.db.connection().execute("UPDATE requests SET status = 'maybe' WHERE id = ?", (opened.id,))


def test_list_filters_orders_newest_first_and_limits(service: ApprovalService) -> None:
    clock: Clock = service.clock  # type: ignore[assignment]
    ids = []
    for _ in range(5):
        ids.append(open_request(service).id)
        clock.advance(1)
    with service.store.write() as tx:
        tx.settle(ids[1], "withdrawn", T0, "gone")
    assert [r.id for r in service.store.list()] == ids[::-1]
    assert [r.id for r in service.store.list("pending")] == [ids[4], ids[3], ids[2], ids[0]]
    assert [r.id for r in service.store.list("withdrawn")] == [ids[1]]
    assert [r.id for r in service.store.list(limit=2)] == [ids[4], ids[3]]
    with pytest.raises(ValueError, match="unknown status 'open'"):
        service.store.list("open")  # type: ignore[arg-type]


def test_get_many_handles_more_ids_than_sqlite_binds(service: ApprovalService) -> None:
    opened = open_request(service)
    found = service.store.get_many([opened.id] + [f"apr-{i:06d}" for i in range(1200)])
    assert list(found) == [opened.id]


def test_grants_match_exactly_and_only_while_live(service: ApprovalService) -> None:
    opened = open_request(service)
    with service.store.write() as tx:
        tx.add_grant(Grant("agent-ci", "payments", "fp-1", T0, T0 + timedelta(minutes=30), opened.id))
    store = service.store
    assert store.active_grant("agent-ci", "payments", "fp-1", T0).request_id == opened.id
    assert store.active_grant("agent-ci", "payments", "fp-1", T0 + timedelta(minutes=29, seconds=59))
    assert store.active_grant("agent-ci", "payments", "fp-1", T0 + timedelta(minutes=30)) is None
    assert store.active_grant("agent-ci", "payments", "fp-2", T0) is None
    assert store.active_grant("agent-ci", "billing", "fp-1", T0) is None
    assert store.active_grant("someone-else", "payments", "fp-1", T0) is None
    assert [g.fingerprint for g in store.active_grants(T0)] == ["fp-1"]
    assert store.active_grants(T0 + timedelta(hours=1)) == []


def test_requester_is_stored_as_given(service: ApprovalService) -> None:
    opened = open_request(service, requester=DBA1)
    assert service.store.get(opened.id).requester.display == "dba1@example.test"
    assert service.store.get(opened.id).requester.subject == "dba-1"
    assert service.store.get(open_request(service).id).requester.subject == AGENT.subject


def test_sql_is_stored_verbatim(service: ApprovalService) -> None:
    opened = open_request(service, CARD_UPDATE)
    assert service.store.get(opened.id).sql == CARD_UPDATE
