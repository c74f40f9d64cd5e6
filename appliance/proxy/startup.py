"""The agent's side of a connection before it is a session: startup packets, TLS, cancels.

A connection opens with untyped packets: SSLRequest or GSSENCRequest (answered 'S' or
'N'; with 'S' the shell runs the TLS handshake and the packets start again, encrypted),
CancelRequest (the whole purpose of its connection), or the StartupMessage. At the
StartupMessage the agent is identified (the authenticator reads its client certificate),
the target's rules are applied, and the credentials Tollgate holds for the role asked for
are looked up: what the upstream login then uses.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from appliance.config import Credential, Target
from appliance.pgwire import FrontendDecoder, ProtocolError
from appliance.pgwire import messages as m
from appliance.proxy.agent_auth import AuthFailure
from appliance.proxy.errors import SessionError

if TYPE_CHECKING:
    from appliance.proxy.hooks import SessionInfo
    from appliance.proxy.session import Session

log = logging.getLogger("tollgate.session")

TRUE_VALUES = {"1", "true", "yes", "on", "database"}


class AgentStartup:
    """Reads the agent's startup packets until the StartupMessage is accepted."""

    def __init__(self, session: Session):
        self.session = session
        self.decoder = FrontendDecoder()
        self.peer_certificate: bytes | None = None
        self.accepted: m.StartupMessage | None = None
        self.credential: Credential | None = None
        self.started = False  # the client has sent something: it gets a FATAL, not a bare close
        # Encryption requests answered so far: one of each kind, as PostgreSQL allows.
        self.answered: set[type] = set()

    def feed(self, data: bytes) -> None:
        """Client bytes in the startup phase. Whatever follows an accepted StartupMessage
        (a pipelining client) is handed to the session once it is ready."""
        self.started = True
        decoder = self.decoder
        decoder.feed(data)
        while self.accepted is None:
            packet = decoder.next_message()
            if packet is None:
                return
            if isinstance(packet, (m.SSLRequest, m.GSSENCRequest)):
                self._encryption_request(packet)
                if self.session.tls_starting:
                    return
            elif isinstance(packet, m.CancelRequest):
                self.session.forward_cancel(packet)
                return
            else:
                self._accept(packet)  # type: ignore[arg-type]
                rest = decoder.take_rest()
                if rest:  # pipelined behind the StartupMessage: relayed once the session is ready
                    self.session.pipeline.feed(rest)

    def tls_ready(self, peer_certificate: bytes | None) -> None:
        """The handshake is done: the packets start again, inside TLS."""
        self.peer_certificate = peer_certificate
        self.decoder = FrontendDecoder()

    def _encryption_request(self, packet: m.SSLRequest | m.GSSENCRequest) -> None:
        session = self.session
        # Bytes after an SSLRequest, before our answer, would be read as part of the
        # handshake by a careless server (CVE-2021-23222): refuse instead.
        if self.decoder.buffered_bytes:
            raise ProtocolError("received unencrypted data after an encryption request")
        # PostgreSQL answers one GSSENCRequest and one SSLRequest, then refuses another; a
        # client repeating them would otherwise get an answer per packet until its deadline.
        kind = type(packet)
        if kind in self.answered or (kind is m.GSSENCRequest and session.info.client_tls is not None):
            raise ProtocolError(f"duplicate {kind.__name__}: a connection makes one of each encryption request")
        self.answered.add(kind)
        context = None
        if isinstance(packet, m.SSLRequest) and session.target is not None and session.info.client_tls is None:
            context = session.authenticator.server_context(session.target)
        if context is None:
            session.io.send_client(b"N")
        else:
            session.io.send_client(b"S")
            session.start_client_tls(context)

    def _accept(self, startup: m.StartupMessage) -> None:
        session = self.session
        startup.validate()
        if startup.protocol_version >> 16 != 3:
            raise SessionError("0A000", f"unsupported frontend protocol {startup.protocol_version >> 16}."
                                        f"{startup.protocol_version & 0xFFFF}: Tollgate speaks 3.x")
        params = startup.parameters
        info = session.info
        info.user = params.get("user")
        info.database = params.get("database") or info.user
        info.application_name = params.get("application_name")
        target = session.target
        if target is None:
            raise SessionError(
                "08004", f"Tollgate does not protect a database at {info.destination}; the connection is refused",
                hint="Ask the network team to add this address to a target in Tollgate's configuration.")
        if params.get("replication", "false").lower() in TRUE_VALUES and not target.allow_replication:
            raise SessionError("28000", f"replication connections to {target.name!r} are not allowed through Tollgate")
        try:
            info.identity = session.authenticator.authenticate(info, self.peer_certificate)
        except AuthFailure as exc:
            info.auth_error = exc.message
            raise SessionError("28000", exc.message, hint=exc.hint) from None
        credential = target.credentials.get(info.user or "")
        if credential is None:
            raise SessionError(
                "28000", f"Tollgate holds no credentials for role {info.user!r} on database {target.name!r}",
                hint=f"Roles available through Tollgate here: {', '.join(sorted(target.credentials)) or 'none'}.")
        if credential.groups is not None:
            self._check_role_is_for(info, target, credential)
        info.upstream_user = credential.upstream_user
        self.accepted, self.credential = startup, credential
        session.connect_upstream(startup, credential)

    @staticmethod
    def _check_role_is_for(info: SessionInfo, target: Target, credential: Credential) -> None:
        """A role whose credentials name groups is only for identities in one of them."""
        groups = info.identity.groups if info.identity is not None else None
        if not credential.allows(groups):
            usable = sorted(role for role, c in target.credentials.items() if c.allows(groups))
            raise SessionError(
                "28000", f"role {info.user!r} on database {target.name!r} is not for your identity's groups",
                hint=f"Roles your identity may use through Tollgate here: {', '.join(usable) or 'none'}.")
