"""Traces for the ``forward`` hook: the commit point every request that makes the server
act passes once its verdict is final, and the batch that waits for it.

Playbooks (tests/proxy/playbook.py): what each side receives and when the session pauses,
waits and resumes, as one ordered script."""

from __future__ import annotations

import asyncio
from typing import Any

from appliance.pgwire import messages as m
from appliance.proxy.hooks import (
    Addon,
    Forward,
    Hold,
    Reject,
    Result,
    SessionInfo,
    Statement,
)
from appliance.proxy.pipeline import BLOCKED_PORTAL, BLOCKED_SQL
from tests.proxy.playbook import (
    ClientData,
    ClientGets,
    Error,
    Like,
    PauseClient,
    ResumeClient,
    ServerData,
    ServerGets,
    Wait,
    WaitDone,
    ready_playbook,
    roundtrip,
)

BLOCKED = BLOCKED_SQL.decode()
READY = m.ReadyForQuery(b"I")


class Recorder(Addon):
    """Sees every forward; answers with whatever ``answer`` says for it."""

    def __init__(self, answer: Any = None) -> None:
        self.forwards: list[Forward] = []
        self.results: list[tuple[Result, str | None, bool]] = []
        self.answer = answer

    def forward(self, session: SessionInfo, request: Forward):
        self.forwards.append(request)
        return self.answer(request) if callable(self.answer) else self.answer

    def result_complete(self, session: SessionInfo, result: Result, tag: str | None, error: bool) -> None:
        self.results.append((result, tag, error))


class Blocker(Addon):
    def statement(self, session: SessionInfo, statement: Statement):
        if "DROP" in statement.text:
            return Reject("42501", "no dropping")
        if statement.text.startswith("UPDATE"):
            return Hold(asyncio.sleep(0), "needs approval")
        return None


class Token:
    """Stands for an awaitable the session must wait on (the playbook never awaits it)."""


class Unavailable(Exception):
    sqlstate = "53100"
    hint = "free some space"


def test_forward_sees_each_request_that_makes_the_server_act_with_its_parameters():
    recorder = Recorder()
    pb = ready_playbook([recorder])
    requests = [m.Query("SELECT 1"),
                m.Parse("s1", "SELECT $1::text", ()), m.Bind("", "s1", (0,), (b"hello",), ()), m.Describe(b"P", ""),
                m.Execute("", 0), m.Sync(),
                m.FunctionCall(1598, (), (), 0)]
    assert roundtrip(pb, requests)  # nothing waited for: all sent at once
    assert [f.kind for f in recorder.forwards] == ["query", "execute", "function_call"]
    query, execute, call = recorder.forwards
    assert query.statement.text == "SELECT 1" and query.reject is None
    assert execute.statement.text == "SELECT $1::text" and b"hello" in execute.bind
    assert call.statement.function_oid == 1598
    assert all(f.started_ns > 0 for f in recorder.forwards)


def test_refused_statements_are_shown_to_forward_with_their_reject_and_never_wait():
    recorder = Recorder(answer=Token())
    pb = ready_playbook([Blocker(), recorder])
    assert (pb
            >> ClientData(m.Query("DROP TABLE cards"), m.Parse("", "DROP TABLE cards", ()), m.Sync())
            << ServerGets(m.Query(BLOCKED), m.Parse("", BLOCKED, ()), m.Sync()))  # no wait
    assert [(f.kind, f.reject.message) for f in recorder.forwards] == [("query", "no dropping"),
                                                                        ("parse", "no dropping")]


BATCH = [m.Query("SELECT 1"), m.Parse("", "SELECT 2", ()), m.Bind("", "", (), (), ()), m.Execute("", 0), m.Sync()]


def test_a_batch_waits_once_for_all_its_forwards_then_goes_in_order():
    tokens: list[Token] = []

    def answer(request: Forward) -> Token:
        tokens.append(Token())
        return tokens[-1]

    recorder = Recorder(answer)
    pb = ready_playbook([recorder])
    assert (pb
            >> ClientData(*BATCH)
            << PauseClient()
            << Wait("batch"))
    assert len(tokens) == 2
    assert pb >> ClientData(m.Query("SELECT 3"))  # arrives while the batch waits: nothing goes
    assert len(recorder.forwards) == 2
    assert (pb
            >> WaitDone("batch")
            << ServerGets(*BATCH)
            << Wait("SELECT 3"))  # … which went through the hook after the batch, and waits in a batch of its own
    assert len(recorder.forwards) == 3
    assert (pb
            >> WaitDone("SELECT 3")
            << ServerGets(m.Query("SELECT 3"))
            << ResumeClient())


def test_when_the_wait_fails_every_request_of_the_batch_is_refused_and_none_reaches_the_server():
    pb = ready_playbook([Recorder(answer=lambda r: Token())])
    refused = Error("53100", "No space left on device", hint="free some space")
    assert (pb
            >> ClientData(*BATCH)
            << PauseClient()
            << Wait("batch")
            >> WaitDone("batch", error=Unavailable("the audit log could not be written: No space left on device"))
            << ServerGets(m.Query(BLOCKED), m.Parse("", "SELECT 2", ()), m.Bind("", "", (), (), ()),
                          m.Execute(BLOCKED_PORTAL, 0), m.Sync())
            << ResumeClient()
            >> ServerData(m.ErrorResponse.build("ERROR", "42601", "syntax error"), READY,
                          m.ParseComplete(), m.BindComplete(),
                          m.ErrorResponse.build("ERROR", "34000", "portal does not exist"), READY)
            << ClientGets(refused, READY, m.ParseComplete(), m.BindComplete(), Error("53100"), READY)
            >> ClientData(m.Query("SELECT 4"))  # the session carries on
            << PauseClient()
            << Wait())


def test_a_forward_hook_may_refuse_at_once():
    recorder = Recorder(answer=lambda r: Reject("53100", "audit log full"))
    pb = ready_playbook([recorder])
    assert (pb
            >> ClientData(m.Query("SELECT 1"))
            << ServerGets(m.Query(BLOCKED))  # and no wait
            >> ServerData(m.ErrorResponse.build("ERROR", "42601", "syntax"), READY)
            << ClientGets(Like(m.ErrorResponse, sqlstate="53100", message="audit log full"), READY))
    [(result, _tag, is_error)] = recorder.results
    assert is_error and result.sqlstate == "53100" and result.forward is recorder.forwards[0]


def test_results_carry_their_forward_the_error_code_and_skipped_requests():
    recorder = Recorder()
    pb = ready_playbook([recorder])
    assert roundtrip(pb, [m.Parse("", "SELECT 1/0", ()), m.Bind("", "", (), (), ()), m.Execute("", 0),
                          m.Parse("b", "SELECT 2", ()), m.Bind("", "b", (), (), ()), m.Execute("", 0), m.Sync()],
                     [m.ParseComplete(), m.BindComplete(),
                      m.ErrorResponse.build("ERROR", "22012", "division by zero"), READY])
    first, second = recorder.results
    assert first[0].forward is recorder.forwards[0] and first[0].sqlstate == "22012" and first[2]
    assert second[0].skipped and second[0].forward is recorder.forwards[1]


def test_a_hold_behind_a_waiting_batch_never_overtakes_it():
    recorder = Recorder(answer=lambda r: Token())
    pb = ready_playbook([Blocker(), recorder])
    update = m.Query("UPDATE t SET x = 1")
    assert (pb
            >> ClientData(m.Query("SELECT 1"), update)
            << PauseClient()
            << Wait("approval")  # the UPDATE's hold …
            << Wait("batch")  # … and the batch before it
            >> WaitDone("approval")  # approved first: still waits for the batch ahead of it
            >> WaitDone("batch")
            << ServerGets(m.Query("SELECT 1"))
            << Wait("update")  # the approved UPDATE, in a batch of its own
            >> WaitDone("update")
            << ServerGets(update)
            << ResumeClient())
