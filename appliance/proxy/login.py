"""Tollgate's own login to the database, with the credentials the appliance holds.

Once the upstream TCP connection is up: SSLRequest (unless the target disables TLS), the
agent's StartupMessage with the role swapped for the upstream one, then the password
exchange — SCRAM-SHA-256, MD5, or a cleartext password only over TLS. What the server says
after AuthenticationOk (ParameterStatus, BackendKeyData, notices) reaches the agent, the
cancel key's secret swapped for one Tollgate issues (the pid stays the backend's real one,
see cancel.py); ReadyForQuery makes the session ready.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from appliance.config import Credential, Target
from appliance.pgwire import BackendDecoder, ProtocolError, decode_backend
from appliance.pgwire import messages as m
from appliance.pgwire.encodings import client_encoding
from appliance.proxy import dispatch
from appliance.proxy.errors import SessionError
from appliance.proxy.upstream_auth import AuthError, ScramSha256, md5_password

if TYPE_CHECKING:
    from appliance.proxy.session import Session

AUTH_OK = m.AuthenticationOk().encode()
SSL_REQUEST = m.SSLRequest().encode()
# No login message is anywhere near this; a larger one is not a PostgreSQL server's.
MAX_LOGIN_MESSAGE = 1 << 20


class UpstreamLogin:
    """Drives the login to the database; tells the session when it is authenticated and
    when it is ready."""

    def __init__(self, session: Session, target: Target, startup: m.StartupMessage, credential: Credential):
        self.session, self.target, self.startup, self.credential = session, target, startup, credential
        self.decoder = BackendDecoder(MAX_LOGIN_MESSAGE)
        self.authenticated = False
        self.tls_requested = False
        self.scram: ScramSha256 | None = None

    def connected(self) -> None:
        if self.target.tls == "disable":
            self._send_startup()
        else:
            self.tls_requested = True
            self.decoder.expect_ssl_response()
            self.session.io.send_server(SSL_REQUEST)

    def tls_ready(self) -> None:
        self._send_startup()

    def feed(self, data: bytes) -> None:
        decoder = self.decoder
        decoder.feed(data)
        while not self.session.ready:
            msg = decoder.next_message()
            if msg is None:
                return
            if isinstance(msg, m.SSLResponse):
                self._ssl_response(msg)
                if msg.accepted:
                    return
            elif isinstance(msg, m.ErrorResponse):
                raise SessionError(msg.sqlstate or "28000",
                                   f"database {self.target.name!r} refused Tollgate's login: {msg.message}")
            elif not self.authenticated:
                self._auth_message(msg)
            else:
                self._startup_message(msg)

    def take_rest(self) -> bytes:
        """What the server sent after ReadyForQuery: the relay's to read."""
        return self.decoder.take_rest()

    def _send_startup(self) -> None:
        params = dict(self.startup.parameters)
        params["user"] = self.credential.upstream_user
        # PostgreSQL defaults the database to the *login* role; keep the agent's expectation.
        params["database"] = self.session.info.database or ""
        self.session.login_sent()
        self.session.io.send_server(m.StartupMessage(self.startup.protocol_version, params).encode())

    def _ssl_response(self, msg: m.SSLResponse) -> None:
        if msg.accepted:
            if self.decoder.buffered_bytes:
                raise SessionError("08006", "the database sent data before the TLS handshake; refusing it")
            self.session.start_upstream_tls()
            return
        if self.target.tls != "prefer":
            raise SessionError("08006", f"database {self.target.name!r} refused TLS, which its target requires "
                                        f"(tls = {self.target.tls!r})")
        self._send_startup()

    def _auth_message(self, msg: Any) -> None:
        io, cred = self.session.io, self.credential
        if isinstance(msg, m.NegotiateProtocolVersion):
            io.send_client(msg.encode())
        elif isinstance(msg, m.AuthenticationOk):
            self.authenticated = True
            self.session.login_authenticated()
            io.send_client(AUTH_OK)
        elif isinstance(msg, m.AuthenticationSASL):
            if ScramSha256.MECHANISM not in msg.mechanisms:
                raise SessionError("28000", f"database offers SASL mechanisms {', '.join(msg.mechanisms)}; "
                                            "Tollgate speaks SCRAM-SHA-256")
            self.scram = ScramSha256(cred.password)
            io.send_server(m.SASLInitialResponse(ScramSha256.MECHANISM, self.scram.client_first()).encode())
        elif isinstance(msg, m.AuthenticationSASLContinue) and self.scram is not None:
            io.send_server(m.SASLResponse(_auth_step(self.scram.client_final, msg.data)).encode())
        elif isinstance(msg, m.AuthenticationSASLFinal) and self.scram is not None:
            _auth_step(self.scram.verify_server_final, msg.data)
        elif isinstance(msg, m.AuthenticationMD5Password):
            io.send_server(m.PasswordMessage(md5_password(cred.upstream_user, cred.password, msg.salt)
                                             + b"\0").encode())
        elif isinstance(msg, m.AuthenticationCleartextPassword):
            if self.session.info.upstream_tls is None:
                # The appliance's password would cross the network in clear: fail closed.
                raise SessionError("28000", "the database asked for a cleartext password over an unencrypted "
                                            "connection; Tollgate refuses",
                                   hint="Set tls = \"require\" (or verify-*) for this target.")
            io.send_server(m.PasswordMessage(cred.password.encode() + b"\0").encode())
        else:
            raise SessionError("28000", f"the database asked for {type(msg).__name__}, which Tollgate does not "
                                        "support upstream")

    def _startup_message(self, msg: Any) -> None:
        session = self.session
        if isinstance(msg, m.BackendKeyData):
            session.backend_key(msg)
        elif isinstance(msg, m.ParameterStatus):
            # Through the same hooks as in the session: the client gets, and the session
            # keeps, what they made of it (a card number in a startup option, masked).
            raw = msg.encode()
            hooks = session.hooks.parameter_status
            new = dispatch.rewrite(hooks, session.info, memoryview(raw)) if hooks else None
            if new is not None:
                raw, msg = new, decode_backend(b"S", memoryview(new)[5:])
            session.info.parameters[msg.name] = msg.value
            session.io.send_client(raw)
        elif isinstance(msg, m.ReadyForQuery):
            # The encoding the session's text is read in, for its whole life: a later
            # change is refused (appliance.policy.pins).
            session.info.client_encoding = client_encoding(session.info.parameters.get("client_encoding", "UTF8"))
            session.login_complete(msg)
        elif isinstance(msg, m.NoticeResponse):
            raw = msg.encode()
            hooks = session.hooks.notice
            new = dispatch.rewrite(hooks, session.info, memoryview(raw), False) if hooks else None
            session.io.send_client(raw if new is None else new)
        elif isinstance(msg, m.NegotiateProtocolVersion):
            session.io.send_client(msg.encode())
        else:
            raise ProtocolError(f"unexpected {type(msg).__name__} before the session was ready")


def _auth_step(step: Callable[[bytes], Any], data: bytes) -> Any:
    try:
        return step(data)
    except AuthError as exc:
        raise SessionError("28000", str(exc)) from None
