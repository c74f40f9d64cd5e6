"""The programs themselves, without a lab: loaded with bcc (not attached) and given
packets through BPF_PROG_TEST_RUN; what each returns (0 pass, 2 drop) and what the ledger
and counters then hold. Needs root and bcc, like the appliance."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.config import parse_config
from appliance.flows.bpf import FlowProgram
from bench.bpf_cost import _run

PASS, DROP = 0, 2
AGENT, DB, OTHER, SPOOF = "198.18.1.10", "198.18.2.10", "198.18.9.10", "203.0.113.7"


@pytest.fixture(scope="module")
def program() -> Iterator[tuple[FlowProgram, object]]:
    if os.geteuid() != 0:
        pytest.skip("loading eBPF programs needs root")
    lib = ctypes.CDLL(ctypes.util.find_library("bpf") or "libbpf.so.1", use_errno=True)
    lib.bpf_prog_test_run_opts.argtypes = [ctypes.c_int, ctypes.c_void_p]
    config = parse_config(
        "[intercept]\nagent_subnets = ['198.18.1.0/24', 'fd7a:6c67:1::/64']\n"
        "protected_subnets = ['198.18.2.0/24']\n"
        "[[targets]]\nname = 'a'\naddresses = ['198.18.2.10:5432', '[fd7a:6c67:2::10]:5432']\nallow_ports = [9187]\n"
        "[targets.credentials.app]\npassword = 'x'\n"
        "[[targets]]\nname = 'watched'\naddresses = ['198.18.2.20:5432']\nbypass = 'record'\n"
        "[targets.credentials.app]\npassword = 'x'\n", Path("(test)"))
    prog = FlowProgram(config, ("(none)",), guard=True)
    prog.load()
    try:
        yield prog, lib
    finally:
        prog.close()


def run(program: tuple[FlowProgram, object], frame: bytes, direction: str = "ingress") -> int:
    prog, lib = program
    return _run(lib, (prog.ingress if direction == "ingress" else prog.egress).fd, frame, 1)[0]


def eth():
    from scapy.all import Ether
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def flow_of(prog: FlowProgram, **want: object) -> list[dict[str, object]]:
    out = []
    for flow in prog.flows():
        fields = flow.fields(now_mono_ns=0, now_wall_ns=0, end="live")
        if all(fields.get(k) == v for k, v in want.items()):
            out.append(fields)
    return out


def test_a_diverted_connection_passes_both_ways_and_closes(program: tuple[FlowProgram, object]) -> None:
    from scapy.all import IP, TCP, Raw
    prog, _ = program
    closed = []
    prog.open_events(closed.append)
    e = eth()
    assert run(program, bytes(e / IP(src=AGENT, dst=DB) / TCP(sport=40000, dport=5432, flags="S"))) == PASS
    assert run(program, bytes(e / IP(src=DB, dst=AGENT) / TCP(sport=5432, dport=40000, flags="SA")), "egress") == PASS
    assert run(program, bytes(e / IP(src=AGENT, dst=DB) / TCP(sport=40000, dport=5432, flags="PA") / Raw(b"Q" * 9))) \
        == PASS
    assert run(program, bytes(e / IP(src=AGENT, dst=DB) / TCP(sport=40000, dport=5432, flags="FA"))) == PASS
    assert run(program, bytes(e / IP(src=DB, dst=AGENT) / TCP(sport=5432, dport=40000, flags="FA")), "egress") == PASS
    # The last ACK, after both FINs: the flow is closed but still in the map.
    assert run(program, bytes(e / IP(src=AGENT, dst=DB) / TCP(sport=40000, dport=5432, flags="A"))) == PASS
    [flow] = flow_of(prog, sport=40000)
    assert (flow["verdict"], flow["packets_in"], flow["packets_out"]) == ("intercepted", 4, 2)
    assert (flow["tcp_flags_in"], flow["tcp_flags_out"]) == ("FSPA", "FSA")
    prog.poll_events(1000)
    assert [(c.key.sport, c.closed, c.verdict) for c in closed] == [(40000, True, "intercepted")]


@pytest.mark.parametrize("layers, sport, reason", [
    ("IP(src=AGENT, dst=DB) / TCP(sport=40100, dport=22, flags='S')", 40100, "other-port"),
    ("IP(src=AGENT, dst='198.18.2.11') / TCP(sport=40101, dport=5432, flags='S')", 40101, "other-port"),
    ("IP(src=AGENT, dst=DB) / UDP(sport=40102, dport=53)", 40102, "udp"),
    ("IP(src=AGENT, dst=DB) / ICMP(id=40103)", 40103, "icmp"),
    ("IP(src=AGENT, dst=DB) / TCP(sport=40104, dport=5432, flags='A')", 40104, "not-diverted"),
    ("IP(src=SPOOF, dst=DB) / TCP(sport=40105, dport=5432, flags='S')", 40105, "source-not-agent"),
    ("IP(src=AGENT, dst=DB, options=[IPOption_RR()]) / TCP(sport=40106, dport=5432, flags='S')", 40106, "ip-options"),
    ("IP(src=AGENT, dst=DB, flags='MF') / TCP(sport=40107, dport=5432, flags='S')", 0, "fragment"),
    ("IP(src=AGENT, dst=DB, proto=47) / Raw(b'x')", 0, "other-protocol"),
    ("IPv6(src='fd7a:6c67:1::10', dst='fd7a:6c67:2::10') / IPv6ExtHdrDestOpt() / TCP(dport=5432)", 0,
     "ipv6-extension-headers"),
])
def test_each_bypass_class_is_dropped_with_its_reason(program: tuple[FlowProgram, object], layers: str, sport: int,
                                                      reason: str) -> None:
    from scapy.all import ICMP, IP, TCP, UDP, IPOption_RR, IPv6, Raw  # noqa: F401 - used by eval
    from scapy.layers.inet6 import IPv6ExtHdrDestOpt  # noqa: F401 - used by eval
    prog, _ = program
    before = prog.counters()["dropped"].get(reason, 0)
    assert run(program, bytes(eth() / eval(layers))) == DROP
    assert prog.counters()["dropped"][reason] == before + 1
    assert [f["verdict"] for f in flow_of(prog, reason=reason, sport=sport)][:1] == ["dropped"]


def test_allowed_ports_and_record_only_targets_pass_and_are_recorded(program: tuple[FlowProgram, object]) -> None:
    from scapy.all import IP, TCP, UDP
    prog, _ = program
    assert run(program, bytes(eth() / IP(src=AGENT, dst=DB) / TCP(sport=40200, dport=9187, flags="S"))) == PASS
    assert [f["reason"] for f in flow_of(prog, sport=40200)] == ["allowed-port"]
    assert run(program, bytes(eth() / IP(src=AGENT, dst="198.18.2.20") / UDP(sport=40201, dport=53))) == PASS
    assert [(f["verdict"], f["reason"]) for f in flow_of(prog, sport=40201)] == [("passed", "udp")]
    assert run(program, bytes(eth() / IP(src=AGENT, dst=OTHER) / TCP(sport=40202, dport=80, flags="S"))) == PASS
    assert [(f["verdict"], f["reason"]) for f in flow_of(prog, sport=40202)] == [("passed", "")]
