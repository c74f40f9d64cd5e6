"""One prepared-statement namespace across protocol Parse and SQL PREPARE/EXECUTE/DEALLOCATE.

Playbooks over a session with the real enforcement addon and a real policy (writes held),
so each case shows what reaches the server and what approvers are asked: a statement is
decided, held and recorded as what it really runs, whichever protocol prepared it, and a
name Tollgate can't tell the text of is refused.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from appliance.pgwire import messages as m
from appliance.policy.addon import EnforcementAddon
from appliance.policy.holder import PolicyHolder
from appliance.proxy.hooks import Addon, Forward, SessionInfo
from appliance.proxy.pipeline import BLOCKED_PORTAL, BLOCKED_SQL, BLOCKED_STATEMENT
from tests.proxy.playbook import (
    ClientData,
    ClientGets,
    Contains,
    Like,
    PauseClient,
    Playbook,
    ResumeClient,
    ServerData,
    ServerGets,
    Wait,
    WaitDone,
    ready_playbook,
    roundtrip,
)

POLICY = """
default = "deny"

[[rule]]
name = "writes-need-approval"
classes = ["write"]
action = "hold"
approvers = ["dba"]

[[rule]]
name = "the-rest"
classes = ["read", "prepared", "transaction", "session", "role_change"]
action = "allow"
"""

READY = m.ReadyForQuery(b"I")
BLOCKED = BLOCKED_SQL.decode()
CARD_UPDATE = "UPDATE cards SET brand = $1 WHERE id = $2"
VISA_7 = (b"visa", b"7")


class Approvals:
    """Stands in for the broker: records what approvers would be asked."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.granted: set[str] = set()

    def grant_allows(self, subject: str, target: str, key: str) -> bool:
        return key in self.granted

    def hold(self, request: dict[str, Any], decision: Any) -> Any:
        self.requests.append(request)
        return SimpleNamespace(id=f"apr-test{len(self.requests)}", timeout_seconds=300), asyncio.sleep(0)


class Records(Addon):
    """What the audit would record for each request that makes the server act."""

    name = "records"
    after = ("enforcement",)

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None, tuple[str, ...], str | None]] = []

    def forward(self, session: SessionInfo, request: Forward) -> None:
        statement = request.statement
        decision = statement.decision if statement is not None else None
        self.seen.append((request.kind, statement.text if statement is not None else None,
                          tuple(r.text for r in statement.executes) if statement is not None else (),
                          decision.action.value if decision is not None else None))


@pytest.fixture
def world(tmp_path: Path) -> tuple[Playbook, Approvals, Records]:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    approvals, records = Approvals(), Records()
    pb = ready_playbook([EnforcementAddon(PolicyHolder(path), approvals), records])
    return pb, approvals, records


def query(pb: Playbook, sql: str, *reply: m.Message) -> Playbook:
    return roundtrip(pb, [m.Query(sql)], [*reply, READY])


# What a held agent hears at once (the fake approvals name their requests apr-testN).
HELD_NOTICE = ClientGets(Like(m.NoticeResponse, message=Contains("statement held for approval apr-test")))


def held(pb: Playbook, sent: list[m.Message], wait: str = "approval") -> Playbook:
    """``sent`` is held for approval, then approved and sent as it was."""
    return (pb >> ClientData(*sent) << PauseClient()
            << HELD_NOTICE << Wait(wait)
            >> WaitDone(wait) << ServerGets(*sent) << ResumeClient())


def refused_query(pb: Playbook, sql: str, sqlstate: str, message: str) -> Playbook:
    """Tollgate refuses ``sql``: the server gets the stand-in, the agent the reason."""
    return (pb >> ClientData(m.Query(sql)) << ServerGets(m.Query(BLOCKED))
            >> ServerData(m.ErrorResponse.build("ERROR", "42601", "syntax error"), READY)
            << ClientGets(Like(m.ErrorResponse, sqlstate=sqlstate, message=message), READY))


def bind_refused(pb: Playbook, name: str) -> Playbook:
    """A Bind of ``name`` is refused as not existing, whatever the server holds."""
    return (pb >> ClientData(m.Bind("", name, (), (), ()), m.Execute("", 0), m.Sync())
            << ServerGets(m.Bind("", BLOCKED_STATEMENT, (), (), ()), m.Execute("", 0), m.Sync())
            >> ServerData(m.ErrorResponse.build("ERROR", "26000", "does not exist"), READY)
            << ClientGets(Like(m.ErrorResponse, sqlstate="26000",
                               message=f'prepared statement "{name}" does not exist'), READY))


def test_sql_execute_of_a_protocol_parsed_update_is_held_as_that_update(world):
    pb, approvals, records = world
    parse = m.Parse("s1", CARD_UPDATE, ())
    assert roundtrip(pb, [parse, m.Sync()], [m.ParseComplete(), READY])
    assert held(pb, [m.Query("EXECUTE s1('visa', 7)")])
    [request] = approvals.requests
    assert request["sql"] == f"EXECUTE s1('visa', 7)\n-- s1 is: {CARD_UPDATE}"
    assert request["free"] == ["'visa'", "7"]
    assert records.seen[-1] == ("query", "EXECUTE s1('visa', 7)", (CARD_UPDATE,), "hold")


def test_protocol_bind_of_a_sql_prepared_update_is_held_with_its_parameters(world):
    pb, approvals, records = world
    prepare = f"PREPARE s2 AS {CARD_UPDATE}"
    assert query(pb, prepare, m.CommandComplete("PREPARE"))
    assert approvals.requests == []  # preparing runs nothing
    assert (pb >> ClientData(m.Bind("", "s2", (), VISA_7, ()), m.Execute("", 0), m.Sync())
            << PauseClient() << HELD_NOTICE << Wait("approval")
            << ServerGets(m.Bind("", "s2", (), VISA_7, ()))
            >> WaitDone("approval")
            << ServerGets(m.Execute("", 0), m.Sync()) << ResumeClient())
    [request] = approvals.requests
    assert (request["sql"], request["params"]) == (CARD_UPDATE, ["visa", "7"])
    assert records.seen[-1] == ("execute", CARD_UPDATE, (), "hold")


def test_a_name_prepared_in_the_same_query_is_what_its_execute_runs(world):
    pb, approvals, _ = world
    both = "PREPARE s3 AS SELECT 1; DEALLOCATE s3; PREPARE s3 AS UPDATE cards SET brand = 'x'; EXECUTE s3"
    assert held(pb, [m.Query(both)])
    assert approvals.requests[0]["sql"].endswith("-- s3 is: UPDATE cards SET brand = 'x'")


def test_explain_analyze_execute_runs_the_statement_and_is_held(world):
    pb, approvals, _ = world
    assert roundtrip(pb, [m.Parse("s1", CARD_UPDATE, ()), m.Sync()], [m.ParseComplete(), READY])
    assert held(pb, [m.Query("EXPLAIN ANALYZE EXECUTE s1('visa', 7)")])
    assert len(approvals.requests) == 1


def test_a_parsed_sql_execute_is_resolved_when_it_runs(world):
    pb, approvals, records = world
    assert query(pb, "PREPARE s4 AS SELECT 1", m.CommandComplete("PREPARE"))
    run = [m.Parse("runner", "EXECUTE s4", ()), m.Bind("", "runner", (), (), ()), m.Execute("", 0), m.Sync()]
    assert roundtrip(pb, run, [m.ParseComplete(), m.BindComplete(), m.CommandComplete("SELECT 1"), READY])
    assert records.seen[-1] == ("execute", "EXECUTE s4", ("SELECT 1",), "allow")
    # s4 is now another statement: the same Parse runs it, and is decided as it.
    assert query(pb, "DEALLOCATE s4", m.CommandComplete("DEALLOCATE"))
    assert query(pb, "PREPARE s4 AS UPDATE cards SET brand = 'y'", m.CommandComplete("PREPARE"))
    again = [m.Bind("", "runner", (), (), ()), m.Execute("", 0), m.Sync()]
    assert (pb >> ClientData(*again) << PauseClient() << HELD_NOTICE << Wait("approval") << ServerGets(again[0])
            >> WaitDone("approval") << ServerGets(*again[1:]) << ResumeClient())
    assert approvals.requests[0]["sql"] == "EXECUTE s4\n-- s4 is: UPDATE cards SET brand = 'y'"


def test_deallocate_forgets_the_name_for_both_protocols(world):
    pb, _, _ = world
    assert roundtrip(pb, [m.Parse("s1", "SELECT 1", ()), m.Sync()], [m.ParseComplete(), READY])
    assert query(pb, "DEALLOCATE PREPARE s1", m.CommandComplete("DEALLOCATE"))
    assert refused_query(pb, "EXECUTE s1", "26000", 'prepared statement "s1" does not exist')
    assert bind_refused(pb, "s1")


@pytest.mark.parametrize("reset", ["DEALLOCATE ALL", "DISCARD ALL"])
def test_deallocate_all_and_discard_all_forget_every_named_statement(world, reset):
    pb, _, _ = world
    assert roundtrip(pb, [m.Parse("s1", "SELECT 1", ()), m.Sync()], [m.ParseComplete(), READY])
    assert query(pb, "PREPARE s2 AS SELECT 2", m.CommandComplete("PREPARE"))
    assert query(pb, reset, m.CommandComplete(reset.split()[0]))
    assert refused_query(pb, "EXECUTE s2", "26000", 'prepared statement "s2" does not exist')
    assert bind_refused(pb, "s1")


def test_protocol_close_forgets_a_sql_prepared_statement(world):
    pb, _, _ = world
    assert query(pb, "PREPARE s2 AS SELECT 2", m.CommandComplete("PREPARE"))
    assert roundtrip(pb, [m.Close(b"S", "s2"), m.Sync()], [m.CloseComplete(), READY])
    assert refused_query(pb, "EXECUTE s2", "26000", 'prepared statement "s2" does not exist')


def test_a_prepare_in_a_rolled_back_transaction_still_exists_as_in_postgresql(world):
    # PostgreSQL keeps prepared statements outside transactions: ROLLBACK undoes neither
    # PREPARE nor DEALLOCATE (checked against PostgreSQL 15).
    pb, approvals, _ = world
    assert query(pb, "BEGIN", m.CommandComplete("BEGIN"))
    assert roundtrip(pb, [m.Query(f"PREPARE s5 AS {CARD_UPDATE}")],
                     [m.CommandComplete("PREPARE"), m.ReadyForQuery(b"T")])
    assert query(pb, "ROLLBACK", m.CommandComplete("ROLLBACK"))
    assert held(pb, [m.Query("EXECUTE s5('amex', 1)")])
    assert approvals.requests[0]["sql"].endswith(f"-- s5 is: {CARD_UPDATE}")


def test_statements_after_a_failed_one_in_a_query_prepared_nothing(world):
    pb, _, records = world
    batch = "PREPARE s6 AS SELECT 6; SELECT 1/0; PREPARE s7 AS SELECT 7"
    assert query(pb, batch, m.CommandComplete("PREPARE"), m.ErrorResponse.build("ERROR", "22012", "division by zero"))
    assert refused_query(pb, "EXECUTE s7", "26000", 'prepared statement "s7" does not exist')
    # Prepared before the error: it stands (the implicit transaction's rollback keeps it too).
    assert query(pb, "EXECUTE s6", m.CommandComplete("SELECT 1"))
    assert records.seen[-1] == ("query", "EXECUTE s6", ("SELECT 6",), "allow")


def test_a_failed_prepare_leaves_nothing_to_bind(world):
    pb, _, _ = world
    assert query(pb, "PREPARE s8 AS SELECT nope", m.ErrorResponse.build("ERROR", "42703", "column nope"))
    assert bind_refused(pb, "s8")


def test_a_prepare_run_through_the_extended_protocol_takes_effect_when_it_runs(world):
    pb, approvals, _ = world
    prepare = f"PREPARE s9 AS {CARD_UPDATE}"
    # Skipped after an error in its pipeline: it never ran, so s9 does not exist.
    failing = [m.Parse("", "SELECT 1/0", ()), m.Bind("", "", (), (), ()), m.Execute("", 0),
               m.Parse("", prepare, ()), m.Bind("", "", (), (), ()), m.Execute("", 0), m.Sync()]
    assert roundtrip(pb, failing, [m.ParseComplete(), m.BindComplete(),
                                   m.ErrorResponse.build("ERROR", "22012", "division by zero"), READY])
    assert refused_query(pb, "EXECUTE s9('visa', 1)", "26000", 'prepared statement "s9" does not exist')
    # Run: s9 exists, and running it is held.
    run = [m.Parse("", prepare, ()), m.Bind("", "", (), (), ()), m.Execute("", 0), m.Sync()]
    assert roundtrip(pb, run, [m.ParseComplete(), m.BindComplete(), m.CommandComplete("PREPARE"), READY])
    assert held(pb, [m.Query("EXECUTE s9('visa', 1)")])
    assert len(approvals.requests) == 1


def test_a_query_drops_the_unnamed_statement(world):
    pb, _, _ = world
    assert roundtrip(pb, [m.Parse("", "SELECT 1", ()), m.Sync()], [m.ParseComplete(), READY])
    assert query(pb, "SELECT 2", m.CommandComplete("SELECT 1"))
    assert bind_refused(pb, "")


@pytest.mark.parametrize("again", [m.Parse("s1", "SELECT 1", ()), m.Query("PREPARE s1 AS SELECT 1")])
def test_preparing_a_known_name_again_forgets_it_rather_than_guess(world, again):
    # The server refuses and keeps the UPDATE — unless a function dropped s1 where Tollgate
    # can't see, and then it takes the SELECT. Tollgate can't tell which: s1 is refused.
    pb, approvals, _ = world
    assert roundtrip(pb, [m.Parse("s1", CARD_UPDATE, ()), m.Sync()], [m.ParseComplete(), READY])
    already = m.ErrorResponse.build("ERROR", "42P05", 'prepared statement "s1" already exists')
    assert roundtrip(pb, [again, *([m.Sync()] if isinstance(again, m.Parse) else [])], [already, READY])
    assert bind_refused(pb, "s1")
    assert refused_query(pb, "EXECUTE s1('visa', 7)", "26000", 'prepared statement "s1" does not exist')
    assert approvals.requests == []


def test_after_a_reload_both_protocols_run_a_prepared_statement_as_the_new_policy_decides(tmp_path: Path):
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    holder, records = PolicyHolder(path), Records()
    pb = ready_playbook([EnforcementAddon(holder, Approvals()), records])
    assert query(pb, "PREPARE s1 AS DELETE FROM cards", m.CommandComplete("PREPARE"))
    path.write_text(POLICY.replace('action = "hold"\napprovers = ["dba"]', 'action = "block"'))
    assert holder.reload()
    pb.hooks.epoch += 1  # what tollgate run's reload callback does
    assert (pb >> ClientData(m.Bind("p", "s1", (), (), ()), m.Execute("p", 0), m.Sync())
            << ServerGets(m.Bind("p", "s1", (), (), ()), m.Execute(BLOCKED_PORTAL, 0), m.Sync()))
    assert records.seen[-1] == ("execute", "DELETE FROM cards", (), "block")
    assert (pb >> ServerData(m.BindComplete(), m.ErrorResponse.build("ERROR", "34000", "no portal"), READY)
            << ClientGets(m.BindComplete(), Like(m.ErrorResponse, sqlstate="42501"), READY))
    assert refused_query(pb, "EXECUTE s1", "42501", "blocked by policy rule 'writes-need-approval' (policy.toml:4)")
    assert records.seen[-1] == ("query", "EXECUTE s1", ("DELETE FROM cards",), "block")


def test_an_exact_grant_for_an_execute_binds_the_statement_it_ran(world):
    pb, approvals, _ = world
    assert query(pb, "PREPARE s1 AS UPDATE cards SET brand = $1 WHERE id = $2", m.CommandComplete("PREPARE"))
    assert held(pb, [m.Query("EXECUTE s1('visa', 7)")])
    [request] = approvals.requests
    approvals.granted.add(request["fingerprint"])  # approved with an exact grant
    assert query(pb, "EXECUTE s1('visa', 7)", m.CommandComplete("UPDATE 1"))  # granted: no new request
    # Same EXECUTE text, another statement behind the name: not what was approved.
    assert query(pb, "DEALLOCATE s1", m.CommandComplete("DEALLOCATE"))
    assert query(pb, "PREPARE s1 AS DELETE FROM cards WHERE brand = $1 OR id = $2", m.CommandComplete("PREPARE"))
    assert held(pb, [m.Query("EXECUTE s1('visa', 7)")], "second approval")
    assert len(approvals.requests) == 2
