"""Traces for the ``forward`` hook: the commit point every request that makes the server
act passes once its verdict is final, and the batch that waits for it."""

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
from appliance.proxy.session import BLOCKED_PORTAL, BLOCKED_SQL
from tests.proxy.trace import backend, frontend, ready_session


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
    """Stands for an awaitable the session must wait on (RecordingIO never awaits it)."""


class Unavailable(Exception):
    sqlstate = "53100"
    hint = "free some space"


def _close(awaitable: Any) -> None:
    if hasattr(awaitable, "close"):
        awaitable.close()


def test_forward_sees_each_request_that_makes_the_server_act_with_its_parameters():
    recorder = Recorder()
    session, io = ready_session([recorder])
    session.client_data(frontend(
        m.Query("SELECT 1"),
        m.Parse("s1", "SELECT $1::text", ()), m.Bind("", "s1", (0,), (b"hello",), ()), m.Describe(b"P", ""),
        m.Execute("", 0), m.Sync(),
        m.FunctionCall(1598, (), (), 0)))
    assert [f.kind for f in recorder.forwards] == ["query", "execute", "function_call"]
    query, execute, call = recorder.forwards
    assert query.statement.text == "SELECT 1" and query.reject is None
    assert execute.statement.text == "SELECT $1::text" and b"hello" in execute.bind
    assert call.statement.function_oid == 1598
    assert all(f.started_ns > 0 for f in recorder.forwards)
    assert len(io.server_got()) == 7  # nothing waited for: all sent at once


def test_refused_statements_are_shown_to_forward_with_their_reject_and_never_wait():
    recorder = Recorder(answer=Token())
    session, io = ready_session([Blocker(), recorder])
    session.client_data(frontend(m.Query("DROP TABLE cards"), m.Parse("", "DROP TABLE cards", ()), m.Sync()))
    assert [(f.kind, f.reject.message) for f in recorder.forwards] == [("query", "no dropping"), ("parse", "no dropping")]
    assert io.waits == []
    sent = io.server_got()
    assert sent[0].query.encode() == BLOCKED_SQL


def test_a_batch_waits_once_for_all_its_forwards_then_goes_in_order():
    tokens: list[Token] = []

    def answer(request: Forward) -> Token:
        tokens.append(Token())
        return tokens[-1]

    recorder = Recorder(answer)
    session, io = ready_session([recorder])
    session.client_data(frontend(
        m.Query("SELECT 1"),
        m.Parse("", "SELECT 2", ()), m.Bind("", "", (), (), ()), m.Execute("", 0), m.Sync()))
    assert io.server_got() == []
    assert io.client_paused and len(io.waits) == 1 and len(tokens) == 2
    session.client_data(frontend(m.Query("SELECT 3")))  # arrives while the batch waits
    assert io.server_got() == [] and len(recorder.forwards) == 2
    awaitable, done = io.waits.pop()
    _close(awaitable)
    done(None, None)
    sent = io.server_got()
    assert [type(x).__name__ for x in sent][:5] == ["Query", "Parse", "Bind", "Execute", "Sync"]
    assert len(recorder.forwards) == 3  # SELECT 3 went through the hook after the batch
    assert len(io.waits) == 1 and io.client_paused  # … and waits in a batch of its own
    awaitable, done = io.waits.pop()
    done(None, None)
    assert [x.query for x in io.server_got()] == ["SELECT 3"]
    assert not io.client_paused


def test_when_the_wait_fails_every_request_of_the_batch_is_refused_and_none_reaches_the_server():
    session, io = ready_session([Recorder(answer=lambda r: Token())])
    session.client_data(frontend(
        m.Query("SELECT 1"),
        m.Parse("", "SELECT 2", ()), m.Bind("", "", (), (), ()), m.Execute("", 0), m.Sync()))
    awaitable, done = io.waits.pop()
    _close(awaitable)
    done(None, Unavailable("the audit log could not be written: No space left on device"))
    query, parse, bind, execute, sync = io.server_got()
    assert query.query.encode() == BLOCKED_SQL
    assert parse.query == "SELECT 2" and execute.portal == BLOCKED_PORTAL
    session.server_data(backend(m.ErrorResponse.build("ERROR", "42601", "syntax error"), m.ReadyForQuery(b"I"),
                                m.ParseComplete(), m.BindComplete(),
                                m.ErrorResponse.build("ERROR", "34000", "portal does not exist"),
                                m.ReadyForQuery(b"I")))
    got = io.client_got()
    errors = [x for x in got if isinstance(x, m.ErrorResponse)]
    assert [e.sqlstate for e in errors] == ["53100", "53100"]
    assert "No space left on device" in errors[0].message and dict(errors[0].fields)["H"] == "free some space"
    assert not io.client_paused
    session.client_data(frontend(m.Query("SELECT 4")))  # the session carries on
    assert io.waits


def test_a_forward_hook_may_refuse_at_once():
    recorder = Recorder(answer=lambda r: Reject("53100", "audit log full"))
    session, io = ready_session([recorder])
    session.client_data(frontend(m.Query("SELECT 1")))
    [sent] = io.server_got()
    assert sent.query.encode() == BLOCKED_SQL and io.waits == []
    session.server_data(backend(m.ErrorResponse.build("ERROR", "42601", "syntax"), m.ReadyForQuery(b"I")))
    error, _ = io.client_got()
    assert (error.sqlstate, error.message) == ("53100", "audit log full")
    [(result, tag, is_error)] = recorder.results
    assert is_error and result.sqlstate == "53100" and result.forward is recorder.forwards[0]


def test_results_carry_their_forward_the_error_code_and_skipped_requests():
    recorder = Recorder()
    session, io = ready_session([recorder])
    session.client_data(frontend(
        m.Parse("", "SELECT 1/0", ()), m.Bind("", "", (), (), ()), m.Execute("", 0),
        m.Parse("b", "SELECT 2", ()), m.Bind("", "b", (), (), ()), m.Execute("", 0), m.Sync()))
    io.server_got()
    session.server_data(backend(m.ParseComplete(), m.BindComplete(),
                                m.ErrorResponse.build("ERROR", "22012", "division by zero"), m.ReadyForQuery(b"I")))
    first, second = recorder.results
    assert first[0].forward is recorder.forwards[0] and first[0].sqlstate == "22012" and first[2]
    assert second[0].skipped and second[0].forward is recorder.forwards[1]


def test_a_hold_behind_a_waiting_batch_never_overtakes_it():
    recorder = Recorder(answer=lambda r: Token())
    session, io = ready_session([Blocker(), recorder])
    session.client_data(frontend(m.Query("SELECT 1"), m.Query("UPDATE t SET x = 1")))
    assert len(io.waits) == 2  # the approval and the batch before it
    (approval, approve), (batch, batch_done) = io.waits
    _close(approval)
    approve(None, None)  # approved first: still waits for the batch ahead of it
    assert io.server_got() == []
    batch_done(None, None)
    assert [x.query for x in io.server_got()] == ["SELECT 1"]
    awaitable, done = io.waits[2]  # the approved UPDATE, in a batch of its own
    done(None, None)
    assert [x.query for x in io.server_got()] == ["UPDATE t SET x = 1"]
    assert not io.client_paused
