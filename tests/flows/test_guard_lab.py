"""The bypass guard and the flow ledger in the lab (issue 18).

One lab with the proxy, the guard on and the audit log on. From the agent's namespace,
scapy sends one packet of each bypass class towards the database; a raw capture in the db
namespace, ended by a canary sent after them, sees none arrive, and the ledger (the
proxy's control socket) shows each flow dropped with its reason. The probes are sent with
the gateway's nftables table removed, so what stops them is the guard alone; the table is
put back afterwards. psql through the proxy still works, and every session has its flow in
the audit log; a connection made by hand around the proxy (the guard set to record only,
the divert removed) is recorded as ``flow.unmatched``.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from typing import Any

import pytest

from appliance.audit.reader import AuditReader, parse
from appliance.lab import Lab, topology
from tests.e2e.conftest import wait_for

pytestmark = pytest.mark.lab

CANARY = {4: "198.18.9.10", 6: "fd7a:6c67:9::10"}
AGENT = {4: topology.AGENT_V4, 6: topology.AGENT_V6}
DB = {4: topology.DB_PROTECTED_V4, 6: topology.DB_PROTECTED_V6}
DIRECT = {4: topology.DB_DIRECT_V4, 6: topology.DB_DIRECT_V6}
SPOOFED = {4: "203.0.113.7", 6: "2001:db8:77::7"}

# Runs in the db namespace: `python -c CAPTURE TOKEN DEADLINE`. Every IPv4/IPv6 packet that
# arrives on eth0 (any protocol, fragments and extension headers too) until the canary (UDP
# carrying TOKEN) does, as [src, dst, first next-header]. The deadline is a safety net only.
CAPTURE = r'''
import ipaddress, json, socket, sys, time
token, deadline = sys.argv[1].encode(), time.monotonic() + float(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
s.bind(("eth0", 0))
print("ready", flush=True)
seen, done = [], False
while not done and time.monotonic() < deadline:
    s.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        frame, addr = s.recvfrom(65535)
    except TimeoutError:
        break
    if addr[2] == socket.PACKET_OUTGOING:
        continue
    kind, ip = int.from_bytes(frame[12:14], "big"), frame[14:]
    if kind == 0x0800:
        proto, src, dst, l4 = ip[9], ip[12:16], ip[16:20], ip[(ip[0] & 15) * 4:]
    elif kind == 0x86DD:
        proto, src, dst, l4 = ip[6], ip[8:24], ip[24:40], ip[40:]
    else:
        continue
    if proto == 17 and l4[8:] == token:
        done = True
        continue
    seen.append([str(ipaddress.ip_address(src)), str(ipaddress.ip_address(dst)), proto])
print(json.dumps({"canary": done, "seen": seen}), flush=True)
'''

# Runs in the agent namespace: `python -c PROBE JSON`. Each probe is scapy text evaluated
# with IP/IPv6 layers at hand (SRC, DST and TCP/UDP/ICMP names bound); sent through a raw
# socket of its family, then the canary.
PROBE = r'''
import json, socket, sys
from scapy.all import IP, IPv6, TCP, UDP, ICMP, ICMPv6EchoRequest, IPOption_RR, Raw
from scapy.layers.inet6 import IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting
spec = json.loads(sys.argv[1])
socks = {4: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW),
         6: socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)}
for family, dst, text in spec["probes"]:
    packet = eval(text)
    socks[family].sendto(bytes(packet), (dst, 0))
for family, dst, token in spec["canaries"]:
    ip = IP(dst=dst) if family == 4 else IPv6(dst=dst)
    socks[family].sendto(bytes(ip / UDP(sport=9, dport=9) / token.encode()), (dst, 0))
print("sent", flush=True)
'''


def probes() -> list[tuple[int, str, str, dict[str, Any]]]:
    """(family, destination, scapy text, the ledger entry it must make)."""
    out: list[tuple[int, str, str, dict[str, Any]]] = []
    for family in (4, 6):
        a, d, x = AGENT[family], DB[family], DIRECT[family]
        ip = f"IP(src='{a}', dst='{{}}')" if family == 4 else f"IPv6(src='{a}', dst='{{}}')"
        icmp = "ICMP(type=8, id={})" if family == 4 else "ICMPv6EchoRequest(id={})"
        icmp_proto = "icmp" if family == 4 else "icmpv6"
        base = 41000 + family * 100
        out += [
            (family, d, ip.format(d) + f" / TCP(sport={base + 1}, dport=22, flags='S')",
             {"protocol": "tcp", "dst": d, "sport": base + 1, "reason": "other-port"}),
            (family, x, ip.format(x) + f" / TCP(sport={base + 2}, dport=5432, flags='S')",
             {"protocol": "tcp", "dst": x, "sport": base + 2, "reason": "other-port"}),
            (family, d, ip.format(d) + f" / UDP(sport={base + 3}, dport=5432) / b'x'",
             {"protocol": "udp", "dst": d, "sport": base + 3, "reason": "udp"}),
            (family, d, ip.format(d) + " / " + icmp.format(base + 4),
             {"protocol": icmp_proto, "dst": d, "sport": base + 4, "reason": "icmp"}),
            (family, d, ip.format(d) + f" / TCP(sport={base + 5}, dport=5432, flags='A', seq=1, ack=1)",
             {"protocol": "tcp", "dst": d, "sport": base + 5, "reason": "not-diverted"}),
            (family, d, ip.format(d) + f" / TCP(sport={base + 6}, dport=5432, flags='PA', seq=1, ack=1) / b'Q'",
             {"protocol": "tcp", "dst": d, "sport": base + 6, "reason": "not-diverted"}),
            (family, d, ip.format(d).replace(f"src='{a}'", f"src='{SPOOFED[family]}'")
             + f" / TCP(sport={base + 7}, dport=5432, flags='S')",
             {"protocol": "tcp", "src": SPOOFED[family], "dst": d, "sport": base + 7, "reason": "source-not-agent"}),
        ]
    a4, d4 = AGENT[4], DB[4]
    out += [
        (4, d4, f"IP(src='{a4}', dst='{d4}', flags='MF', id=7001) / TCP(sport=41501, dport=5432, flags='S')",
         {"protocol": "tcp", "dst": d4, "sport": 0, "reason": "fragment"}),
        (4, d4, f"IP(src='{a4}', dst='{d4}', frag=100, proto=17, id=7002) / Raw(b'y' * 16)",
         {"protocol": "udp", "dst": d4, "sport": 0, "reason": "fragment"}),
        (4, d4, f"IP(src='{a4}', dst='{d4}', options=[IPOption_RR()]) / TCP(sport=41503, dport=5432, flags='S')",
         {"protocol": "tcp", "dst": d4, "sport": 41503, "reason": "ip-options"}),
        (4, d4, f"IP(src='{a4}', dst='{d4}', proto=47) / Raw(b'gre-ish')",
         {"protocol": "47", "dst": d4, "sport": 0, "reason": "other-protocol"}),
    ]
    a6, d6 = AGENT[6], DB[6]
    out += [
        (6, d6, f"IPv6(src='{a6}', dst='{d6}') / IPv6ExtHdrDestOpt() / TCP(sport=41601, dport=5432, flags='S')",
         {"protocol": "60", "dst": d6, "sport": 0, "reason": "ipv6-extension-headers"}),
        (6, d6, f"IPv6(src='{a6}', dst='{d6}') / IPv6ExtHdrHopByHop() / TCP(sport=41602, dport=5432, flags='S')",
         {"protocol": "0", "dst": d6, "sport": 0, "reason": "ipv6-extension-headers"}),
        (6, d6, f"IPv6(src='{a6}', dst='{d6}') / IPv6ExtHdrRouting() / TCP(sport=41603, dport=5432, flags='S')",
         {"protocol": "43", "dst": d6, "sport": 0, "reason": "ipv6-extension-headers"}),
        (6, d6, (f"IPv6(src='{a6}', dst='{d6}') / IPv6ExtHdrFragment(m=1, id=7003) / TCP(sport=41604, dport=5432, "
         "flags='S')"),
         {"protocol": "44", "dst": d6, "sport": 0, "reason": "fragment"}),
    ]
    return out


@pytest.fixture(scope="module")
def lab(lab_host: None) -> Iterator[Lab]:
    lab = Lab.create(owner_pid=os.getpid(), proxy=True, agent_auth="trust", policy="permissive", audit="write")
    with lab:
        for family, canary in CANARY.items():
            v = "-4" if family == 4 else "-6"
            lab.exec("db", ["ip", v, "addr", "add", f"{canary}/{32 if family == 4 else 128}", "dev", "lo"],
                     check=True)
            lab.exec("gw", ["ip", v, "route", "add", canary, "via", DB[family]], check=True)
        yield lab


def divert(lab: Lab, up: bool) -> None:
    """Remove the gateway's nftables table (divert and filter), or put it back."""
    if up:
        argv = [sys.executable, "-m", "appliance.cli", "intercept", "up", "-c", str(lab.config_path)]
    else:
        argv = ["nft", "delete", "table", "inet", "tollgate"]
    done = lab.exec("gw", argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def send(lab: Lab, batch: list[tuple[int, str, str]]) -> list[list[Any]]:
    """Send ``batch`` from the agent, then a canary per family; what of it reached the db."""
    token = f"canary-{secrets.token_hex(8)}"
    capture = subprocess.Popen(lab.command("db", [sys.executable, "-c", CAPTURE, token, "60"]),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=lab.env())
    try:
        assert capture.stdout is not None and capture.stdout.readline() == "ready\n"
        spec = {"probes": batch, "canaries": [[4, CANARY[4], token]]}
        sent = lab.exec("agent", [sys.executable, "-c", PROBE, json.dumps(spec)], capture_output=True, text=True,
                        timeout=120)
        assert sent.stdout == "sent\n", sent.stderr
        out, err = capture.communicate(timeout=90)
    finally:
        if capture.poll() is None:
            capture.kill()
            capture.communicate(timeout=30)
    result = json.loads(out)
    assert result["canary"], f"the canary never arrived (safety-net deadline): {result} {err}"
    sources = set(AGENT.values()) | set(SPOOFED.values())
    return [seen for seen in result["seen"] if seen[0] in sources]


def test_the_guard_attached_and_says_so(lab: Lab) -> None:
    flows = lab.status()["proxy"]["flows"]
    assert (flows["mode"], flows["state"]) == ("guard", "guard")
    assert sorted(flows["attached"]) == ["eth0/egress", "eth0/ingress"]
    human = subprocess.run([sys.executable, "-m", "appliance.cli", "lab", "status", "--name", lab.name],
                           capture_output=True, text=True, timeout=60, env=lab.env())
    assert "  flows  mode guard, guard (eth0/ingress, eth0/egress)" in human.stdout, human.stdout + human.stderr
    assert "flows: attached to eth0 (guard)" in lab.proxy_log.read_text()


def test_each_bypass_class_is_dropped_by_the_guard_alone(lab: Lab) -> None:
    batch = probes()
    divert(lab, up=False)
    try:
        arrived = send(lab, [[family, dst, text] for family, dst, text, _ in batch])
    finally:
        divert(lab, up=True)
    assert arrived == []
    flows = lab.flows_status(verdict="dropped")["flows"]
    for _, _, text, expected in batch:
        want = {"src": AGENT[4] if ":" not in expected["dst"] else AGENT[6], "verdict": "dropped", **expected}
        if want["sport"] == 0:
            del want["sport"]  # a fragment or an extension-header chain: no ports are read
        assert any(all(f.get(k) == v for k, v in want.items()) for f in flows), (text, want, flows)
    counters = lab.flows_status(status_only=True)["counters"]["dropped"]
    for reason in ("other-port", "udp", "icmp", "not-diverted", "source-not-agent", "fragment", "ip-options",
                   "other-protocol", "ipv6-extension-headers"):
        assert counters.get(reason, 0) >= 1, (reason, counters)


def test_control_the_canary_path_passes_and_is_in_the_ledger(lab: Lab) -> None:
    """What the capture can see: a SYN to an unprotected address arrives, recorded as passed."""
    arrived = send(lab, [[4, CANARY[4], (f"IP(src='{AGENT[4]}', dst='{CANARY[4]}') / TCP(sport=41900, dport=7, "
                                        "flags='S')")]])
    assert [AGENT[4], CANARY[4], 6] in arrived
    flows = lab.flows_status(dst=CANARY[4], dport=7)["flows"]
    assert [(f["verdict"], f["sport"]) for f in flows] == [("passed", 41900)]


def audit_records(lab: Lab) -> list[dict[str, Any]]:
    return [parse(entry.line) for entry in AuditReader(lab.audit_dir).records()]


def wait_for_records(lab: Lab, done: Any, what: str, timeout: float = 60.0) -> list[dict[str, Any]]:
    """The audit records once ``done(records)`` holds: the ledger writes a flow when the
    kernel reports it closed and its session is known (a second or so)."""
    def ready() -> list[dict[str, Any]] | None:
        records = audit_records(lab)
        return records if done(records) else None
    return wait_for(ready, f"{what} in the audit log", timeout=timeout, interval=0.2)


def psql(lab: Lab, conninfo: str, node: str = "agent") -> str:
    out = lab.exec(node, ["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", conninfo, "-c",
                          "SELECT inet_server_addr()"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_every_session_has_its_flow(lab: Lab) -> None:
    for ipv6 in (False, True, False):
        psql(lab, lab.conninfo(ipv6=ipv6))

    def complete(records: list[dict[str, Any]]) -> bool:
        starts = {r["session"] for r in records if r["type"] == "session.start"}
        flows = {r.get("session") for r in records if r["type"] == "flow" and r["verdict"] == "intercepted"}
        return len(starts) >= 3 and starts <= flows

    records = wait_for_records(lab, complete, "a flow for each session")
    by_session = {r["session"]: r for r in records if r["type"] == "flow" and r.get("session")}
    for start in (r for r in records if r["type"] == "session.start"):
        flow = by_session[start["session"]]
        assert flow["origin"] == start["origin"]
        assert flow["dport"] == 5432 and flow["end"] in ("closed", "reset")
        assert flow["packets_in"] > 0 and flow["packets_out"] > 0 and "S" in flow["tcp_flags_in"]
    assert not [r for r in records if r["type"] == "flow.unmatched"]


def tollgate(lab: Lab, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "appliance.cli", "flows", "-c", str(lab.config_path), *args],
                          capture_output=True, text=True, timeout=120, env=lab.env())
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_tollgate_flows_shows_live_and_recorded_flows(lab: Lab) -> None:
    live = json.loads(tollgate(lab, "--json", "--verdict", "dropped", "--reason", "udp"))
    assert live["state"] == "guard" and live["counters"]["dropped"]["udp"] >= 2
    assert {f["reason"] for f in live["flows"]} == {"udp"} and len(live["flows"]) >= 2
    recorded = [json.loads(line) for line in tollgate(lab, "--recorded", "--json", "--verdict", "intercepted")
                .splitlines()]
    assert recorded and {r["type"] for r in recorded} == {"flow"}
    assert all(r["dport"] == 5432 and r.get("session") for r in recorded)
    text = tollgate(lab, "--counters")
    assert text.startswith("guard: mode guard, guard on eth0/") and "dropped: " in text


def test_a_sessions_bundle_holds_its_flow_and_verifies(lab: Lab) -> None:
    """Flow records are records like any other: exported with their session, verified."""
    flow = next(r for r in audit_records(lab) if r["type"] == "flow" and r.get("session"))
    bundle = lab.dir / "flow-bundle.tar.gz"
    done = subprocess.run([sys.executable, "-m", "appliance.cli", "audit", "export", "-c", str(lab.config_path),
                           "--session", flow["session"], "-o", str(bundle), "--no-progress"],
                          capture_output=True, text=True, timeout=120, env=lab.env())
    assert done.returncode == 0, done.stderr
    with tarfile.open(bundle) as tar:
        text = b"".join(tar.extractfile(m).read() for m in tar.getmembers()  # type: ignore[union-attr]
                        if m.isfile() and m.name.endswith(".jsonl"))
    assert f'"session":"{flow["session"]}"'.encode() in text and b'"type":"flow"' in text
    root_key = (lab.audit_dir / "keys" / "root.pub").read_text().strip()
    verified = subprocess.run([sys.executable, "-m", "appliance.audit.verifier", str(bundle), "--root-key", root_key],
                              capture_output=True, text=True, timeout=120, env=lab.env())
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "records valid" in verified.stdout


def test_a_connection_around_the_proxy_is_unmatched(lab: Lab) -> None:
    """The guard set to record only and the divert removed: the agent reaches PostgreSQL
    itself. The ledger sees an intercepted flow no session matches."""
    lab.set_flows("ledger")
    divert(lab, up=False)
    try:
        assert psql(lab, lab.conninfo(with_password=True)) == topology.DB_PROTECTED_V4
    finally:
        divert(lab, up=True)
    records = wait_for_records(lab, lambda rs: any(r["type"] == "flow.unmatched" for r in rs), "flow.unmatched")
    unmatched = [r for r in records if r["type"] == "flow.unmatched"]
    assert [(r["what"], r["object"]) for r in unmatched] == [("flow-without-session", "flow:198.18.2.10:5432")]
    lab.set_flows("guard")
    assert lab.status()["proxy"]["flows"]["state"] == "guard"
