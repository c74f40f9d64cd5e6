"""The Ansible role on a booted Debian 12 gateway, run over SSH as a network team would.

The lab (:mod:`appliance.lab`) provides the network and the database: agent, gw and db
namespaces, PostgreSQL in db, no proxy of its own. A debootstrapped Debian 12 boots with
systemd as PID 1 in the gw namespace — it *is* the agents' gateway — and
``ansible-playbook`` connects to it over SSH from another lab namespace (the controller;
the root namespace's network is never touched). Then:

- the services are active and within their ``systemd-analyze security`` targets;
- the agent's unchanged ``psql`` reaches the database through the installed appliance,
  bound to its certificate identity, and the session is in the audit log; a blocked
  statement is in the journal with its structured fields;
- the audit root key is on the controller and not on the gateway;
- a second run reports changed=0, and so does ``--check``;
- powering the gateway off and booting it again brings the services and the ruleset back;
- the uninstall playbook leaves no ruleset, route or unit behind (the audit log stays).

Everything is torn down after the module, also on failure. The steps run in file order
against one gateway (module fixture): each test is one acceptance item.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from appliance.lab import topology
from appliance.lab.lab import DIRECT_NODE, Lab
from tests.deploy.booted import BootedHost, base_rootfs, host_key, prepare_rootfs
from tests.deploy.units import EXPOSURE_TARGETS, exposure

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "ansible"
BUILD_DIR = REPO / "build"
GATEWAY = "gw"  # the inventory name
GATEWAY_ADDRESS = "198.18.3.1"  # gw's address on the link to the controller (the lab's "direct" node)
AGENT_SUBJECT = "agent-7@deploy.test"
AGENT_GROUP = "payments-agents"

pytestmark = [
    pytest.mark.lab, pytest.mark.slow,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, chroot, debootstrap)"),
    pytest.mark.skipif(shutil.which("debootstrap") is None, reason="debootstrap is not installed (make host-deps)"),
    pytest.mark.skipif(shutil.which("ansible-playbook", path=os.path.dirname(sys.executable)) is None,
                       reason="ansible-core is not installed (the test extra)"),
]

POLICY = {
    "default": "deny",
    "default_message": "no policy rule allows this statement for your groups",
    "agent_groups": [AGENT_GROUP],
    "rules": [
        {"name": "agents-read", "groups": [AGENT_GROUP],
         "classes": ["read", "function_call", "session", "transaction", "empty"], "action": "allow"},
        {"name": "no-ddl", "classes": ["ddl"], "action": "block", "message": "no DDL through Tollgate"},
    ],
}


HEALTH = f"""
import ssl, urllib.request
context = ssl.create_default_context(cafile="/var/lib/tollgate/ca/ca.crt")
print(urllib.request.urlopen("https://{topology.GW_AGENT_V4}:8443/healthz", context=context, timeout=60).status)
"""


@dataclass
class Gateway:
    lab: Lab
    host: BootedHost
    work: Path
    inventory: Path
    extra_vars: Path
    key_dir: Path
    first_run: str

    def playbook(self, playbook: str, *extra: str) -> str:
        """Run a playbook from the controller's namespace; its output (it must succeed)."""
        env = {**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
               "ANSIBLE_HOME": str(self.work / "ansible-home"), "ANSIBLE_LOCAL_TEMP": str(self.work / "ansible-tmp"),
               "ANSIBLE_SSH_CONTROL_PATH_DIR": str(self.work / "cp"), "ANSIBLE_NOCOLOR": "1",
               "ANSIBLE_FORCE_COLOR": "0", "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
        result = subprocess.run(
            ["ip", "netns", "exec", self.lab.namespace(DIRECT_NODE),
             os.path.join(os.path.dirname(sys.executable), "ansible-playbook"), "-i", str(self.inventory),
             "-e", f"@{self.extra_vars}", playbook, *extra],
            cwd=ANSIBLE_DIR, env=env, capture_output=True, text=True, check=False, timeout=1200)
        output = result.stdout + result.stderr
        assert result.returncode == 0, (f"ansible-playbook {playbook} {' '.join(extra)} failed:\n{output[-12000:]}"
                                        f"\n--- the gateway's journal:\n{self.journal()}")
        return output

    def journal(self) -> str:
        """The Tollgate units' recent journal on the gateway (for failure messages)."""
        return self.host.run(["journalctl", "--no-pager", "-n", "60", "-u", "tollgate-*"], check=False).stdout

    def tollgate(self, *args: str) -> str:
        return self.host.run(["runuser", "-u", "tollgate", "--", "/opt/tollgate/bin/tollgate", *args]).stdout


def changed(output: str) -> int:
    """changed= from the PLAY RECAP line of the gateway."""
    found = re.search(rf"^{GATEWAY}\s*:\s*ok=\d+\s+changed=(\d+)\s+unreachable=0\s+failed=0", output, re.M)
    assert found, f"no PLAY RECAP for {GATEWAY} in:\n{output[-4000:]}"
    return int(found.group(1))


def changed_tasks(output: str) -> list[str]:
    """The tasks that reported a change, for failure messages."""
    tasks, current = [], ""
    for line in output.splitlines():
        if line.startswith(("TASK [", "RUNNING HANDLER [")):
            current = line.rstrip(" *")
        elif line.startswith("changed:") and (not tasks or tasks[-1] != current):
            tasks.append(current)
    return tasks


def wheelhouse(into: Path, source_date_epoch: int) -> Path:
    """What `make wheelhouse` builds, built here with the suite's interpreter. The epoch
    stamps the wheel's files, so two builds of the same tree differ as two releases do."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-cache-dir", "--wheel-dir", str(into),
                    f"{REPO}[fast]"], check=True, capture_output=True, timeout=900,
                   env={**os.environ, "SOURCE_DATE_EPOCH": str(source_date_epoch)})
    return into


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    work = Path(tempfile.mkdtemp(prefix="tollgate-deploy-"))
    lab = None
    host = None
    try:
        base = base_rootfs(BUILD_DIR)
        wheels = wheelhouse(work / "wheelhouse", 1_700_000_000)
        lab = Lab.create(owner_pid=os.getpid(), proxy=False, agent_auth="trust", audit="off")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / "id_ed25519")],
                       check=True, timeout=60)
        root = work / "rootfs"
        prepare_rootfs(base, root, hostname="gw", authorized_key=(work / "id_ed25519.pub").read_text())
        (work / "known_hosts").write_text(f"{GATEWAY_ADDRESS} ssh-ed25519 {host_key(root)}\n")
        host = BootedHost(root, lab.namespace("gw"), work / "console.log")
        host.boot()

        inventory = work / "hosts.yml"
        inventory.write_text(json.dumps({"all": {"children": {"tollgate_gateways": {"hosts": {GATEWAY: {
            "ansible_host": GATEWAY_ADDRESS, "ansible_user": "root",
            "ansible_ssh_private_key_file": str(work / "id_ed25519"),
            "ansible_ssh_common_args": f"-o UserKnownHostsFile={work / 'known_hosts'} -o StrictHostKeyChecking=yes",
        }}}}}}))
        key_dir = work / "audit-root-keys"
        extra_vars = work / "vars.json"
        extra_vars.write_text(json.dumps({
            "tollgate_wheelhouse": str(wheels),
            "tollgate_agent_subnets": [topology.AGENT_SUBNET_V4, topology.AGENT_SUBNET_V6],
            "tollgate_agent_interfaces": [topology.GW_AGENT_IFACE],
            "tollgate_protected_subnets": [topology.DB_SUBNET_V4, topology.DB_SUBNET_V6],
            "tollgate_enroll_url": f"https://{topology.GW_AGENT_V4}:8443",
            # Where an issuer would be: the web service needs one configured, and asks it only
            # when a token arrives (enrollment over OIDC is tests/e2e's).
            "tollgate_oidc": {"issuer": f"https://{topology.GW_AGENT_V4}:9443", "audience": "tollgate"},
            "tollgate_targets": [{
                "name": "payments", "addresses": [f"{topology.DB_PROTECTED_V4}:5432"], "tls": "prefer",
                "credentials": [{"role": "app", "upstream_user": "app", "password": lab.password("app")}],
            }],
            "tollgate_policy": POLICY,
            "tollgate_audit_root_key_dir": str(key_dir),
        }))
        gw = Gateway(lab, host, work, inventory, extra_vars, key_dir, first_run="")
        gw.first_run = gw.playbook("site.yml")
        yield gw
    finally:
        if host is not None:
            host.poweroff()
        if lab is not None:
            lab.down()
        shutil.rmtree(work, ignore_errors=True)


def test_first_run_installs(gateway: Gateway) -> None:
    assert changed(gateway.first_run) > 0


def test_services_active(gateway: Gateway) -> None:
    for unit in ("tollgate-proxy.service", "tollgate-web.service", "tollgate-audit-verify.timer",
                 "tollgate-audit-review.timer", "tollgate-audit-retain.timer"):
        state = gateway.host.run(["systemctl", "is-active", unit], check=False).stdout.strip()
        assert state == "active", f"{unit} is {state}:\n" + gateway.host.run(
            ["journalctl", "-u", unit, "--no-pager", "-n", "40"], check=False).stdout
    # The web service answers over HTTPS with the certificate the appliance CA issued it.
    health = gateway.host.run(["/opt/tollgate/bin/python", "-c", HEALTH])
    assert health.stdout.strip() == "200"
    # READY=1 came after the ruleset was applied: the table is there and the status says so.
    status = gateway.host.run(["systemctl", "show", "-P", "StatusText", "tollgate-proxy.service"]).stdout
    assert status.startswith("ready: port 15432, redirect")
    assert "table inet tollgate" in gateway.host.run(["nft", "list", "tables"]).stdout
    assert gateway.host.run(["systemctl", "show", "-P", "WatchdogUSec", "tollgate-proxy.service"]).stdout.strip() \
        == "30s"


@pytest.mark.parametrize("unit", sorted(EXPOSURE_TARGETS))
def test_exposure_in_place(gateway: Gateway, unit: str) -> None:
    """systemd-analyze security on the running system, as the installed units are loaded."""
    result = gateway.host.run(["systemd-analyze", "security", "--no-pager", unit], check=False)
    assert exposure(result.stdout + result.stderr) <= EXPOSURE_TARGETS[unit]


def test_the_root_key_left_the_gateway(gateway: Gateway) -> None:
    assert (gateway.key_dir / GATEWAY / "root.key").is_file()
    assert (gateway.key_dir / GATEWAY / "root.key").stat().st_mode & 0o077 == 0
    pub = (gateway.key_dir / GATEWAY / "root.pub").read_text()
    assert gateway.host.run(["test", "-e", "/var/lib/tollgate/audit/keys/root.key"], check=False).returncode == 1
    assert gateway.host.run(["cat", "/etc/tollgate/audit-root.pub"]).stdout == pub


def enroll_agent(gateway: Gateway) -> None:
    """The agent's key made in its home, its certificate issued by the gateway's CA (what
    the enrollment service does after checking an OIDC token; tests/e2e covers that flow)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    issue = ("import sys\n"
             "from datetime import timedelta\n"
             "from appliance.identity.ca import CertificateAuthority\n"
             "from appliance.identity.certs import certificate_pem\n"
             "from appliance.model.identity import Identity\n"
             "ca = CertificateAuthority.load('/var/lib/tollgate/ca/ca.crt', '/var/lib/tollgate/ca/ca.key')\n"
             f"who = Identity(subject={AGENT_SUBJECT!r}, kind='agent', groups=({AGENT_GROUP!r},))\n"
             "sys.stdout.write(certificate_pem(ca.issue_client(sys.stdin.read(), who, timedelta(hours=1))).decode())\n")
    cert = gateway.host.run(["runuser", "-u", "tollgate", "--", "/opt/tollgate/bin/python", "-c", issue],
                            input=csr.public_bytes(serialization.Encoding.PEM).decode()).stdout
    pgdir = gateway.lab.paths.agent_home / ".postgresql"
    (pgdir / "postgresql.crt").write_text(cert)
    key_path = pgdir / "postgresql.key"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    # As `tollgate enroll` does: the appliance CA joins what libpq trusts (the agent then
    # verifies the certificate the appliance presents for the database's address).
    ca = gateway.host.run(["cat", "/var/lib/tollgate/ca/ca.crt"]).stdout
    with open(pgdir / "root.crt", "a") as root_crt:
        root_crt.write(ca)


def agent_psql(gateway: Gateway, sql: str) -> subprocess.CompletedProcess[str]:
    return gateway.lab.exec("agent", ["psql", gateway.lab.conninfo(), "-X", "-At", "-c", sql],
                            capture_output=True, text=True, check=False, timeout=120)


def test_agent_reaches_the_database_as_itself(gateway: Gateway) -> None:
    enroll_agent(gateway)
    result = agent_psql(gateway, "select current_user, inet_server_addr()")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"app|{topology.DB_PROTECTED_V4}"
    blocked = agent_psql(gateway, "create table t (x int)")
    assert blocked.returncode != 0 and "no DDL through Tollgate" in blocked.stderr
    sessions = json.loads(gateway.tollgate("sessions", "-c", "/etc/tollgate/tollgate.toml", "--json"))
    assert any(AGENT_SUBJECT in json.dumps(s) for s in sessions), sessions
    # The journal has the block with its structured fields (appliance.proxy.journal).
    journal = gateway.host.run(["journalctl", "-u", "tollgate-proxy.service", "-o", "json", "--no-pager",
                                "TOLLGATE_DECISION=block"]).stdout
    entries = [json.loads(line) for line in journal.splitlines() if line.strip()]
    assert any(e.get("TOLLGATE_IDENTITY") == AGENT_SUBJECT and e.get("TOLLGATE_RULE") == "no-ddl" for e in entries), \
        journal[-3000:]


def test_review_and_retention_run_as_installed(gateway: Gateway) -> None:
    """The timers' services, started by hand: the review verifies the log and records a
    review record (its exit status 3 means findings, the block above may be one); retention
    finds no closed month to seal yet."""
    review = gateway.host.run(["systemctl", "start", "tollgate-audit-review.service"], check=False)
    journal = gateway.host.run(["journalctl", "--no-pager", "-u", "tollgate-audit-review.service"], check=False).stdout
    status = gateway.host.run(["systemctl", "show", "-P", "ExecMainStatus", "tollgate-audit-review.service"]).stdout
    assert status.strip() in ("0", "3"), journal
    assert "recorded as review record" in journal, journal
    assert review.returncode == 0 or status.strip() == "3"
    retain = gateway.host.run(["systemctl", "start", "tollgate-audit-retain.service"], check=False)
    assert retain.returncode == 0, gateway.host.run(
        ["journalctl", "--no-pager", "-u", "tollgate-audit-retain.service"], check=False).stdout


def test_without_a_certificate_the_agent_is_refused(gateway: Gateway) -> None:
    pgdir = gateway.lab.paths.agent_home / ".postgresql"
    aside = gateway.work / "agent-cert-aside"
    aside.mkdir(exist_ok=True)
    for name in ("postgresql.crt", "postgresql.key"):
        if (pgdir / name).exists():
            (pgdir / name).rename(aside / name)
    try:
        result = agent_psql(gateway, "select 1")
        assert result.returncode != 0
    finally:
        for name in ("postgresql.crt", "postgresql.key"):
            if (aside / name).exists():
                (aside / name).rename(pgdir / name)


def test_second_run_changes_nothing(gateway: Gateway) -> None:
    output = gateway.playbook("site.yml")
    assert changed(output) == 0, changed_tasks(output)


def test_check_mode_changes_nothing(gateway: Gateway) -> None:
    output = gateway.playbook("site.yml", "--check")
    assert changed(output) == 0, changed_tasks(output)


def test_restart_brings_services_and_ruleset_back(gateway: Gateway) -> None:
    host = gateway.host
    host.poweroff()
    # The namespace outlives the host: take the ruleset down so that only the booted
    # system's own start-up can bring it back.
    subprocess.run(["ip", "netns", "exec", gateway.lab.namespace("gw"), "nft", "delete", "table", "inet", "tollgate"],
                   check=True, timeout=60)
    host.boot()
    for unit in ("tollgate-proxy.service", "tollgate-web.service", "tollgate-audit-verify.timer",
                 "tollgate-audit-review.timer", "tollgate-audit-retain.timer"):
        assert host.run(["systemctl", "is-active", unit], check=False).stdout.strip() == "active", unit
    assert "table inet tollgate" in host.run(["nft", "list", "tables"]).stdout
    result = agent_psql(gateway, "select 1")
    assert (result.returncode, result.stdout.strip()) == (0, "1"), result.stderr


def main_pid(gateway: Gateway) -> int:
    return int(gateway.host.run(["systemctl", "show", "-P", "MainPID", "tollgate-proxy.service"]).stdout)


def test_upgrade_restarts_and_the_audit_log_continues(gateway: Gateway) -> None:
    """A new wheelhouse is rolled out with a restart; the audit log goes on where it was:
    the daily verification (export + verify against the pinned root key) passes over the
    records from before and after."""
    before = main_pid(gateway)
    new = wheelhouse(gateway.work / "wheelhouse-next", 1_700_086_400)
    output = gateway.playbook("site.yml", "-e", f"tollgate_wheelhouse={new}")
    assert changed(output) > 0
    assert "Install | Tollgate from a changed wheelhouse" in output
    assert main_pid(gateway) not in (0, before)
    result = agent_psql(gateway, "select 2")
    assert (result.returncode, result.stdout.strip()) == (0, "2"), result.stderr
    verify = gateway.host.run(["systemctl", "start", "tollgate-audit-verify.service"], check=False)
    assert verify.returncode == 0, gateway.host.run(
        ["journalctl", "--no-pager", "-n", "40", "-u", "tollgate-audit-verify.service"], check=False).stdout
    sessions = json.loads(gateway.tollgate("sessions", "-c", "/etc/tollgate/tollgate.toml", "--json", "--limit", "0"))
    # Before the power cycle, after it, and after the upgrade.
    assert sum(AGENT_SUBJECT in json.dumps(s) for s in sessions) >= 3


def test_uninstall_leaves_nothing_behind(gateway: Gateway) -> None:
    gateway.playbook("uninstall.yml")
    host = gateway.host
    assert "tollgate" not in host.run(["nft", "list", "tables"]).stdout
    # (list-unit-files exits 1 when nothing matches: that is the point.)
    assert host.run(["systemctl", "list-unit-files", "--no-legend", "tollgate*"], check=False).stdout.strip() == ""
    assert host.run(["systemctl", "list-units", "--all", "--no-legend", "tollgate*"], check=False).stdout.strip() == ""
    # No policy routing left (tproxy's; redirect installs none, and removes any).
    rules = host.run(["ip", "rule", "list"]).stdout
    assert [line.split(":", 1)[1].strip() for line in rules.splitlines()] == \
        ["from all lookup local", "from all lookup main", "from all lookup default"]
    for path in ("/opt/tollgate", "/etc/tollgate", "/etc/sysctl.d/60-tollgate.conf"):
        assert host.run(["test", "-e", path], check=False).returncode == 1, path
    # The audit log is a record: kept.
    assert host.run(["test", "-f", "/var/lib/tollgate/audit/keys/root.pub"], check=False).returncode == 0
    # Nothing diverts the agent any more: PostgreSQL itself answers and asks for the role's
    # password (Tollgate, which holds it, never asks an agent for one).
    result = agent_psql(gateway, "select 1")
    assert result.returncode != 0 and "no password supplied" in result.stderr, result.stderr
