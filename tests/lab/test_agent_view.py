"""The lab is a fair model: the agent sees nothing of the appliance, its admin APIs are guarded.

One lab with the proxy and the real identity flow. From the agent's namespace (which runs
in its own mount view, :mod:`appliance.lab.agent_view`): no file of the appliance can be
opened, the control socket cannot be reached, the view cannot be undone or reached around,
and the dev issuer's admin API is out of reach; meanwhile the agent's own home, its
enrollment and psql through the proxy work as before.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.lab import Lab
from appliance.lab import identity as lab_identity
from tests.lab.test_lab import lab_cli

pytestmark = pytest.mark.lab

# Run in the agent's node: try to open (and stat) each path given as JSON on stdin; print
# the ones that worked.
OPEN_EACH = """\
import json, sys
opened = []
for path in json.load(sys.stdin):
    try:
        with open(path, "rb") as fh:
            fh.read(1)
        opened.append(path)
    except OSError:
        pass
print(json.dumps(opened))
"""

CONNECT = """\
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print(type(exc).__name__)
else:
    print("connected")
"""


@pytest.fixture(scope="module")
def full_lab(lab_host: None) -> Iterator[Lab]:
    with Lab.create(owner_pid=os.getpid(), proxy=True) as lab:
        yield lab


def agent(lab: Lab, argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return lab.exec("agent", argv, capture_output=True, text=True, timeout=120, **kwargs)  # type: ignore[arg-type]


def appliance_files(lab: Lab) -> list[Path]:
    """Every file of the appliance side: the lab directory but the agent's home, and the audit log."""
    files = []
    for top in (lab.dir, lab.audit_dir):
        for dirpath, _, names in os.walk(top):
            if Path(dirpath).is_relative_to(lab.paths.agent_home):
                continue
            files += [Path(dirpath, name) for name in names]
    return sorted(set(files))


def test_the_agent_opens_no_file_of_the_appliance(full_lab: Lab) -> None:
    lab = full_lab
    secrets = [lab.password_file("app"), lab.paths.client_secret_file("lab-dba-1"),
               lab.paths.client_secret_file("lab-dba-2"), lab.paths.issuer_admin_token, lab.paths.issuer_key,
               lab.paths.identity_dir / "ca" / "ca.key", lab.paths.ca_key, lab.paths.server_key,
               lab.dir / "state.json", lab.config_path, lab.paths.identity_dir / "certificates.db"]
    files = appliance_files(lab)
    # The test means something: the secrets are there, and the audit keys are among the files.
    assert all(path.is_file() for path in secrets), [p for p in secrets if not p.is_file()]
    assert set(secrets) <= set(files)
    assert any(p.is_relative_to(lab.audit_dir / "keys") for p in files)
    proc = agent(lab, [sys.executable, "-c", OPEN_EACH], input=json.dumps([str(p) for p in files]))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
    # Nor by listing: the lab root is an empty tmpfs to the agent, its home aside.
    listing = agent(lab, ["find", str(lab.root), "-mindepth", "1", "-not", "-path", f"{lab.paths.agent_home}*"])
    assert listing.stdout.split() == [str(lab.dir)]


def test_the_agent_cannot_reach_the_control_socket(full_lab: Lab) -> None:
    from appliance.config import load_config
    from appliance.proxy.control import control_request
    lab = full_lab
    assert control_request(load_config(lab.config_path), {"op": "policy"})  # it serves the appliance side
    proc = agent(lab, [sys.executable, "-c", CONNECT, str(lab.control_socket)])
    assert proc.stdout.strip() == "FileNotFoundError", proc.stderr


@pytest.mark.parametrize("attempt", [
    ["umount", "-l", "{root}"],
    ["mount", "--bind", "/", "/mnt"],
    ["nsenter", "-t", "1", "-m", "cat", "{secret}"],
    ["ip", "netns", "exec", "{gw}", "cat", "{secret}"],
    ["cat", "/proc/{proxy}/root{secret}"],
    ["readlink", "-e", "/proc/{proxy}/fd/0"],
    ["cat", "/proc/{proxy}/cwd/state.json"],  # the proxy runs in the lab directory
    ["cat", "/proc/{proxy}/environ"],
    ["unshare", "--mount", "sh", "-c", "umount -l {root} && cat {secret}"],
    # A user namespace of its own gives every capability there, but the view's mounts came
    # from a more privileged namespace: locked, they cannot be taken off.
    ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "umount -l {root}; cat {secret}"],
], ids=["umount", "mount", "nsenter-pid1", "netns-gw", "proc-root", "proc-fd", "proc-cwd", "proc-environ", "unshare",
        "userns-unshare"])
def test_the_agent_cannot_undo_or_reach_around_its_view(full_lab: Lab, attempt: list[str]) -> None:
    lab = full_lab
    values = {"root": str(lab.root), "secret": str(lab.password_file("app")), "gw": lab.namespaces["gw"],
              "proxy": str(lab.status()["proxy"]["pid"])}
    proc = agent(lab, [arg.format(**values) for arg in attempt])
    assert proc.returncode != 0, proc.stdout
    assert lab.password("app") not in proc.stdout


def test_the_agent_cannot_put_a_link_into_another_namespace(full_lab: Lab) -> None:
    """Network namespaces are all owned by the host's user namespace, so an agent holding
    CAP_NET_ADMIN could name any process's namespace by pid: ``ip link add … peer … netns
    PID`` made a veth whose other end was in the gateway's (or the host's, or the
    database's) namespace — a link of its own around the appliance."""
    lab = full_lab
    proxy = str(lab.status()["proxy"]["pid"])
    try:
        proc = agent(lab, ["ip", "link", "add", "tgvx", "type", "veth", "peer", "name", "tgvy", "netns", proxy])
        assert proc.returncode != 0, proc.stdout
        in_gw = lab.exec("gw", ["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
        assert "tgvy" not in in_gw
    finally:  # removing one end removes the pair, whichever namespace the other is in
        lab.exec("agent", ["ip", "link", "del", "tgvx"], capture_output=True)
    # The agent's raw-packet capability stays (the hardening probes craft packets with it).
    raw = agent(lab, [sys.executable, "-c", "import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, 255)"])
    assert raw.returncode == 0, raw.stderr


def test_the_agents_own_home_and_psql_through_the_proxy_still_work(full_lab: Lab) -> None:
    lab = full_lab
    home = agent(lab, ["sh", "-c", 'echo "$HOME"; ls "$HOME/.postgresql"'])
    assert home.stdout.split() == [str(lab.paths.agent_home), "postgresql.crt", "postgresql.key", "root.crt"]
    # Through the CLI as a person would; the session carries the enrolled identity.
    out = lab_cli("exec", "--name", lab.name, "agent", "--", "psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                  lab.conninfo(), "-c", "SELECT current_user, count(*) > 0 FROM cards").stdout
    assert out.strip() == "app|t"
    # Enrolling again from the agent's side needs only its home.
    enrolled = agent(lab, lab_identity.enroll_agent_argv(lab.paths))
    assert enrolled.returncode == 0 and "expires at" in enrolled.stdout, enrolled.stderr


def test_an_approvers_secret_is_not_the_agents_to_use(full_lab: Lab) -> None:
    lab = full_lab
    stolen = agent(lab, lab_identity.token_argv(lab.paths, "lab-dba-1"))
    assert stolen.returncode != 0 and "No such file" in stolen.stderr
    assert lab_identity.token_node("lab-dba-1") == "gw"
    token = lab_cli("token", "--name", lab.name, "lab-dba-1").stdout.strip()
    assert token.count(".") == 2
    own = lab_cli("token", "--name", lab.name, "lab-agent").stdout.strip()  # the agent's own, from its home
    assert own.count(".") == 2


def test_the_issuer_admin_api_needs_its_secret_and_is_out_of_the_agents_reach(full_lab: Lab) -> None:
    lab = full_lab
    post = """\
import ssl, sys, urllib.error, urllib.request
request = urllib.request.Request(sys.argv[1], method="POST", data=b"")
context = ssl.create_default_context(cafile=sys.argv[2])
try:
    urllib.request.urlopen(request, context=context, timeout=30)
    print("200")
except urllib.error.HTTPError as exc:
    print(exc.code)
except OSError as exc:
    print(type(getattr(exc, "reason", exc)).__name__)
"""
    public = f"{lab_identity.issuer_url()}/admin/rotate?drop_old=1"
    admin_there = f"https://{lab.status()['addresses']['gw']['agent_side'][0]}:{lab_identity.ISSUER_ADMIN_PORT}"
    for url, expected in ((public, "404"), (f"{admin_there}/admin/rotate", "ConnectionRefusedError"),
                          (f"{lab_identity.issuer_admin_url()}/admin/rotate", "ConnectionRefusedError")):
        proc = agent(lab, [sys.executable, "-c", post, url, str(lab.paths.agent_lab_ca)])
        assert proc.stdout.strip() == expected, (url, proc.stdout, proc.stderr)
    # On the appliance side, the admin listener is there but wants the secret …
    proc = lab.exec("gw", [sys.executable, "-c", post, f"{lab_identity.issuer_admin_url()}/admin/rotate",
                           str(lab.paths.ca_cert)], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "401", proc.stderr
    # … which `tollgate lab rotate-issuer-key` presents.
    rotated = json.loads(lab_cli("rotate-issuer-key", "--name", lab.name, "--drop-old").stdout)
    assert rotated["kids"] == [rotated["kid"]]
    # The agent enrolls with tokens signed by the new key (the appliance follows the rotation).
    enrolled = agent(lab, lab_identity.enroll_agent_argv(lab.paths))
    assert enrolled.returncode == 0, enrolled.stderr
