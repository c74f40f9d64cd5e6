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

    def start(self, ns: str, *args: str) -> subprocess.Popen[str]:
        """Start a helper server in ``ns`` and wait until it says it is listening."""
        proc = subprocess.Popen(["ip", "netns", "exec", ns, PY, "-c", HELPER, *args], cwd=REPO, text=True,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.procs.append(proc)
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if line != "ready\n":
            stop(proc)
            raise AssertionError(f"helper {args} did not start: {line!r} {proc.stderr.read()}")  # type: ignore[union-attr]
        return proc

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
            (lab.db, "eth0", (f"{DB4}/24", f"{DB6}/64")),
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
                 targets: tuple[str, ...] = (f"{DB4}:5432", f"[{DB6}]:5432"), interfaces: tuple[str, ...] = ()) -> Path:
    path.write_text(
        f"[proxy]\nlisten_port = {PROXY_PORT}\n"
        f"[intercept]\nmethod = \"{method}\"\n"
        f"agent_subnets = {json.dumps(list(agent_subnets))}\n"
        f"agent_interfaces = {json.dumps(list(interfaces))}\n"
        f"route_table = {ROUTE_TABLE}\ntproxy_mark = {TPROXY_MARK}\n"
        f"[[targets]]\nname = \"orders\"\naddresses = {json.dumps(list(targets))}\n"
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
def test_unprotected_port_is_not_diverted(lab: Lab, proxy: None, db: str, agent: str) -> None:
    reply = lab.connect(lab.agent, db, 5433)
    assert reply.startswith("db ") and reply.endswith(f" {agent}") and ":5433" in reply


@pytest.mark.parametrize("db, gw", [(DB4, GW_DB4), (DB6, GW_DB6)], ids=["ipv4", "ipv6"])
def test_gateway_own_connections_are_not_diverted(lab: Lab, proxy: None, intercepted: Path, db: str, gw: str) -> None:
    assert lab.connect(lab.gw, db, 5432).endswith(f" {gw}")
    # As the proxy's upstream connection, with SO_MARK from prepare_upstream.
    reply = lab.connect(lab.gw, db, 5432, config=intercepted)
    assert reply.startswith("db ") and reply.endswith(f" {gw}")


def test_other_interfaces_are_not_diverted(lab: Lab, method: str, tmp_path: Path) -> None:
    # The agent's subnet and target match, but it arrives on an interface not listed.
    config = str(write_config(tmp_path / "tollgate.toml", method, interfaces=("elsewhere0",)))
    lab.tollgate("intercept", "up", "-c", config)
    try:
        assert lab.connect(lab.agent, DB4, 5432) == f"db {DB4}:5432 {AGENT4}"
        assert lab.connect(lab.agent, DB6, 5432) == f"db [{DB6}]:5432 {AGENT6}"
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


def test_check_reports_support(lab: Lab, method: str, tmp_path: Path) -> None:
    config = str(write_config(tmp_path / "tollgate.toml", method))
    result = lab.tollgate("intercept", "check", "-c", config)
    assert result.stdout.startswith(f"{method}: supported: ")
    assert lab.nft_tables() == ""  # a dry run leaves nothing behind


def test_nft_failure_reports_nft_stderr(lab: Lab) -> None:
    code = ("from appliance.intercept import nft, InterceptError\n"
            "try:\n    nft.apply('table inet broken { chain c { nonsense } }\\n')\n"
            "except InterceptError as exc:\n    print(exc)\n")
    out = lab.exec(lab.gw, PY, "-c", code).stdout
    assert "failed to apply the ruleset" in out and "syntax error" in out
    assert lab.nft_tables() == ""
