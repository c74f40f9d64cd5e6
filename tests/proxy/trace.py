"""Step-by-step session driving for tests outside tests/proxy (policy, masking, audit):
call the session's event methods yourself and read what each side got since last asked.

RecordingIO is the playbook's TraceIO (tests/proxy/playbook.py) — one ordered list of
every effect — with the older per-side views on top of it. New session-layer tests use
playbooks, which check the order across sides too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from appliance.config import Target
from appliance.pgwire import BackendDecoder, FrontendDecoder
from appliance.pgwire import messages as m
from appliance.proxy.hooks import Addon, AddonManager, SessionInfo
from appliance.proxy.session import CancelRegistry, Session
from tests.proxy.playbook import (
    AGENT,
    DB,
    MAX_DECODED,
    UPSTREAM_KEY,
    CancelUpstream,
    Close,
    OpenUpstream,
    PauseClient,
    ResumeClient,
    StartClientTls,
    StartUpstreamTls,
    TraceIO,
    WaitCancelled,
    _Send,
    make_target,
)

__all__ = ["AGENT", "DB", "UPSTREAM_KEY", "RecordingIO", "backend", "frontend", "make_target", "new_session",
           "ready_session", "startup"]


class RecordingIO(TraceIO):
    """The ordered trace, read per side: ``client_got()``/``server_got()`` decode what that
    side received since the last call; ``to_client``/``to_server`` are those bytes."""

    def __init__(self) -> None:
        super().__init__()
        self._read = {"client": 0, "server": 0}  # trace index each side was read up to
        self._decoders = {"client": BackendDecoder(MAX_DECODED), "server": FrontendDecoder(MAX_DECODED, MAX_DECODED)}
        # (awaitable, done) of each wait, in order; tests may pop them once handled.
        self.pending_waits: list[tuple[Awaitable[Any], Callable[[Any, BaseException | None], None]]] = []

    def wait(self, awaitable: Awaitable[Any], done: Callable[[Any, BaseException | None], None]) -> Callable[[], None]:
        self.pending_waits.append((awaitable, done))
        return super().wait(awaitable, done)

    @property
    def waits(self) -> list[tuple[Awaitable[Any], Callable[[Any, BaseException | None], None]]]:  # type: ignore[override]
        return self.pending_waits

    def _unread(self, side: str) -> bytes:
        return b"".join(e.data for e in self.trace[self._read[side]:] if isinstance(e, _Send) and e.side == side)

    @property
    def to_client(self) -> bytes:
        return self._unread("client")

    @property
    def to_server(self) -> bytes:
        return self._unread("server")

    @property
    def closed(self) -> bool:
        return any(isinstance(e, Close) for e in self.trace)

    @property
    def client_paused(self) -> bool:
        state = False
        for e in self.trace:
            if isinstance(e, (PauseClient, ResumeClient)):
                state = isinstance(e, PauseClient)
        return state

    @property
    def events(self) -> list[tuple[Any, ...]]:
        """The effects other than sends, as tuples."""
        out: list[tuple[Any, ...]] = []
        for e in self.trace:
            if isinstance(e, OpenUpstream):
                out.append(("open_upstream", e.target, e.endpoint))
            elif isinstance(e, StartUpstreamTls):
                out.append(("start_tls", e.target))
            elif isinstance(e, StartClientTls):
                out.append(("start_client_tls", e.context))
            elif isinstance(e, CancelUpstream):
                out.append(("cancel_upstream", e.endpoint, e.process_id, e.secret_key))
            elif isinstance(e, WaitCancelled):
                out.append(("hold_cancelled",))
        return out

    def _take(self, side: str) -> bytes:
        data = self._unread(side)
        self._read[side] = len(self.trace)
        return data

    def client_got(self) -> list[Any]:
        """Messages sent to the client since the last call (SSL answers as raw bytes)."""
        data = self._take("client")
        if data in (b"N", b"S"):
            return [data]
        decoder = self._decoders["client"]
        decoder.feed(data)
        return list(decoder)

    def server_got(self) -> list[Any]:
        decoder = self._decoders["server"]
        decoder.feed(self._take("server"))
        return list(decoder)


def new_session(addons: list[Addon] | None = None, target: Target | None = None,
                cancels: CancelRegistry | None = None, stream_threshold: int = 1 << 20,
                no_target: bool = False, authenticator: Any = None) -> tuple[Session, RecordingIO]:
    io = RecordingIO()
    session = Session(io, SessionInfo(client=AGENT, destination=DB),
                      None if no_target else (target or make_target()),
                      AddonManager(addons or []), cancels if cancels is not None else CancelRegistry(),
                      max_client_message=1 << 24, stream_threshold=stream_threshold,
                      authenticator=authenticator)
    return session, io


def startup(user: str = "app", database: str = "payments", **params: str) -> bytes:
    return m.StartupMessage(196608, {"user": user, "database": database, **params}).encode()


def ready_session(addons: list[Addon] | None = None, **kw: Any) -> tuple[Session, RecordingIO]:
    """A session through startup and md5 login, with the client's view drained."""
    session, io = new_session(addons, **kw)
    session.client_data(startup())
    session.upstream_connected()
    io.server_got()
    session.server_data(m.AuthenticationMD5Password(b"salt").encode())
    io.server_got()
    session.server_data(
        m.AuthenticationOk().encode() + m.ParameterStatus("server_version", "15.0").encode()
        + m.BackendKeyData(*UPSTREAM_KEY).encode() + m.ReadyForQuery(b"I").encode())
    io.client_got()
    return session, io


def backend(*messages: Any) -> bytes:
    return b"".join(msg.encode() for msg in messages)


def frontend(*messages: Any) -> bytes:
    return b"".join(msg.encode() for msg in messages)
