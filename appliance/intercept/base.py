"""The interface every intercept method implements, and what they share.

An intercept method is how agents' TCP connections to protected databases end up at the
proxy without the agents changing their configuration: it installs the divert (nftables,
plus policy routing for tproxy), removes it, prepares the proxy's sockets, and tells the
proxy where an accepted connection was really going. Modelled on sshuttle's firewall
"methods": one small module per method behind this one interface.
"""

from __future__ import annotations

import socket
from abc import ABC, abstractmethod
from typing import ClassVar

from appliance.config import Config, Endpoint

# Linux constants the socket module doesn't export on every Python version.
SO_MARK = 36


class InterceptError(Exception):
    """Setting up, tearing down or querying the intercept failed; the message says why."""


class InterceptMethod(ABC):
    """One way of diverting agents' connections into the proxy."""

    name: ClassVar[str]

    @abstractmethod
    def is_supported(self) -> tuple[bool, str]:
        """Whether this host can run the method, and a one-line reason either way."""

    @abstractmethod
    def setup(self, config: Config) -> None:
        """Install (or replace) the divert for ``config``; safe to call again."""

    @abstractmethod
    def teardown(self, config: Config) -> None:
        """Remove exactly what :meth:`setup` installs; nothing else, no error if absent."""

    def prepare_listener(self, sock: socket.socket) -> None:  # noqa: B027 - optional, most methods need nothing
        """Adjust a proxy listening socket before it is bound."""

    def prepare_upstream(self, sock: socket.socket, config: Config) -> None:
        """Mark a proxy upstream socket (before connect) so the ruleset never diverts it.

        Without the mark a proxy whose upstream traffic passes through the divert (e.g.
        when the appliance's own address falls in an agent subnet) would loop into itself.
        """
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, config.intercept.bypass_mark)

    @abstractmethod
    def original_destination(self, sock: socket.socket) -> Endpoint:
        """Where the agent behind an accepted socket was connecting to.

        Called once per accepted connection, so implementations stay to one or two
        syscalls. Raises :class:`InterceptError` if the socket wasn't diverted by this
        method (the proxy then refuses the connection).
        """
