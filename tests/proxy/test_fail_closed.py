"""Fail closed at every hook: an addon whose hook raises never lets anything through.

For every hook in ``HOOK_NAMES`` an addon raises a plain exception (KeyError), or one that
carries its own ``sqlstate`` (FailClosed among them), at that hook — in both directions where a hook has two — and
the session's whole trace is checked as a playbook:

* a hook deciding a request (``statement``, ``execute``, ``forward``) refuses that request:
  the agent gets an ERROR with SQLSTATE XX000, the statement never runs (the server gets a
  stand-in that fails, so that transaction state matches, never the SQL text), and the
  session goes on serving the next statement;
* a hook on data on its way to the agent, on COPY data from it, or on ``session_start``
  ends the session with a FATAL carrying a SQLSTATE (XX000, or the exception's own) —
  plainly closed instead when part of a message is already on its way — the message that
  set it off goes no further, and ``close_reason`` names the hook (or gives the
  FailClosed's own message);
* ``session_end`` and ``session_refused`` fail on a session that is over anyway: the
  exception is logged and the connection still closes.

Every failure is logged, and another session on the same AddonManager carries on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from appliance.pgwire import messages as m
from appliance.proxy.hooks import HOOK_NAMES, Addon, AddonManager, FailClosed
from tests.proxy.playbook import (
    ClientClosed,
    ClientData,
    ClientGets,
    Close,
    Error,
    Fatal,
    Lacks,
    Like,
    Not,
    OpenUpstream,
    Partial,
    Playbook,
    ServerData,
    ServerGets,
    TerminateSession,
    UpstreamConnected,
    login,
    playbook,
    ready_playbook,
    roundtrip,
    startup,
)

MARK = "hook-exploded"
SECRET = "SELECT pan FROM cards WHERE id = 7"
READY = m.ReadyForQuery(b"I")
FIELD = m.FieldDescription("n", 0, 0, 23, 4, -1, 0)
STREAM_THRESHOLD = 4096
BIG_ROW = m.DataRow((b"7" * 10_000,)).encode()


class Unavailable(Exception):
    """An addon's error that says which SQLSTATE it means."""

    sqlstate = "53100"


EXCEPTIONS: dict[str, Callable[[], Exception]] = {
    "KeyError": lambda: KeyError(MARK),
    "own-sqlstate": lambda: Unavailable(MARK),
    "FailClosed": lambda: FailClosed("42501", f"cannot make this safe: {MARK}"),  # the hooks' own way to say it
}


class Broken(Addon):
    """Raises ``exc`` once, at ``hook``, once armed (and only for ``direction``: copy_data's
    from_client, notice's is_error). Every other call lets everything through."""

    name = "broken"

    def __init__(self, hook: str, exc: Exception, direction: bool | None = None):
        self.hook, self.exc, self.direction = hook, exc, direction
        self.armed = False
        self.raised = False

    def _call(self, hook: str, args: tuple[Any, ...]) -> None:
        if not self.armed or hook != self.hook:
            return
        if self.direction is not None and _direction(hook, args) is not self.direction:
            return
        self.armed, self.raised = False, True
        raise self.exc


def _direction(hook: str, args: tuple[Any, ...]) -> bool | None:
    if hook == "copy_data":  # (session, result, from_client, message)
        return args[2]
    if hook == "notice":  # (session, is_error, message)
        return args[1]
    return None


def broken(hook: str, exc: Exception, direction: bool | None = None) -> Broken:
    """A Broken addon that implements only ``hook`` (an addon's hooks are called only if it
    overrides them); for ``execute``, it also defers every statement to run time."""

    def method(self: Broken, *args: Any) -> None:
        self._call(hook, args)

    method.__name__ = method.__qualname__ = hook
    attrs: dict[str, Any] = {hook: method}
    if hook in ("data_rows", "copy_rows"):  # a batched form is used only by an addon with the single one
        def single(self: Broken, *args: Any) -> None:
            return None
        single.__name__ = "data_row" if hook == "data_rows" else "copy_data"
        attrs[single.__name__] = single
    if hook == "execute":
        def statement(self: Broken, session: Any, statement: Any) -> None:
            statement.deferred = "decided at each execute"
        attrs["statement"] = statement
    return type(f"Broken_{hook}", (Broken,), attrs)(hook, exc, direction)


def logged(caplog: pytest.LogCaptureFixture, exc: BaseException) -> bool:
    """The exception (or one it caused) was logged with its traceback, or named."""
    for record in caplog.records:
        seen = record.exc_info[1] if record.exc_info else None
        while seen is not None:
            if seen is exc:
                return True
            seen = seen.__cause__ or seen.__context__
        if MARK in record.getMessage():
            return True
    return False


def still_serves(pb: Playbook) -> Playbook:
    """A query, through every hook an ordinary result passes, completes."""
    return roundtrip(pb, [m.Query("SELECT 2")],
                     [m.RowDescription((FIELD,)), m.DataRow((b"2",)), m.CommandComplete("SELECT 1"), READY])


def a_query(pb: Playbook) -> Playbook:
    return roundtrip(pb, [m.Query("SELECT 1")], [m.CommandComplete("SELECT 1"), READY])


# ---- hooks that decide a request: the request is refused, the session goes on -------------------

PREPARED = [m.Parse("s", SECRET, ()), m.Sync()]
RUN_PREPARED = [m.Bind("", "s", (), (), ()), m.Execute("", 0), m.Sync()]


def refused_query(pb: Playbook) -> Playbook:
    return (pb
            >> ClientData(m.Query(SECRET))
            << ServerGets(Like(m.Query, query=Lacks(SECRET)))  # a stand-in the server rejects
            >> ServerData(m.ErrorResponse.build("ERROR", "42601", "syntax error"), READY)
            << ClientGets(Error("XX000"), READY))


def refused_parse(pb: Playbook) -> Playbook:
    return (pb
            >> ClientData(m.Parse("", SECRET, ()), m.Bind("", "", (), (), ()), m.Execute("", 0), m.Sync())
            << ServerGets(Like(m.Parse, query=Lacks(SECRET)), m.Bind("", "", (), (), ()), Like(m.Execute), m.Sync())
            >> ServerData(m.ErrorResponse.build("ERROR", "42601", "syntax error"), READY)
            << ClientGets(Error("XX000"), READY))


def extended_query(pb: Playbook) -> Playbook:
    sent = [m.Parse("", "SELECT 1", ()), m.Bind("", "", (), (), ()), m.Execute("", 0), m.Sync()]
    return roundtrip(pb, sent, [m.ParseComplete(), m.BindComplete(), m.CommandComplete("SELECT 1"), READY])


def prepared(pb: Playbook) -> Playbook:
    return roundtrip(pb, PREPARED, [m.ParseComplete(), READY])


def refused_execute(pb: Playbook) -> Playbook:
    """The prepared statement's portal never runs: the server gets an Execute of a portal
    that does not exist in its place."""
    return (pb
            >> ClientData(*RUN_PREPARED)
            << ServerGets(m.Bind("", "s", (), (), ()), Like(m.Execute, portal=Not("")), m.Sync())
            >> ServerData(m.BindComplete(), m.ErrorResponse.build("ERROR", "34000", "portal does not exist"), READY)
            << ClientGets(m.BindComplete(), Error("XX000"), READY))


def runs_prepared(pb: Playbook) -> Playbook:
    return roundtrip(pb, RUN_PREPARED, [m.BindComplete(), m.CommandComplete("SELECT 1"), READY])


@dataclass
class Refusal:
    hook: str
    id: str
    prepare: Callable[[Playbook], Playbook]  # before the addon is armed
    refused: Callable[[Playbook], Playbook]  # the request the hook raises on, and its refusal
    again: Callable[[Playbook], Playbook]  # the addon no longer raising: the session serves on


def nothing(pb: Playbook) -> Playbook:
    return pb


REFUSALS = [
    Refusal("statement", "statement-Query", nothing, refused_query, a_query),
    Refusal("statement", "statement-Parse/Bind/Execute/Sync", nothing, refused_parse, extended_query),
    # The statement is prepared (deferred: the addon decides at each Execute) before the
    # hook fails: from then on nothing of it reaches the server but a stand-in.
    Refusal("execute", "execute-Bind/Execute/Sync", prepared, refused_execute, runs_prepared),
    Refusal("forward", "forward-Query", nothing, refused_query, a_query),
    Refusal("forward", "forward-Bind/Execute/Sync", prepared, refused_execute, runs_prepared),
]


@pytest.mark.parametrize("case", REFUSALS, ids=[c.id for c in REFUSALS])
def test_a_hook_deciding_a_request_that_raises_refuses_that_request_only(case: Refusal, caplog):
    exc = KeyError(MARK)
    addon = broken(case.hook, exc)
    hooks = AddonManager([addon])
    bystander = ready_playbook(hooks=hooks)
    pb = ready_playbook(hooks=hooks)
    assert case.prepare(pb)
    addon.armed = True
    assert case.refused(pb)
    assert addon.raised
    assert logged(caplog, exc)
    assert case.again(pb)  # the same session serves the next statement
    assert still_serves(bystander)


# ---- hooks on data and on the session's life: the session ends, fail closed ---------------------

def selecting(pb: Playbook) -> Playbook:
    return roundtrip(pb, [m.Query("SELECT n FROM t")])


def described(pb: Playbook) -> Playbook:
    return roundtrip(selecting(pb), [], [m.RowDescription((FIELD,))])


def streaming(pb: Playbook) -> Playbook:
    """Part of a large row (streamed, not held whole) is already on its way to the agent."""
    return described(pb) >> ServerData(BIG_ROW[:5000]) << ClientGets(Partial())


def copying_out(pb: Playbook) -> Playbook:
    return roundtrip(pb, [m.Query("COPY t TO STDOUT")], [m.CopyOutResponse(0, (0,))])


def copying_in(pb: Playbook) -> Playbook:
    return roundtrip(pb, [m.Query("COPY t FROM STDIN")], [m.CopyInResponse(0, (0,))])


def calling(pb: Playbook) -> Playbook:
    return roundtrip(pb, [m.FunctionCall(1598, (), (), 0)])


def dividing(pb: Playbook) -> Playbook:
    return roundtrip(pb, [m.Query("SELECT 1/0")])


def logging_in(pb: Playbook) -> Playbook:
    """Startup and the upstream password exchange, up to the server's AuthenticationOk."""
    return (pb
            >> ClientData(startup())
            << OpenUpstream()
            >> UpstreamConnected()
            << ServerGets(Like(m.StartupMessage))
            >> ServerData(m.AuthenticationMD5Password(b"salt"))
            << ServerGets(Like(m.PasswordMessage)))


def server_sends(*messages: m.Message) -> Callable[[Playbook], Playbook]:
    def trigger(pb: Playbook) -> Playbook:
        return pb >> ServerData(*messages)
    return trigger


def client_copies(pb: Playbook) -> Playbook:
    return pb >> ClientData(m.CopyData(b"4111111111111111\n"), m.CopyDone())  # never reaches the server


def login_completes(pb: Playbook) -> Playbook:
    """The server's ReadyForQuery runs session_start: what came before it reached the
    agent as it arrived; the ReadyForQuery itself must not."""
    return (pb
            >> ServerData(m.AuthenticationOk(), m.ParameterStatus("server_version", "15.0"),
                          m.BackendKeyData(4242, b"\x01\x02\x03\x04"), READY)
            << ClientGets(m.AuthenticationOk(), m.ParameterStatus("server_version", "15.0"),
                          Like(m.BackendKeyData)))


def login_reports_a_parameter(pb: Playbook) -> Playbook:
    """A ParameterStatus during login: what came before it has reached the agent."""
    return (pb
            >> ServerData(m.AuthenticationOk(), m.ParameterStatus("application_name", "4111111111111111"),
                          m.BackendKeyData(4242, b"\x01\x02\x03\x04"), READY)
            << ClientGets(m.AuthenticationOk()))


@dataclass
class Ending:
    hook: str
    id: str
    setup: Callable[[Playbook], Playbook]  # before the addon is armed
    trigger: Callable[[Playbook], Playbook]  # the input the hook raises on (and what rightly precedes the end)
    direction: bool | None = None
    streamed: bool = False  # part of a message already went: no FATAL can follow it
    logged_in: bool = True  # start from a ready session


NOTICE = m.NoticeResponse((("S", "NOTICE"), ("V", "NOTICE"), ("C", "00000"), ("M", "card 4111111111111111")))
ENDINGS = [
    Ending("row_description", "row_description", selecting,
           server_sends(m.RowDescription((FIELD,)), m.DataRow((b"1",)), m.CommandComplete("SELECT 1"), READY)),
    Ending("data_row", "data_row", described,
           server_sends(m.DataRow((b"1",)), m.CommandComplete("SELECT 1"), READY)),
    Ending("data_rows", "data_rows", described,
           server_sends(m.DataRow((b"1",)), m.DataRow((b"2",)), m.CommandComplete("SELECT 2"), READY)),
    # The first window of a large row: nothing of the row has gone yet, so a FATAL can.
    Ending("stream_chunk", "stream_chunk-first-window", described, lambda pb: pb >> ServerData(BIG_ROW[:5000])),
    Ending("stream_chunk", "stream_chunk-later-window", streaming,
           lambda pb: pb >> ServerData(BIG_ROW[5000:]), streamed=True),
    Ending("copy_data", "copy_data-from-server", copying_out,
           server_sends(m.CopyData(b"1\n"), m.CopyDone(), m.CommandComplete("COPY 1"), READY), direction=False),
    Ending("copy_data", "copy_data-from-client", copying_in, client_copies, direction=True),
    Ending("copy_rows", "copy_rows", copying_out,
           server_sends(m.CopyData(b"1\n"), m.CopyData(b"2\n"), m.CopyDone(), m.CommandComplete("COPY 2"), READY)),
    Ending("function_result", "function_result", calling, server_sends(m.FunctionCallResponse(b"x"), READY)),
    Ending("notice", "notice-ErrorResponse", dividing,
           server_sends(m.ErrorResponse.build("ERROR", "22012", "division by zero"), READY), direction=True),
    Ending("notice", "notice-NoticeResponse", nothing, server_sends(NOTICE), direction=False),
    Ending("notification", "notification", nothing, server_sends(m.NotificationResponse(7, "cards", "changed"))),
    Ending("parameter_status", "parameter_status", nothing,
           server_sends(m.ParameterStatus("application_name", "4111111111111111"))),
    Ending("parameter_status", "parameter_status-login", logging_in, login_reports_a_parameter, logged_in=False),
    Ending("column_names", "column_names", selecting,
           server_sends(m.RowDescription((FIELD,)), m.DataRow((b"1",)), m.CommandComplete("SELECT 1"), READY)),
    Ending("result_complete", "result_complete", selecting, server_sends(m.CommandComplete("SELECT 0"), READY)),
    Ending("session_start", "session_start", logging_in, login_completes, logged_in=False),
]


@pytest.mark.parametrize("exception", list(EXCEPTIONS))
@pytest.mark.parametrize("case", ENDINGS, ids=[c.id for c in ENDINGS])
def test_a_hook_on_data_or_the_sessions_start_that_raises_ends_that_session_only(case: Ending, exception, caplog):
    exc = EXCEPTIONS[exception]()
    addon = broken(case.hook, exc, case.direction)
    hooks = AddonManager([addon])
    bystander = ready_playbook(hooks=hooks)
    pb = playbook(hooks=hooks, stream_threshold=STREAM_THRESHOLD)
    if case.logged_in:
        assert login(pb)
    assert case.setup(pb)
    addon.armed = True
    pb = case.trigger(pb)
    if not case.streamed:
        pb << ClientGets(Fatal(getattr(exc, "sqlstate", "XX000")))
    assert pb << Close()
    assert addon.raised
    # close_reason says what failed: the hook, or what a FailClosed says it could not make safe
    assert (exc.message if isinstance(exc, FailClosed) else case.hook) in pb.session.close_reason
    assert logged(caplog, exc)
    assert still_serves(bystander)


# ---- hooks on a session that is over: logged, and the connection still closes ------------------

@pytest.mark.parametrize("how", ["client-closed", "terminated"])
def test_a_session_end_hook_that_raises_is_logged_and_the_connection_closes(how, caplog):
    exc = KeyError(MARK)
    addon = broken("session_end", exc)
    hooks = AddonManager([addon])
    bystander = ready_playbook(hooks=hooks)
    pb = ready_playbook(hooks=hooks)
    addon.armed = True
    if how == "client-closed":
        assert pb >> ClientClosed() << Close()
    else:
        assert (pb
                >> TerminateSession("57P01", "Tollgate is shutting down")
                << ClientGets(Fatal("57P01", "shutting down"))
                << Close())
    assert addon.raised
    assert logged(caplog, exc)
    assert still_serves(bystander)


def test_a_session_refused_hook_that_raises_is_logged_and_the_connection_closes(caplog):
    exc = KeyError(MARK)
    addon = broken("session_refused", exc)
    hooks = AddonManager([addon])
    bystander = ready_playbook(hooks=hooks)
    pb = playbook(hooks=hooks)
    addon.armed = True
    assert (pb
            >> ClientData(startup(user="postgres"))  # no credentials for that role: refused
            << ClientGets(Fatal("28000"))
            << Close())
    assert addon.raised
    assert logged(caplog, exc)
    assert still_serves(bystander)


def test_every_hook_is_made_to_fail():
    covered = {c.hook for c in REFUSALS} | {c.hook for c in ENDINGS} | {"session_end", "session_refused"}
    assert covered == set(HOOK_NAMES)
    assert {c.direction for c in ENDINGS if c.hook == "copy_data"} == {True, False}
    assert {c.direction for c in ENDINGS if c.hook == "notice"} == {True, False}


def test_a_broken_addon_lets_everything_through_until_armed():
    """The fixture itself: disarmed, an addon at every hook changes nothing."""
    addons = [broken(hook, KeyError(MARK)) for hook in HOOK_NAMES]
    pb = ready_playbook(hooks=AddonManager(addons))
    assert still_serves(pb)
    assert not any(a.raised for a in addons)
