"""The lab itself: network, routing, database, roles, status, teardown, gc, coexistence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.config import load_config
from appliance.lab import Lab, LabError, gc, topology
from appliance.lab import state as lab_state
from appliance.lab.pans import brand_of, is_luhn_valid
from tests.lab.conftest import lab_leftovers

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
# Only a hang reaches this: a test that works never waits for it, however loaded the machine.
SAFETY = 120.0


def lab_cli(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The lab CLI in a subprocess (stand-alone entry point: needs only appliance.lab)."""
    proc = subprocess.run([sys.executable, "-m", "appliance.lab.cli", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"lab {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def psql(lab: Lab, node: str, conninfo: str, sql: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = lab.exec(node, ["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", conninfo, "-c", sql],
                    capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"psql in {node} ({conninfo}) failed: {proc.stderr}")
    return proc


# --- network -------------------------------------------------------------------------------

def test_agent_traffic_to_the_database_routes_through_gw(lab: Lab) -> None:
    for dst in (topology.DB_PROTECTED_V4, topology.DB_DIRECT_V4):
        out = lab.exec("agent", ["ip", "route", "get", dst], capture_output=True, text=True, check=True).stdout
        assert f"via {topology.GW_AGENT_V4} dev eth0" in out
    for dst in (topology.DB_PROTECTED_V6, topology.DB_DIRECT_V6):
        out = lab.exec("agent", ["ip", "-6", "route", "get", dst], capture_output=True, text=True, check=True).stdout
        assert f"via {topology.GW_AGENT_V6} dev eth0" in out
    out = lab.exec("db", ["ip", "route", "get", topology.AGENT_V4], capture_output=True, text=True, check=True).stdout
    assert f"via {topology.GW_DB_V4}" in out


def test_gw_forwards_in_its_own_namespace_only(lab: Lab) -> None:
    out = lab.exec("gw", ["sysctl", "-n", "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"],
                   capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1", "1"]
    # No lab link ever lives in the root namespace.
    root_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert lab.name not in root_links


def test_addresses_are_in_place(lab: Lab) -> None:
    out = lab.exec("db", ["ip", "-o", "addr", "show", "dev", "eth0"], capture_output=True, text=True,
                   check=True).stdout
    for address in topology.DB_ADDRESSES:
        assert f" {address}/" in out
    assert "tentative" not in out  # nodad: usable at once


# --- database ------------------------------------------------------------------------------

@pytest.mark.parametrize("node", ["gw", "agent"])
@pytest.mark.parametrize("host", [topology.DB_PROTECTED_V4, topology.DB_DIRECT_V4,
                                  topology.DB_PROTECTED_V6, topology.DB_DIRECT_V6])
def test_database_answers_app(lab: Lab, host: str, node: str) -> None:
    # No proxy in this lab: the protected address answers directly too, from either side.
    conninfo = f"host={host} port=5432 dbname=payments user=app password={lab.password('app')}"
    count = int(psql(lab, node, conninfo, "SELECT count(*) FROM cards").stdout)
    assert count > 0


def test_the_direct_namespace_reaches_the_direct_address_over_tls(lab: Lab) -> None:
    conninfo = lab.conninfo(direct=True, sslmode="verify-full", sslrootcert=lab.status()["database"]["tls_ca"])
    out = psql(lab, "direct", conninfo, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").stdout
    assert out.strip() == "t"


def test_every_pan_is_luhn_valid_and_matches_its_brand(lab: Lab) -> None:
    out = psql(lab, "gw", lab.conninfo(direct=True),
               "SELECT pan, pan_last4, brand FROM cards ORDER BY id").stdout
    rows = [line.split("|") for line in out.splitlines() if line]
    assert len(rows) >= 200
    for pan, last4, brand in rows:
        assert is_luhn_valid(pan), pan
        assert pan.endswith(last4)
        assert brand_of(pan) == brand, (pan, brand)
    assert {brand for _, _, brand in rows} >= {"visa", "mastercard", "amex", "discover", "diners", "jcb", "unionpay"}


def test_payments_schema(lab: Lab) -> None:
    out = psql(lab, "gw", lab.conninfo(direct=True),
               "SELECT count(*), min(amount) > 0, pg_typeof(min(amount))::text, count(DISTINCT card_id) > 1"
               " FROM payments JOIN cards ON cards.id = payments.card_id").stdout
    count, positive, amount_type, several = out.strip().split("|")
    assert int(count) > 0 and positive == "t" and amount_type == "numeric" and several == "t"
    owner = psql(lab, "gw", lab.conninfo(direct=True),
                 "SELECT string_agg(DISTINCT tableowner, ',') FROM pg_tables WHERE schemaname = 'public'").stdout
    assert owner.strip() == "app"


def test_auth_methods_per_role(lab: Lab) -> None:
    base = f"host={topology.DB_DIRECT_V4} port=5432 dbname=payments"
    methods = psql(lab, "gw", lab.conninfo(direct=True),
                   "SELECT rolname, left(rolpassword, 3) FROM pg_authid WHERE rolname IN ('app', 'legacy_md5')"
                   " ORDER BY 1", check=False)
    # pg_authid needs a superuser; ask the server over its socket instead when app can't read it.
    if methods.returncode != 0:
        methods = lab.exec("db", ["psql", "-X", "-At", "-h", lab.status()["database"]["socket_dir"], "-U",
                                  "postgres", "-c", ("SELECT rolname, left(rolpassword, 3) FROM pg_authid"
                                                     " WHERE rolname IN ('app', 'legacy_md5') ORDER BY 1")],
                           capture_output=True, text=True, check=True)
    assert methods.stdout.split() == ["app|SCR", "legacy_md5|md5"]

    md5 = f"{base} user=legacy_md5 password={lab.password('legacy_md5')}"
    assert psql(lab, "agent", md5, "SELECT count(*) FROM cards").stdout.strip() != "0"
    clear = f"{base} user=clear_tls password={lab.password('clear_tls')}"
    assert psql(lab, "agent", clear + " sslmode=require", "SELECT current_user").stdout.strip() == "clear_tls"
    refused = psql(lab, "agent", clear + " sslmode=disable", "SELECT 1", check=False)
    assert refused.returncode != 0 and "no encryption" in refused.stderr
    wrong = psql(lab, "agent", f"{base} user=app password=wrong", "SELECT 1", check=False)
    assert wrong.returncode != 0 and "password authentication failed" in wrong.stderr


# --- status and CLI ------------------------------------------------------------------------

def test_status_json_has_the_documented_keys(lab: Lab) -> None:
    status = json.loads(lab_cli("status", "--name", lab.name, "--json").stdout)
    assert status == json.loads(json.dumps(lab.status()))
    assert {"name", "phase", "healthy", "owner_pid", "state_dir", "namespaces", "addresses", "database",
            "roles", "roles_note", "proxy", "agent_conninfo", "conninfo"} <= set(status)
    assert status["phase"] == "up" and status["healthy"] is True
    assert status["owner_pid"] == os.getpid()
    assert status["namespaces"] == {n: f"tg{lab.name}-{n}" for n in ("agent", "gw", "db", "witness", "direct")}
    assert status["addresses"]["db"] == {"protected": ["198.18.2.10", "fd7a:6c67:2::10"],
                                         "direct": ["198.18.2.11", "fd7a:6c67:2::11"]}
    db = status["database"]
    assert (db["host"], db["port"], db["dbname"]) == ("198.18.2.10", 5432, "payments")
    assert Path(db["tls_ca"]).is_file() and db["running"]
    assert set(status["roles"]) == {"app", "legacy_md5", "clear_tls", "agent"}
    for info in status["roles"].values():
        assert info["lab_only"] is True and info["password"]
        assert Path(info["password_file"]).read_text().strip() == info["password"]
        assert Path(info["password_file"]).stat().st_mode & 0o777 == 0o600
    assert "lab-only" in status["roles_note"]
    witness = status["witness"]
    assert witness["running"] and witness["pid"] in topology.namespace_pids(lab.namespaces["witness"])
    assert witness["url"] == "http://198.18.4.10:7380" and witness["key"].startswith(f"witness.lab/{lab.name}+")
    proxy = status["proxy"]
    assert proxy["enabled"] is False and proxy["port"] == 15432 and proxy["pid"] is None
    assert status["agent_conninfo"] == "host=198.18.2.10 port=5432 dbname=payments user=app"
    assert status["addresses"]["direct"] == {"ipv4": "198.18.3.10", "ipv6": "fd7a:6c67:3::10"}
    human = lab_cli("status", "--name", lab.name, "--next-steps").stdout
    assert f'tollgate lab exec --name {lab.name} agent -- psql "host=198.18.2.10 dbname=payments user=app"' in human
    assert f"tollgate lab down --name {lab.name}" in human


def test_generated_proxy_config_is_valid(lab: Lab) -> None:
    config = load_config(Path(lab.status()["proxy"]["config"]))
    (target,) = config.targets
    assert target.name == "payments" and target.tls == "prefer"
    assert [str(e) for e in target.endpoints] == ["198.18.2.10:5432", "[fd7a:6c67:2::10]:5432"]
    assert {r: c.password for r, c in target.credentials.items()} == {
        r: lab.password(r) for r in ("app", "legacy_md5", "clear_tls", "agent")}
    assert config.intercept.method == "redirect"
    # The whole database subnet is protected: its direct address is not the agent's to reach;
    # nor is the witness's link.
    assert [str(n) for n in config.intercept.protected_subnets] == [
        "198.18.2.0/24", "fd7a:6c67:2::/64", "198.18.4.0/24", "fd7a:6c67:4::/64"]
    assert [str(n) for n in config.intercept.agent_subnets] == ["198.18.1.0/24", "fd7a:6c67:1::/64"]
    # Whatever arrives on the agent's link is agent traffic, whatever its source address.
    assert config.intercept.agent_interfaces == ("eth0",)
    assert config.proxy.listen_port == 15432 and config.proxy.agent_auth == "certificate"
    assert config.identity.oidc.issuer == "https://198.18.1.1:9443"
    assert config.identity.ca_cert.is_file() and config.identity.server_cert("payments")[0].is_file()


def test_cli_exec_passes_exit_code_and_output(lab: Lab) -> None:
    proc = lab_cli("exec", "--name", lab.name, "agent", "--", "sh", "-c", "ip -o -4 addr show eth0; exit 7",
                   check=False)
    assert proc.returncode == 7
    assert "198.18.1.10/24" in proc.stdout
    proc = lab_cli("exec", "--name", lab.name, "db", "--", "pg_isready", "-h", "198.18.2.11", check=False)
    assert proc.returncode == 0, proc.stderr


def test_cli_errors_are_clear(lab: Lab) -> None:
    proc = lab_cli("status", "--name", "nosuchlab", check=False)
    assert proc.returncode == 1 and "no lab named 'nosuchlab'" in proc.stderr
    proc = lab_cli("up", "--name", lab.name, "--no-proxy", check=False)
    assert proc.returncode == 1 and "already exists" in proc.stderr
    assert lab.status()["healthy"]  # and the existing lab was left alone


# --- lifecycle -----------------------------------------------------------------------------

def test_two_labs_coexist_and_teardown_leaves_nothing(lab: Lab, lab_host: None) -> None:
    second = Lab.create(owner_pid=os.getpid(), proxy=False)
    try:
        for each in (lab, second):
            out = psql(each, "direct", each.conninfo(direct=True), "SELECT count(*) FROM cards").stdout
            assert int(out) > 0
        pids = [pid for ns in second.namespaces.values() for pid in topology.namespace_pids(ns)]
        assert pids, "postgres should be running in the second lab"
    finally:
        second.down()
    assert lab_leftovers(second) == []
    assert not [pid for pid in pids if lab_state.process_alive({"pid": pid, "start_time":
                                                                 lab_state.process_start_time(pid) or -1})]
    assert lab.status()["healthy"], "tearing down one lab must not disturb another"


def test_gc_removes_labs_whose_owner_is_gone(lab_host: None) -> None:
    owner = subprocess.Popen(["sleep", "600"])
    try:
        name = "gc" + os.urandom(3).hex()
        lab_cli("up", "--name", name, "--no-proxy", "--owner-pid", str(owner.pid))
        doomed = Lab.open(name)
        gc()
        assert Lab.open(name).status()["healthy"], "a lab whose owner lives must survive gc"
    finally:
        owner.kill()
        owner.wait()
    collected = gc()
    assert (name, f"its owner (pid {owner.pid}) is gone") in collected
    assert lab_leftovers(doomed) == []


def test_down_finishes_a_half_built_lab(lab_host: None) -> None:
    name = "hb" + os.urandom(3).hex()
    builder = subprocess.Popen([sys.executable, "-m", "appliance.lab.cli", "up", "--name", name, "--no-proxy"],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill it once the database namespace exists, i.e. somewhere in the middle of building
    # (the cluster, identity services and enrollment still to come). The deadline is only a
    # safety net for a builder that hangs.
    db_ns = Path("/run/netns", f"tg{name}-db")
    deadline = time.monotonic() + SAFETY
    while not db_ns.exists() and builder.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    builder.send_signal(signal.SIGKILL)
    builder.wait()
    half = Lab(name)
    assert db_ns.exists(), f"the builder never created {db_ns} (exit status {builder.returncode})"
    assert half.dir.exists()
    assert lab_cli("down", "--name", name).returncode == 0
    assert lab_leftovers(half) == []


class _FakeProxyLab(Lab):
    """A lab whose 'proxy' is a stand-in script, to test the ready wait and its failures."""

    script = "import sys, time; print('tollgate: ready', file=sys.stderr, flush=True); time.sleep(600)"

    def proxy_argv(self) -> list[str]:
        return [sys.executable, "-c", self.script]


class _CrashingProxyLab(_FakeProxyLab):
    script = "import sys; print('tollgate: bad config: kaboom', file=sys.stderr); sys.exit(3)"


def test_proxy_is_started_in_gw_and_waited_for(lab_host: None) -> None:
    with _FakeProxyLab.create(owner_pid=os.getpid(), proxy=True) as fake:
        proxy = fake.status()["proxy"]
        assert proxy["running"] and proxy["pid"] in topology.namespace_pids(fake.namespaces["gw"])
        assert "tollgate: ready" in Path(proxy["log"]).read_text()
        assert fake.status()["healthy"]
    assert lab_leftovers(fake) == []
    assert not lab_state.process_alive({"pid": proxy["pid"], "start_time": -1})


class _DyingEnrollLab(Lab):
    """A lab whose enrollment service says it is ready and then dies, as gunicorn does when a
    worker fails to boot (it listened, said so, then closed its socket)."""

    script = ("import sys; print('tollgate-enroll: ready on https://198.18.1.1:8443', file=sys.stderr, flush=True); "
              "print('Worker failed to boot.', file=sys.stderr); sys.exit(3)")

    def identity_services(self):  # type: ignore[no-untyped-def]
        return [s._replace(argv=[sys.executable, "-c", self.script]) if s.name == "enroll" else s
                for s in super().identity_services()]


def test_a_service_that_dies_after_its_ready_line_fails_up_with_its_log(lab_host: None) -> None:
    # Not "enrolling the lab's agent failed: ... Connection refused": the lab waits for an
    # answer from the agent's namespace, and says which service died and what it logged.
    dying = _DyingEnrollLab(owner_pid=os.getpid(), proxy=False)
    with pytest.raises(LabError, match=r"(?s)enroll exited \(status 3\) before it was ready.*Worker failed to boot"
                       ) as info:
        dying.up()
    assert "torn down" in str(info.value)
    assert lab_leftovers(dying) == []


def test_failed_up_tears_down_and_says_why(lab_host: None) -> None:
    crashing = _CrashingProxyLab(owner_pid=os.getpid(), proxy=True)
    with pytest.raises(LabError, match=r"(?s)proxy exited \(status 3\).*kaboom") as info:
        crashing.up()
    assert "torn down" in str(info.value)
    assert lab_leftovers(crashing) == []
