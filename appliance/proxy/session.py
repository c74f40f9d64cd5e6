"""The per-connection session layer: a sans-io state machine between agent and database.

Events come in as method calls (``client_data``, ``server_data``, ``upstream_connected``,
``hook_done`` …); effects go out through a :class:`SessionIO` (send, open upstream, close,
wait for a hold). The asyncio shell implements SessionIO with sockets; tests implement it
with a recorder and replay traces. Nothing here touches a socket or an event loop.

Protocol state lives here: the startup and upstream-authentication handshake, transaction
status, prepared statements and portals, and a FIFO of requests awaiting responses, so
every server message can be attributed to the client request that caused it — pipelining,
errors skipping to Sync, PortalSuspended and COPY included.

The relay path is the hot path: messages are framed in place and forwarded as ranges of
the received buffer; only the few fields the layer needs are read, and a hook nobody
implements costs nothing.
"""

from __future__ import annotations

import enum
import logging
import secrets
from collections import deque
from time import perf_counter_ns
from typing import Any, Awaitable, Callable, Protocol

from appliance.config import PG_MAX_MESSAGE, Endpoint, Target
from appliance.pgwire import ProtocolError, decode_backend, decode_frontend, decode_startup
from appliance.pgwire import messages as m
from appliance.proxy.agent_auth import AgentAuthenticator, AuthFailure, TrustAuthenticator
from appliance.proxy.framing import (
    bind_fields, check_row_description, cstring, kind_and_name, parse_fields, unpack_length,
)
from appliance.proxy.hooks import (
    AddonManager, FailClosed, Forward, Hold, Reject, Result, SessionInfo, Statement, StatementKind, Verdict,
)
from appliance.proxy.upstream_auth import AuthError, ScramSha256, md5_password

log = logging.getLogger("tollgate.session")

MAX_STARTUP_PACKET = 10_000
# A statement the server is sure to reject at parse time, sent in place of a rejected one,
# so that transaction and pipeline state on the server match what the client is told.
BLOCKED_SQL = b"TOLLGATE BLOCKED STATEMENT"
BLOCKED_FUNCTION_CALL = m.FunctionCall(0, (), (), 0).encode()
# No portal has this name (a client can't have bound it: we never forward such a Bind):
# the server fails the stand-in Execute, with the transaction effects of a real error.
BLOCKED_PORTAL = "\x01tollgate blocked portal"
BLOCKED_EXECUTE = m.Execute(BLOCKED_PORTAL, 0).encode()
BLOCKED_QUERY = m.Query(BLOCKED_SQL.decode()).encode()
AUTH_OK = m.AuthenticationOk().encode()
SSL_REQUEST = m.SSLRequest().encode()
TRUE_VALUES = {"1", "true", "yes", "on", "database"}


class SessionIO(Protocol):
    """What the session asks of the world. The asyncio shell and test recorders implement it."""

    def send_client(self, data: bytes | memoryview) -> None: ...
    def send_server(self, data: bytes | memoryview) -> None: ...
    def open_upstream(self, target: Target, endpoint: Endpoint) -> None: ...
    def start_upstream_tls(self, target: Target) -> None: ...
    def start_client_tls(self, context: Any) -> None: ...
    def pause_client(self) -> None: ...
    def resume_client(self) -> None: ...
    def wait(self, awaitable: Awaitable[Any], done: Callable[[Any, BaseException | None], None]) -> Callable[[], None]: ...
    def cancel_upstream(self, endpoint: Endpoint, process_id: int, secret_key: bytes) -> None: ...
    def close(self) -> None: ...


class CancelRegistry:
    """Maps the cancel keys we hand to clients onto their sessions.

    Clients never see the database's BackendKeyData: a key from us can only cancel the
    query of the session it was issued to, through us.
    """

    def __init__(self) -> None:
        self._sessions: dict[tuple[int, bytes], Session] = {}

    def issue(self, session: "Session", key_length: int) -> tuple[int, bytes]:
        while True:
            key = (secrets.randbits(31) or 1, secrets.token_bytes(key_length))
            if key not in self._sessions:
                self._sessions[key] = session
                return key

    def lookup(self, process_id: int, secret_key: bytes) -> "Session | None":
        return self._sessions.get((process_id, secret_key))

    def forget(self, key: tuple[int, bytes] | None) -> None:
        if key is not None:
            self._sessions.pop(key, None)

    def __len__(self) -> int:
        return len(self._sessions)


class Phase(enum.Enum):
    STARTUP = "startup"  # reading the client's untyped startup packets
    CLIENT_TLS = "client-tls"  # TLS handshake with the agent running
    CONNECTING = "connecting"  # upstream TCP connect in progress
    UPSTREAM_TLS = "upstream-tls"  # SSLRequest sent upstream / handshake running
    AUTHENTICATING = "authenticating"  # upstream password exchange
    STARTING = "starting"  # upstream authenticated; ParameterStatus/BackendKeyData flowing
    READY = "ready"  # relaying
    CLOSED = "closed"


class Req(enum.IntEnum):
    """Kinds of client request still awaiting the server's response."""

    QUERY = 1
    PARSE = 2
    BIND = 3
    DESCRIBE_STATEMENT = 4
    DESCRIBE_PORTAL = 5
    EXECUTE = 6
    CLOSE = 7
    SYNC = 8
    FUNCTION_CALL = 9


# Module-level names for the hot path: an enum attribute lookup costs several times more.
QUERY, PARSE, BIND = Req.QUERY, Req.PARSE, Req.BIND
DESCRIBE_STATEMENT, DESCRIBE_PORTAL, EXECUTE = Req.DESCRIBE_STATEMENT, Req.DESCRIBE_PORTAL, Req.EXECUTE
CLOSE, SYNC, FUNCTION_CALL = Req.CLOSE, Req.SYNC, Req.FUNCTION_CALL


class Pending:
    """One request in flight. ``reject`` marks a substituted (blocked) request."""

    __slots__ = ("kind", "statement", "portal", "name", "reject", "forward")

    def __init__(self, kind: Req, statement: Statement | None = None, portal: "Portal | None" = None,
                 name: str = "", reject: Reject | None = None):
        self.kind, self.statement, self.portal, self.name, self.reject = kind, statement, portal, name, reject
        self.forward: Forward | None = None  # what the forward hooks saw (Query, Execute, FunctionCall)


class Portal:
    """A bound portal: its statement and the result formats the client asked for."""

    __slots__ = ("name", "statement", "result_formats", "row_description", "epoch", "bind")

    def __init__(self, name: str, statement: Statement | None, result_formats: tuple[int, ...], epoch: int):
        self.name, self.statement, self.result_formats = name, statement, result_formats
        self.row_description: m.RowDescription | None = None
        # The Bind body, kept only for statements an addon wants to see run (holds show
        # approvers the parameters).
        self.bind: bytes | None = None
        # How many ReadyForQuery-ending requests the client had sent before this Bind:
        # the portal outlives the transaction-ends the server reports before that.
        self.epoch = epoch


class SessionError(Exception):
    """Ends the session with a FATAL ErrorResponse to the client."""

    def __init__(self, sqlstate: str, message: str, detail: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.sqlstate, self.message, self.detail, self.hint = sqlstate, message, detail, hint


def error_bytes(severity: str, sqlstate: str, message: str, detail: str | None = None, hint: str | None = None) -> bytes:
    return m.ErrorResponse.build(severity, sqlstate, message, detail=detail, hint=hint).encode()


class Session:
    """One agent connection and its upstream connection."""

    def __init__(self, io: SessionIO, info: SessionInfo, target: Target | None, hooks: AddonManager,
                 cancels: CancelRegistry, *, max_client_message: int, stream_threshold: int,
                 authenticator: AgentAuthenticator | None = None):
        self.io, self.info, self.hooks, self.cancels = io, info, hooks, cancels
        self.authenticator = authenticator or TrustAuthenticator()
        self._peer_certificate: bytes | None = None
        info.target = target
        self.target = target
        self.phase = Phase.STARTUP
        self.max_client_message = max_client_message
        self.stream_threshold = stream_threshold
        self._cbuf = bytearray()  # client bytes not yet processed (partial, or behind a hold)
        self._sbuf = bytearray()  # server bytes not yet processed (a partial message)
        # Bytes each buffer needs before its head message is complete: a large message
        # arriving in many reads is framed once, not re-copied per read.
        self._c_need = 0
        self._s_need = 0
        self._pending: deque[Pending] = deque()
        self._statements: dict[str, Statement] = {}
        self._portals: dict[str, Portal] = {}
        self._result: Result | None = None
        self._descriptions: dict[bytes, m.RowDescription] = {}  # decoded RowDescriptions by their bytes
        self._ends_sent = 0  # Sync/Query/FunctionCall sent: each ends with ReadyForQuery
        self._ends_done = 0  # ReadyForQuery received
        self._stream_left = 0  # bytes of a streamed server message still to pass through
        self._stream_tag = b""
        self._stream_total = 0
        self._stream_done = 0  # body bytes of the streamed message received so far
        self._stream_carry = b""  # streamed bytes a hook kept back for the next window
        self._in_stream = False  # part of a message is on its way to the client
        self._held: Pending | None = None  # the statement waiting on a Hold
        self._held_verdict: Any = None
        # A batch of client messages waiting for its forward hooks (audit records made
        # durable) before it goes upstream: its pieces, and the requests it may yet refuse.
        self._batch: tuple[list[bytes], list[tuple[int, Pending, bytes, Any]]] | None = None
        self._held_statement: Statement | None = None
        self._cancel_hold: Callable[[], None] | None = None
        self._client_paused = False
        self._startup: m.StartupMessage | None = None
        self._credential = None
        self._scram: ScramSha256 | None = None
        self._upstream_key: tuple[int, bytes] | None = None
        self._client_key: tuple[int, bytes] | None = None
        self._upstream_tls = False
        self._started = False
        self.close_reason = ""

    # ---- events from the shell ------------------------------------------------------------

    def client_data(self, data: bytes) -> None:
        try:
            if self.phase is Phase.READY and not self._cbuf and self._held is None and self._batch is None:
                rest = self._relay_client(data, 0)
                if rest < len(data):
                    self._keep_client_rest(memoryview(data)[rest:])
                return
            if self.phase is Phase.CLOSED:
                return
            self._cbuf += data
            if len(self._cbuf) < self._c_need:
                return  # the message at the head is still incomplete: don't rescan it
            if self.phase is Phase.STARTUP:
                self._read_startup()
            elif self.phase is Phase.READY and self._held is None and self._batch is None:
                self._drain_client_buffer()
            else:
                self._check_client_buffer()
        except ProtocolError as exc:
            self._fatal("08P01", f"invalid frontend message: {exc}")
        except SessionError as exc:
            self._fatal(exc.sqlstate, exc.message, exc.detail, exc.hint)

    def server_data(self, data: bytes) -> None:
        try:
            if self.phase is Phase.READY:
                self._relay_server(data)
            elif self.phase is not Phase.CLOSED:
                self._sbuf += data
                self._handshake_server()
        except ProtocolError as exc:
            self._fatal("08P01", f"invalid message from the database server: {exc}")
        except SessionError as exc:
            self._fatal(exc.sqlstate, exc.message, exc.detail, exc.hint)
        except FailClosed as exc:
            self._fail_closed(exc)

    def client_closed(self) -> None:
        self._close("client disconnected")

    def server_closed(self) -> None:
        if self.phase in (Phase.AUTHENTICATING, Phase.STARTING, Phase.UPSTREAM_TLS):
            self._fatal("08006", "the database server closed the connection during login")
        elif self.phase is Phase.READY and not self.close_reason and not self._stream_left:
            # Not after a FATAL of its own, and not inside a message already half relayed
            # (a FATAL there would break the client's framing): say what happened.
            self._fatal("08006", "the database server closed the connection unexpectedly")
        else:
            self._close("server disconnected")

    def upstream_connected(self) -> None:
        if self.phase is not Phase.CONNECTING:
            return
        assert self.target is not None
        if self.target.tls == "disable":
            self._send_upstream_startup()
        else:
            self.phase = Phase.UPSTREAM_TLS
            self.io.send_server(SSL_REQUEST)

    def upstream_failed(self, reason: str) -> None:
        name = self.target.name if self.target else "?"
        self._fatal("08006", f"Tollgate could not connect to database {name!r} at {self.info.destination}: {reason}")

    def upstream_tls_ready(self, version: str) -> None:
        self._upstream_tls = True
        self.info.upstream_tls = version
        self._send_upstream_startup()

    def upstream_tls_failed(self, reason: str) -> None:
        self._fatal("08006", f"TLS to the database failed: {reason}")

    def client_tls_ready(self, version: str, peer_certificate: bytes | None) -> None:
        """The agent-side handshake finished; the StartupMessage comes next, encrypted."""
        if self.phase is not Phase.CLIENT_TLS:
            return
        self.info.client_tls = version
        self._peer_certificate = peer_certificate
        self.phase = Phase.STARTUP
        self.client_data(b"")

    def client_tls_failed(self, reason: str) -> None:
        self.info.auth_error = f"TLS handshake failed: {reason}"
        self.authenticator.tls_failed(self.info, reason)
        self._close(f"TLS handshake with the agent failed: {reason}")

    def terminate(self, sqlstate: str, message: str, hint: str | None = None) -> None:
        """End the session from outside (shutdown, revocation) with a FATAL to the client."""
        self._fatal(sqlstate, message, hint=hint)

    def cancel_target(self) -> tuple[Endpoint, int, bytes] | None:
        """A CancelRequest carrying this session's key arrived on another connection: where
        to send the real one, or None if we handled it here (a held statement is withdrawn)."""
        if self._held is not None:
            self._resolve_hold(Reject("57014", "canceling statement due to user request",
                                      detail="The statement was waiting for approval; the request is withdrawn."))
            return None
        if self._upstream_key is None:
            return None
        return (self.info.destination, *self._upstream_key)

    # ---- startup ---------------------------------------------------------------------------

    def _read_startup(self) -> None:
        while self.phase is Phase.STARTUP and len(self._cbuf) >= 4:
            (length,) = unpack_length(self._cbuf, 0)
            if length < 8 or length > MAX_STARTUP_PACKET:
                raise ProtocolError(f"startup packet length {length} is outside 8..{MAX_STARTUP_PACKET}")
            if len(self._cbuf) < length:
                return
            packet = decode_startup(bytes(self._cbuf[4:length]))
            del self._cbuf[:length]
            if isinstance(packet, (m.SSLRequest, m.GSSENCRequest)):
                # Bytes after an SSLRequest, before our answer, would be read as part of the
                # handshake by a careless server (CVE-2021-23222): refuse instead.
                if self._cbuf:
                    raise ProtocolError("received unencrypted data after an encryption request")
                context = None
                if isinstance(packet, m.SSLRequest) and self.target is not None:
                    context = self.authenticator.server_context(self.target)
                if context is None:
                    self.io.send_client(b"N")
                else:
                    self.io.send_client(b"S")
                    self.phase = Phase.CLIENT_TLS
                    self.io.start_client_tls(context)
                    return
            elif isinstance(packet, m.CancelRequest):
                self._forward_cancel(packet)
                return
            else:
                self._accept_startup(packet)

    def _forward_cancel(self, packet: m.CancelRequest) -> None:
        session = self.cancels.lookup(packet.process_id, packet.secret_key)
        target = session.cancel_target() if session is not None else None
        if session is None:
            log.warning("cancel request from %s with an unknown key ignored", self.info.client)
        if target is None:
            self._close("cancel request handled")
            return
        # This connection stays open until the database has acted: clients (libpq's PQcancel,
        # asyncpg) take our close as "done", and a cancel arriving later would hit the
        # session's next statement instead.
        self.io.cancel_upstream(*target)

    def cancel_delivered(self) -> None:
        """The database has taken the cancel request we forwarded (it closed that connection)."""
        self._close("cancel request delivered")

    def _accept_startup(self, startup: m.StartupMessage) -> None:
        startup.validate()
        if startup.protocol_version >> 16 != 3:
            raise SessionError("0A000", f"unsupported frontend protocol {startup.protocol_version >> 16}."
                                        f"{startup.protocol_version & 0xFFFF}: Tollgate speaks 3.x")
        params = startup.parameters
        self._startup = startup
        info = self.info
        info.user = params.get("user")
        info.database = params.get("database") or info.user
        info.application_name = params.get("application_name")
        target = self.target
        if target is None:
            raise SessionError(
                "08004", f"Tollgate does not protect a database at {info.destination}; the connection is refused",
                hint="Ask the network team to add this address to a target in Tollgate's configuration.")
        if params.get("replication", "false").lower() in TRUE_VALUES and not target.allow_replication:
            raise SessionError("28000", f"replication connections to {target.name!r} are not allowed through Tollgate")
        try:
            info.identity = self.authenticator.authenticate(info, self._peer_certificate)
        except AuthFailure as exc:
            info.auth_error = exc.message
            raise SessionError("28000", exc.message, hint=exc.hint) from None
        credential = target.credentials.get(info.user or "")
        if credential is None:
            raise SessionError(
                "28000", f"Tollgate holds no credentials for role {info.user!r} on database {target.name!r}",
                hint=f"Roles available through Tollgate here: {', '.join(sorted(target.credentials)) or 'none'}.")
        self._credential = credential
        info.upstream_user = credential.upstream_user
        self.phase = Phase.CONNECTING
        self.io.open_upstream(target, info.destination)

    def _send_upstream_startup(self) -> None:
        assert self._startup is not None and self._credential is not None
        params = dict(self._startup.parameters)
        params["user"] = self._credential.upstream_user
        # PostgreSQL defaults the database to the *login* role; keep the agent's expectation.
        params["database"] = self.info.database or ""
        self.phase = Phase.AUTHENTICATING
        self.io.send_server(m.StartupMessage(self._startup.protocol_version, params).encode())

    def _handshake_server(self) -> None:
        buf = self._sbuf
        if self.phase is Phase.UPSTREAM_TLS and not self._upstream_tls:
            if not buf:
                return
            answer = buf[0:1]
            if answer == b"S":
                if len(buf) > 1:
                    raise SessionError("08006", "the database sent data before the TLS handshake; refusing it")
                del buf[:]
                self.io.start_upstream_tls(self.target)
                return
            if answer == b"N":
                del buf[:1]
                assert self.target is not None
                if self.target.tls != "prefer":
                    raise SessionError("08006", f"database {self.target.name!r} refused TLS, which its target requires (tls = {self.target.tls!r})")
                self._send_upstream_startup()
                return
            raise SessionError("08006", "the database did not answer the SSLRequest")
        pos = 0
        while self.phase in (Phase.AUTHENTICATING, Phase.STARTING) and len(buf) - pos >= 5:
            tag = buf[pos:pos + 1]
            (length,) = unpack_length(buf, pos + 1)
            if length < 4 or length > 1 << 20:
                raise ProtocolError(f"message type {tag!r} has invalid length {length} during login")
            end = pos + 1 + length
            if end > len(buf):
                break
            raw = bytes(buf[pos:end])
            msg = decode_backend(tag, raw[5:])
            pos = end
            self._on_handshake_message(msg, raw)
        del buf[:pos]
        if self.phase is Phase.READY and buf:
            rest = bytes(buf)
            buf.clear()
            self._relay_server(rest)

    def _on_handshake_message(self, msg: Any, raw: bytes) -> None:
        if isinstance(msg, m.ErrorResponse):
            name = self.target.name if self.target else "?"
            raise SessionError(msg.sqlstate or "28000", f"database {name!r} refused Tollgate's login: {msg.message}")
        if self.phase is Phase.AUTHENTICATING:
            self._on_auth_message(msg, raw)
        elif isinstance(msg, m.BackendKeyData):
            if self._client_key is not None:
                raise ProtocolError("the database sent BackendKeyData twice")
            self._upstream_key = (msg.process_id, msg.secret_key)
            self.info.backend_pid = msg.process_id
            self._client_key = self.cancels.issue(self, len(msg.secret_key))
            self.io.send_client(m.BackendKeyData(*self._client_key).encode())
        elif isinstance(msg, m.ParameterStatus):
            self.info.parameters[msg.name] = msg.value
            self.io.send_client(raw)
        elif isinstance(msg, m.ReadyForQuery):
            self.info.transaction_status = msg.status
            self.phase = Phase.READY
            self.io.send_client(raw)
            self._started = True
            for hook in self.hooks.session_start:
                hook(self.info)
            if self._cbuf:
                # Through client_data, so a bad pipelined message is blamed on the client.
                self._c_need = 0
                self.client_data(b"")
        elif isinstance(msg, (m.NoticeResponse, m.NegotiateProtocolVersion)):
            self.io.send_client(raw)
        else:
            raise ProtocolError(f"unexpected {type(msg).__name__} before the session was ready")

    def _on_auth_message(self, msg: Any, raw: bytes) -> None:
        cred = self._credential
        assert cred is not None
        if isinstance(msg, m.NegotiateProtocolVersion):
            self.io.send_client(raw)
        elif isinstance(msg, m.AuthenticationOk):
            self.phase = Phase.STARTING
            self.io.send_client(AUTH_OK)
        elif isinstance(msg, m.AuthenticationSASL):
            if ScramSha256.MECHANISM not in msg.mechanisms:
                raise SessionError("28000", f"database offers SASL mechanisms {', '.join(msg.mechanisms)}; Tollgate speaks SCRAM-SHA-256")
            self._scram = ScramSha256(cred.password)
            self.io.send_server(m.SASLInitialResponse(ScramSha256.MECHANISM, self._scram.client_first()).encode())
        elif isinstance(msg, m.AuthenticationSASLContinue) and self._scram is not None:
            self.io.send_server(m.SASLResponse(self._auth(self._scram.client_final, msg.data)).encode())
        elif isinstance(msg, m.AuthenticationSASLFinal) and self._scram is not None:
            self._auth(self._scram.verify_server_final, msg.data)
        elif isinstance(msg, m.AuthenticationMD5Password):
            self.io.send_server(m.PasswordMessage(md5_password(cred.upstream_user, cred.password, msg.salt) + b"\0").encode())
        elif isinstance(msg, m.AuthenticationCleartextPassword):
            if not self._upstream_tls:
                # The appliance's password would cross the network in clear: fail closed.
                raise SessionError("28000", "the database asked for a cleartext password over an unencrypted connection; Tollgate refuses",
                                   hint="Set tls = \"require\" (or verify-*) for this target.")
            self.io.send_server(m.PasswordMessage(cred.password.encode() + b"\0").encode())
        else:
            raise SessionError("28000", f"the database asked for {type(msg).__name__}, which Tollgate does not support upstream")

    @staticmethod
    def _auth(step: Callable[[bytes], Any], data: bytes) -> Any:
        try:
            return step(data)
        except AuthError as exc:
            raise SessionError("28000", str(exc)) from None

    # ---- relay: client → server -----------------------------------------------------------

    def _check_client_buffer(self) -> None:
        if len(self._cbuf) > self.max_client_message + 5:
            raise ProtocolError(f"client sent more than {self.max_client_message} bytes without a complete message")

    def _drain_client_buffer(self) -> None:
        data = bytes(self._cbuf)
        self._cbuf.clear()
        self._c_need = 0
        rest = self._relay_client(data, 0)
        if rest < len(data):
            self._keep_client_rest(memoryview(data)[rest:])

    def _keep_client_rest(self, rest: memoryview) -> None:
        """Keep an unprocessed tail; note how much the head message needs to be complete."""
        self._cbuf += rest
        self._check_client_buffer()
        if self._held is None and len(rest) >= 5:
            self._c_need = 1 + unpack_length(rest, 1)[0]
        elif self._held is None:
            self._c_need = 5

    def _relay_client(self, data: bytes, pos: int) -> int:
        """Frame and forward client messages; returns where processing stopped."""
        n = len(data)
        flush_from = pos
        pieces: list[bytes | memoryview] = []
        view = memoryview(data)
        pending = self._pending
        max_len = self.max_client_message
        forwarding = bool(self.hooks.forward)
        waiting: list[tuple[int, Pending, bytes, Any]] = []  # requests whose forward hooks must finish first
        while n - pos >= 5 and self._held is None and self.phase is Phase.READY:
            tag = data[pos]
            (length,) = unpack_length(data, pos + 1)
            end = pos + 1 + length
            bound = _CLIENT_LENGTH_BOUNDS.get(tag)
            if bound is None:
                raise ProtocolError(f"unexpected frontend message type {_tag_name(tag)} after startup")
            low, high = bound
            if length < low or length > (high or max_len):
                raise ProtocolError(f"message type {_tag_name(tag)} has length {length}, "
                                    f"outside {low}..{high or max_len}")
            if end > n:
                break
            replacement: bytes | memoryview | None = None
            if tag == 0x51:  # Q
                statement = Statement(StatementKind.QUERY, _query_text(data, pos + 5, end))
                verdict = self._decide(statement)
                if type(verdict) is Hold:
                    self._hold(Pending(QUERY, statement), verdict)
                    break
                self._ends_sent += 1
                request = Pending(QUERY, statement, None, "", verdict)
                pending.append(request)
                if verdict is not None:
                    replacement = BLOCKED_QUERY
                if forwarding:
                    replacement = self._commit("query", request, BLOCKED_QUERY, view[pos:end], replacement,
                                               len(pieces), waiting)
            elif tag == 0x50:  # P
                stmt_name, query, param_types = parse_fields(data, pos + 5, end)
                statement = Statement(StatementKind.PARSE, query, stmt_name, param_types)
                verdict = self._decide(statement)
                if type(verdict) is Hold:
                    self._hold(Pending(PARSE, statement, None, stmt_name), verdict)
                    break
                # Registered now, not at ParseComplete: the server acts on messages in
                # order, so a later Bind in this pipeline already refers to this statement.
                # Requests the server skips after an error are rolled back (_on_error).
                if verdict is None:
                    pending.append(Pending(PARSE, statement, None, stmt_name))
                    self._statements[stmt_name] = statement
                else:
                    request = Pending(PARSE, statement, None, stmt_name, verdict)
                    pending.append(request)
                    replacement = m.Parse(stmt_name, BLOCKED_SQL.decode(), ()).encode()
                    if forwarding:  # only to be recorded: a refused Parse has nothing to wait for
                        self._forward("parse", request)
            elif tag == 0x42:  # B
                portal_name, stmt_name, formats = bind_fields(data, pos + 5, end)
                bound = self._statements.get(stmt_name)
                if portal_name == BLOCKED_PORTAL:
                    raise ProtocolError("that portal name is reserved")
                portal = Portal(portal_name, bound, formats, self._ends_sent)
                if bound is not None and (forwarding or bound.deferred is not None or bound.epoch != self.hooks.epoch):
                    portal.bind = bytes(view[pos + 5:end])
                pending.append(Pending(BIND, None, portal))
                self._portals[portal_name] = portal
            elif tag == 0x45:  # E
                portal_name, after = cstring(data, pos + 5, end)
                if end - after != 4:
                    raise ProtocolError("Execute must end with a 4-byte row limit")
                portal = self._portals.get(portal_name)
                bound = portal.statement if portal is not None else None
                if bound is not None and (bound.deferred is not None or bound.epoch != self.hooks.epoch
                                          or bound.verdict is not None):
                    verdict = self._decide_execute(portal, bound)  # type: ignore[arg-type]
                    if type(verdict) is Hold:
                        self._hold(Pending(EXECUTE, None, portal, portal_name), verdict)
                        break
                    request = Pending(EXECUTE, None, portal, portal_name, verdict)
                    if verdict is not None:
                        replacement = BLOCKED_EXECUTE
                else:
                    request = Pending(EXECUTE, None, portal, portal_name)
                pending.append(request)
                if forwarding:
                    replacement = self._commit("execute", request, BLOCKED_EXECUTE, view[pos:end], replacement,
                                               len(pieces), waiting)
            elif tag == 0x53:  # S
                pending.append(Pending(SYNC))
                self._ends_sent += 1
            elif tag == 0x44:  # D
                kind, name = kind_and_name(data, pos + 5, end, "Describe")
                pending.append(Pending(DESCRIBE_STATEMENT if kind == 0x53 else DESCRIBE_PORTAL, None, None, name))
            elif tag == 0x43:  # C
                kind, name = kind_and_name(data, pos + 5, end, "Close")
                pending.append(Pending(CLOSE))
                (self._statements if kind == 0x53 else self._portals).pop(name, None)
            elif tag == 0x64:  # d: CopyData
                if self.hooks.copy_data:
                    replacement = self._rewrite(self.hooks.copy_data, view[pos:end], None, True)
            elif tag == 0x66:  # f CopyFail (H Flush, c CopyDone: length checked above)
                decode_frontend(b"f", view[pos + 5:end])
            elif tag == 0x58:  # X Terminate: the server closing next is expected
                self.close_reason = "client terminated the session"
            elif tag == 0x46:  # F: FunctionCall
                call = decode_frontend(b"F", view[pos + 5:end])
                statement = Statement(StatementKind.FUNCTION_CALL, f"<function call oid {call.function_oid}>",
                                      function_oid=call.function_oid)
                verdict = self._decide(statement)
                if type(verdict) is Hold:
                    self._hold(Pending(FUNCTION_CALL, statement), verdict)
                    break
                request = Pending(FUNCTION_CALL, statement, None, "", verdict)
                pending.append(request)
                self._ends_sent += 1
                if verdict is not None:
                    # No function has OID 0: the server fails the stand-in call for us.
                    replacement = BLOCKED_FUNCTION_CALL
                if forwarding:
                    replacement = self._commit("function_call", request, BLOCKED_FUNCTION_CALL, view[pos:end],
                                               replacement, len(pieces), waiting)
            if replacement is not None:
                pieces.append(view[flush_from:pos])
                pieces.append(replacement)
                flush_from = end
            pos = end
        if waiting:
            pieces.append(view[flush_from:pos])
            self._wait_for_batch([bytes(p) for p in pieces], waiting)
        elif pieces:
            pieces.append(view[flush_from:pos])
            self.io.send_server(b"".join(pieces))
        elif pos > flush_from:
            self.io.send_server(data if flush_from == 0 and pos == n else view[flush_from:pos])
        return pos

    def _commit(self, kind: str, request: Pending, blocked: bytes, message: memoryview,
                replacement: bytes | memoryview | None, piece: int,
                waiting: list[tuple[int, Pending, bytes, Any]]) -> bytes | memoryview | None:
        """Put a request whose verdict is final to the forward hooks; returns what to send
        in its place. One that must wait goes as a piece of its own, so that it can still
        be swapped for ``blocked`` if what it waits for fails."""
        wait = self._forward(kind, request)
        if request.reject is not None:
            return blocked if replacement is None else replacement
        if wait is not None:
            # Its piece lands after the one flushing everything before it: index piece + 1.
            waiting.append((piece + 1, request, blocked, wait))
            return message
        return replacement

    def _forward(self, kind: str, request: Pending) -> Any:
        portal = request.portal
        statement = portal.statement if portal is not None else request.statement
        forward = Forward(kind, statement, request.reject, portal.name if portal is not None else "",
                          portal.bind if portal is not None else None, perf_counter_ns())
        request.forward = forward
        wait: Any = None
        for hook in self.hooks.forward:
            try:
                out = hook(self.info, forward)
            except Exception as exc:  # fail closed, as for statement hooks
                log.exception("forward hook %r failed", hook)
                out = Reject("XX000", f"Tollgate could not prepare the statement to run: {exc}")
            if out is None or request.reject is not None:
                continue
            if type(out) is Reject:
                request.reject = forward.reject = out
                return None
            wait = out if wait is None else _all_of(wait, out)
        return wait

    def _wait_for_batch(self, pieces: list[bytes], waiting: list[tuple[int, Pending, bytes, Any]]) -> None:
        """Hold a batch back until its forward hooks' awaitables are done; the client waits
        meanwhile (only this session)."""
        self._batch = (pieces, waiting)
        if not self._client_paused:
            self.io.pause_client()
            self._client_paused = True
        waits = [w for _, _, _, w in waiting]
        # Never cancelled: the awaitables may be shared with other sessions (group commit).
        self.io.wait(waits[0] if len(waits) == 1 else _all_of(*waits), self._batch_done)

    def _batch_done(self, result: Any, error: BaseException | None) -> None:
        if self._batch is None or self.phase is Phase.CLOSED:
            return
        pieces, waiting = self._batch
        self._batch = None
        if error is not None:
            reject = Reject(getattr(error, "sqlstate", None) or "58030",
                            f"Tollgate could not complete what must happen before this statement runs, so it "
                            f"did not run: {error}", hint=getattr(error, "hint", None))
            log.error("session %s: refusing %d request(s): %s", self.info.id, len(waiting), error)
            for index, request, blocked, _ in waiting:
                if request.reject is None:
                    request.reject = reject
                    if request.forward is not None:
                        request.forward.reject = reject
                    pieces[index] = blocked
        self.io.send_server(b"".join(pieces))
        if self._held is None:
            self._c_need = 0
            self.client_data(b"")  # what queued behind the batch
            if self._held is None and self._batch is None and self._client_paused and self.phase is Phase.READY:
                self._client_paused = False
                self.io.resume_client()

    def _decide(self, statement: Statement) -> Verdict:
        if self._held_verdict is not None:
            # The statement at the head of the buffer was already decided by a finished hold.
            verdict, self._held_verdict = self._held_verdict, None
            statement.verdict = None if verdict is _ALLOWED else verdict
            statement.epoch = self.hooks.epoch
            held, self._held_statement = self._held_statement, None
            if held is not None:  # the message is framed anew: keep what the hooks learnt
                statement.decision, statement.deferred = held.decision, held.deferred
            return statement.verdict
        for hook in self.hooks.statement:
            try:
                verdict = hook(self.info, statement)
            except Exception as exc:  # fail closed: a hook that breaks blocks the statement
                log.exception("statement hook %r failed", hook)
                verdict = Reject("XX000", f"Tollgate could not evaluate the statement: {exc}")
            if verdict is not None:
                statement.verdict = verdict
                statement.epoch = self.hooks.epoch
                return verdict
        statement.epoch = self.hooks.epoch
        return None

    def _decide_execute(self, portal: Portal, statement: Statement) -> Verdict:
        """A prepared statement about to run: decided again if policy changed since it was
        prepared, and put to the ``execute`` hooks if an addon deferred it to run time."""
        if self._held_verdict is not None:
            verdict, self._held_verdict = self._held_verdict, None
            return None if verdict is _ALLOWED else verdict
        if statement.epoch != self.hooks.epoch:
            self._decide(statement)
        verdict = statement.verdict
        if type(verdict) is Reject:
            return verdict  # prepared under rules that no longer allow it
        if statement.deferred is None and verdict is None:
            return None
        # Deferred to run time (a hold is asked for with the parameters it runs with).
        return self._execute_hooks(portal, statement, None)

    def _execute_hooks(self, portal: Portal, statement: Statement, verdict: Verdict) -> Verdict:
        for hook in self.hooks.execute:
            try:
                verdict = hook(self.info, statement, portal.bind)
            except Exception as exc:  # fail closed, as for statement hooks
                log.exception("execute hook %r failed", hook)
                verdict = Reject("XX000", f"Tollgate could not evaluate the statement: {exc}")
            if verdict is not None:
                return verdict
        return verdict

    def _hold(self, request: Pending, hold: Hold) -> None:
        self._held = request
        self.io.pause_client()
        self._client_paused = True
        self._cancel_hold = self.io.wait(hold.decision, self._hold_done)

    def _hold_done(self, result: Any, error: BaseException | None) -> None:
        if self._held is None or self.phase is Phase.CLOSED:
            return
        if error is not None:
            result = Reject("XX000", f"the approval could not be completed: {error}")
        elif result is not None and not isinstance(result, Reject):
            result = Reject("XX000", f"the approval returned {result!r}, which is not a verdict")
        self._cancel_hold = None
        self._resolve_hold(result)

    def _resolve_hold(self, verdict: Reject | None) -> None:
        if self._cancel_hold is not None:
            cancel, self._cancel_hold = self._cancel_hold, None
            cancel()
        self._held_statement = self._held.statement if self._held is not None else None
        self._held = None
        self._held_verdict = _ALLOWED if verdict is None else verdict
        self._c_need = 0
        self.client_data(b"")  # resume with what queued behind the hold, errors mapped as ever
        if self._held is None and self._batch is None and self._client_paused and self.phase is Phase.READY:
            self._client_paused = False
            self.io.resume_client()

    # ---- relay: server → client -----------------------------------------------------------

    def _relay_server(self, data: bytes) -> None:
        if self._sbuf:
            self._sbuf += data
            if len(self._sbuf) < self._s_need:
                return
            data = bytes(self._sbuf)
            self._sbuf.clear()
            self._s_need = 0
        n = len(data)
        pos = 0
        view = memoryview(data)
        pieces: list[bytes | memoryview] = []
        flush_from = 0
        if self._stream_left:
            pos = min(n, self._stream_left)
            self._stream_left -= pos
            if self.hooks.stream_chunk:
                pieces.append(self._stream_window(view[:pos]))
                flush_from = pos
            self._in_stream = self._stream_left > 0
        while n - pos >= 5:
            tag = data[pos]
            (length,) = unpack_length(data, pos + 1)
            end = pos + 1 + length
            if length < 4 or length > PG_MAX_MESSAGE:
                raise ProtocolError(f"message type {_tag_name(tag)} has length {length}, outside 4..{PG_MAX_MESSAGE}")
            fixed = _SERVER_FIXED_LENGTHS.get(tag)
            if fixed is not None and length != fixed:
                raise ProtocolError(f"message type {_tag_name(tag)} must have length {fixed}, not {length}")
            if end > n:
                if length > self.stream_threshold and tag in _STREAMABLE:
                    flush_from = self._start_stream(view, pos, length, pieces, flush_from)
                    pos = n = len(view)  # everything consumed
                else:
                    self._s_need = end - pos
                break
            replacement = None
            if tag == 0x44:  # D: DataRow
                if self.hooks.data_row:
                    replacement = self._data_row(view[pos:end])
            else:
                if tag in _SERVER_DECODED:
                    # Rare messages: fully checked, so nothing malformed reaches the client.
                    decode_backend(bytes((tag,)), view[pos + 5:end])
                if tag in _SERVER_HANDLERS:
                    replacement = _SERVER_HANDLERS[tag](self, view, pos, end)
                elif tag not in _SERVER_PASSTHROUGH:
                    raise ProtocolError(f"unexpected backend message type {_tag_name(tag)}")
            if replacement is not None:
                pieces.append(view[flush_from:pos])
                pieces.append(replacement)
                flush_from = end
            pos = end
        if pos < n:
            self._sbuf += view[pos:]
            self._s_need = max(self._s_need, 5)
        if pieces:
            pieces.append(view[flush_from:pos])
            self.io.send_client(b"".join(pieces))
        elif pos > flush_from:
            self.io.send_client(data if flush_from == 0 and pos == len(data) else view[flush_from:pos])

    def _start_stream(self, view: memoryview, pos: int, length: int, pieces: list, flush_from: int) -> int:
        """Begin passing a large message through in pieces (it is never held whole); the
        rest of ``view`` is its first piece. Returns the new flush_from."""
        self._stream_tag, self._stream_total = bytes(view[pos:pos + 1]), length - 4
        body = view[pos + 5:]
        if self._stream_tag == b"D":
            self._current_result().rows += 1
        self._stream_left = self._stream_total - len(body)
        self._stream_done = 0
        self._in_stream = True
        if self.hooks.stream_chunk:
            pieces.append(view[flush_from:pos + 5])
            pieces.append(self._stream_window(body))
            return len(view)
        return flush_from

    def _stream_window(self, new: memoryview) -> bytes | memoryview:
        """Run the stream_chunk hooks over the bytes kept back so far plus ``new``; returns
        what may go to the client now. A hook may keep a tail back (a card number that may
        continue in the next piece); the message's header is already on its way, so a
        replacement must keep the window's length."""
        carry = self._stream_carry
        window: memoryview = memoryview(carry + new) if carry else new
        offset = self._stream_done - len(carry)
        final = self._stream_left == 0
        keep = 0
        result = self._current_result() if self._stream_tag == b"D" else self._result
        for hook in self.hooks.stream_chunk:
            edit = hook(self.info, result, self._stream_tag, window, offset, self._stream_total)
            if edit is None:
                continue
            if edit.data is not None:
                if len(edit.data) != len(window):
                    raise SessionError("XX000", "a streamed value was rewritten to another length")
                window = memoryview(edit.data)
            keep = max(keep, edit.keep)
        if final and keep:
            raise SessionError("XX000", "a stream hook kept bytes back at the end of a message")
        if keep > self.stream_threshold:
            raise SessionError("XX000", "a stream hook kept back more than stream_threshold bytes")
        self._stream_done += len(new)
        if keep:
            self._stream_carry = bytes(window[len(window) - keep:])
            return window[:len(window) - keep]
        self._stream_carry = b""
        return window

    def _data_row(self, message: memoryview) -> bytes | None:
        result = self._current_result()
        result.rows += 1
        return self._rewrite(self.hooks.data_row, message, result)

    def _current_result(self) -> Result:
        if self._result is None:
            head = self._pending[0] if self._pending else None
            self._result = self._result_for(head)
        return self._result

    def _result_for(self, request: Pending | None) -> Result:
        if request is None:
            return Result(None)
        if request.kind is EXECUTE and request.portal is not None:
            portal = request.portal
            description = portal.row_description
            statement = portal.statement
            if description is None and statement is not None:
                description = statement.row_description
            return Result(statement, description, portal.result_formats, forward=request.forward)
        return Result(request.statement, forward=request.forward)

    def _rewrite(self, hooks: list[Callable[..., bytes | None]], message: memoryview, *args: Any) -> bytes | None:
        """Run rewriting hooks in turn, each seeing the previous one's output."""
        new: bytes | None = None
        for hook in hooks:
            out = hook(self.info, *args, message if new is None else memoryview(new))
            if out is not None:
                new = out
        return new

    # Handlers for server messages that move protocol state. Each returns replacement bytes
    # for the message, or None to forward it unchanged.

    def _on_ready_for_query(self, view: memoryview, pos: int, end: int) -> None:
        if end - pos != 6 or view[pos + 5] not in b"IET":
            raise ProtocolError("ReadyForQuery must carry one status byte I, E or T")
        status = bytes(view[pos + 5:pos + 6])
        self.info.transaction_status = status
        pending = self._pending
        while pending:
            kind = pending.popleft().kind
            if kind in _ENDED_BY_READY:
                break
        self._result = None
        self._ends_done += 1
        if status == b"I" and self._portals:
            # Portals never outlive their transaction; those bound after this Sync live on.
            done = self._ends_done
            for name in [n for n, p in self._portals.items() if p.epoch < done]:
                del self._portals[name]
        return None

    def _on_command_complete(self, view: memoryview, pos: int, end: int) -> None:
        if end - pos < 6 or view.obj.find(b"\0", pos + 5, end) != end - 1:  # type: ignore[union-attr]
            raise ProtocolError("CommandComplete must hold exactly one NUL-terminated tag")
        head = self._pending[0] if self._pending else None
        if self.hooks.result_complete:
            tag, _ = cstring(view.obj, pos + 5, end)
            self._complete(tag, False)
        self._result = None
        if head is not None and head.kind is EXECUTE:
            self._pending.popleft()
        return None

    def _on_portal_suspended(self, view: memoryview, pos: int, end: int) -> None:
        if self.hooks.result_complete:
            self._complete(None, False)
        self._result = None
        if self._pending and self._pending[0].kind is EXECUTE:
            self._pending.popleft()
        return None

    def _on_empty_query(self, view: memoryview, pos: int, end: int) -> None:
        return self._on_portal_suspended(view, pos, end)

    def _complete(self, tag: str | None, error: bool, sqlstate: str | None = None) -> None:
        result = self._current_result()
        result.sqlstate = sqlstate
        for hook in self.hooks.result_complete:
            hook(self.info, result, tag, error)

    def _on_error(self, view: memoryview, pos: int, end: int) -> bytes | None:
        pending = self._pending
        head = pending[0] if pending else None
        replacement: bytes | None = None
        if head is not None and head.reject is not None:
            # The server rejected our stand-in for a blocked request: tell the client why.
            r = head.reject
            replacement = error_bytes("ERROR", r.sqlstate, r.message, r.detail, r.hint)
        elif self.hooks.notice:
            replacement = self._rewrite(self.hooks.notice, view[pos:end], True)
        if self.hooks.result_complete and head is not None and head.kind in (QUERY, EXECUTE, FUNCTION_CALL):
            code = head.reject.sqlstate if head.reject is not None else _error_code(view, pos, end)
            self._complete(None, True, code)
        self._result = None
        if head is not None and head.kind not in (QUERY, FUNCTION_CALL, SYNC):
            # Extended protocol: the server now skips everything up to the next Sync, so
            # statements and portals those requests would have made never exist.
            if head.kind is EXECUTE and pending and pending[0] is head:
                pending.popleft()  # this one has had its say above
            while pending and pending[0].kind is not SYNC:
                skipped = pending.popleft()
                self._forget_created(skipped)
                if skipped.forward is not None and self.hooks.result_complete:
                    result = Result(skipped.forward.statement, forward=skipped.forward, skipped=True)
                    for hook in self.hooks.result_complete:
                        hook(self.info, result, None, True)
        if view[pos + 5:end].tobytes().find(b"SFATAL\0") >= 0:
            # Whatever the request: the server's FATAL is the client's last word, not ours.
            self.close_reason = "the database ended the session (FATAL)"
        return replacement

    def _on_notice(self, view: memoryview, pos: int, end: int) -> bytes | None:
        if self.hooks.notice:
            return self._rewrite(self.hooks.notice, view[pos:end], False)
        return None

    def _on_notification(self, view: memoryview, pos: int, end: int) -> bytes | None:
        if self.hooks.notification:
            return self._rewrite(self.hooks.notification, view[pos:end])
        return None

    def _on_row_description(self, view: memoryview, pos: int, end: int) -> None:
        head = self._pending[0] if self._pending else None
        raw = view[pos + 5:end]
        check_row_description(view.obj, pos + 5, end)  # type: ignore[arg-type]
        description = None
        if self.hooks.row_description or self.hooks.data_row:
            # A session sees the same few descriptions over and over: decode each once, and
            # hand addons the same object, so what they derive from it can be kept too.
            key = raw.tobytes()
            description = self._descriptions.get(key)
            if description is None:
                description = decode_backend(b"T", raw)
                if len(self._descriptions) >= 64:
                    self._descriptions.clear()
                self._descriptions[key] = description
        if head is not None and head.kind is DESCRIBE_STATEMENT:
            self._pending.popleft()
            statement = self._statements.get(head.name)
            if statement is not None:
                statement.row_description = description
        elif head is not None and head.kind is DESCRIBE_PORTAL:
            self._pending.popleft()
            portal = self._portals.get(head.name)
            if portal is not None:
                portal.row_description = description
        else:
            self._result = Result(head.statement if head else None, description,
                                  forward=head.forward if head else None)
            for hook in self.hooks.row_description:
                hook(self.info, self._result)
        return None

    def _on_no_data(self, view: memoryview, pos: int, end: int) -> None:
        if self._pending and self._pending[0].kind in (DESCRIBE_STATEMENT, DESCRIBE_PORTAL):
            self._pending.popleft()
        return None

    def _on_parse_complete(self, view: memoryview, pos: int, end: int) -> None:
        if self._pending and self._pending[0].kind is PARSE:
            self._pending.popleft()
        return None

    def _on_bind_complete(self, view: memoryview, pos: int, end: int) -> None:
        if self._pending and self._pending[0].kind is BIND:
            self._pending.popleft()
        return None

    def _forget_created(self, request: Pending) -> None:
        """Undo what a request registered when sent, because the server never ran it."""
        if request.kind is PARSE and self._statements.get(request.name) is request.statement:
            del self._statements[request.name]
        elif request.kind is BIND and request.portal is not None \
                and self._portals.get(request.portal.name) is request.portal:
            del self._portals[request.portal.name]

    def _on_close_complete(self, view: memoryview, pos: int, end: int) -> None:
        if self._pending and self._pending[0].kind is CLOSE:
            self._pending.popleft()
        return None

    def _on_copy_data(self, view: memoryview, pos: int, end: int) -> bytes | None:
        if self.hooks.copy_data:
            return self._rewrite(self.hooks.copy_data, view[pos:end], self._current_result(), False)
        return None

    def _on_copy_out(self, view: memoryview, pos: int, end: int) -> None:
        response = decode_backend(b"H", view[pos + 5:end])
        result = self._current_result()
        result.copy_format, result.copy_column_formats = response.format, response.column_formats
        return None

    def _on_function_result(self, view: memoryview, pos: int, end: int) -> bytes | None:
        if self.hooks.function_result:
            return self._rewrite(self.hooks.function_result, view[pos:end])
        return None

    def _on_parameter_status(self, view: memoryview, pos: int, end: int) -> None:
        status = decode_backend(b"S", view[pos + 5:end])
        self.info.parameters[status.name] = status.value
        return None

    # ---- ending -----------------------------------------------------------------------------

    def _fail_closed(self, exc: FailClosed) -> None:
        """An addon found data it cannot make safe: nothing more of it reaches the client."""
        log.warning("session %s: failing closed: %s", self.info.id, exc.message)
        self._fatal(exc.sqlstate, exc.message, hint=exc.hint)

    def _fatal(self, sqlstate: str, message: str, detail: str | None = None, hint: str | None = None) -> None:
        if self.phase is Phase.CLOSED:
            return
        log.warning("session %s (%s → %s) ended: %s", self.info.id, self.info.client, self.info.destination, message)
        if not self._in_stream:
            # Inside a message already half sent an ErrorResponse would be read as part
            # of it: then the connection is cut instead.
            self.io.send_client(error_bytes("FATAL", sqlstate, message, detail, hint))
        self._close(message)

    def _close(self, reason: str) -> None:
        if self.phase is Phase.CLOSED:
            return
        self.phase = Phase.CLOSED
        self.close_reason = self.close_reason or reason
        if self._cancel_hold is not None:
            cancel, self._cancel_hold = self._cancel_hold, None
            cancel()
        self.cancels.forget(self._client_key)
        if self._started:
            for hook in self.hooks.session_end:
                hook(self.info, self.close_reason)
        else:
            for hook in self.hooks.session_refused:
                hook(self.info, self.close_reason)
        self.io.close()

    def describe(self) -> dict[str, Any]:
        """A snapshot for listings (``tollgate sessions``)."""
        info = self.info
        return {
            "id": info.id, "client": str(info.client), "destination": str(info.destination),
            "target": self.target.name if self.target else None, "user": info.user,
            "database": info.database, "upstream_user": info.upstream_user,
            "application_name": info.application_name, "phase": self.phase.value,
            "transaction_status": info.transaction_status.decode(), "started_at": info.started_at,
            "held": self._held is not None, "upstream_tls": info.upstream_tls,
            "client_tls": info.client_tls,
            "identity": getattr(info.identity, "display", None),
            "identity_kind": getattr(info.identity, "kind", None),
            "groups": list(getattr(info.identity, "groups", ())),
            "identity_source": info.identity_source,
            "certificate_serial": f"{info.certificate_serial:032X}" if info.certificate_serial is not None else None,
        }


class _Allowed:
    """Marks a hold that ended in approval (None means 'not decided yet')."""


_ALLOWED = _Allowed()

_ENDED_BY_READY = frozenset({QUERY, SYNC, FUNCTION_CALL})
_STREAMABLE = frozenset(b"DdV")
# Backend messages that carry no state we track and go through untouched.
_SERVER_PASSTHROUGH = frozenset(b"tGWc")
# Backend messages too rare to matter for speed: decoded in full to validate them. DataRow
# is not among them: it is the hot message, checked by the addons that parse rows.
_SERVER_DECODED = frozenset(b"ENAtGHWV")
_SERVER_HANDLERS: dict[int, Callable[[Session, memoryview, int, int], bytes | None]] = {
    ord("Z"): Session._on_ready_for_query,
    ord("C"): Session._on_command_complete,
    ord("s"): Session._on_portal_suspended,
    ord("I"): Session._on_empty_query,
    ord("E"): Session._on_error,
    ord("N"): Session._on_notice,
    ord("A"): Session._on_notification,
    ord("T"): Session._on_row_description,
    ord("n"): Session._on_no_data,
    ord("1"): Session._on_parse_complete,
    ord("2"): Session._on_bind_complete,
    ord("3"): Session._on_close_complete,
    ord("d"): Session._on_copy_data,
    ord("H"): Session._on_copy_out,
    ord("V"): Session._on_function_result,
    ord("S"): Session._on_parameter_status,
}


# Length bounds of client messages, judged from the 5-byte header as PostgreSQL does (a
# Sync claiming a megabyte is refused at once, not waited for). 0 = max_client_message.
_SMALL = 10_000
_CLIENT_LENGTH_BOUNDS: dict[int, tuple[int, int]] = {
    ord("Q"): (5, 0), ord("P"): (8, 0), ord("B"): (12, 0), ord("F"): (14, 0), ord("d"): (4, 0),
    ord("E"): (9, _SMALL), ord("D"): (6, _SMALL), ord("C"): (6, _SMALL), ord("f"): (5, _SMALL),
    ord("S"): (4, 4), ord("H"): (4, 4), ord("X"): (4, 4), ord("c"): (4, 4),
}
# Backend messages with a fixed length: checked, since we relay them without decoding.
_SERVER_FIXED_LENGTHS: dict[int, int] = {
    ord("1"): 4, ord("2"): 4, ord("3"): 4, ord("n"): 4, ord("s"): 4, ord("I"): 4, ord("c"): 4, ord("Z"): 5,
}


async def _all_of(*waits: Any) -> None:
    for wait in waits:
        await wait


def _error_code(view: memoryview, pos: int, end: int) -> str | None:
    """The SQLSTATE of an ErrorResponse at view[pos:end] (a rare message: decoded in full)."""
    return decode_backend(b"E", bytes(view[pos + 5:end])).sqlstate


def _tag_name(tag: int) -> str:
    return repr(chr(tag)) if 0x20 < tag < 0x7F else f"0x{tag:02x}"


def _query_text(data: bytes, start: int, end: int) -> str:
    if end <= start or data[end - 1] != 0:
        raise ProtocolError("Query text is not NUL-terminated")
    return data[start:end - 1].decode("utf-8", "surrogateescape")
