"""Typed hook points of a proxied session, and the addon manager that dispatches them.

Features (policy, masking, holds, audit) are addons: classes that override some of the
methods of :class:`Addon`. The manager collects, per hook, only the addons that actually
override it, so a hook nobody implements costs the hot path one falsy-list check.

Hooks run inside the session layer, synchronously. The only hook that may wait is
``statement``: it returns a :class:`Hold` wrapping an awaitable, and the session pauses —
only itself — until the awaitable yields a verdict.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable

if TYPE_CHECKING:
    from appliance.config import Endpoint, Target
    from appliance.pgwire.messages import RowDescription


class StatementKind(enum.Enum):
    """How a statement reached the proxy."""

    QUERY = "query"  # simple protocol Query: may hold several statements
    PARSE = "parse"  # extended protocol Parse: decided here, run later by name
    FUNCTION_CALL = "function_call"  # the legacy FunctionCall message


_session_ids = itertools.count(1)


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
    upstream_user: str | None = None
    upstream_tls: str | None = None  # negotiated TLS version upstream, None if clear
    client_tls: str | None = None  # TLS version towards the agent, None if clear
    backend_pid: int | None = None
    transaction_status: bytes = b"I"
    # Who this is (appliance.identity.Identity), and how we know: "certificate", or
    # "legacy-source-address" for the opt-in address mapping; None in trust mode.
    identity: Any = None
    identity_source: str | None = None
    certificate_serial: int | None = None
    addon_state: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False, slots=True)
class Statement:
    """A statement the client asked to run (or prepare), before it is forwarded."""

    kind: StatementKind
    text: str
    name: str = ""  # prepared statement name (PARSE), "" for unnamed
    param_types: tuple[int, ...] = ()
    function_oid: int | None = None
    # Set by the session once decided; enforcement at Bind/Execute reads it by name.
    verdict: "Verdict | None" = None
    # Learnt from the server's answer to Describe(statement); clients may skip Describe.
    row_description: "RowDescription | None" = None


@dataclass(eq=False, slots=True)
class Result:
    """One result set (or command outcome) flowing back for a statement."""

    statement: Statement | None
    row_description: RowDescription | None = None
    # Result column formats as the client asked for them in Bind (0 text, 1 binary).
    result_formats: tuple[int, ...] = ()
    rows: int = 0


@dataclass(frozen=True, slots=True)
class Reject:
    """Refuse a statement: the client gets an ErrorResponse, the server never sees it."""

    sqlstate: str
    message: str
    detail: str | None = None
    hint: str | None = None


@dataclass(frozen=True, slots=True)
class Hold:
    """Pause this session until ``decision`` yields ``None`` (go ahead) or a Reject."""

    decision: Awaitable[Reject | None]
    description: str = ""


Verdict = Reject | Hold | None


class Addon:
    """Base class for features. Override only the hooks you need."""

    name: str = "addon"

    def session_start(self, session: SessionInfo) -> None:
        """The upstream session is authenticated and ready for queries."""

    def session_end(self, session: SessionInfo, reason: str) -> None:
        """The connection is over (for any reason, after session_start)."""

    def session_refused(self, session: SessionInfo, reason: str) -> None:
        """A connection was refused before it became a session (unknown target, bad startup…)."""

    def statement(self, session: SessionInfo, statement: Statement) -> Verdict:
        """Before a statement is forwarded. Return None to allow, Reject, or Hold."""
        return None

    def row_description(self, session: SessionInfo, result: Result) -> None:
        """A result's column description is known (sent by the server or cached)."""

    def data_row(self, session: SessionInfo, result: Result, message: memoryview) -> bytes | None:
        """A whole DataRow message (tag and length included). Return replacement bytes."""
        return None

    def stream_chunk(self, session: SessionInfo, tag: bytes, chunk: memoryview, offset: int, total: int) -> bytes | None:
        """A piece of a server message too large to hold whole (DataRow, CopyData...).

        ``offset`` is where the chunk starts in the message body of ``total`` bytes. The
        header is already on its way, so a replacement must be the same length.
        """
        return None

    def copy_data(self, session: SessionInfo, from_client: bool, message: memoryview) -> bytes | None:
        """A whole CopyData message in either direction. Return replacement bytes."""
        return None

    def notice(self, session: SessionInfo, is_error: bool, message: memoryview) -> bytes | None:
        """An ErrorResponse or NoticeResponse on its way to the client."""
        return None

    def notification(self, session: SessionInfo, message: memoryview) -> bytes | None:
        """A NotificationResponse (LISTEN/NOTIFY) on its way to the client."""
        return None

    def result_complete(self, session: SessionInfo, result: Result, tag: str | None, error: bool) -> None:
        """A statement's result is over: CommandComplete (tag), PortalSuspended, or error."""


HOOK_NAMES = (
    "session_start", "session_end", "session_refused", "statement", "row_description",
    "data_row", "stream_chunk", "copy_data", "notice", "notification", "result_complete",
)


class AddonManager:
    """Holds the addons and, per hook, the bound methods of those that implement it."""

    def __init__(self, addons: Iterable[Addon] = ()):
        self.addons: list[Addon] = list(addons)
        self._index()

    def add(self, addon: Addon) -> None:
        self.addons.append(addon)
        self._index()

    def _index(self) -> None:
        for hook in HOOK_NAMES:
            base = getattr(Addon, hook)
            bound: list[Callable[..., Any]] = [
                getattr(a, hook) for a in self.addons if getattr(type(a), hook, base) is not base
            ]
            setattr(self, hook, bound)

    # Filled by _index: one list of bound methods per hook.
    session_start: list[Callable[[SessionInfo], None]]
    session_end: list[Callable[[SessionInfo, str], None]]
    session_refused: list[Callable[[SessionInfo, str], None]]
    statement: list[Callable[[SessionInfo, Statement], Verdict]]
    row_description: list[Callable[[SessionInfo, Result], None]]
    data_row: list[Callable[[SessionInfo, Result, memoryview], bytes | None]]
    stream_chunk: list[Callable[[SessionInfo, bytes, memoryview, int, int], bytes | None]]
    copy_data: list[Callable[[SessionInfo, bool, memoryview], bytes | None]]
    notice: list[Callable[[SessionInfo, bool, memoryview], bytes | None]]
    notification: list[Callable[[SessionInfo, memoryview], bytes | None]]
    result_complete: list[Callable[[SessionInfo, Result, str | None, bool], None]]
