"""Flow records decoded from the kernel's bytes: the layout, the fields, and fuzzing."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.flows.records import EVENT_SIZE, KEY, N_REASONS, REASONS, VAL, FlowKey, FlowRecord, tcp_flags

HEADER = Path(__file__).resolve().parents[2] / "bpf" / "tollgate_bpf.h"


def test_the_layouts_match_the_shared_header() -> None:
    """tollgate_bpf.h and records.py describe the same bytes: 40-byte key, 64-byte value."""
    assert (KEY.size, VAL.size, EVENT_SIZE) == (40, 64, 104)
    text = HEADER.read_text()
    reasons = {int(n): name for name, n in re.findall(r"#define TG_REASON_(\w+)\s+(\d+)", text)}
    assert int(re.search(r"#define TG_REASONS\s+(\d+)", text).group(1)) == N_REASONS  # type: ignore[union-attr]
    assert sorted(reasons) == sorted(REASONS)
    for number, name in reasons.items():  # the same names, spelt for people
        expected = {"NONE": "", "IPV6_EXT": "ipv6-extension-headers", "SOURCE": "source-not-agent",
                    "OTHER_PROTO": "other-protocol"}.get(name, name.lower().replace("_", "-"))
        assert REASONS[number] == expected


def test_a_closed_intercepted_flow_reads_back() -> None:
    key = FlowKey(6, 6, "fd7a:6c67:1::10", 40000, "fd7a:6c67:2::10", 5432)
    val = VAL.pack(1_000, 3_000_000_000, 9, 6, 700, 900, 2, 0x13, 0x12, 1, 0, 0x04 | 0x01 | 0x02)
    flow = FlowRecord.from_event(key.pack() + val)
    assert flow.key == key and flow.closed and not flow.reset
    assert (flow.key.client, flow.key.server) == ("[fd7a:6c67:1::10]:40000", "[fd7a:6c67:2::10]:5432")
    fields = flow.fields(now_mono_ns=3_000_000_000, now_wall_ns=1_800_000_000_000_000_000, interfaces={2: "eth0"},
                         end="closed")
    assert fields["verdict"] == "intercepted" and fields["reason"] == ""
    assert (fields["packets_in"], fields["packets_out"], fields["bytes_in"], fields["bytes_out"]) == (9, 6, 700, 900)
    assert (fields["tcp_flags_in"], fields["tcp_flags_out"]) == ("FSA", "SA")
    assert fields["interface"] == "eth0" and fields["family"] == "ipv6" and fields["protocol"] == "tcp"
    assert fields["duration_us"] == (3_000_000_000 - 1_000) // 1000


def test_an_ipv4_drop_reads_back() -> None:
    key = FlowKey(4, 17, "198.18.1.10", 53000, "198.18.2.10", 5432)
    flow = FlowRecord.unpack(key.pack(), VAL.pack(5, 5, 1, 0, 33, 0, 2, 0, 0, 3, 2, 0))
    assert (flow.verdict, flow.reason, flow.key) == ("dropped", "udp", key)


def test_tcp_flags_in_tcpdump_order() -> None:
    assert tcp_flags(0) == "" and tcp_flags(0xFF) == "FSRPAUEC" and tcp_flags(0x18) == "PA"


def test_a_short_event_is_refused() -> None:
    with pytest.raises(ValueError, match="a flow event of 103 bytes"):
        FlowRecord.from_event(b"\0" * (EVENT_SIZE - 1))


@given(st.binary(min_size=EVENT_SIZE, max_size=EVENT_SIZE * 2))
def test_any_event_bytes_decode_or_fail_cleanly(data: bytes) -> None:
    """Whatever the ring buffer hands over decodes to a record with every field (an unknown
    verdict or reason is kept as its number, an impossible time as None), never an exception."""
    flow = FlowRecord.from_event(data)
    fields = flow.fields(now_mono_ns=2**63, now_wall_ns=2**62, end="closed")
    assert set(fields) >= {"src", "dst", "verdict", "reason", "packets_in", "bytes_out"}
    assert struct.unpack_from("=16s16sHHBBH", data)[4] == flow.key.family
