"""Traces for a read-only statement running while its audit record syncs: sent upstream at
once, its answer withheld until the record is durable, released in order, refused whole if
the record fails; anything that may change state still waits before it goes upstream.

Playbooks (tests/proxy/playbook.py): what each side receives and when, as one script."""

from __future__ import annotations

from appliance.model.decision import Action, Decision
from appliance.pgwire import messages as m
from appliance.policy.classifier import classify
from appliance.proxy.hooks import Addon, Forward, SessionInfo, Statement
from appliance.proxy.results import WITHHELD_HIGH_WATER
from tests.proxy.playbook import (
    ClientData,
    ClientGets,
    Error,
    PauseClient,
    PauseServer,
    ResumeClient,
    ResumeServer,
    ServerData,
    ServerGets,
    Wait,
    WaitDone,
    ready_playbook,
)

READY = m.ReadyForQuery(b"I")
IN_BLOCK = m.ReadyForQuery(b"T")
ONE_COLUMN = m.RowDescription((m.FieldDescription("n", 0, 0, 23, 4, -1, 0),))


class Classifying(Addon):
    """Policy's part, as the policy addon plays it: the real classifier's decision, allowed."""

    def statement(self, session: SessionInfo, statement: Statement):
        statement.decision = Decision(Action.ALLOW, "test", statements=tuple(classify(statement.text)))
        return None


class Durability(Addon):
    """The audit's part: every statement waits for its record to be durable."""

    def __init__(self) -> None:
        self.forwards: list[Forward] = []

    def forward(self, session: SessionInfo, request: Forward):
        self.forwards.append(request)
        return Token()


class Token:
    """Stands for the durability future (the playbook never awaits it)."""


class DiskFull(Exception):
    sqlstate = "53100"
    hint = "free some space"


def answer(*values: bytes, status: m.ReadyForQuery = READY) -> list[m.Message]:
    rows = [m.DataRow((v,)) for v in values]
    return [ONE_COLUMN, *rows, m.CommandComplete(f"SELECT {len(rows)}"), status]


def playbook():
    return ready_playbook([Classifying(), Durability()])


def test_a_read_only_statement_goes_upstream_at_once_and_its_results_wait_for_the_record():
    pb = playbook()
    assert pb
    before = pb.writes("client")
    select = m.Query("SELECT n FROM t")
    assert (pb
            >> ClientData(select)
            << PauseClient()
            << ServerGets(select)  # before the record is durable …
            << Wait("record")
            >> ServerData(*answer(b"1", b"2")))  # … but none of its answer goes to the agent
    assert pb.writes("client") == before
    assert (pb
            >> WaitDone("record")
            << ClientGets(*answer(b"1", b"2"))
            << ResumeClient())
    assert pb.writes("client") == before + 1  # released in one write


def test_results_withheld_until_durable_are_released_in_order_before_what_queued_behind():
    pb = playbook()
    first, second = m.Query("SELECT n FROM t"), m.Query("SELECT n FROM u")
    assert (pb
            >> ClientData(first)
            << PauseClient()
            << ServerGets(first)
            << Wait("first")
            >> ServerData(*answer(b"1")[:2])  # part of the answer …
            >> ClientData(second)  # … the agent's next statement, which must queue …
            >> ServerData(*answer(b"1")[2:])  # … the rest
            >> WaitDone("first")
            << ClientGets(*answer(b"1"))
            << ServerGets(second)  # only now, and withheld in its turn
            << Wait("second")
            >> ServerData(*answer(b"7"))
            >> WaitDone("second")
            << ClientGets(*answer(b"7"))
            << ResumeClient())


def test_a_failing_sync_refuses_a_read_whose_results_were_held():
    durability = Durability()
    pb = ready_playbook([Classifying(), durability])
    select = m.Query("SELECT pan FROM cards")
    assert (pb
            >> ClientData(select)
            << PauseClient()
            << ServerGets(select)
            << Wait("record")
            >> ServerData(*answer(b"4111111111111111"))
            >> WaitDone("record", error=DiskFull("the audit log could not be written: No space left on device"))
            << ClientGets(Error("53100", hint="free some space"), READY)  # nothing of the answer
            << ResumeClient())
    assert durability.forwards[0].reject.sqlstate == "53100"  # refused, as its record says


def test_a_failing_sync_before_the_answer_drops_the_rest_of_it_as_it_comes():
    pb = playbook()
    select = m.Query("SELECT pan FROM cards")
    assert (pb
            >> ClientData(select)
            << PauseClient()
            << ServerGets(select)
            << Wait("record")
            >> ServerData(*answer(b"4111111111111111")[:2])
            >> WaitDone("record", error=DiskFull("No space left on device"))
            << ResumeClient()
            >> ServerData(*answer(b"4111111111111111")[2:], m.NoticeResponse.build("NOTICE", "00000", "later"))
            << ClientGets(Error("53100"), READY, m.NoticeResponse.build("NOTICE", "00000", "later")))


def test_statements_that_may_change_state_never_go_upstream_before_their_record():
    for sql in ("UPDATE t SET n = 1", "SELECT nextval('s')", "SELECT n FROM t FOR UPDATE",
                "SELECT n INTO u FROM t", "WITH d AS (DELETE FROM t RETURNING n) SELECT n FROM d",
                "SELECT pg_advisory_lock(1)", "SELECT 1; UPDATE t SET n = 1", "BEGIN"):
        pb = playbook()
        query = m.Query(sql)
        assert (pb
                >> ClientData(query)
                << PauseClient()
                << Wait("record")  # and nothing upstream
                >> WaitDone("record")
                << ServerGets(query)
                << ResumeClient()), sql


def test_inside_a_transaction_block_a_read_waits_for_its_record():
    pb = playbook()
    begin, select = m.Query("BEGIN"), m.Query("SELECT n FROM t")
    assert (pb
            >> ClientData(begin) << PauseClient() << Wait("begin") >> WaitDone("begin")
            << ServerGets(begin) << ResumeClient()
            >> ServerData(m.CommandComplete("BEGIN"), IN_BLOCK)
            << ClientGets(m.CommandComplete("BEGIN"), IN_BLOCK)
            >> ClientData(select)
            << PauseClient()
            << Wait("select")
            >> WaitDone("select")
            << ServerGets(select)
            << ResumeClient())


def test_withheld_output_past_its_high_water_mark_pauses_reading_from_the_server():
    pb = playbook()
    select = m.Query("SELECT n FROM t")
    big = b"x" * (WITHHELD_HIGH_WATER // 4)
    rows = answer(*[big] * 5)
    assert (pb
            >> ClientData(select)
            << PauseClient()
            << ServerGets(select)
            << Wait("record")
            >> ServerData(*rows)
            << PauseServer()
            >> WaitDone("record")
            << ClientGets(*rows)
            << ResumeServer()
            << ResumeClient())


def extended(sql: str, name: str = "") -> list[m.Message]:
    return [m.Parse(name, sql, ()), m.Bind("", name, (), (), ()), m.Describe(b"P", ""), m.Execute("", 0), m.Sync()]


def extended_answer(*values: bytes) -> list[m.Message]:
    return [m.ParseComplete(), m.BindComplete(), *answer(*values)]


def test_an_extended_read_goes_upstream_with_its_parse_bind_and_sync_and_waits_likewise():
    pb = playbook()
    request = extended("SELECT n FROM t")
    assert (pb
            >> ClientData(*request)
            << PauseClient()
            << ServerGets(*request)
            << Wait("record")
            >> ServerData(*extended_answer(b"1"))
            >> WaitDone("record")
            << ClientGets(*extended_answer(b"1"))
            << ResumeClient())


def test_a_failing_sync_refuses_an_extended_read_whose_results_were_held():
    pb = playbook()
    request = extended("SELECT pan FROM cards")
    assert (pb
            >> ClientData(*request)
            << PauseClient()
            << ServerGets(*request)
            << Wait("record")
            >> ServerData(*extended_answer(b"4111111111111111"))
            >> WaitDone("record", error=DiskFull("No space left on device"))
            << ClientGets(Error("53100"), READY)
            << ResumeClient())


def test_extended_requests_that_leave_more_behind_or_may_change_state_wait_for_their_record():
    cases = [extended("UPDATE t SET n = 1"),
             extended("SELECT n FROM t", name="kept"),  # a named statement the server would keep
             extended("SELECT n FROM t")[:-1] + extended("SELECT n FROM u"),  # two statements
             extended("SELECT n FROM t")[:-1]]  # no Sync yet: more may follow before it ends
    for request in cases:
        pb = playbook()
        assert pb
        before = pb.writes("server")
        assert (pb
                >> ClientData(*request)
                << PauseClient()
                << Wait("record")  # and nothing upstream
                ), request
        assert pb.writes("server") == before, request


def test_a_fatal_from_the_server_reaches_the_agent_and_nothing_withheld_does():
    pb = playbook()
    select = m.Query("SELECT n FROM t")
    fatal = m.ErrorResponse.build("FATAL", "57P01", "terminating connection due to administrator command")
    assert (pb
            >> ClientData(select)
            << PauseClient()
            << ServerGets(select)
            << Wait("record")
            >> ServerData(*answer(b"1")[:2], fatal)
            << ClientGets(fatal))
