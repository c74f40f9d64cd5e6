"""The ``redirect`` method: NAT the agent's connection to the proxy's local port.

Works on any kernel with nftables NAT, needs nothing of the listening socket, and the
original destination survives in conntrack, where ``SO_ORIGINAL_DST`` reads it back.
The cost is NAT itself: the proxy's socket is bound to a local address, not the database's.
"""

from __future__ import annotations

import errno
import ipaddress
import socket

from appliance.config import Config, Endpoint, normalize_address
from appliance.intercept import nft, routing
from appliance.intercept.base import InterceptError, InterceptMethod
from appliance.intercept.ruleset import PROBE_TABLE, probe_config, render_ruleset

SO_ORIGINAL_DST = 80  # SOL_IP; returns the conntrack original tuple's sockaddr_in
IP6T_SO_ORIGINAL_DST = 80  # SOL_IPV6; returns a sockaddr_in6
_SOCKADDR_IN = 16
_SOCKADDR_IN6 = 28


class RedirectMethod(InterceptMethod):
    """Divert with ``redirect to :PORT`` in a NAT prerouting chain."""

    name = "redirect"

    def is_supported(self) -> tuple[bool, str]:
        return nft.dry_run(render_ruleset(probe_config(self.name, PROBE_TABLE)))

    def setup(self, config: Config) -> None:
        nft.apply(render_ruleset(config, self.name))
        # Switching from tproxy leaves its policy routing behind; it is Tollgate's, so
        # clear it, and the host is in exactly the redirect state.
        routing.remove_policy_routing(config.intercept.tproxy_mark, config.intercept.route_table)

    def teardown(self, config: Config) -> None:
        nft.delete_table(config.intercept.table)
        routing.remove_policy_routing(config.intercept.tproxy_mark, config.intercept.route_table)

    def original_destination(self, sock: socket.socket) -> Endpoint:
        try:
            if sock.family == socket.AF_INET:
                return _from_sockaddr_in(sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN))
            try:
                raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6)
            except OSError as exc:
                # A dual-stack socket's IPv4 peer (::ffff:a.b.c.d) is tracked as IPv4,
                # so the IPv6 lookup misses; asking at SOL_IP finds it.
                if exc.errno != errno.ENOENT:
                    raise
                return _from_sockaddr_in(sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN))
            return _from_sockaddr_in6(raw)
        except OSError as exc:
            raise InterceptError(f"no original destination (connection not tracked by conntrack?): {exc}") from None


def _from_sockaddr_in(raw: bytes) -> Endpoint:
    # struct sockaddr_in: family (host order), port (network order), 4-byte address.
    return Endpoint(ipaddress.IPv4Address(raw[4:8]), int.from_bytes(raw[2:4], "big"))


def _from_sockaddr_in6(raw: bytes) -> Endpoint:
    # struct sockaddr_in6: family, port (network order), flowinfo, 16-byte address, scope.
    return Endpoint(normalize_address(ipaddress.IPv6Address(raw[8:24])), int.from_bytes(raw[2:4], "big"))

