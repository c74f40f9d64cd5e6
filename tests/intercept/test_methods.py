"""Both intercept methods for real: nftables, policy routing and sockets in a lab of namespaces.

Three network namespaces made for this module — agent, gateway (the appliance) and db —
joined by veth pairs, IPv4 and IPv6. ``tollgate intercept up`` runs in the gateway; a
stand-in proxy there (the method's own ``prepare_listener`` and ``original_destination``)
answers each connection with what it learnt; listeners in db answer with theirs. Nothing
here touches the host's own namespace: every command runs through ``ip netns exec`` or
``ip -n``, and the namespaces (with everything in them) are deleted afterwards.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(not shutil.which("ip"), reason="needs iproute2"),
]

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
NFT = shutil.which("nft") or "/usr/sbin/nft"
PROXY_PORT = 15432
ROUTE_TABLE = 7468
TPROXY_MARK = 0x746D

AGENT4, GW_AGENT4, GW_DB4, DB4 = "198.18.1.2", "198.18.1.1", "198.18.2.1", "198.18.2.10"
AGENT6, GW_AGENT6, GW_DB6, DB6 = "fd7a:6c67:1::2", "fd7a:6c67:1::1", "fd7a:6c67:2::1", "fd7a:6c67:2::10"
# The database's other address (protected by protected_subnets, not a target) and an
# unprotected host beside it in the db namespace, where the capture's canary goes.
DB4_OTHER, DB6_OTHER = "198.18.2.11", "fd7a:6c67:2::11"
CANARY4, CANARY6 = "198.18.2.20", "fd7a:6c67:2::20"
PROTECTED = ("198.18.2.10/31", "fd7a:6c67:2::10/127")

# Runs inside a namespace: `python -c HELPER VERB ARGS...`. Servers print "ready" once
# listening, then answer each connection with one line.
HELPER = r'''
import ipaddress, json, selectors, socket, sys
from appliance.config import Endpoint, normalize_address, load_config
from appliance.intercept import get_method

def listeners(port, dual, prepare):
    specs = [(socket.AF_INET6, "::")] if dual else [(socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")]
    socks = []
    for family, host in specs:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual else 1)
        prepare(s)
        s.bind((host, port))
        s.listen(64)
        socks.append(s)
    return socks

def endpoint(sockaddr):
    return Endpoint(normalize_address(ipaddress.ip_address(sockaddr[0])), sockaddr[1])

def serve(socks, answer):
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            conn, _ = key.fileobj.accept()
            with conn:
                try:
                    line = answer(conn)
                except Exception as exc:
                    line = f"error {type(exc).__name__}: {exc}"
                conn.sendall(line.encode() + b"\n")

verb, args = sys.argv[1], sys.argv[2:]
if verb == "proxy":  # proxy METHOD split|dual PORT
    method = get_method(args[0])
    socks = listeners(int(args[2]), args[1] == "dual", method.prepare_listener)
    serve(socks, lambda c: f"proxy {method.original_destination(c)} {endpoint(c.getpeername()).address}")
elif verb == "db":  # db PORT...
    socks = [s for port in args for s in listeners(int(port), False, lambda s: None)]
    serve(socks, lambda c: f"db {endpoint(c.getsockname())} {endpoint(c.getpeername()).address}")
elif verb == "connect":  # connect HOST PORT [CONFIG]  (with CONFIG: marked as a proxy upstream)
    host, port = args[0], int(args[1])
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(10)
    if len(args) > 2:
        config = load_config(args[2])
        get_method(config.intercept.method).prepare_upstream(s, config)
    s.connect((host, port))
    print(s.makefile().readline().strip())
elif verb == "routing":  # routing TABLE: every rule, and the routes in TABLE, via pyroute2
    from pyroute2 import IPRoute
    table = int(args[0])
    with IPRoute() as ipr:
        rules = [[r["family"], r.get("priority") or 0, r.get("fwmark"), r.get("table")]
                 for family in (socket.AF_INET, socket.AF_INET6) for r in ipr.get_rules(family=family)]
        routes = [[r["family"], r["type"], r["dst_len"]]
                  for family in (socket.AF_INET, socket.AF_INET6) for r in ipr.get_routes(family=family)
                  if r.get("table") == table]
    print(json.dumps({"rules": rules, "routes": routes}))
'''

# Runs in the db namespace: `python -c CAPTURE TOKEN DEADLINE`. Captures every IPv4/IPv6
# packet arriving on eth0 from the agent until the canary (UDP carrying TOKEN) arrives,
# then prints them as JSON, canary excluded. The deadline is only a safety net: the
# capture ends on the canary, and a capture that hits the deadline says so.
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
    if proto not in (6, 17):
        continue
    sport, dport = int.from_bytes(l4[0:2], "big"), int.from_bytes(l4[2:4], "big")
    if proto == 17 and l4[8:] == token:
        done = True
        continue
    flags = "".join(c for i, c in enumerate("FSRPAU") if proto == 6 and l4[13] & (1 << i))
    seen.append([str(ipaddress.ip_address(src)), str(ipaddress.ip_address(dst)),
                 "tcp" if proto == 6 else "udp", dport, sport, flags])
print(json.dumps({"canary": done, "seen": seen}), flush=True)
'''

# Runs in the agent namespace: `python -c PROBE JSON`. Crafts each packet with scapy and
# sends it, then the canary, through one raw socket per family (the kernel routes them and
# resolves neighbours, so they leave exactly as crafted, in order).
PROBE = r'''
import json, socket, sys
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
spec = json.loads(sys.argv[1])
family = spec["family"]
ip = (lambda dst: IP(src=spec["src"], dst=dst)) if family == 4 else (lambda dst: IPv6(src=spec["src"], dst=dst))
s = socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
for p in spec["probes"]:
    if p["proto"] == "tcp":
        options = [("MD5", b"\x00" * 16)] if p["md5"] else []
        layer = TCP(sport=p["sport"], dport=p["dport"], flags=p["flags"], seq=p["seq"], ack=p["ack"],
                    window=64240, options=options)
    else:
        layer = UDP(sport=p["sport"], dport=p["dport"]) / b"probe"
    s.sendto(bytes(ip(p["dst"]) / layer), (p["dst"], 0))
canary_dst, canary_port, token = spec["canary"]
s.sendto(bytes(ip(canary_dst) / UDP(sport=9, dport=canary_port) / token.encode()), (canary_dst, 0))
print("sent", flush=True)
'''


@dataclass(frozen=True)
class Probe:
    """One packet the agent crafts: a SYN (optionally with a TCP-MD5 option) or a UDP datagram."""

    dst: str
    proto: str
    dport: int
    sport: int
    seq: int = 1_000_000
    md5: bool = False
    flags: str = "S"
    ack: int = 0

    def seen_as(self) -> tuple[object, ...]:
        """How the capture reports this packet, if it arrives (source address aside)."""
        flags = "".join(c for c in "FSRPAU" if c in self.flags) if self.proto == "tcp" else ""
        return (self.dst, self.proto, self.dport, self.sport, flags)


# Per family: the database's target address, its other address, the agent, the canary.
DBS = {4: (DB4, DB4_OTHER, AGENT4, CANARY4), 6: (DB6, DB6_OTHER, AGENT6, CANARY6)}


def tollgate_argv() -> list[str]:
    return [PY, "-m", "appliance.cli"]


def run(*cmd: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result


@dataclass
class Lab:
    agent: str
    gw: str
    db: str
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def exec(self, ns: str, *cmd: str, check: bool = True,
             stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", ns, *cmd, check=check, stdin=stdin)

    def tollgate(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.exec(self.gw, *tollgate_argv(), *args, check=check)

    def helper(self, ns: str, *args: str) -> str:
        return self.exec(ns, PY, "-c", HELPER, *args).stdout.strip()

    def connect(self, ns: str, host: str, port: int, config: Path | None = None) -> str:
        return self.helper(ns, "connect", host, str(port), *([str(config)] if config else []))

    def start(self, ns: str, *args: str, script: str = HELPER) -> subprocess.Popen[str]:
        """Start a helper server in ``ns`` and wait until it says it is listening."""
        proc = subprocess.Popen(["ip", "netns", "exec", ns, PY, "-c", script, *args], cwd=REPO, text=True,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.procs.append(proc)
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if line != "ready\n":
            stop(proc)
            raise AssertionError(f"helper {args} did not start: {line!r} {proc.stderr.read()}")  # type: ignore[union-attr]
        return proc

    def probe(self, family: int, probes: list[Probe]) -> list[tuple[object, ...]]:
        """Send ``probes`` from the agent, then a canary; what of them reached the db namespace.

        The capture in db is listening before anything is sent and ends when the canary
        arrives: the canary leaves after every probe, from one CPU through one path, so
        a probe that got through would have been captured before it.
        """
        _db, _other, agent, canary = DBS[family]
        token = f"canary-{secrets.token_hex(8)}"
        capture = self.start(self.db, token, "60", script=CAPTURE)
        try:
            spec = {"family": family, "src": agent, "canary": [canary, 9, token],
                    "probes": [{"dst": p.dst, "proto": p.proto, "dport": p.dport, "sport": p.sport, "seq": p.seq,
                                "md5": p.md5, "flags": p.flags, "ack": p.ack} for p in probes]}
            pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
            assert self.exec(self.agent, *pin, PY, "-c", PROBE, json.dumps(spec)).stdout == "sent\n"
            out, err = capture.communicate(timeout=90)
        finally:
            stop(capture)
            self.procs.remove(capture)
        result = json.loads(out)
        assert result["canary"], f"the canary never arrived (safety-net deadline): {result} {err}"
        return [tuple(seen[1:]) for seen in result["seen"] if seen[0] == agent]

    def nft_tables(self) -> str:
        return self.exec(self.gw, NFT, "list", "tables").stdout

    def routing(self) -> dict[str, list[list[int]]]:
        return json.loads(self.helper(self.gw, "routing", str(ROUTE_TABLE)))


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=30)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    prefix = f"tgt-{os.getpid()}-{secrets.token_hex(3)}"
    lab = Lab(f"{prefix}-agent", f"{prefix}-gw", f"{prefix}-db")
    created: list[str] = []
    try:
        for ns in (lab.agent, lab.gw, lab.db):
            run("ip", "netns", "add", ns)
            created.append(ns)
        # veth pairs are made inside the namespaces, so no link ever exists in the host's.
        run("ip", "-n", lab.agent, "link", "add", "eth0", "type", "veth", "peer", "name", "agents", "netns", lab.gw)
        run("ip", "-n", lab.db, "link", "add", "eth0", "type", "veth", "peer", "name", "dbs", "netns", lab.gw)
        for ns, dev, addrs in (
            (lab.agent, "eth0", (f"{AGENT4}/24", f"{AGENT6}/64")),
            (lab.gw, "agents", (f"{GW_AGENT4}/24", f"{GW_AGENT6}/64")),
            (lab.gw, "dbs", (f"{GW_DB4}/24", f"{GW_DB6}/64")),
            (lab.db, "eth0", (f"{DB4}/24", f"{DB6}/64", f"{DB4_OTHER}/24", f"{DB6_OTHER}/64", f"{CANARY4}/24",
                              f"{CANARY6}/64")),
        ):
            for addr in addrs:
                # nodad: an IPv6 address is usable at once, not after duplicate detection.
                run("ip", "-n", ns, "addr", "add", addr, "dev", dev, *(["nodad"] if ":" in addr else []))
            run("ip", "-n", ns, "link", "set", dev, "up")
        for ns in (lab.agent, lab.gw, lab.db):
            run("ip", "-n", ns, "link", "set", "lo", "up")
        for ns, via4, via6 in ((lab.agent, GW_AGENT4, GW_AGENT6), (lab.db, GW_DB4, GW_DB6)):
            run("ip", "-n", ns, "route", "add", "default", "via", via4)
            run("ip", "-n", ns, "-6", "route", "add", "default", "via", via6)
        lab.exec(lab.gw, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        # The database: protected port 5432 and unprotected 5433.
        lab.start(lab.db, "db", "5432", "5433")
        yield lab
    finally:
        for proc in lab.procs:
            stop(proc)
        for ns in created:
            subprocess.run(["ip", "netns", "delete", ns], check=False)


def write_config(path: Path, method: str, agent_subnets: tuple[str, ...] = ("198.18.1.0/24", "fd7a:6c67:1::/64"),
                 targets: tuple[str, ...] = (f"{DB4}:5432", f"[{DB6}]:5432"), interfaces: tuple[str, ...] = (),
                 protected: tuple[str, ...] = PROTECTED, allow_ports: tuple[int, ...] = (5433,)) -> Path:
    path.write_text(
        f"[proxy]\nlisten_port = {PROXY_PORT}\n"
        f"[intercept]\nmethod = \"{method}\"\n"
        f"agent_subnets = {json.dumps(list(agent_subnets))}\n"
        f"agent_interfaces = {json.dumps(list(interfaces))}\n"
        f"protected_subnets = {json.dumps(list(protected))}\n"
        f"route_table = {ROUTE_TABLE}\ntproxy_mark = {TPROXY_MARK}\n"
        f"[[targets]]\nname = \"orders\"\naddresses = {json.dumps(list(targets))}\n"
        f"allow_ports = {json.dumps(list(allow_ports))}\n"
    )
    return path


@pytest.fixture(params=["redirect", "tproxy"])
def method(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def intercepted(lab: Lab, method: str, tmp_path: Path) -> Iterator[Path]:
    """The intercept up in the gateway (agent interface restricted too) for one test."""
    config = write_config(tmp_path / "tollgate.toml", method, interfaces=("agents",))
    lab.tollgate("intercept", "up", "-c", str(config))
    try:
        yield config
    finally:
        lab.tollgate("intercept", "down", "-c", str(config), check=False)
        assert lab.nft_tables() == ""


@pytest.fixture
def proxy(lab: Lab, method: str, intercepted: Path, request: pytest.FixtureRequest) -> Iterator[None]:
    listener = getattr(request, "param", "split")
    proc = lab.start(lab.gw, "proxy", method, listener, str(PROXY_PORT))
    try:
        yield
    finally:
        stop(proc)
        lab.procs.remove(proc)


@pytest.mark.parametrize("proxy", ["split", "dual"], indirect=True)
@pytest.mark.parametrize("db, agent", [(DB4, AGENT4), (DB6, AGENT6)], ids=["ipv4", "ipv6"])
def test_agent_connection_to_protected_target_is_diverted(lab: Lab, proxy: None, db: str, agent: str) -> None:
    expected_destination = f"[{db}]:5432" if ":" in db else f"{db}:5432"
    assert lab.connect(lab.agent, db, 5432) == f"proxy {expected_destination} {agent}"


@pytest.mark.parametrize("db, agent", [(DB4, AGENT4), (DB6, AGENT6)], ids=["ipv4", "ipv6"])
def test_allowed_port_is_neither_diverted_nor_filtered(lab: Lab, proxy: None, db: str, agent: str) -> None:
    # 5433 is in the target's allow_ports: the one way past the forward filter.
    reply = lab.connect(lab.agent, db, 5433)
    assert reply.startswith("db ") and reply.endswith(f" {agent}") and ":5433" in reply


@pytest.mark.parametrize("db, gw", [(DB4, GW_DB4), (DB6, GW_DB6)], ids=["ipv4", "ipv6"])
def test_gateway_own_connections_are_not_diverted(lab: Lab, proxy: None, intercepted: Path, db: str, gw: str) -> None:
    assert lab.connect(lab.gw, db, 5432).endswith(f" {gw}")
    # As the proxy's upstream connection, with SO_MARK from prepare_upstream.
    reply = lab.connect(lab.gw, db, 5432, config=intercepted)
    assert reply.startswith("db ") and reply.endswith(f" {gw}")


def test_other_interfaces_are_not_diverted_nor_forwarded(lab: Lab, method: str, tmp_path: Path) -> None:
    # The agent's subnet and target match, but it arrives on an interface not listed: the
    # divert doesn't take it, and the forward filter (agent subnet OR agent interface)
    # drops it rather than let it reach the database around the proxy.
    config = str(write_config(tmp_path / "tollgate.toml", method, interfaces=("elsewhere0",)))
    lab.tollgate("intercept", "up", "-c", config)
    try:
        for family in (4, 6):
            probes = [Probe(DBS[family][0], "tcp", 5432, sport=40100 + family)]
            assert lab.probe(family, probes) == []
    finally:
        lab.tollgate("intercept", "down", "-c", config)


def test_bypass_mark_is_never_diverted(lab: Lab, tmp_path: Path) -> None:
    # Locally made connections to a local address pass prerouting (on lo), so with the
    # gateway's loopback as the "agent subnet" only the bypass rule stands between a
    # marked connection and the divert. (tproxy only: NAT binds such connections at output.)
    config = write_config(tmp_path / "lo.toml", "tproxy", agent_subnets=("127.0.0.0/8",),
                          targets=("127.0.0.2:5432",))
    lab.tollgate("intercept", "up", "-c", str(config))
    procs = [lab.start(lab.gw, "proxy", "tproxy", "split", str(PROXY_PORT)), lab.start(lab.gw, "db", "5432")]
    try:
        assert lab.connect(lab.gw, "127.0.0.2", 5432) == "proxy 127.0.0.2:5432 127.0.0.1"
        assert lab.connect(lab.gw, "127.0.0.2", 5432, config=config) == "db 127.0.0.2:5432 127.0.0.1"
    finally:
        for proc in procs:
            stop(proc)
            lab.procs.remove(proc)
        lab.tollgate("intercept", "down", "-c", str(config))


def test_setup_is_idempotent_and_teardown_exact(lab: Lab, method: str, tmp_path: Path) -> None:
    config = str(write_config(tmp_path / "tollgate.toml", method))
    # Someone else's table and rule, which teardown must leave alone.
    lab.exec(lab.gw, NFT, "-f", "-",
             stdin="table inet other {\n\tchain c {\n\t\ttype filter hook input priority 0;\n\t}\n}\n")
    lab.exec(lab.gw, "ip", "rule", "add", "fwmark", "0x99", "lookup", "99", "priority", "1234")
    try:
        lab.tollgate("intercept", "up", "-c", config)
        lab.tollgate("intercept", "up", "-c", config)
        assert lab.nft_tables().split("\n")[:2] == ["table inet other", "table inet tollgate"]
        tollgate_rules = [r for r in lab.routing()["rules"] if r[2] == TPROXY_MARK]
        routes = lab.routing()["routes"]
        if method == "tproxy":
            # One rule and one local default route per family, however often `up` ran.
            assert sorted((r[0], r[3]) for r in tollgate_rules) == [(2, ROUTE_TABLE), (10, ROUTE_TABLE)]
            assert sorted(routes) == [[2, 2, 0], [10, 2, 0]]
        else:
            assert tollgate_rules == [] and routes == []

        lab.tollgate("intercept", "down", "-c", config)
        assert lab.nft_tables() == "table inet other\n"
        state = lab.routing()
        assert [r for r in state["rules"] if r[2] == TPROXY_MARK or r[3] == ROUTE_TABLE] == []
        assert state["routes"] == []
        assert [2, 1234, 0x99, 99] in state["rules"]
        # Down again, with nothing left to remove, is fine.
        lab.tollgate("intercept", "down", "-c", config)
    finally:
        lab.exec(lab.gw, NFT, "delete", "table", "inet", "other", check=False)
        lab.exec(lab.gw, "ip", "rule", "del", "priority", "1234", check=False)


def test_switching_method_leaves_no_tproxy_routing(lab: Lab, tmp_path: Path) -> None:
    tproxy = str(write_config(tmp_path / "tproxy.toml", "tproxy"))
    redirect = str(write_config(tmp_path / "redirect.toml", "redirect"))
    try:
        lab.tollgate("intercept", "up", "-c", tproxy)
        lab.tollgate("intercept", "up", "-c", redirect)
        assert "type nat hook prerouting" in lab.exec(lab.gw, NFT, "list", "table", "inet", "tollgate").stdout
        assert lab.routing()["routes"] == []
        assert [r for r in lab.routing()["rules"] if r[2] == TPROXY_MARK] == []
    finally:
        lab.tollgate("intercept", "down", "-c", tproxy)
    assert lab.nft_tables() == ""


def test_check_reports_support_and_the_filter(lab: Lab, method: str, tmp_path: Path) -> None:
    config = str(write_config(tmp_path / "tollgate.toml", method))
    result = lab.tollgate("intercept", "check", "-c", config, check=False)
    assert result.stdout.startswith(f"{method}: supported: ")
    # Supported, but nothing installed: agents would reach the database directly.
    assert result.returncode == 1
    assert "filter: NOT in force:\n  - table inet tollgate is not installed" in result.stdout
    assert lab.nft_tables() == ""  # a dry run leaves nothing behind
    lab.tollgate("intercept", "up", "-c", config)
    try:
        result = lab.tollgate("intercept", "check", "-c", config)
        assert "\nfilter: in force: table inet tollgate drops invalid agent packets" in result.stdout
        # Someone removes the forward chain: check says so, and fails.
        lab.exec(lab.gw, NFT, "delete", "chain", "inet", "tollgate", "forward")
        result = lab.tollgate("intercept", "check", "-c", config, check=False)
        assert result.returncode == 1
        assert "  - chain forward (filter, hook forward) is missing" in result.stdout
    finally:
        lab.tollgate("intercept", "down", "-c", config)


def test_nft_failure_reports_nft_stderr(lab: Lab) -> None:
    code = ("from appliance.intercept import nft, InterceptError\n"
            "try:\n    nft.apply('table inet broken { chain c { nonsense } }\\n')\n"
            "except InterceptError as exc:\n    print(exc)\n")
    out = lab.exec(lab.gw, PY, "-c", code).stdout
    assert "failed to apply the ruleset" in out and "syntax error" in out
    assert lab.nft_tables() == ""


# --- nothing reaches the database except through the proxy ---------------------------------

def divert_only(text: str) -> str:
    """The ruleset without its guard and forward chains: the divert as it was before them."""
    for chain in ("guard", "forward"):
        start = text.index(f"\tchain {chain} {{\n")
        text = text[:start] + text[text.index("\n\t}\n\n", start) + len("\n\t}\n\n"):]
    return text


def bypass_probes(family: int, sport: int) -> tuple[list[Probe], list[Probe]]:
    """The probes, and those of them the divert alone lets through with ``redirect``."""
    db, other, _agent, _canary = DBS[family]
    seq = 1_000_000
    # (1) A SYN with a TCP-MD5 option is diverted and dropped silently by the proxy's stack
    # (it holds no MD5 key), which pins conntrack's entry in SYN_SENT. The same
    # connection's later segments are then invalid to conntrack — a SYN out of window
    # (on kernels that call it so; 6.18 re-initialises instead), a SYN/FIN, an ACK, data —
    # so NAT never sees them and they are routed on to the database.
    pinned = [Probe(db, "tcp", 5432, sport, seq=seq, md5=True),
              Probe(db, "tcp", 5432, sport, seq=seq - 100_000)]
    invalid = [Probe(db, "tcp", 5432, sport, seq=seq + 1, flags="SF"),
               Probe(db, "tcp", 5432, sport, seq=seq + 1, flags="A", ack=1),
               Probe(db, "tcp", 5432, sport, seq=seq + 1, flags="PA", ack=1)]
    # (2) another port of the database's address, (3) its other address, (4) another protocol.
    others = [Probe(db, "tcp", 5434, sport + 1), Probe(other, "tcp", 5432, sport + 2),
              Probe(db, "udp", 5432, sport + 3)]
    return [*pinned, *invalid, *others], invalid


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_nothing_reaches_the_database_except_through_the_proxy(lab: Lab, method: str, proxy: None,
                                                               intercepted: Path, family: int) -> None:
    db, _other, agent, _canary = DBS[family]
    shown = lab.tollgate("intercept", "show", "-c", str(intercepted)).stdout
    # Control: the divert alone, as before the filter. Other ports, addresses and
    # protocols get through, and with redirect the pinned connection's invalid segments
    # too (tproxy diverts them locally): the probes are packets the database would take.
    lab.exec(lab.gw, NFT, "-f", "-", stdin=divert_only(shown))
    probes, invalid = bypass_probes(family, 41000 + 10 * family)
    expected = [p.seen_as() for p in (invalid if method == "redirect" else []) + probes[-3:]]
    # (The database answers what reaches it, and the agent's kernel resets what it never
    # opened: those RSTs are the agent's too, but no probe.)
    assert sorted(seen for seen in lab.probe(family, probes) if seen[-1] != "R") == sorted(expected)

    # The whole ruleset: nothing gets through.
    lab.tollgate("intercept", "up", "-c", str(intercepted))
    assert "\nfilter: in force" in lab.tollgate("intercept", "check", "-c", str(intercepted)).stdout
    probes, _invalid = bypass_probes(family, 42000 + 10 * family)
    assert lab.probe(family, probes) == []
    # While a connection through the proxy works as before …
    expected_destination = f"[{db}]:5432" if family == 6 else f"{db}:5432"
    assert lab.connect(lab.agent, db, 5432) == f"proxy {expected_destination} {agent}"
    # … and so does the proxy's own upstream connection, which leaves from the gateway
    # itself (output, never forward) marked with the bypass mark.
    assert lab.connect(lab.gw, db, 5432, config=intercepted).startswith("db ")
