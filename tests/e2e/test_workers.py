"""A proxy of two workers (``[proxy] workers = 2``) end to end, in a lab of its own.

Connections land on both workers (SO_REUSEPORT); what must reach every worker does: a
revocation ends the revoked certificate's sessions in each, a hold in either worker is
decided through the approvals API, a cancel reaches its session whichever worker took
the cancel connection, SIGHUP to the primary reloads every worker's policy. The audit
log stays one tree, written by the primary, and verifies. A killed worker is replaced;
a killed primary takes its workers with it (nothing may run without the audit writer).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.identity import Identity
from appliance.lab import Lab
from appliance.lab import identity as lab_identity
from tests.e2e.conftest import proxy_request, psql, run, superuser_sql, wait_for
from tests.e2e.test_audit import records
from tests.e2e.test_identity import identity_status, issue

pytestmark = pytest.mark.lab

MARKER = "tollgate-test: connected"
TRIES = 40  # connections to open at most until both workers have one: 2^-39 to miss


@pytest.fixture(scope="module")
def lab(lab_host: None) -> Iterator[Lab]:
    with Lab.create(owner_pid=os.getpid(), proxy=True, workers=2) as lab:
        yield lab


@pytest.fixture(scope="module")
def tokens(lab: Lab) -> dict[str, str]:
    out = {}
    for client in lab_identity.APPROVERS:
        proc = run(lab, lab_identity.token_node(client), lab_identity.token_argv(lab.paths, client))
        out[client] = proc.stdout.decode().strip()
    return out


class Client:
    """A psql session from the agent, kept open after its first statement ran."""

    def __init__(self, lab: Lab, env: dict[str, str] | None = None) -> None:
        self.proc = lab.popen("agent", ["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", lab.conninfo()],
                              env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"SELECT pg_backend_pid();\n\\echo {MARKER}\n".encode())
        self.proc.stdin.flush()
        lines = []
        while (line := self.proc.stdout.readline().decode()).strip() != MARKER:
            if not line:
                raise AssertionError(f"psql ended: {self.proc.communicate()[1].decode()}")
            lines.append(line)
        self.backend_pid = int(lines[0])

    def run(self, sql: str) -> tuple[str, str]:
        """Send ``sql`` and end the session; psql's output and errors."""
        out, err = self.proc.communicate(f"{sql};\n".encode(), timeout=60)
        return out.decode(), err.decode()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def worker_of(lab: Lab, backend_pid: int) -> int:
    sessions = proxy_request(lab, {"op": "sessions"})["sessions"]
    return next(s["worker"] for s in sessions if s["backend_pid"] == backend_pid)


def clients_on_both_workers(lab: Lab, env: dict[str, str] | None = None) -> list[Client]:
    clients: list[Client] = []
    seen: set[int] = set()
    try:
        while seen != {1, 2}:
            assert len(clients) < TRIES, f"{TRIES} connections all landed on worker(s) {seen}"
            clients.append(Client(lab, env))
            seen.add(worker_of(lab, clients[-1].backend_pid))
    except BaseException:
        for client in clients:
            client.close()
        raise
    return clients


def primary_pid(lab: Lab) -> int:
    return lab.state["pids"]["proxy"]["pid"]


def test_connections_land_on_both_workers_and_the_primary_lists_them_all(lab: Lab):
    workers = proxy_request(lab, {"op": "workers"})["workers"]
    assert [w["worker"] for w in workers] == [1, 2] and all(w["ready"] for w in workers)
    assert len({w["pid"] for w in workers} | {primary_pid(lab)}) == 3
    clients = clients_on_both_workers(lab)
    try:
        sessions = proxy_request(lab, {"op": "sessions"})["sessions"]
        assert {c.backend_pid for c in clients} <= {s["backend_pid"] for s in sessions}
        assert {s["worker"] for s in sessions} == {1, 2}
        # Every session works, whichever worker has it.
        for client in clients:
            out, err = client.run("SELECT count(*) FROM cards")
            assert out.strip() == "300", err
    finally:
        for client in clients:
            client.close()


def test_a_revocation_ends_the_certificates_sessions_in_every_worker(lab: Lab, tmp_path: Path):
    serial = issue(lab, Identity("two-workers", "agent", ("payments-agents",)), tmp_path / "c")
    env = {"PGSSLCERT": str(tmp_path / "c" / "postgresql.crt"), "PGSSLKEY": str(tmp_path / "c" / "postgresql.key")}
    clients = clients_on_both_workers(lab, env)
    try:
        run(lab, "gw", [sys.executable, "-m", "appliance.cli", "certs", "revoke", f"{serial:X}",
                        "--reason", "incident 7", "--state-dir", identity_status(lab)["state_dir"]])
        serial_hex = f"{serial:032X}"
        wait_for(lambda: not [s for s in proxy_request(lab, {"op": "sessions"})["sessions"]
                              if s["certificate_serial"] == serial_hex], "every worker to end the revoked sessions")
        for client in clients:
            out, err = client.run("SELECT 1")
            assert "was revoked" in err and "incident 7" in err, (out, err)
    finally:
        for client in clients:
            client.close()


def held_update(lab: Lab, card_id: int) -> Client:
    """A session holding an UPDATE of ``card_id`` (the lab policy sends it to a DBA)."""
    client = Client(lab)
    assert client.proc.stdin is not None
    client.proc.stdin.write(f"UPDATE cards SET brand = brand || '+w' WHERE id = {card_id};\n".encode())
    client.proc.stdin.flush()
    return client


def pending(lab: Lab, token: str) -> list[dict]:
    out = run(lab, "gw", [sys.executable, "-m", "appliance.cli", "approvals", "list", "--status", "pending", "--json",
                          "-c", str(lab.config_path)], env={"TOLLGATE_TOKEN": token}).stdout
    return json.loads(out)


def brand(lab: Lab, card_id: int) -> str:
    return superuser_sql(lab, f"SELECT brand FROM cards WHERE id = {card_id}").strip()


def test_holds_in_either_worker_are_decided_through_the_approvals_api(lab: Lab, tokens):
    token = tokens["lab-dba-1"]
    cards = list(range(21, 21 + TRIES))
    before = {card: brand(lab, card) for card in cards[:4]}
    clients: dict[int, Client] = {}
    held_in: dict[int, int] = {}
    try:
        for card in cards:
            if set(held_in.values()) == {1, 2}:
                break
            clients[card] = held_update(lab, card)
            wait_for(lambda card=card: [r for r in pending(lab, token) if f"WHERE id = {card}" in r["sql"]],
                     f"the hold of card {card}")
            held_in[card] = worker_of(lab, clients[card].backend_pid)
            before.setdefault(card, brand(lab, card))
        assert set(held_in.values()) == {1, 2}
        for request in pending(lab, token):
            if any(f"WHERE id = {card}" in request["sql"] for card in clients):
                run(lab, "gw", [sys.executable, "-m", "appliance.cli", "approvals", "approve", request["id"],
                                "--reason", "two workers", "-c", str(lab.config_path)], env={"TOLLGATE_TOKEN": token})
        for card, client in clients.items():
            out, err = client.run("SELECT 1")
            assert "UPDATE 1" in out, err
            assert brand(lab, card) == before[card] + "+w"  # exactly once
    finally:
        for client in clients.values():
            client.close()
        for card in clients:
            superuser_sql(lab, f"UPDATE cards SET brand = '{before[card]}' WHERE id = {card}")


def cancels(lab: Lab) -> list[dict]:
    return proxy_request(lab, {"op": "cancels"})["workers"]


def test_a_cancel_reaches_its_session_whichever_worker_takes_the_cancel_connection(lab: Lab, tokens):
    """psql's Ctrl-C opens a new connection with the key: the kernel may hand it to the
    other worker, which passes it on. Held statements: the cancel withdraws the hold."""
    token = tokens["lab-dba-1"]
    outcomes = []
    for card in range(81, 81 + TRIES):
        if sum(w["from_elsewhere"] for w in cancels(lab)) >= 1 and len(outcomes) >= 2:
            break
        proc = lab.popen("agent", ["psql", "-X", "-v", "ON_ERROR_STOP=1", lab.conninfo(),
                                   "-c", f"UPDATE cards SET brand = 'cancelled' WHERE id = {card}"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_for(lambda card=card: [r for r in pending(lab, token) if f"WHERE id = {card}" in r["sql"]],
                     f"the hold of card {card}")
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
            proc.wait()
        outcomes.append((proc.returncode, err.decode()))
    assert all(code != 0 and "canceling statement due to user request" in err for code, err in outcomes), outcomes
    counts = cancels(lab)
    assert sum(w["from_elsewhere"] for w in counts) >= 1  # one went through the other worker
    assert sum(w["passed_on"] for w in counts) >= sum(w["from_elsewhere"] for w in counts)


def test_sighup_to_the_primary_reloads_every_workers_policy(lab: Lab):
    def reloads() -> int:
        return lab.proxy_log.read_text(errors="replace").count("SIGHUP: reloading policy")

    before = reloads()
    os.kill(primary_pid(lab), signal.SIGHUP)
    wait_for(lambda: reloads() >= before + 2, "both workers to reload on SIGHUP")


def test_one_tree_from_both_workers_that_exports_and_verifies(lab: Lab):
    clients = clients_on_both_workers(lab)
    for client in clients:
        client.run("SELECT 'one tree'")
    every = records(lab)
    primary_run = proxy_request(lab, {"op": "audit"})["audit"]["run"]
    assert {r["run"] for r in every if r["type"] == "statement"} == {primary_run}
    runs = {r["session"].rsplit("-", 1)[0] for r in every if r["type"] == "session.start"}
    assert len(runs) == 2  # each worker names its sessions apart
    bundle = lab.dir / "bundle-workers.tar.gz"
    run(lab, "gw", [sys.executable, "-m", "appliance.cli", "audit", "export", "-c", str(lab.config_path),
                    "-o", str(bundle), "--no-progress"])
    root_key = (lab.audit_dir / "keys" / "root.pub").read_text().strip()
    verified = run(lab, "gw", [sys.executable, "-m", "appliance.audit.verifier", str(bundle), "--root-key", root_key,
                               "--offbox", str(lab.offbox_dir)])
    assert "records valid" in verified.stdout.decode()


def test_a_killed_worker_is_replaced_and_a_killed_primary_takes_its_workers_down(lab: Lab):
    workers = proxy_request(lab, {"op": "workers"})
    victim = workers["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: (lambda w: w["restarts"] >= workers["restarts"] + 1 and all(x["ready"] for x in w["workers"])
                      and victim not in {x["pid"] for x in w["workers"]})(proxy_request(lab, {"op": "workers"})),
             "the worker to be replaced")
    assert psql(lab, "SELECT count(*) FROM cards").strip() == "300"
    # Without its primary a worker has no audit writer: it stops, and agents fail closed.
    pids = [w["pid"] for w in proxy_request(lab, {"op": "workers"})["workers"]]
    run_before = proxy_request(lab, {"op": "audit"})["audit"]["run"]
    os.kill(primary_pid(lab), signal.SIGKILL)
    wait_for(lambda: not any(alive(pid) for pid in pids), "the workers to stop")
    refused = run(lab, "agent", ["psql", "-X", lab.conninfo(), "-c", "SELECT 1"], check=False)
    assert refused.returncode != 0
    lab.restart_proxy()
    assert psql(lab, "SELECT count(*) FROM cards").strip() == "300"
    assert proxy_request(lab, {"op": "audit"})["audit"]["run"] != run_before


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
