"""Flow records: the kernel's flow key and value (bytes) as a record the audit log takes.

Pure: the layouts mirror ``bpf/tollgate_bpf.h`` and are decoded with :mod:`struct`, so the
records can be made and tested without bcc or root. The names of verdicts and reasons are
the vocabulary of the ledger, ``tollgate flows`` and docs/ebpf.md.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import struct
from dataclasses import dataclass
from typing import Any

# struct tg_flow_key: saddr[16] daddr[16] sport dport family proto pad
KEY = struct.Struct("=16s16sHHBBH")
# struct tg_flow_val: first last packets[2] bytes[2] ifindex flags[2] verdict reason state pad[7]
VAL = struct.Struct("=QQ2Q2QI2BBBB7x")
EVENT_SIZE = KEY.size + VAL.size

VERDICTS = {1: "intercepted", 2: "passed", 3: "dropped"}
REASONS = {
    0: "", 1: "other-port", 2: "udp", 3: "icmp", 4: "fragment", 5: "ipv6-extension-headers", 6: "ip-options",
    7: "not-diverted", 8: "source-not-agent", 9: "other-protocol", 10: "ledger-full", 11: "allowed-port",
    12: "malformed",
}
N_REASONS = 13
# counters after the per-reason drops (tollgate_bpf.h TG_CTR_*)
COUNTER_NAMES = ("overflow", "events_lost", "passed", "intercepted", "recorded", "untracked")
PROTOCOLS = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}
TCP_FLAGS = "FSRPAUEC"  # bit 0 (FIN) … bit 7 (CWR)
STATE_CLOSED, STATE_RST = 0x04, 0x08


def tcp_flags(bits: int) -> str:
    """``SAF`` style: the letters of the flags in ``bits``, in tcpdump's order."""
    return "".join(letter for i, letter in enumerate(TCP_FLAGS) if bits & (1 << i))


@dataclass(frozen=True, slots=True)
class FlowKey:
    """A flow from the agent's side: source (the agent) and destination."""

    family: int
    proto: int
    src: str
    sport: int
    dst: str
    dport: int

    @classmethod
    def unpack(cls, raw: bytes) -> FlowKey:
        saddr, daddr, sport, dport, family, proto, _ = KEY.unpack_from(raw)
        return cls(family, proto, _address(family, saddr), sport, _address(family, daddr), dport)

    def pack(self) -> bytes:
        return KEY.pack(_raw(self.src), _raw(self.dst), self.sport, self.dport, self.family, self.proto, 0)

    @property
    def client(self) -> str:
        """The agent's end as the proxy's sessions name it (``Endpoint.__str__``)."""
        return f"[{self.src}]:{self.sport}" if self.family == 6 else f"{self.src}:{self.sport}"

    @property
    def server(self) -> str:
        return f"[{self.dst}]:{self.dport}" if self.family == 6 else f"{self.dst}:{self.dport}"


@dataclass(frozen=True, slots=True)
class FlowRecord:
    """One flow as the ledger records it (times: CLOCK_MONOTONIC nanoseconds)."""

    key: FlowKey
    first_ns: int
    last_ns: int
    packets: tuple[int, int]  # from the agent, to it
    bytes: tuple[int, int]
    ifindex: int
    flags: tuple[int, int]
    verdict: str
    reason: str
    closed: bool
    reset: bool

    @classmethod
    def unpack(cls, key: bytes, val: bytes) -> FlowRecord:
        first, last, p0, p1, b0, b1, ifindex, f0, f1, verdict, reason, state = VAL.unpack_from(val)
        return cls(FlowKey.unpack(key), first, last, (p0, p1), (b0, b1), ifindex, (f0, f1),
                   VERDICTS.get(verdict, str(verdict)), REASONS.get(reason, str(reason)),
                   bool(state & STATE_CLOSED), bool(state & STATE_RST))

    @classmethod
    def from_event(cls, data: bytes) -> FlowRecord:
        if len(data) < EVENT_SIZE:
            raise ValueError(f"a flow event of {len(data)} bytes (expected {EVENT_SIZE})")
        return cls.unpack(data[:KEY.size], data[KEY.size:EVENT_SIZE])

    @property
    def identity(self) -> tuple[FlowKey, int]:
        """What tells one flow from a later one of the same 5-tuple."""
        return self.key, self.first_ns

    def fields(self, *, now_mono_ns: int, now_wall_ns: int, interfaces: dict[int, str] | None = None,
               end: str) -> dict[str, Any]:
        """The record's fields (JSON-able); ``end``: closed, reset, idle, interim, expired, live."""
        def wall(mono: int) -> str | None:
            ns = now_wall_ns - (now_mono_ns - mono)
            try:
                return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).isoformat(timespec="microseconds")
            except (OverflowError, ValueError, OSError):  # not a time the kernel's clock gives
                return None
        k = self.key
        return {
            "family": f"ipv{k.family}", "protocol": PROTOCOLS.get(k.proto, str(k.proto)),
            "src": k.src, "sport": k.sport, "dst": k.dst, "dport": k.dport,
            "first_seen": wall(self.first_ns), "last_seen": wall(self.last_ns),
            "duration_us": max(0, self.last_ns - self.first_ns) // 1000,
            "packets_in": self.packets[0], "packets_out": self.packets[1],
            "bytes_in": self.bytes[0], "bytes_out": self.bytes[1],
            "tcp_flags_in": tcp_flags(self.flags[0]), "tcp_flags_out": tcp_flags(self.flags[1]),
            "verdict": self.verdict, "reason": self.reason, "end": end,
            "interface": (interfaces or {}).get(self.ifindex, str(self.ifindex)),
        }


def _address(family: int, raw: bytes) -> str:
    if family == 4:
        return str(ipaddress.IPv4Address(raw[:4]))
    return str(ipaddress.IPv6Address(raw))


def _raw(address: str) -> bytes:
    packed = ipaddress.ip_address(address).packed
    return packed.ljust(16, b"\0")
