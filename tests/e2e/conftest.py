"""End-to-end fixtures: one lab with Tollgate in it, and ways to act from its namespaces.

Everything here goes through the real path: a client in the agent namespace dials the
database's real address, nftables in the gateway namespace diverts it into the proxy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence

import pytest

from appliance.lab import Lab


@pytest.fixture(scope="session")
def lab(lab_host: None) -> Iterator[Lab]:
    # agent_direct: these tests compare the direct path with Tollgate's from one process in
    # the agent's namespace, so the database subnet stays reachable from it (not protected).
    # TOLLGATE_TEST_WORKERS=N runs the whole end-to-end suite through a proxy of N workers.
    workers = int(os.environ.get("TOLLGATE_TEST_WORKERS", "1"))
    with Lab.create(owner_pid=os.getpid(), proxy=True, agent_direct=True, workers=workers) as lab:
        yield lab


def run(lab: Lab, node: str, argv: Sequence[str], *, input: bytes | None = None, timeout: float = 120,
        check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run a command in a lab node, capturing output; failures show both streams."""
    proc = subprocess.run(lab.command(node, list(argv)), input=input, capture_output=True, timeout=timeout,
                          env=lab.env(env))
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}):\n"
                             f"{proc.stdout.decode(errors='replace')}\n{proc.stderr.decode(errors='replace')}")
    return proc


def psql(lab: Lab, sql: str, *, direct: bool = False, node: str = "agent", role: str = "app",
         dbname: str = "payments", extra: Sequence[str] = ()) -> str:
    """Run SQL with psql from a node; through Tollgate unless ``direct``. Returns stdout."""
    conninfo = lab.conninfo(role, direct=direct, dbname=dbname)
    proc = run(lab, node, ["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", conninfo, *extra, "-c", sql])
    return proc.stdout.decode()


def python(lab: Lab, code: str, *args: str, node: str = "agent", timeout: float = 120,
           check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """Run a Python snippet (with the venv's packages) in a lab node."""
    return run(lab, node, [sys.executable, "-c", textwrap.dedent(code), *args], timeout=timeout, check=check)


def python_json(lab: Lab, code: str, *args: str, **kw: object) -> object:
    """Run a snippet that prints one JSON document as its last line; return it decoded."""
    out = python(lab, code, *args, **kw).stdout.decode().strip().splitlines()
    return json.loads(out[-1])


def superuser_sql(lab: Lab, sql: str, dbname: str = "payments") -> str:
    """SQL as the postgres superuser over the database's own Unix socket (never via Tollgate)."""
    db = lab.status()["database"]
    proc = run(lab, "db", ["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", db["socket_dir"],
                           "-p", str(db["port"]), "-U", "postgres", "-d", dbname, "-c", sql])
    return proc.stdout.decode()


def proxy_request(lab: Lab, request: dict) -> dict:
    from appliance.config import load_config
    from appliance.proxy.control import control_request
    return control_request(load_config(lab.config_path), request)


def live_sessions_during(lab: Lab, sql: str = "SELECT 1", *, conninfo: str | None = None) -> tuple[list[dict], str]:
    """Run ``sql`` in a psql session from the agent and, while that session is still open,
    list the proxy's live sessions (``tollgate sessions --live``) from the appliance side —
    the agent cannot reach the control socket. Returns (sessions, psql's output of ``sql``)."""
    marker = "tollgate-test: statement done"
    proc = lab.popen("agent", ["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", conninfo or lab.conninfo()],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(f"{sql};\n\\echo {marker}\n".encode())
        proc.stdin.flush()
        out = []
        # psql echoes the marker only once the statement has run: the session is open now.
        while (line := proc.stdout.readline().decode()).strip() != marker:
            if not line:
                raise AssertionError(f"psql ended before the marker: {proc.communicate()[1].decode()}")
            out.append(line)
        listing = run(lab, "gw", [sys.executable, "-m", "appliance.cli", "sessions", "--live", "-c",
                                  str(lab.config_path), "--json"])
        proc.stdin.close()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return json.loads(listing.stdout), "".join(out)


def wait_for(condition, what: str, timeout: float = 60.0, interval: float = 0.05):
    """Wait until ``condition()`` returns something truthy (an observable state of the
    system under test), and return it; fail naming ``what`` after ``timeout``.

    The timeout is a safety net for a state that never comes, never a bound on how fast it
    comes: nothing may assert on how long the wait took."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def set_policy(lab: Lab, text: str) -> None:
    """Replace the appliance's policy file and wait until the proxy enforces exactly it."""
    import hashlib
    tmp = lab.policy_path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, lab.policy_path)  # the rename-over an editor does: never a half-written file
    want = hashlib.sha256(text.encode()).hexdigest()
    wait_for(lambda: policy_digests(lab) == {want}, "the proxy (every worker) to load the new policy")


def policy_digests(lab: Lab) -> set[str]:
    """The digest of the policy each worker enforces (one process: its own)."""
    reply = proxy_request(lab, {"op": "policy"})
    return {w.get("sha256") for w in reply.get("workers", [reply])}


@pytest.fixture
def lab_policy(lab: Lab) -> Iterator[None]:
    """Restore the lab's own policy after a test that changes it, whatever happens."""
    from appliance.lab.policy import POLICIES
    try:
        yield
    finally:
        set_policy(lab, POLICIES[lab.policy])
