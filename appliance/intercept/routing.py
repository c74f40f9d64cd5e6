"""Policy routing for tproxy, through pyroute2 (netlink, no ``ip`` subprocesses).

tproxy marks diverted packets but leaves their destination alone, so without help the
kernel would forward them on to the database. The fix is the standard one: packets with
Tollgate's tproxy mark look up a table of Tollgate's own whose only route says every
address is local:

    ip rule add fwmark MARK lookup TABLE
    ip route add local 0.0.0.0/0 dev lo table TABLE      (and ::/0 for IPv6)

Adding is idempotent (EEXIST ignored); removing touches only those exact rules and
routes and ignores their absence.
"""

from __future__ import annotations

import errno
import socket
from typing import TYPE_CHECKING

from appliance.intercept.base import InterceptError

if TYPE_CHECKING:
    from pyroute2 import IPRoute

# Early, so no other rule can route Tollgate-marked packets elsewhere (they would be
# forwarded to the database past the proxy); only packets carrying the tproxy mark match.
RULE_PRIORITY = 100
_DEFAULTS = ((socket.AF_INET, "0.0.0.0/0"), (socket.AF_INET6, "::/0"))


def _ipr() -> IPRoute:
    # Imported late: only tproxy (and cleanup after it) needs netlink.
    try:
        from pyroute2 import IPRoute
    except ImportError as exc:  # pragma: no cover - a packaging error
        raise InterceptError(f"pyroute2 is needed for tproxy policy routing: {exc}") from None
    return IPRoute()


def _route_spec(family: int, dst: str, lo: int, table: int) -> dict[str, object]:
    # IPv4 refuses a local route in universe scope; `ip route` picks host scope itself.
    spec: dict[str, object] = {"family": family, "dst": dst, "type": "local", "oif": lo, "table": table}
    if family == socket.AF_INET:
        spec["scope"] = "host"
    return spec


def add_policy_routing(mark: int, table: int) -> None:
    """Install the fwmark rule and the local default route, for IPv4 and IPv6."""
    from pyroute2.netlink.exceptions import NetlinkError

    with _ipr() as ipr:
        lo = _loopback_index(ipr)
        for family, dst in _DEFAULTS:
            steps = (
                ("rule", {"family": family, "priority": RULE_PRIORITY, "fwmark": mark, "table": table}),
                ("route", _route_spec(family, dst, lo, table)),
            )
            for kind, spec in steps:
                try:
                    getattr(ipr, kind)("add", **spec)
                except NetlinkError as exc:
                    if exc.code == errno.EEXIST:
                        continue
                    # A host with IPv6 disabled can't divert IPv6 anyway.
                    if family == socket.AF_INET6 and exc.code == errno.EAFNOSUPPORT:
                        break
                    raise InterceptError(
                        f"cannot add {_describe(kind, family, mark, table)}: {exc}"
                    ) from None


def remove_policy_routing(mark: int, table: int) -> None:
    """Remove Tollgate's fwmark rules (any priority) and local default routes, if present."""
    from pyroute2.netlink.exceptions import NetlinkError

    gone = (errno.ENOENT, errno.ESRCH, errno.EAFNOSUPPORT)
    with _ipr() as ipr:
        lo = _loopback_index(ipr)
        for family, dst in _DEFAULTS:
            try:
                priorities = _rule_priorities(ipr, family, mark, table)
            except NetlinkError as exc:
                if exc.code in gone:
                    continue
                raise InterceptError(f"cannot list {_family_name(family)} rules: {exc}") from None
            for priority in priorities:
                try:
                    ipr.rule("del", family=family, priority=priority, fwmark=mark, table=table)
                except NetlinkError as exc:
                    if exc.code not in gone:
                        raise InterceptError(f"cannot remove {_describe('rule', family, mark, table)}: {exc}") from None
            try:
                ipr.route("del", **_route_spec(family, dst, lo, table))
            except NetlinkError as exc:
                if exc.code not in gone:
                    raise InterceptError(f"cannot remove {_describe('route', family, mark, table)}: {exc}") from None


def _rule_priorities(ipr: IPRoute, family: int, mark: int, table: int) -> list[int]:
    return [
        r.get("priority") or 0
        for r in ipr.get_rules(family=family)
        if r.get("fwmark") == mark and r.get("table") == table
    ]


def _loopback_index(ipr: IPRoute) -> int:
    found = ipr.link_lookup(ifname="lo")
    if not found:
        raise InterceptError("no loopback interface in this network namespace")
    return int(found[0])


def _family_name(family: int) -> str:
    return "IPv4" if family == socket.AF_INET else "IPv6"


def _describe(kind: str, family: int, mark: int, table: int) -> str:
    if kind == "rule":
        return f"{_family_name(family)} rule fwmark {mark:#x} lookup {table}"
    return f"{_family_name(family)} local default route in table {table}"
