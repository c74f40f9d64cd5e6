"""How the proxy accepts the agent side of a connection: the seam the identity layer fills.

The session asks an :class:`AgentAuthenticator` two things: whether to answer an SSLRequest
with TLS (and with which server context — the shell does the handshake), and, once the
StartupMessage arrives, who this is. :class:`TrustAuthenticator` is the lab's and the
tests' choice until certificates are configured: no TLS towards the agent, no identity.
"""

from __future__ import annotations

import ssl
from typing import Any, Protocol

from appliance.config import Target
from appliance.proxy.hooks import SessionInfo


class AuthFailure(Exception):
    """The agent can't be identified; the message and hint go into a FATAL (SQLSTATE 28000)."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message, self.hint = message, hint


class AgentAuthenticator(Protocol):
    def server_context(self, target: Target) -> ssl.SSLContext | None:
        """The TLS context to answer an SSLRequest for ``target`` with, or None for 'N'."""

    def tls_failed(self, info: SessionInfo, reason: str) -> None:
        """A handshake failed; remember why, to explain it if the client retries in clear."""

    def authenticate(self, info: SessionInfo, peer_certificate: bytes | None) -> Any:
        """The identity for this connection, or raise AuthFailure. Runs at StartupMessage."""


class TrustAuthenticator:
    """Accept every agent without TLS or identity (``agent_auth = "trust"``)."""

    def server_context(self, target: Target) -> ssl.SSLContext | None:
        return None

    def tls_failed(self, info: SessionInfo, reason: str) -> None:
        pass

    def authenticate(self, info: SessionInfo, peer_certificate: bytes | None) -> Any:
        return None
