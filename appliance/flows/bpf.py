"""The loader: compiles ``bpf/flows.bpf.c`` with bcc, fills its maps from the config,
attaches it at TC (clsact) ingress and egress of each agent-facing interface, and reads
its ring buffer, flow map and counters.

bcc comes from Debian (``python3-bpfcc``); the venv sees it through system site-packages.
It compiles against the kernel headers at ``/lib/modules/$(uname -r)/build`` (the
Makefile's host-deps links Debian's). Everything here raises :class:`GuardError` with the
reason when something can't be done, so ``tollgate run`` can refuse to start and say why.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from appliance.config import Config, IPNetwork
from appliance.flows.records import COUNTER_NAMES, EVENT_SIZE, N_REASONS, REASONS, FlowKey, FlowRecord
from appliance.intercept.ruleset import protected_networks

log = logging.getLogger("tollgate.flows")

# bpf/ beside the package in a source checkout; TOLLGATE_BPF_DIR elsewhere (a package install).
BPF_DIR = Path(os.environ.get("TOLLGATE_BPF_DIR") or Path(__file__).resolve().parents[2] / "bpf")
SOURCE = "flows.bpf.c"
ACTION_DROP, ACTION_RECORD = 1, 2
# The clsact qdisc's hooks (linux/pkt_sched.h TC_H_MIN_INGRESS / EGRESS under ffff:).
PARENTS = {"ingress": "ffff:fff2", "egress": "ffff:fff3"}
FILTER_PRIO = 1  # ours alone on the interface's clsact; replaced as a whole at each start


class GuardError(Exception):
    """The programs could not be compiled, loaded, configured or attached; says why."""


def _lpm_key(table: Any, net: IPNetwork) -> Any:
    key = table.Key()
    key.prefixlen = 8 + net.prefixlen
    key.family = net.version
    raw = net.network_address.packed.ljust(16, b"\0")
    ctypes.memmove(ctypes.addressof(key.addr), raw, 16)
    return key


def _endpoint_key(table: Any, address: Any, port: int) -> Any:
    key = table.Key()
    ctypes.memmove(ctypes.addressof(key.addr), address.packed.ljust(16, b"\0"), 16)
    key.port = port
    key.family = address.version
    return key


class FlowProgram:
    """The compiled programs and their maps, attached to ``interfaces`` of this namespace."""

    def __init__(self, config: Config, interfaces: tuple[str, ...], *, guard: bool):
        self.config = config
        self.interfaces = interfaces
        self.guard = guard
        self.bpf: Any = None
        self.attached: list[tuple[int, str]] = []  # (ifindex, direction)
        self.ifnames: dict[int, str] = {}

    # ---- loading --------------------------------------------------------------------------

    def load(self) -> None:
        """Compile and load the programs, and fill the maps; nothing attached yet."""
        if not self.interfaces:
            raise GuardError("no interface to attach to: set [flows] interfaces or intercept.agent_interfaces")
        try:
            from bcc import BPF  # Debian's python3-bpfcc
        except ImportError as exc:
            raise GuardError(f"bcc is not importable ({exc}): install python3-bpfcc (make host-deps)") from None
        source = BPF_DIR / SOURCE
        if not source.is_file():
            raise GuardError(f"{source} is missing (set TOLLGATE_BPF_DIR to the directory of flows.bpf.c)")
        flows = self.config.flows
        cflags = [f"-I{BPF_DIR}", f"-DMAX_FLOWS={flows.max_flows}", f"-DRINGBUF_PAGES={flows.ring_pages}",
                  "-Wno-macro-redefined"]
        try:
            self.bpf = BPF(src_file=str(source).encode(), cflags=cflags)
            self.ingress = self.bpf.load_func(b"tg_ingress", BPF.SCHED_CLS)
            self.egress = self.bpf.load_func(b"tg_egress", BPF.SCHED_CLS)
        except Exception as exc:  # noqa: BLE001 - bcc raises bare Exception when compiling or loading fails
            raise GuardError(f"the eBPF programs did not compile or load: {exc}") from None
        self._fill_maps()

    def _fill_maps(self) -> None:
        b, config = self.bpf, self.config
        agents = b[b"agents"]
        for net in config.intercept.agent_subnets:
            agents[_lpm_key(agents, net)] = ctypes.c_uint8(1)
        protected = b[b"protected"]
        for net in protected_networks(config):
            protected[_lpm_key(protected, net)] = ctypes.c_uint8(ACTION_DROP)
        targets, allowed = b[b"targets"], b[b"allowed"]
        for target in config.targets:
            action = ACTION_DROP if target.bypass == "drop" else ACTION_RECORD
            for ep in target.endpoints:
                targets[_endpoint_key(targets, ep.address, ep.port)] = ctypes.c_uint8(action)
                # The target's own address, so its bypass action covers its other ports too.
                net = ipaddress.ip_network(ep.address)
                protected[_lpm_key(protected, net)] = ctypes.c_uint8(action)
                for port in target.allow_ports:
                    allowed[_endpoint_key(allowed, ep.address, port)] = ctypes.c_uint8(1)
        settings = b[b"settings"]
        value = settings.Leaf()
        value.guard = 1 if self.guard else 0
        settings[ctypes.c_int(0)] = value

    # ---- attaching ------------------------------------------------------------------------

    def attach(self) -> None:
        """Attach at ingress and egress of every interface (a clsact qdisc is added where
        there is none); our filters replace any of ours left by an earlier run."""
        from pyroute2 import IPRoute
        with IPRoute() as ipr:
            for name in self.interfaces:
                found = ipr.link_lookup(ifname=name)
                if not found:
                    raise GuardError(f"interface {name!r} does not exist here")
                index = found[0]
                self.ifnames[index] = name
                try:
                    ipr.tc("add", "clsact", index)
                except Exception as exc:  # noqa: BLE001 - EEXIST: the qdisc is there already
                    if getattr(exc, "code", None) != 17:
                        raise GuardError(f"adding a clsact qdisc to {name}: {exc}") from None
                for direction, fn in (("ingress", self.ingress), ("egress", self.egress)):
                    try:
                        ipr.tc("replace-filter", "bpf", index, handle=1, fd=fn.fd, name=fn.name.decode(),
                               parent=PARENTS[direction], classid=1, direct_action=True, prio=FILTER_PRIO)
                    except Exception as exc:  # noqa: BLE001 - pyroute2's NetlinkError and friends
                        raise GuardError(f"attaching at {direction} of {name}: {exc}") from None
                    self.attached.append((index, direction))
        log.info("flows: attached to %s (%s)", ", ".join(self.interfaces), "guard" if self.guard else "ledger only")

    def detach(self) -> None:
        """Remove our filters (the clsact qdisc stays: others may use it)."""
        if not self.attached:
            return
        from pyroute2 import IPRoute
        with IPRoute() as ipr:
            for index, direction in self.attached:
                try:
                    ipr.tc("del-filter", "bpf", index, handle=1, parent=PARENTS[direction], prio=FILTER_PRIO)
                except Exception as exc:  # noqa: BLE001 - the interface may be gone already
                    log.debug("flows: detaching from %s %s: %s", self.ifnames.get(index), direction, exc)
        self.attached.clear()

    def attached_here(self) -> list[str]:
        """Which of our attachments the kernel still shows (``iface/direction``)."""
        from pyroute2 import IPRoute
        present = []
        with IPRoute() as ipr:
            for index, direction in self.attached:
                filters = ipr.get_filters(index=index, parent=int(PARENTS[direction].replace(":", ""), 16))
                if any(f.get_attr("TCA_KIND") == "bpf" for f in filters):
                    present.append(f"{self.ifnames.get(index, index)}/{direction}")
        return present

    # ---- reading --------------------------------------------------------------------------

    def open_events(self, callback: Callable[[FlowRecord], None]) -> None:
        def on_event(ctx: Any, data: Any, size: int) -> int:
            callback(FlowRecord.from_event(ctypes.string_at(data, min(size, EVENT_SIZE))))
            return 0
        self._on_event = on_event  # bcc keeps a weak hold only
        self.bpf[b"events"].open_ring_buffer(on_event)

    def poll_events(self, timeout_ms: int) -> None:
        self.bpf.ring_buffer_poll(timeout_ms)

    def flows(self) -> Iterator[FlowRecord]:
        """Every flow in the map now (a snapshot, one entry at a time)."""
        table = self.bpf[b"flows"]
        try:
            # One syscall per batch rather than two per flow: a full map is 65,536 flows.
            entries = [(bytes(k), bytes(v)) for k, v in table.items_lookup_batch()]
        except Exception:  # noqa: BLE001 - a kernel without batch operations: one at a time
            entries = [(bytes(k), bytes(v)) for k, v in table.items()]
        for key, val in entries:
            yield FlowRecord.unpack(key, val)

    def delete(self, key: FlowKey) -> None:
        table = self.bpf[b"flows"]
        k = table.Key.from_buffer_copy(key.pack())
        with contextlib.suppress(KeyError):
            del table[k]

    def counters(self) -> dict[str, Any]:
        """Packets dropped by reason, and the other counters, summed over CPUs."""
        table = self.bpf[b"counters"]
        totals = [sum(table[ctypes.c_int(i)]) for i in range(N_REASONS + len(COUNTER_NAMES))]
        dropped = {REASONS[i]: totals[i] for i in range(1, N_REASONS) if totals[i]}
        out: dict[str, Any] = {name: totals[N_REASONS + i] for i, name in enumerate(COUNTER_NAMES)}
        out["dropped"] = dropped
        out["dropped_total"] = sum(dropped.values())
        return out

    def close(self) -> None:
        self.detach()
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None
