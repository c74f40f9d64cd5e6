"""The audit log when things go wrong: the proxy killed under load, the disk full.

A lab of its own whose audit directory is a small tmpfs, so the test can fill it. The
database logs every statement it runs (``log_statement = all``): that is the server's own
account, against which the audit log is checked — nothing that may change state ran
unrecorded. A statement proven read-only runs while its record syncs, so it may have run
unrecorded; what it returned must never have reached the agent unrecorded: the agents'
own account of what they received is checked too.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.lab import Lab
from appliance.lab import state as lab_state
from tests.e2e.conftest import run, superuser_sql, wait_for

pytestmark = pytest.mark.lab

AGENTS = 50


@pytest.fixture(scope="module")
def tmpfs_lab(lab_host: None) -> Iterator[Lab]:
    mount = Path(tempfile.mkdtemp(prefix="tollgate-audit-tmpfs-"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tollgate-audit-test", str(mount)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        mount.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        with Lab.create(owner_pid=os.getpid(), proxy=True, policy="permissive", audit_dir=mount / "audit") as lab:
            superuser_sql(lab, "ALTER SYSTEM SET log_statement = 'all'")
            superuser_sql(lab, "SELECT pg_reload_conf()")
            yield lab
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
        mount.rmdir()


def records(lab: Lab) -> list[dict[str, Any]]:
    out = []
    for segment in sorted((lab.audit_dir / "segments").glob("*.jsonl")):
        for line in segment.read_bytes().split(b"\n"):
            if line:
                with contextlib.suppress(ValueError):  # a line being written this instant
                    out.append(json.loads(line))
    return out


def executed_by_server(lab: Lab, prefix: str) -> set[str]:
    """Markers of the statements the database itself logged as run."""
    text = lab.paths.log.read_text(errors="replace")
    found = set()
    for line in text.splitlines():
        if "statement: " in line or "execute " in line:
            found.update(re.findall(rf"{prefix}-\d+-\d+", line))
    return found


def recorded(lab: Lab, prefix: str) -> set[str]:
    out = set()
    for r in records(lab):
        if r.get("type") == "statement" and r.get("outcome") == "success":
            out.update(re.findall(rf"{prefix}-\d+-\d+", r.get("text", "")))
    return out


LOAD = textwrap.dedent("""
    import json, sys, threading
    import psycopg
    conninfo, prefix, agents = sys.argv[1], sys.argv[2], int(sys.argv[3])
    done = [0] * agents
    errors = []
    received = []
    def agent(i):
        try:
            with psycopg.connect(conninfo, autocommit=True) as conn:
                n = 0
                while True:
                    marker = f"{prefix}-{i}-{n}"
                    # Even: a read, run while its record syncs. Odd: a statement that
                    # changes the session's state, which must wait for its record.
                    sql = (f"SELECT '{marker}'" if n % 2 == 0
                           else f"SELECT set_config('tollgate.mark', '{marker}', false)")
                    received.extend(row[0] for row in conn.execute(sql).fetchall())
                    n += 1
                    done[i] = n
        except Exception as exc:
            errors.append(type(exc).__name__)
    threads = [threading.Thread(target=agent, args=(i,)) for i in range(agents)]
    for t in threads: t.start()
    print("started", flush=True)
    for t in threads: t.join()
    print(json.dumps({"done": sum(done), "errors": len(errors), "received": received}), flush=True)
""")


def changes_state(marker: str) -> bool:
    """The LOAD's odd statements (set_config) change state; the even ones only read."""
    return int(marker.rsplit("-", 1)[1]) % 2 == 1


def test_kill_9_under_load_loses_no_record_of_what_ran(tmpfs_lab: Lab, tmp_path: Path):
    lab = tmpfs_lab
    prefix = f"tgk{secrets.token_hex(3)}"
    load = lab.popen("agent", [sys.executable, "-c", LOAD, lab.conninfo(), prefix, str(AGENTS)],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: len(recorded(lab, prefix)) >= 3000, "3000 statements recorded under load", timeout=120)
        proxy = lab.state["pids"]["proxy"]
        os.kill(proxy["pid"], signal.SIGKILL)
        out, err = load.communicate(timeout=120)
    finally:
        load.kill()
    summary = json.loads(out.decode().strip().splitlines()[-1])
    assert summary["errors"] == AGENTS, err.decode()[-2000:]  # every agent lost its connection
    wait_for(lambda: not lab_state.process_alive(proxy), "the killed proxy to be gone")
    lab.restart_proxy()

    ran = executed_by_server(lab, prefix)
    assert len(ran) >= 3000
    on_record = recorded(lab, prefix)
    missing = {marker for marker in ran if changes_state(marker)} - on_record
    assert not missing, f"{len(missing)} statements ran without a record, e.g. {sorted(missing)[:5]}"
    received = set(summary["received"])
    assert any(not changes_state(marker) for marker in received)  # reads were answered
    unrecorded = received - on_record
    assert not unrecorded, \
        f"{len(unrecorded)} answers reached the agent without a record, e.g. {sorted(unrecorded)[:5]}"

    every = records(lab)
    restart = [r for r in every if r["type"] == "log.start"][-1]
    before = every[restart["seq"] - 1]
    assert before["run"] != restart["run"] and before["type"] != "log.stop"  # killed: no clean stop
    assert restart["outcome"] == "success" and "recovered" in restart
    bundle = tmp_path / "after-kill.tar.gz"
    run(lab, "gw", [sys.executable, "-m", "appliance.cli", "audit", "export", "-c", str(lab.config_path),
                    "-o", str(bundle), "--no-progress"])
    root_key = (lab.audit_dir / "keys" / "root.pub").read_text().strip()
    verified = run(lab, "gw", [sys.executable, "-m", "appliance.audit.verifier", str(bundle), "--root-key", root_key],
                   check=False)
    assert verified.returncode == 0, verified.stdout.decode() + verified.stderr.decode()


def _fill(path: Path) -> None:
    chunk = b"\0" * (1 << 20)
    with open(path, "wb", buffering=0) as fh:
        while True:
            try:
                fh.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 1:
                    return
                chunk = chunk[:len(chunk) // 2]


def test_a_full_audit_directory_refuses_statements_until_space_returns(tmpfs_lab: Lab):
    lab = tmpfs_lab
    prefix = f"tgf{secrets.token_hex(3)}"
    filler = lab.audit_dir.parent / "filler"
    # A read runs while its record syncs: when that fails, it may have run, but nothing
    # of its answer reaches the agent.
    _fill(filler)
    try:
        reads = [arg for i in range(60) for arg in ("-c", f"SELECT '{prefix}-2-{i}'")]
        refused = run(lab, "agent", ["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-v", "VERBOSITY=verbose",
                                     lab.conninfo(), *reads], check=False)
        err = refused.stderr.decode()
        assert refused.returncode != 0
        # Refused before it ran, or (its record's write failing after it was sent) run
        # and its answer withheld: which depends on which record the disk refuses first.
        assert "53100" in err and ("so it was not run" in err or "its results were withheld" in err)
        answered = refused.stdout.decode().split()
        assert answered == [f"{prefix}-2-{i}" for i in range(len(answered))]  # up to the refused one, none after
    finally:
        filler.unlink()
    assert set(answered) <= recorded(lab, prefix)  # every answer the agent got was recorded
    _fill(filler)
    try:
        # The segment's last page may still have room for a record or two: keep going
        # until the log can take no more. Each changes the session's state: none may
        # reach the database unrecorded.
        statements = [arg for i in range(60)
                      for arg in ("-c", f"SELECT set_config('tollgate.mark', '{prefix}-0-{i}', false)")]
        refused = run(lab, "agent", ["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-v", "VERBOSITY=verbose",
                                     lab.conninfo(), *statements], check=False)
        err = refused.stderr.decode()
        assert refused.returncode != 0
        assert "53100" in err and "could not record this statement in the audit log" in err
        assert "No space left on device" in err
        ran_before = len(refused.stdout.decode().split())
    finally:
        filler.unlink()
    # (The reads above may have run unrecorded: only these count.)
    executed = {marker for marker in executed_by_server(lab, prefix) if not marker.startswith(f"{prefix}-2-")}
    assert f"{prefix}-0-{ran_before}" not in executed  # the refused one never reached the database
    assert executed <= recorded(lab, prefix)  # and whatever ran before it was recorded
    # Space is back: service resumes by itself, and the gap is on the record.
    out = run(lab, "agent", ["psql", "-X", "-A", "-t", lab.conninfo(), "-c", f"SELECT '{prefix}-1-0'"]).stdout
    assert out.decode().strip() == f"{prefix}-1-0"
    assert f"{prefix}-1-0" in recorded(lab, prefix)
    # One account per outage: a result's record dropped with a batch that could not be
    # written is one too (its "lost" seqs; nothing waited for it), before the refused statement.
    failures = wait_for(lambda: [r for r in records(lab) if r["type"] == "audit.failure"] or None,
                        "the audit.failure record")
    assert sum(f["refused"] for f in failures) >= 1
    for failure in failures:
        assert "No space left" in failure["error"] and (failure["refused"] >= 1 or "lost" in failure)
        assert failure["outcome"] == "failure" and failure["user"] == "tollgate"
