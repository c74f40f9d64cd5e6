"""The ``tproxy`` method: deliver the agent's packets, untouched, to a transparent socket.

No NAT and no conntrack lookup: the accepted socket is bound to the database's own
address, so ``getsockname()`` is the original destination. Needs the kernel's tproxy
support, IP_TRANSPARENT on the listener, and policy routing that makes marked packets
local (see :mod:`appliance.intercept.routing`).
"""

from __future__ import annotations

import importlib.util
import ipaddress
import socket

from appliance.config import Config, Endpoint, normalize_address
from appliance.intercept import nft, routing
from appliance.intercept.base import InterceptError, InterceptMethod
from appliance.intercept.ruleset import PROBE_TABLE, probe_config, render_ruleset

IP_TRANSPARENT = 19  # SOL_IP
IPV6_TRANSPARENT = 75  # SOL_IPV6


class TproxyMethod(InterceptMethod):
    """Divert with ``tproxy ip/ip6 to :PORT`` plus fwmark policy routing."""

    name = "tproxy"

    def is_supported(self) -> tuple[bool, str]:
        if importlib.util.find_spec("pyroute2") is None:
            return False, "pyroute2 is not installed (needed for policy routing)"
        return nft.dry_run(render_ruleset(probe_config(self.name, PROBE_TABLE)))

    def setup(self, config: Config) -> None:
        ic = config.intercept
        # Routing first: marked packets then always have somewhere local to go, so no
        # moment exists when a diverted packet would be forwarded past the proxy.
        routing.add_policy_routing(ic.tproxy_mark, ic.route_table)
        nft.apply(render_ruleset(config, self.name))

    def teardown(self, config: Config) -> None:
        ic = config.intercept
        nft.delete_table(ic.table)
        routing.remove_policy_routing(ic.tproxy_mark, ic.route_table)

    def prepare_listener(self, sock: socket.socket) -> None:
        # IPV6_TRANSPARENT sets the same socket flag, covering a dual-stack socket's IPv4 side.
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        else:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)

    def original_destination(self, sock: socket.socket) -> Endpoint:
        try:
            host, port = sock.getsockname()[:2]
        except OSError as exc:
            raise InterceptError(f"no original destination: {exc}") from None
        return Endpoint(normalize_address(ipaddress.ip_address(host)), port)
