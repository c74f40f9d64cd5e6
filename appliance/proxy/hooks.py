"""Typed hook points of a proxied session, and the addon manager that dispatches them.

Features (policy, masking, holds, audit) are addons: classes that override some of the
methods of :class:`Addon`. The manager collects, per hook, only the addons that actually
override it, so a hook nobody implements costs the hot path one falsy-list check.

Hooks run inside the session layer, synchronously. The only hooks that may wait are
``statement`` and ``execute``: they return a :class:`Hold` wrapping an awaitable, and the
session pauses — only itself — until the awaitable yields a verdict. ``forward`` is the
commit point: it sees every request that makes the server act once its verdict is final,
and may return an awaitable that must finish before the request goes upstream (the audit
record being made durable); the session waits for those of a whole batch at once. Whatever a hook raises fails
closed (see ``dispatch``); a hook that finds data it must not let through and cannot make
safe raises an error with a ``sqlstate`` and ``message`` (:class:`FailClosed`, or the
feature's own) so the agent is told why.

Besides hooks, an addon has a life cycle the composition root drives: ``open`` before the
proxy listens, ``start`` once it does (background work, control-socket operations),
``close`` after the last session. Addons declare which others must run before them
(``after``); :class:`AddonManager` refuses an order that breaks that.

Data passes between addons only through the typed fields of the hook data: policy's
:class:`~appliance.model.decision.Decision` on a Statement, the
:class:`~appliance.model.identity.Identity` on SessionInfo, the audit's statement number
on a Forward, the audit's sample on a Result.
"""

from __future__ import annotations

import enum
import itertools
import logging
import secrets
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from appliance.model.decision import Decision
from appliance.model.identity import Identity
from appliance.pgwire.encodings import UTF8, ClientEncoding

_LENGTH = struct.Struct("!i")

if TYPE_CHECKING:
    from appliance.config import Endpoint, Target
    from appliance.pgwire.messages import RowDescription
    from appliance.proxy.control import ControlOps
    from appliance.proxy.prepared import NamespaceOp

log = logging.getLogger("tollgate.addons")


class StatementKind(enum.Enum):
    """How a statement reached the proxy."""

    QUERY = "query"  # simple protocol Query: may hold several statements
    PARSE = "parse"  # extended protocol Parse: decided here, run later by name
    FUNCTION_CALL = "function_call"  # the legacy FunctionCall message


_session_ids = itertools.count(1)
# This proxy process's run: with the session's number it makes the session's one id
# (SessionInfo.key), the same in the live listing, approvals, audit records and the console.
PROXY_RUN = secrets.token_hex(6)


@dataclass(eq=False)
class SessionInfo:
    """What is known about one client connection; shared with every hook."""

    client: Endpoint
    destination: Endpoint
    id: int = field(default_factory=lambda: next(_session_ids))
    started_at: float = field(default_factory=time.time)
    target: Target | None = None
    user: str | None = None  # the role the agent asked for
    database: str | None = None
    application_name: str | None = None
    parameters: dict[str, str] = field(default_factory=dict)
    # The client_encoding the server reported at login, which statement text is read in
    # (appliance.pgwire.encodings); None: one Tollgate can't read, every statement refused.
    client_encoding: ClientEncoding | None = UTF8
    upstream_user: str | None = None
    upstream_tls: str | None = None  # negotiated TLS version upstream, None if clear
    client_tls: str | None = None  # TLS version towards the agent, None if clear
    backend_pid: int | None = None
    transaction_status: bytes = b"I"
    # Who this is, and how we know: "certificate", or "legacy-source-address" for the
    # opt-in address mapping; None in trust mode.
    identity: Identity | None = None
    identity_source: str | None = None
    certificate_serial: int | None = None
    masked_values: int = 0  # values masked on their way to the agent, whole session
    auth_error: str | None = None  # why the agent's authentication failed, when it did
    addon_state: dict[str, Any] = field(default_factory=dict)
    run: str = PROXY_RUN

    @property
    def key(self) -> str:
        """The session's id everywhere outside the process: ``<run>-<n>``, unique across
        proxy restarts (the number alone starts again at 1)."""
        return f"{self.run}-{self.id}"


@dataclass(eq=False, slots=True)
class Statement:
    """A statement the client asked to run (or prepare), before it is forwarded."""

    kind: StatementKind
    text: str
    name: str = ""  # prepared statement name (PARSE), "" for unnamed
    param_types: tuple[int, ...] = ()
    function_oid: int | None = None
    # Set by the session once decided; enforcement at Bind/Execute reads it by name.
    verdict: Verdict | None = None
    # Learnt from the server's answer to Describe(statement); clients may skip Describe.
    row_description: RowDescription | None = None
    # Policy's decision, for masking and records.
    decision: Decision | None = None
    # The AddonManager.epoch the verdict was reached in: a prepared statement is decided
    # again at Execute once policy has changed since.
    epoch: int = 0
    # Set by policy when it wants a say at every Execute of this statement (a hold is
    # asked for when it runs, with its parameters, not when it is prepared).
    deferred: Decision | None = None
    # The prepared statements this one runs by SQL ``EXECUTE name``, resolved by the session
    # in its one prepared-statement namespace (protocol Parse and SQL PREPARE alike): a
    # statement is decided, held and recorded as what it really runs.
    executes: tuple[Statement, ...] = ()
    # What it does to that namespace when it runs (PREPARE, EXECUTE, DEALLOCATE, DISCARD
    # ALL), read by the session core (appliance.proxy.prepared).
    effects: tuple[NamespaceOp, ...] = ()


@dataclass(eq=False, slots=True)
class Forward:
    """A request that makes the server act — a Query, an Execute, a FunctionCall — at the
    moment it goes upstream; or a statement refused instead (``reject`` set, Parse too)."""

    kind: str  # "query", "execute", "function_call" or "parse"
    statement: Statement | None
    reject: Reject | None = None
    portal: str = ""
    bind: bytes | None = None  # the portal's Bind body (parameters), for an Execute
    started_ns: int = 0  # time.perf_counter_ns() when it was forwarded
    number: int | None = None  # the statement's number in its session's audit records


@dataclass(eq=False, slots=True)
class Result:
    """One result set (or command outcome) flowing back for a statement."""

    statement: Statement | None
    row_description: RowDescription | None = None
    # Result column formats as the client asked for them in Bind (0 text, 1 binary).
    result_formats: tuple[int, ...] = ()
    rows: int = 0
    masked: int = 0  # values masked in this result (masking addon counts)
    # From CopyOutResponse: overall format (0 text/csv, 1 binary) and per-column formats.
    copy_format: int | None = None
    copy_column_formats: tuple[int, ...] = ()
    forward: Forward | None = None  # the request this result answers
    sqlstate: str | None = None  # the error's SQLSTATE, when the result is an error
    skipped: bool = False  # the server skipped the request after an earlier error
    # The first rows, as text, the audit keeps for replay; truncated when a row was cut.
    sample: list[list[str | None]] | None = None
    sample_truncated: bool = False


@dataclass(frozen=True, slots=True)
class Reject:
    """Refuse a statement: the client gets an ErrorResponse, the server never sees it."""

    sqlstate: str
    message: str
    detail: str | None = None
    hint: str | None = None


@dataclass(frozen=True, slots=True)
class Notice:
    """Something the client is told at once, as a NoticeResponse, while its statement waits."""

    message: str
    detail: str | None = None
    hint: str | None = None


@dataclass(frozen=True, slots=True)
class Hold:
    """Pause this session until ``decision`` yields ``None`` (go ahead) or a Reject.

    ``notice`` is sent to the client when the wait begins (a held agent hears why it waits
    and where its request is decided); ``approval`` names the approval request it waits on,
    for listings."""

    decision: Awaitable[Reject | None]
    description: str = ""
    notice: Notice | None = None
    approval: str | None = None


Verdict = Reject | Hold | None


class FailClosed(Exception):
    """Raised by a hook that can't make data safe: the session ends with a FATAL error."""

    def __init__(self, sqlstate: str, message: str, hint: str | None = None):
        super().__init__(message)
        self.sqlstate, self.message, self.hint = sqlstate, message, hint


@dataclass(slots=True)
class StreamEdit:
    """A stream_chunk hook's answer: ``data`` replaces the window (same length; None keeps
    it), and the last ``keep`` bytes are held back and start the next window."""

    data: bytes | None = None
    keep: int = 0


class Addon:
    """Base class for features. Override only the hooks you need."""

    name: str = "addon"
    # Addons whose hooks must run before this one's when both are present (masking reads
    # the decision enforcement made; audit records what both did).
    after: tuple[str, ...] = ()

    async def open(self) -> None:
        """Before the proxy listens. Raising stops it from starting (the audit log must be
        open before the first session)."""

    async def start(self, control: ControlOps) -> None:
        """The proxy listens: start background work, register control-socket operations."""

    async def close(self) -> None:
        """After the last session has ended."""

    def session_start(self, session: SessionInfo) -> None:
        """The upstream session is authenticated and ready for queries."""

    def session_end(self, session: SessionInfo, reason: str) -> None:
        """The connection is over (for any reason, after session_start)."""

    def session_refused(self, session: SessionInfo, reason: str) -> None:
        """A connection was refused before it became a session (unknown target, bad startup…)."""

    def statement(self, session: SessionInfo, statement: Statement) -> Verdict:
        """Before a statement is forwarded. Return None to allow, Reject, or Hold."""
        return None

    def forward(self, session: SessionInfo, request: Forward) -> Awaitable[Any] | Reject | None:
        """A request's verdict is final. For one about to go upstream, return an awaitable
        it must wait for (raising refuses it), a Reject to refuse it now, or None; for a
        refused one (``request.reject``) the answer is ignored."""
        return None

    def row_description(self, session: SessionInfo, result: Result) -> None:
        """A result's column description is known (sent by the server or cached)."""

    def execute(self, session: SessionInfo, statement: Statement, bind: bytes | None) -> Verdict:
        """An Execute of a portal whose statement is ``deferred`` or was decided under an
        older epoch. ``bind`` is the portal's Bind message body when the statement is
        deferred (its parameters), else None. Return None, Reject or Hold."""
        return None

    def data_row(self, session: SessionInfo, result: Result, message: memoryview) -> bytes | None:
        """A whole DataRow message (tag and length included). Return replacement bytes."""
        return None

    def data_rows(self, session: SessionInfo, result: Result, rows: memoryview) -> bytes | None:
        """The batched form of :meth:`data_row`: consecutive whole DataRow messages of one
        result, back to back (what one read from the server brought), already framed and
        length-checked by the session (:func:`row_spans` walks them). Return replacement
        bytes for the whole run (whole messages), or None. Optional: the session hands
        over runs only when every addon implementing ``data_row`` implements this too,
        else it calls ``data_row`` once per row."""
        return None

    def stream_chunk(self, session: SessionInfo, result: Result | None, tag: bytes, window: memoryview,
                     offset: int, total: int) -> StreamEdit | None:
        """A window onto a server message too large to hold whole (DataRow, CopyData,
        FunctionCallResponse), never the whole of it at once.

        ``window`` holds bytes ``offset .. offset+len(window)`` of the message body (after
        tag and length) of ``total`` bytes; it starts with whatever the previous call kept
        back. The header is already on its way, so a replacement must be the same length.
        On the last window (``offset + len(window) == total``) ``keep`` must be 0.
        """
        return None

    def copy_data(self, session: SessionInfo, result: Result | None, from_client: bool,
                  message: memoryview) -> bytes | None:
        """A whole CopyData message in either direction (``result`` is the COPY's result
        when it comes from the server). Return replacement bytes."""
        return None

    def copy_rows(self, session: SessionInfo, result: Result, rows: memoryview) -> bytes | None:
        """The batched form of :meth:`copy_data` for COPY OUT: consecutive whole CopyData
        messages from the server (what one read brought), framed and length-checked by the
        session (:func:`row_spans` walks them). Return replacement bytes for the whole run,
        or None. Optional, like :meth:`data_rows`: used only when every addon implementing
        ``copy_data`` implements this too."""
        return None

    def function_result(self, session: SessionInfo, message: memoryview) -> bytes | None:
        """A whole FunctionCallResponse message. Return replacement bytes."""
        return None

    def notice(self, session: SessionInfo, is_error: bool, message: memoryview) -> bytes | None:
        """An ErrorResponse or NoticeResponse on its way to the client."""
        return None

    def notification(self, session: SessionInfo, message: memoryview) -> bytes | None:
        """A NotificationResponse (LISTEN/NOTIFY) on its way to the client."""
        return None

    def parameter_status(self, session: SessionInfo, message: memoryview) -> bytes | None:
        """A whole ParameterStatus on its way to the client, during login too. Return
        replacement bytes; the session's ``parameters`` keep what the client got."""
        return None

    def column_names(self, session: SessionInfo, message: memoryview) -> bytes | None:
        """A whole RowDescription on its way to the client (a result's, or one answering
        Describe), before anything decodes it. Return replacement bytes, which may change
        field names only; every addon and cache then sees the replacement. The answer must
        depend on the bytes alone, and bytes the hooks passed or produced must pass again:
        the session reuses answers when the same bytes come again."""
        return None

    def result_complete(self, session: SessionInfo, result: Result, tag: str | None, error: bool) -> None:
        """A statement's result is over: CommandComplete (tag), PortalSuspended, or error."""


HOOK_NAMES = (
    "session_start", "session_end", "session_refused", "statement", "execute", "forward", "row_description",
    "data_row", "data_rows", "stream_chunk", "copy_data", "copy_rows", "function_result", "notice", "notification",
    "parameter_status", "column_names", "result_complete",
)


class AddonOrderError(ValueError):
    """The addons are in an order their declarations forbid."""


class AddonManager:
    """Holds the addons in their declared order and, per hook, the bound methods of those
    that implement it; runs their life cycle."""

    def __init__(self, addons: Iterable[Addon] = ()):
        self.addons: list[Addon] = list(addons)
        check_order(self.addons)
        # Bumped when a decision-making addon's rules change (a policy reload): verdicts
        # of prepared statements from an older epoch are reached again at Execute.
        self.epoch = 0
        self._opened: list[Addon] = []
        self._index()

    def bump_epoch(self) -> None:
        self.epoch += 1

    async def open(self) -> None:
        """Open every addon in order; if one fails, close those already open and raise."""
        for addon in self.addons:
            try:
                await addon.open()
            except BaseException:
                await self.close()
                raise
            self._opened.append(addon)

    async def start(self, control: ControlOps) -> None:
        for addon in self._opened:
            await addon.start(control)

    async def close(self) -> None:
        """Close the opened addons in reverse order; one failing doesn't keep the rest open."""
        while self._opened:
            addon = self._opened.pop()
            try:
                await addon.close()
            except Exception:
                log.exception("addon %s failed to close", addon.name)

    def _index(self) -> None:
        for hook in HOOK_NAMES:
            base = getattr(Addon, hook)
            bound: list[Callable[..., Any]] = [
                getattr(a, hook) for a in self.addons if getattr(type(a), hook, base) is not base
            ]
            setattr(self, hook, bound)
        # The batched DataRow hook, when every data_row addon has one (else the per-row form).
        runs = [a.data_rows for a in self.addons
                if type(a).data_row is not Addon.data_row and type(a).data_rows is not Addon.data_rows]
        self.data_rows = runs if len(runs) == len(self.data_row) else []
        runs = [a.copy_rows for a in self.addons
                if type(a).copy_data is not Addon.copy_data and type(a).copy_rows is not Addon.copy_rows]
        self.copy_rows = runs if len(runs) == len(self.copy_data) else []

    # Filled by _index: one list of bound methods per hook.
    session_start: list[Callable[[SessionInfo], None]]
    session_end: list[Callable[[SessionInfo, str], None]]
    session_refused: list[Callable[[SessionInfo, str], None]]
    statement: list[Callable[[SessionInfo, Statement], Verdict]]
    execute: list[Callable[[SessionInfo, Statement, bytes | None], Verdict]]
    forward: list[Callable[[SessionInfo, Forward], Awaitable[Any] | Reject | None]]
    row_description: list[Callable[[SessionInfo, Result], None]]
    data_row: list[Callable[[SessionInfo, Result, memoryview], bytes | None]]
    data_rows: list[Callable[[SessionInfo, Result, memoryview], bytes | None]]
    stream_chunk: list[Callable[[SessionInfo, Result | None, bytes, memoryview, int, int], StreamEdit | None]]
    copy_data: list[Callable[[SessionInfo, Result | None, bool, memoryview], bytes | None]]
    copy_rows: list[Callable[[SessionInfo, Result, memoryview], bytes | None]]
    function_result: list[Callable[[SessionInfo, memoryview], bytes | None]]
    notice: list[Callable[[SessionInfo, bool, memoryview], bytes | None]]
    notification: list[Callable[[SessionInfo, memoryview], bytes | None]]
    parameter_status: list[Callable[[SessionInfo, memoryview], bytes | None]]
    column_names: list[Callable[[SessionInfo, memoryview], bytes | None]]
    result_complete: list[Callable[[SessionInfo, Result, str | None, bool], None]]


def row_spans(rows: memoryview | bytes) -> Iterator[tuple[int, int]]:
    """(start, end) of each message in a run handed to ``data_rows`` (framed by the session,
    so the lengths are trusted; a run a hook rebuilt must be whole messages too)."""
    pos, n = 0, len(rows)
    while pos < n:
        end = pos + 1 + _LENGTH.unpack_from(rows, pos + 1)[0]
        yield pos, end
        pos = end


def check_order(addons: list[Addon]) -> None:
    """Raise AddonOrderError unless every addon comes after the ones it declares it runs after."""
    last: dict[str, int] = {}
    for index, addon in enumerate(addons):
        last[addon.name] = index
    for index, addon in enumerate(addons):
        late = [name for name in addon.after if last.get(name, -1) > index]
        if late:
            raise AddonOrderError(f"addon {addon.name!r} must run after {', '.join(map(repr, late))}, "
                                  "but comes before")
