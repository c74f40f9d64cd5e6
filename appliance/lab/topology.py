"""The lab's network: five namespaces (agent, gw, db, witness, direct) joined by four veth pairs.

::

    agent ns                 gw ns (the appliance)                     db ns
    eth0 198.18.1.10/24 ──── eth0 198.18.1.1/24   eth1 198.18.2.1/24 ──── eth0 198.18.2.10/24 (protected)
         fd7a:6c67:1::10/64       fd7a:6c67:1::1/64    fd7a:6c67:2::1/64          198.18.2.11/24 (direct)
                                                                              fd7a:6c67:2::10/64, ::11/64
                                  eth2 198.18.4.1/24 ──── witness ns eth0 198.18.4.10/24
                                       fd7a:6c67:4::1/64               fd7a:6c67:4::10/64
    direct ns
    eth0 198.18.3.10/24 ──────── eth3 198.18.3.1/24
         fd7a:6c67:3::10/64           fd7a:6c67:3::1/64

The database's direct address (198.18.2.11) is for clients that compare with Tollgate —
the benchmark, the driver suites' direct run — and they run in the *direct* namespace:
routed to the database through the gateway, never on the agent's side. The whole database
subnet is in the proxy's ``protected_subnets``, so the gateway's forward filter drops
every agent packet towards it that isn't diverted (only a lab made with ``agent_direct``
leaves it out, for tests comparing both paths from one process).

The witness (:mod:`appliance.witness`) has a namespace of its own, as it would have a host
of its own: it is no part of the appliance. It has no default route, so it answers the
gateway's side of its link and nothing else (the agent's packets could be forwarded to it,
its answers could not come back).

Every veth end is created directly inside its namespace (never in the root namespace), so
nothing of a lab ever appears among the host's links, and deleting the namespaces removes
the links with them. The addresses are fixed: namespaces isolate them, so several labs can
coexist. This module also owns namespace lifecycle and the killing of what runs inside one.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

NETNS_DIR = Path("/run/netns")
NODES = ("agent", "gw", "db", "witness", "direct")
IFA_F_NODAD = 0x02  # linux/if_addr.h: usable at once, no duplicate address detection wait

AGENT_SUBNET_V4 = "198.18.1.0/24"
AGENT_SUBNET_V6 = "fd7a:6c67:1::/64"
DB_SUBNET_V4 = "198.18.2.0/24"
DB_SUBNET_V6 = "fd7a:6c67:2::/64"

AGENT_V4 = "198.18.1.10"
AGENT_V6 = "fd7a:6c67:1::10"
GW_AGENT_IFACE = "eth0"  # the gateway's link to the agent
GW_AGENT_V4 = "198.18.1.1"
GW_AGENT_V6 = "fd7a:6c67:1::1"
GW_DB_V4 = "198.18.2.1"
GW_DB_V6 = "fd7a:6c67:2::1"
DB_PROTECTED_V4 = "198.18.2.10"
DB_PROTECTED_V6 = "fd7a:6c67:2::10"
DB_DIRECT_V4 = "198.18.2.11"
DB_DIRECT_V6 = "fd7a:6c67:2::11"

DIRECT_SUBNET_V4 = "198.18.3.0/24"
DIRECT_SUBNET_V6 = "fd7a:6c67:3::/64"
GW_DIRECT_V4 = "198.18.3.1"
GW_DIRECT_V6 = "fd7a:6c67:3::1"
DIRECT_CLIENT_V4 = "198.18.3.10"
DIRECT_CLIENT_V6 = "fd7a:6c67:3::10"

WITNESS_SUBNET_V4 = "198.18.4.0/24"
WITNESS_SUBNET_V6 = "fd7a:6c67:4::/64"
GW_WITNESS_V4 = "198.18.4.1"
GW_WITNESS_V6 = "fd7a:6c67:4::1"
WITNESS_V4 = "198.18.4.10"
WITNESS_V6 = "fd7a:6c67:4::10"
WITNESS_PORT = 7380

DB_ADDRESSES = (DB_PROTECTED_V4, DB_DIRECT_V4, DB_PROTECTED_V6, DB_DIRECT_V6)
LAB_SUBNETS = (AGENT_SUBNET_V4, DB_SUBNET_V4, AGENT_SUBNET_V6, DB_SUBNET_V6, DIRECT_SUBNET_V4, DIRECT_SUBNET_V6)


class TopologyError(Exception):
    """A namespace, link, address or route could not be set up."""


@dataclass(frozen=True, slots=True)
class Iface:
    """One interface as the lab configures it: its namespace node, name and addresses."""

    node: str
    name: str
    addresses: tuple[tuple[str, int], ...]


# (node, ifname) ↔ (node, ifname): the two veth pairs.
LINKS = ((("agent", "eth0"), ("gw", "eth0")), (("gw", "eth1"), ("db", "eth0")), (("gw", "eth2"), ("witness", "eth0")),
         (("gw", "eth3"), ("direct", "eth0")))

IFACES = (
    Iface("agent", "eth0", ((AGENT_V4, 24), (AGENT_V6, 64))),
    Iface("gw", "eth0", ((GW_AGENT_V4, 24), (GW_AGENT_V6, 64))),
    Iface("gw", "eth1", ((GW_DB_V4, 24), (GW_DB_V6, 64))),
    Iface("db", "eth0", ((DB_PROTECTED_V4, 24), (DB_DIRECT_V4, 24), (DB_PROTECTED_V6, 64), (DB_DIRECT_V6, 64))),
    Iface("gw", "eth2", ((GW_WITNESS_V4, 24), (GW_WITNESS_V6, 64))),
    Iface("witness", "eth0", ((WITNESS_V4, 24), (WITNESS_V6, 64))),
    Iface("gw", "eth3", ((GW_DIRECT_V4, 24), (GW_DIRECT_V6, 64))),
    Iface("direct", "eth0", ((DIRECT_CLIENT_V4, 24), (DIRECT_CLIENT_V6, 64))),
)

# node → default gateways (v4, v6)
DEFAULT_ROUTES = {"agent": (GW_AGENT_V4, GW_AGENT_V6), "db": (GW_DB_V4, GW_DB_V6),
                  "direct": (GW_DIRECT_V4, GW_DIRECT_V6)}


def addresses() -> dict[str, dict[str, Any]]:
    """Each node's addresses, as ``lab status`` shows them."""
    return {
        "agent": {"ipv4": AGENT_V4, "ipv6": AGENT_V6, "subnets": [AGENT_SUBNET_V4, AGENT_SUBNET_V6]},
        "gw": {"agent_side": [GW_AGENT_V4, GW_AGENT_V6], "db_side": [GW_DB_V4, GW_DB_V6]},
        "db": {"protected": [DB_PROTECTED_V4, DB_PROTECTED_V6], "direct": [DB_DIRECT_V4, DB_DIRECT_V6]},
        "witness": {"ipv4": WITNESS_V4, "ipv6": WITNESS_V6, "port": WITNESS_PORT},
        "direct": {"ipv4": DIRECT_CLIENT_V4, "ipv6": DIRECT_CLIENT_V6},
    }


def namespace_names(lab_name: str) -> dict[str, str]:
    return {node: f"tg{lab_name}-{node}" for node in NODES}


def namespace_exists(ns: str) -> bool:
    return (NETNS_DIR / ns).exists()


def _run(argv: list[str], what: str) -> None:
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        raise TopologyError(f"{what}: `{' '.join(argv)}` failed: {proc.stderr.strip() or proc.returncode}")


def create_namespace(ns: str) -> None:
    if namespace_exists(ns):
        # A leftover of a lab whose teardown never ran; reusing it would mix two labs.
        raise TopologyError(f"network namespace {ns} already exists (a stale lab? try `tollgate lab gc` "
                            f"or `ip netns delete {ns}`)")
    _run(["ip", "netns", "add", ns], f"creating namespace {ns}")


def delete_namespace(ns: str) -> None:
    if namespace_exists(ns):
        _run(["ip", "netns", "delete", ns], f"deleting namespace {ns}")


def build(namespaces: dict[str, str]) -> None:
    """Wire already-created namespaces: loopback, veths, addresses, routes, forwarding."""
    for node in NODES:
        # No duplicate address detection on the links to come (link-local addresses too):
        # the lab's addresses are unique by construction, and DAD would delay first use.
        # A namespace's own sysctls; the host's are never touched.
        _run(["ip", "netns", "exec", namespaces[node], "sysctl", "-q", "-w",
              "net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf.all.accept_dad=0"],
             f"disabling DAD in {node}")
        with IPRoute(netns=namespaces[node]) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
    for (node_a, if_a), (node_b, if_b) in LINKS:
        with IPRoute(netns=namespaces[node_a]) as ipr:
            try:
                ipr.link("add", ifname=if_a, kind="veth", peer={"ifname": if_b, "net_ns_fd": namespaces[node_b]})
            except Exception as exc:
                raise TopologyError(f"creating veth {node_a}:{if_a} ↔ {node_b}:{if_b}: {exc}") from exc
    for iface in IFACES:
        with IPRoute(netns=namespaces[iface.node]) as ipr:
            index = ipr.link_lookup(ifname=iface.name)[0]
            for address, prefixlen in iface.addresses:
                try:
                    ipr.addr("add", index=index, address=address, prefixlen=prefixlen,
                             flags=IFA_F_NODAD if ":" in address else 0)
                except Exception as exc:
                    raise TopologyError(f"adding {address}/{prefixlen} to {iface.node}:{iface.name}: {exc}") from exc
            ipr.link("set", index=index, state="up")
    for node, gateways in DEFAULT_ROUTES.items():
        with IPRoute(netns=namespaces[node]) as ipr:
            for gateway in gateways:
                family = 10 if ":" in gateway else 2
                try:
                    ipr.route("add", dst="default", gateway=gateway, family=family)
                except Exception as exc:
                    raise TopologyError(f"default route via {gateway} in {node}: {exc}") from exc
    # The namespace's own sysctls (per-netns), never the host's.
    _run(["ip", "netns", "exec", namespaces["gw"], "sysctl", "-q", "-w",
          "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"], "enabling forwarding in gw")


# --- processes inside a namespace ---------------------------------------------------------

def namespace_pids(ns: str) -> list[int]:
    if not namespace_exists(ns):
        return []
    proc = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def wait_for_exit(pids: list[int], timeout: float) -> list[int]:
    """Wait until every pid has exited (pidfd readiness, no polling); return the survivors."""
    fds: dict[int, int] = {}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            fds[os.pidfd_open(pid)] = pid
    try:
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + timeout
        pending = set(fds)
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for fd, _ in poller.poll(remaining * 1000):
                pending.discard(fd)
                poller.unregister(fd)
        return [fds[fd] for fd in pending]
    finally:
        for fd in fds:
            os.close(fd)


def kill_namespace_processes(ns: str, grace: float = 5.0) -> None:
    """SIGTERM everything in ``ns``, SIGKILL what outlives ``grace``; only that namespace's pids."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        pids = namespace_pids(ns)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        wait_for_exit(pids, wait)
    left = namespace_pids(ns)
    if left:
        raise TopologyError(f"processes {left} in {ns} survived SIGKILL")
