"""The eBPF programs' own cost per packet, from the kernel's BPF_PROG_TEST_RUN: each kind
of packet run through tg_ingress (or tg_egress) a million times by the kernel, which
reports the mean time per run. Load from other processes inflates it less than it does a
pgbench run, which is why the bench reports it beside the TPS comparison.

Nothing is attached: the programs are loaded with a config of their own (the lab's
addresses) and given packets directly.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path
from typing import Any

REPEAT = 1_000_000


class _TestRunOpts(ctypes.Structure):
    # libbpf's struct bpf_test_run_opts (libbpf 1.x)
    _fields_ = [("sz", ctypes.c_size_t), ("data_in", ctypes.c_void_p), ("data_out", ctypes.c_void_p),
                ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
                ("ctx_in", ctypes.c_void_p), ("ctx_out", ctypes.c_void_p),
                ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
                ("retval", ctypes.c_uint32), ("repeat", ctypes.c_int), ("duration", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32)]


def _run(lib: Any, fd: int, frame: bytes, repeat: int) -> tuple[int, int]:
    """(return code, mean ns per run) of the program ``fd`` on ``frame``."""
    buf = ctypes.create_string_buffer(frame, len(frame))
    out = ctypes.create_string_buffer(len(frame) + 256)
    opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts), data_in=ctypes.cast(buf, ctypes.c_void_p),
                        data_out=ctypes.cast(out, ctypes.c_void_p), data_size_in=len(frame),
                        data_size_out=len(out), repeat=repeat)
    err = lib.bpf_prog_test_run_opts(fd, ctypes.byref(opts))
    if err != 0:
        raise OSError(-err, f"bpf_prog_test_run_opts: {err}")
    return opts.retval, opts.duration


def _frames() -> dict[str, tuple[str, bytes]]:
    from scapy.all import ICMP, IP, TCP, UDP, Ether, Raw  # scapy: a test extra, installed for the bench too
    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    agent, db, other = "198.18.1.10", "198.18.2.10", "198.18.9.10"
    return {
        "syn of a diverted connection": ("ingress", bytes(eth / IP(src=agent, dst=db) / TCP(sport=40000,
                                                                                                  dport=5432,
                                                                                                  flags="S"))),
        "data of a diverted connection": ("ingress", bytes(eth / IP(src=agent, dst=db) / TCP(
            sport=40000, dport=5432, flags="PA") / Raw(b"Q" * 64))),
        "answer to the agent (egress)": ("egress", bytes(eth / IP(src=db, dst=agent) / TCP(
            sport=5432, dport=40000, flags="PA") / Raw(b"D" * 64))),
        "dropped: udp to the database": ("ingress", bytes(eth / IP(src=agent, dst=db) / UDP(sport=40001,
                                                                                               dport=5432))),
        "passed: not protected": ("ingress", bytes(eth / IP(src=agent, dst=other) / ICMP())),
    }


def measure(repeat: int = REPEAT) -> dict[str, Any]:
    """Mean ns per packet for each kind, and the programs' verdicts (0 pass, 2 drop)."""
    from appliance.config import parse_config
    from appliance.flows.bpf import FlowProgram
    lib = ctypes.CDLL(ctypes.util.find_library("bpf") or "libbpf.so.1", use_errno=True)
    lib.bpf_prog_test_run_opts.argtypes = [ctypes.c_int, ctypes.c_void_p]
    config = parse_config(
        "[intercept]\nagent_subnets = ['198.18.1.0/24']\nprotected_subnets = ['198.18.2.0/24']\n"
        "[[targets]]\nname = 'a'\naddresses = ['198.18.2.10:5432']\n[targets.credentials.app]\npassword = 'x'\n",
        Path("(bench)"))
    program = FlowProgram(config, ("(none)",), guard=True)
    program.load()
    try:
        fds = {"ingress": program.ingress.fd, "egress": program.egress.fd}
        out: dict[str, Any] = {"repeat": repeat, "ns_per_packet": {}, "retval": {}}
        for name, (direction, frame) in _frames().items():
            retval, ns = _run(lib, fds[direction], frame, repeat if not name.startswith("syn") else 1)
            if name.startswith("syn"):  # once, to make the flow the next ones belong to; then timed
                retval, ns = _run(lib, fds[direction], frame, repeat)
            out["ns_per_packet"][name] = ns
            out["retval"][name] = retval
        return out
    finally:
        program.close()


def line(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"eBPF per packet: FAILED: {result['error']}"
    parts = ", ".join(f"{name} {ns} ns" for name, ns in result["ns_per_packet"].items())
    return f"eBPF per packet (BPF_PROG_TEST_RUN, mean of {result['repeat']:,}): {parts}"


if __name__ == "__main__":
    print(line(measure()))
