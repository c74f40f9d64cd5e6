"""One agent connection and its upstream connection: a sans-io state machine in layers.

Events come in as method calls (``client_data``, ``server_data``, ``upstream_connected``,
a wait finishing …); effects go out through a :class:`SessionIO` (send, open upstream,
start TLS, pause the client, wait, close). The asyncio shell implements SessionIO with
sockets; tests implement it with a recorder and replay traces. Nothing here touches a
socket or an event loop.

The session hands each phase to its layer:

- ``startup.AgentStartup`` — the agent's startup packets, TLS, cancel requests, identity;
- ``login.UpstreamLogin`` — Tollgate's own login to the database;
- ``pipeline.RequestPipeline`` — client → server: framing, decisions, holds, commits;
- ``results.ResponseRelay`` — server → client: attribution, hooks, streaming;
- ``dispatch`` — how every hook is called, so that any failure fails closed.

Whatever escapes a layer — a protocol violation, an addon's exception — ends the session
here with a FATAL to the client: nothing is relayed on after a failure.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from appliance.config import DEFAULT_MAX_PENDING_REQUESTS, Credential, Endpoint, Target
from appliance.pgwire import DEFAULT_MAX_MESSAGE_SIZE, ProtocolError
from appliance.pgwire import messages as m
from appliance.proxy import dispatch
from appliance.proxy.agent_auth import AgentAuthenticator, TrustAuthenticator
from appliance.proxy.budget import UNLIMITED, BufferBudget
from appliance.proxy.cancel import CancelRegistry
from appliance.proxy.errors import SessionError
from appliance.proxy.hooks import AddonManager, Reject, SessionInfo
from appliance.proxy.login import UpstreamLogin
from appliance.proxy.pipeline import RequestPipeline
from appliance.proxy.requests import Req, RequestState
from appliance.proxy.results import ResponseRelay, error_bytes
from appliance.proxy.startup import AgentStartup

log = logging.getLogger("tollgate.session")

__all__ = ["CancelRegistry", "Phase", "Session", "SessionError", "SessionIO"]


class SessionIO(Protocol):
    """What the session asks of the world. The asyncio shell and test recorders implement it."""

    def send_client(self, data: bytes | memoryview) -> None: ...
    def send_server(self, data: bytes | memoryview) -> None: ...
    def open_upstream(self, target: Target, endpoint: Endpoint) -> None: ...
    def start_upstream_tls(self, target: Target) -> None: ...
    def start_client_tls(self, context: Any) -> None: ...
    def pause_client(self) -> None: ...
    def resume_client(self) -> None: ...
    def pause_server(self) -> None: ...
    def resume_server(self) -> None: ...
    def wait(self, awaitable: Awaitable[Any],
             done: Callable[[Any, BaseException | None], None]) -> Callable[[], None]: ...
    def cancel_upstream(self, endpoint: Endpoint, process_id: int, secret_key: bytes) -> None: ...
    def close(self) -> None: ...


class Phase(enum.Enum):
    STARTUP = "startup"  # reading the client's untyped startup packets
    CLIENT_TLS = "client-tls"  # TLS handshake with the agent running
    CONNECTING = "connecting"  # upstream TCP connect in progress
    UPSTREAM_TLS = "upstream-tls"  # SSLRequest sent upstream / handshake running
    AUTHENTICATING = "authenticating"  # upstream password exchange
    STARTING = "starting"  # upstream authenticated; ParameterStatus/BackendKeyData flowing
    READY = "ready"  # relaying
    CLOSED = "closed"


class Session:
    """One agent connection and its upstream connection."""

    def __init__(self, io: SessionIO, info: SessionInfo, target: Target | None, hooks: AddonManager,
                 cancels: CancelRegistry, *, max_client_message: int, stream_threshold: int,
                 authenticator: AgentAuthenticator | None = None, budget: BufferBudget | None = None,
                 startup_timeout: float | None = None, max_pending_requests: int = DEFAULT_MAX_PENDING_REQUESTS):
        self.io, self.info, self.hooks, self.cancels = io, info, hooks, cancels
        self.authenticator = authenticator or TrustAuthenticator()
        info.target = target
        self.target = target
        self.phase = Phase.STARTUP
        self.ready = False  # the hot path's test for Phase.READY
        self.tls_starting = False
        self.max_client_message = max_client_message
        self.max_pending_requests = max_pending_requests
        self.max_server_message = DEFAULT_MAX_MESSAGE_SIZE
        self.stream_threshold = stream_threshold
        # Bytes of incomplete client messages, shared by all sessions (max_buffered_total).
        self.budget = budget if budget is not None else BufferBudget(UNLIMITED)
        # The shell enforces the startup deadline with a timer and tells us when it passes
        # (startup_timed_out); whatever cancels that timer is kept here, called once ready.
        self.startup_timeout = startup_timeout
        self.cancel_deadline: Callable[[], None] | None = None
        self.cancelling = False  # a CancelRequest is on its way to the database
        self.startup = AgentStartup(self)
        self.login: UpstreamLogin | None = None
        self.requests = RequestState()
        self.pipeline = RequestPipeline(self, self.requests)
        self.responses = ResponseRelay(self, self.requests)
        self._upstream_key: tuple[int, bytes] | None = None
        self._client_key: tuple[int, bytes] | None = None
        self._started = False
        self.close_reason = ""

    # ---- events from the shell ------------------------------------------------------------

    def client_data(self, data: bytes) -> None:
        try:
            if self.ready or self.login is not None:
                # During the login, what the client pipelined waits in the pipeline's buffer.
                self.pipeline.feed(data)
            elif self.phase is Phase.STARTUP or self.phase is Phase.CLIENT_TLS:
                self.startup.feed(data)
        except Exception as exc:  # noqa: BLE001 - fail closed: _failed ends the session
            self._failed(exc, "client")

    def server_data(self, data: bytes) -> None:
        try:
            if self.ready:
                self.responses.feed(data)
            elif self.login is not None and self.phase is not Phase.CLOSED:
                self.login.feed(data)
        except Exception as exc:  # noqa: BLE001 - fail closed: _failed ends the session
            self._failed(exc, "server")

    def run(self, step: Callable[..., None], *args: Any, blame: str = "client") -> None:
        """Run a step of the session; whatever it raises ends the session, fail closed."""
        try:
            step(*args)
        except Exception as exc:  # noqa: BLE001 - fail closed: _failed ends the session
            self._failed(exc, blame)

    def _failed(self, exc: Exception, blame: str) -> None:
        """Whatever escaped a layer ends the session with a FATAL: nothing more goes through."""
        if isinstance(exc, ProtocolError):
            what = "frontend message" if blame == "client" else "message from the database server"
            self._fatal("08P01", f"invalid {what}: {exc}")
        elif isinstance(exc, SessionError):  # AddonFailed included
            self._fatal(exc.sqlstate, exc.message, exc.detail, exc.hint)
        else:  # a defect, ours or an addon's
            log.error("session %s: failing closed", self.info.id, exc_info=exc)
            self._fatal(dispatch.INTERNAL_ERROR, f"Tollgate failed closed: {type(exc).__name__}: {exc}")

    def client_closed(self) -> None:
        self._close("client disconnected")

    def server_closed(self) -> None:
        if self.phase in (Phase.AUTHENTICATING, Phase.STARTING, Phase.UPSTREAM_TLS):
            self._fatal("08006", "the database server closed the connection during login")
        elif self.ready and not self.close_reason and not self.responses.stream_left:
            # Not after a FATAL of its own, and not inside a message already half relayed
            # (a FATAL there would break the client's framing): say what happened.
            self._fatal("08006", "the database server closed the connection unexpectedly")
        else:
            self._close("server disconnected")

    def upstream_connected(self) -> None:
        if self.phase is not Phase.CONNECTING or self.login is None:
            return
        self.phase = Phase.UPSTREAM_TLS
        self.run(self.login.connected, blame="server")

    def upstream_failed(self, reason: str) -> None:
        name = self.target.name if self.target else "?"
        self._fatal("08006", f"Tollgate could not connect to database {name!r} at {self.info.destination}: {reason}")

    def upstream_tls_ready(self, version: str) -> None:
        self.info.upstream_tls = version
        if self.login is not None:
            self.run(self.login.tls_ready, blame="server")

    def upstream_tls_failed(self, reason: str) -> None:
        self._fatal("08006", f"TLS to the database failed: {reason}")

    def client_tls_ready(self, version: str, peer_certificate: bytes | None) -> None:
        """The agent-side handshake finished; the StartupMessage comes next, encrypted."""
        if self.phase is not Phase.CLIENT_TLS:
            return
        self.info.client_tls = version
        self.tls_starting = False
        self.startup.tls_ready(peer_certificate)
        self.phase = Phase.STARTUP

    def client_tls_failed(self, reason: str) -> None:
        self.info.auth_error = f"TLS handshake failed: {reason}"
        self.authenticator.tls_failed(self.info, reason)
        self._close(f"TLS handshake with the agent failed: {reason}")

    def startup_timed_out(self) -> None:
        """The startup deadline passed before the session was ready: it ends here. A
        connection that never sent a byte is closed without a word (as PostgreSQL does); a
        TLS handshake still running can't carry a FATAL either."""
        self.cancel_deadline = None
        if self.ready or self.phase is Phase.CLOSED or self.cancelling:
            return
        seconds = f"{self.startup_timeout:g} s" if self.startup_timeout is not None else "the time allowed"
        phase = self.phase
        if phase is Phase.CLIENT_TLS:
            self.client_tls_failed(f"no TLS handshake within {seconds}")
        elif phase is Phase.STARTUP:
            if not self.startup.started and self.info.client_tls is None:
                self._close(f"no startup packet within {seconds}")
            else:
                self._fatal("08P01", f"the client did not complete its startup within {seconds}",
                            hint="Tollgate's startup_timeout bounds how long a connection may take to start.")
        else:  # connecting or logging in to the database
            name = self.target.name if self.target else "?"
            self._fatal("08006", f"Tollgate could not log in to database {name!r} at {self.info.destination} "
                                 f"within {seconds} (still {phase.value})",
                        hint="Tollgate's startup_timeout bounds the whole startup, the database's login included.")

    def terminate(self, sqlstate: str, message: str, hint: str | None = None) -> None:
        """End the session from outside (shutdown, revocation) with a FATAL to the client."""
        self._fatal(sqlstate, message, hint=hint)

    def cancel_target(self) -> tuple[Endpoint, int, bytes] | None:
        """A CancelRequest carrying this session's key arrived on another connection: where
        to send the real one, or None if we handled it here (a held statement is withdrawn)."""
        if self.pipeline.held is not None:
            self.pipeline.resolve_hold(Reject(
                "57014", "canceling statement due to user request",
                detail="The statement was waiting for approval; the request is withdrawn."))
            return None
        if self._upstream_key is None:
            return None
        return (self.info.destination, *self._upstream_key)

    def cancel_delivered(self) -> None:
        """The database has taken the cancel request we forwarded (it closed that connection)."""
        self._close("cancel request delivered")

    # ---- what the layers ask of the session -------------------------------------------------

    def start_client_tls(self, context: Any) -> None:
        self.phase = Phase.CLIENT_TLS
        self.tls_starting = True
        self.io.start_client_tls(context)

    def forward_cancel(self, packet: m.CancelRequest) -> None:
        session = self.cancels.lookup(packet.process_id, packet.secret_key)
        if session is None and self.cancels.elsewhere is not None:
            # Another worker's session, perhaps: ask them, and keep this connection open
            # meanwhile, as for a session of ours (below).
            self.cancelling = True
            self._stop_deadline()
            self.cancels.passed_on += 1
            self.cancels.elsewhere(packet.process_id, packet.secret_key, self._cancel_target_found)
            return
        target = session.cancel_target() if session is not None else None
        if session is None:  # PostgreSQL, too, ignores it without a word to the sender
            log.debug("cancel request from %s for pid %d with an unknown key ignored", self.info.client,
                      packet.process_id)
        if target is None:
            self._close("cancel request handled")
            return
        # This connection stays open until the database has acted: clients (libpq's PQcancel,
        # asyncpg) take our close as "done", and a cancel arriving later would hit the
        # session's next statement instead. Its delivery has timeouts of its own: the
        # startup deadline no longer applies.
        self.cancelling = True
        self._stop_deadline()
        self.io.cancel_upstream(*target)

    def _cancel_target_found(self, target: tuple[Endpoint, int, bytes] | None) -> None:
        """The other workers' answer to a cancel key none of our sessions holds."""
        if self.phase is Phase.CLOSED:
            return
        if target is None:
            self._close("cancel request handled")
            return
        self.io.cancel_upstream(*target)

    def connect_upstream(self, startup: m.StartupMessage, credential: Credential) -> None:
        assert self.target is not None
        self.login = UpstreamLogin(self, self.target, startup, credential)
        self.phase = Phase.CONNECTING
        self.io.open_upstream(self.target, self.info.destination)

    def start_upstream_tls(self) -> None:
        assert self.target is not None
        self.io.start_upstream_tls(self.target)

    def login_sent(self) -> None:
        """The StartupMessage went upstream: the password exchange comes next."""
        self.phase = Phase.AUTHENTICATING

    def login_authenticated(self) -> None:
        self.phase = Phase.STARTING

    def backend_key(self, msg: m.BackendKeyData) -> None:
        if self._client_key is not None:
            raise ProtocolError("the database sent BackendKeyData twice")
        self._upstream_key = (msg.process_id, msg.secret_key)
        self.info.backend_pid = msg.process_id
        self._client_key = self.cancels.issue(self, msg.process_id, msg.secret_key)
        self.io.send_client(m.BackendKeyData(*self._client_key).encode())

    def login_complete(self, ready: m.ReadyForQuery) -> None:
        """ReadyForQuery after login: the session relays from now on."""
        assert self.login is not None
        self.info.transaction_status = ready.status
        self.phase = Phase.READY
        self.ready = True
        self._started = True
        self._stop_deadline()
        # Before the client hears it may go ahead: a session_start hook that fails ends it.
        dispatch.notify(self.hooks.session_start, self.info)
        self.io.send_client(ready.encode())
        rest = self.login.take_rest()
        self.login = None
        if self.pipeline.buffer:
            # What the client pipelined behind its StartupMessage, framed now that it can be.
            self.run(self.pipeline.resume, blame="client")
        if rest and self.ready:
            self.server_data(rest)

    # ---- ending -----------------------------------------------------------------------------

    def _fatal(self, sqlstate: str, message: str, detail: str | None = None, hint: str | None = None) -> None:
        if self.phase is Phase.CLOSED:
            return
        info = self.info
        log.warning("session %s (%s → %s) ended: %s", info.id, info.client, info.destination, message,
                    extra={"session_id": info.id, "client": str(info.client),
                           "identity": info.identity.subject if info.identity is not None else None,
                           "decision": "end", "target": info.target.name if info.target is not None else None})
        if not self.responses.in_stream:
            # Inside a message already half sent an ErrorResponse would be read as part
            # of it: then the connection is cut instead.
            self.io.send_client(error_bytes("FATAL", sqlstate, message, detail, hint))
        self._close(message)

    def _close(self, reason: str) -> None:
        if self.phase is Phase.CLOSED:
            return
        self.phase = Phase.CLOSED
        self.ready = False
        self.close_reason = self.close_reason or reason
        self._stop_deadline()
        self.pipeline.close()
        self.cancels.forget(self._client_key)
        if self._started:
            dispatch.notify_ending(self.hooks.session_end, self.info, self.close_reason)
        else:
            dispatch.notify_ending(self.hooks.session_refused, self.info, self.close_reason)
        self.io.close()

    def _stop_deadline(self) -> None:
        if self.cancel_deadline is not None:
            cancel, self.cancel_deadline = self.cancel_deadline, None
            cancel()

    def describe(self) -> dict[str, Any]:
        """A snapshot for listings (``tollgate sessions``)."""
        info = self.info
        identity = info.identity
        return {
            "id": info.key, "number": info.id, "client": str(info.client), "destination": str(info.destination),
            "target": self.target.name if self.target else None, "user": info.user,
            "database": info.database, "upstream_user": info.upstream_user,
            "application_name": info.application_name, "phase": self.phase.value,
            "transaction_status": info.transaction_status.decode(), "started_at": info.started_at,
            "backend_pid": info.backend_pid,
            "held": self.pipeline.held is not None, "upstream_tls": info.upstream_tls,
            "client_tls": info.client_tls,
            "identity": identity.display if identity is not None else None,
            "identity_kind": identity.kind if identity is not None else None,
            "groups": list(identity.groups) if identity is not None else [],
            "identity_source": info.identity_source,
            "certificate_serial": f"{info.certificate_serial:032X}" if info.certificate_serial is not None else None,
            **self._current(),
        }

    def _current(self) -> dict[str, Any]:
        """The statement running or held now, its age (seconds), and the approval it waits on."""
        pipeline = self.pipeline
        if pipeline.held is not None and pipeline.hold_info is not None:
            hold, since = pipeline.hold_info
            statement = _statement_of(pipeline.held)
            return {"statement": statement.text if statement is not None else None,
                    "statement_age": max(0.0, time.time() - since), "held_on": hold.approval,
                    "held_for": hold.description}
        now = time.perf_counter_ns()
        for request in self.requests.pending:
            if request.kind not in _RUNS or request.reject is not None:
                continue
            statement = _statement_of(request)
            forward = request.forward  # its start time is known when a forward hook (the audit) saw it
            return {"statement": statement.text if statement is not None else None,
                    "statement_age": max(0.0, (now - forward.started_ns) / 1e9) if forward is not None else None,
                    "held_on": None}
        return {"statement": None, "statement_age": None, "held_on": None}


_RUNS = frozenset({Req.QUERY, Req.EXECUTE, Req.FUNCTION_CALL})


def _statement_of(request: Any) -> Any:
    return request.portal.statement if request.portal is not None else request.statement
