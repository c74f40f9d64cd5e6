"""The lab's database subnet is not the agent's: only diverted connections reach it.

A lab with the proxy (so the gateway's forward filter is installed, with the database
subnet in ``protected_subnets``). From the agent, scapy sends SYNs to the database's direct
address and to other ports of both its addresses, and UDP, in both families; a raw capture
in the db namespace, ended by a canary sent after them, sees none arrive. From the lab's
direct namespace, the direct address answers — the path the benchmark and the driver
suites' direct run use.

The canary needs an address beyond the gateway that is not protected: the test adds
198.18.9.10 / fd7a:6c67:9::10 on the db namespace's loopback and routes them from gw (in
the lab's own namespaces, removed with them).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator

import pytest

from appliance.lab import DIRECT_NODE, Lab, topology
from tests.intercept.test_methods import CAPTURE, PROBE

pytestmark = pytest.mark.lab

CANARY = {4: "198.18.9.10", 6: "fd7a:6c67:9::10"}
# The same beyond the witness's link, for captures in its namespace.
WITNESS_CANARY = {4: "198.18.9.20", 6: "fd7a:6c67:9::20"}
WITNESS = {4: topology.WITNESS_V4, 6: topology.WITNESS_V6}
AGENT = {4: topology.AGENT_V4, 6: topology.AGENT_V6}
DB = {4: (topology.DB_PROTECTED_V4, topology.DB_DIRECT_V4), 6: (topology.DB_PROTECTED_V6, topology.DB_DIRECT_V6)}


def canary_lab(**kwargs: object) -> Lab:
    lab = Lab.create(owner_pid=os.getpid(), proxy=True, agent_auth="trust", policy="permissive", audit="off",
                     **kwargs)
    try:
        for family, canary in CANARY.items():
            v = "-4" if family == 4 else "-6"
            lab.exec("db", ["ip", v, "addr", "add", f"{canary}/{32 if family == 4 else 128}", "dev", "lo"],
                     check=True)
            lab.exec("gw", ["ip", v, "route", "add", canary, "via", DB[family][0]], check=True)
            witness_canary = WITNESS_CANARY[family]
            lab.exec("witness", ["ip", v, "addr", "add", f"{witness_canary}/{32 if family == 4 else 128}", "dev",
                                 "lo"], check=True)
            lab.exec("gw", ["ip", v, "route", "add", witness_canary, "via", WITNESS[family]], check=True)
    except BaseException:
        lab.down()
        raise
    return lab


@pytest.fixture(scope="module")
def lab(lab_host: None) -> Iterator[Lab]:
    with canary_lab() as lab:
        yield lab


def probe(lab: Lab, family: int, probes: list[dict[str, object]], src: str | None = None,
          node: str = "db") -> list[list[object]]:
    """Send ``probes`` from the agent (from ``src``, the agent's address unless spoofed), then
    the canary; what of them reached ``node``'s namespace (db or witness)."""
    src = src or AGENT[family]
    canary = CANARY[family] if node == "db" else WITNESS_CANARY[family]
    token = f"canary-{secrets.token_hex(8)}"
    capture = subprocess.Popen(lab.command(node, [sys.executable, "-c", CAPTURE, token, "60"]),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=lab.env())
    try:
        assert capture.stdout is not None and capture.stdout.readline() == "ready\n"
        spec = {"family": family, "src": src, "canary": [canary, 9, token],
                "probes": [{"seq": 1_000_000, "md5": False, "flags": "S", "ack": 0, **p} for p in probes]}
        sent = lab.exec("agent", ["taskset", "-c", "0", sys.executable, "-c", PROBE, json.dumps(spec)],
                        capture_output=True, text=True, timeout=120)
        assert sent.stdout == "sent\n", sent.stderr
        out, err = capture.communicate(timeout=90)
    finally:
        if capture.poll() is None:
            capture.kill()
            capture.communicate(timeout=30)
    result = json.loads(out)
    assert result["canary"], f"the canary never arrived (safety-net deadline): {result} {err}"
    return [seen for seen in result["seen"] if seen[0] == src]


@pytest.mark.parametrize("family", [4, 6])
def test_the_agent_reaches_nothing_of_the_database_subnet(lab: Lab, family: int) -> None:
    protected, direct = DB[family]
    probes = [
        {"dst": direct, "proto": "tcp", "dport": 5432, "sport": 40001},  # the direct address
        {"dst": direct, "proto": "tcp", "dport": 22, "sport": 40002},  # its other ports
        {"dst": protected, "proto": "tcp", "dport": 22, "sport": 40003},  # the protected one's other ports
        {"dst": direct, "proto": "udp", "dport": 5432, "sport": 40004},  # another protocol
        {"dst": protected, "proto": "udp", "dport": 53, "sport": 40005},
    ]
    assert probe(lab, family, probes) == []


# Source addresses outside the agent subnets, as the agent (root in its namespace) can
# craft them: the direct namespace's, and one of no lab subnet at all.
SPOOFED = {4: ("198.18.3.10", "203.0.113.7"), 6: ("fd7a:6c67:3::10", "2001:db8:77::7")}


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("spoof", [0, 1])
def test_a_spoofed_source_address_reaches_nothing_either(lab: Lab, family: int, spoof: int) -> None:
    """Agent traffic is what arrives on the agent's link, whatever source address it claims:
    a packet forged with another source is not diverted, so the forward filter must drop it."""
    protected, direct = DB[family]
    probes = [
        {"dst": direct, "proto": "tcp", "dport": 5432, "sport": 40101},
        {"dst": protected, "proto": "tcp", "dport": 5432, "sport": 40102},
        {"dst": protected, "proto": "udp", "dport": 5432, "sport": 40103},
    ]
    assert probe(lab, family, probes, src=SPOOFED[family][spoof]) == []


@pytest.mark.parametrize("family", [4, 6])
def test_the_agent_sends_the_witness_nothing(lab: Lab, family: int) -> None:
    """The witness serves the appliance. Its answers could never reach the agent, but the
    agent's SYNs and datagrams did reach it (a one-way flood); now its link is protected."""
    probes = [{"dst": WITNESS[family], "proto": "tcp", "dport": topology.WITNESS_PORT, "sport": 40201},
              {"dst": WITNESS[family], "proto": "udp", "dport": 53, "sport": 40202}]
    assert probe(lab, family, probes, node="witness") == []


def test_a_control_packet_reaches_the_witness_namespace(lab: Lab) -> None:
    seen = probe(lab, 4, [{"dst": WITNESS_CANARY[4], "proto": "tcp", "dport": 7, "sport": 40210}], node="witness")
    assert [WITNESS_CANARY[4], "tcp", 7, 40210, "S"] in [s[1:] for s in seen]


def test_a_control_packet_to_an_unprotected_address_arrives(lab: Lab) -> None:
    """The capture sees what the filter lets through: a SYN to the canary's address itself."""
    seen = probe(lab, 4, [{"dst": CANARY[4], "proto": "tcp", "dport": 7, "sport": 40010}])
    assert [CANARY[4], "tcp", 7, 40010, "S"] in [s[1:] for s in seen]


def test_control_without_the_protected_subnet_the_direct_address_is_reached(lab_host: None) -> None:
    """What the filter closes: a lab made with agent_direct (for tests comparing both paths
    from the agent) lets the agent's SYN to the direct address through."""
    with canary_lab(agent_direct=True) as open_lab:
        seen = probe(open_lab, 4, [{"dst": topology.DB_DIRECT_V4, "proto": "tcp", "dport": 5432, "sport": 40020}])
    # The SYN arrived (the agent's kernel then resets the answer it did not expect: an RST too).
    assert [topology.DB_DIRECT_V4, "tcp", 5432, 40020, "S"] in [s[1:] for s in seen]


def test_the_direct_namespace_reaches_the_direct_address(lab: Lab) -> None:
    conninfo = lab.conninfo(direct=True, sslmode="verify-full", sslrootcert=lab.status()["database"]["tls_ca"])
    out = lab.exec(DIRECT_NODE, ["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", conninfo, "-c",
                                 "SELECT inet_client_addr(), ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"],
                   capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{topology.DIRECT_CLIENT_V4}|t"
    # And the agent's diverted path still works.
    through = lab.exec("agent", ["psql", "-X", "-A", "-t", lab.conninfo(), "-c", "SELECT 1"],
                       capture_output=True, text=True, timeout=120)
    assert (through.returncode, through.stdout.strip()) == (0, "1"), through.stderr
