"""Holds end to end: a statement waits in the proxy while people decide, in the lab.

The agent's UPDATE of ``cards`` matches the lab policy's ``card-changes-need-a-dba`` rule.
Approvers are the dev issuer's ``lab-dba-1`` and ``lab-dba-2`` (group payments-dbas); they
decide with ``tollgate approvals`` against the appliance's approvals API, as people would.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from appliance.lab import Lab
from appliance.lab import identity as lab_identity
from appliance.lab.policy import LAB_POLICY
from tests.e2e.conftest import psql, run, set_policy, superuser_sql, wait_for

pytestmark = pytest.mark.lab

@pytest.fixture(scope="module")
def tokens(lab: Lab) -> dict[str, str]:
    """Access tokens for the lab's approvers, from the dev issuer (client credentials)."""
    out = {}
    for client in (*lab_identity.APPROVERS, lab_identity.AGENT_CLIENT):
        # The approvers' secrets are on the appliance side: their tokens are fetched from gw.
        proc = run(lab, lab_identity.token_node(client), lab_identity.token_argv(lab.paths, client))
        out[client] = proc.stdout.decode().strip()
    return out


def approvals(lab: Lab, token: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    # People decide from outside the agent's view (which has no config and no CA of the appliance).
    return run(lab, "gw", [sys.executable, "-m", "appliance.cli", "approvals", *args, "-c", str(lab.config_path)],
               env={"TOLLGATE_TOKEN": token}, check=check)


def listing(lab: Lab, token: str, status: str = "pending") -> list[dict[str, Any]]:
    out = approvals(lab, token, "list", "--status", status, "--json").stdout
    return json.loads(out)


def held_request(lab: Lab, token: str, fragment: str) -> dict[str, Any]:
    """Wait for the pending request whose SQL contains ``fragment``; return it."""
    return wait_for(lambda: next((r for r in listing(lab, token) if fragment in r["sql"]), None),
                    f"a pending approval request for {fragment!r}")


def start_psql(lab: Lab, sql: str, home: Path | None = None) -> subprocess.Popen[bytes]:
    prefix = ["env", f"HOME={home}"] if home else []
    return lab.popen("agent", [*prefix, "psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", lab.conninfo(), "-c", sql],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[bytes]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, out.decode(), err.decode()


def brand(lab: Lab, card_id: int) -> str:
    return superuser_sql(lab, f"SELECT brand FROM cards WHERE id = {card_id}").strip()


@pytest.fixture
def card(lab: Lab):
    """A card whose brand the test may change; put back afterwards."""
    card_id = 7
    before = brand(lab, card_id)
    yield card_id, before
    superuser_sql(lab, f"UPDATE cards SET brand = '{before}' WHERE id = {card_id}")


def test_an_update_held_and_approved_by_a_dba_runs_exactly_once(lab: Lab, tokens, card):
    card_id, before = card
    proc = start_psql(lab, f"UPDATE cards SET brand = brand || '+' WHERE id = {card_id} RETURNING brand")
    try:
        request = held_request(lab, tokens["lab-dba-1"], f"WHERE id = {card_id}")
        assert request["requester"]["subject"] == "lab-agent" and request["target"] == "payments"
        assert request["rule"]["name"] == "card-changes-need-a-dba" and "write" in request["classes"]
        # Only that session waits: the same agent's other sessions carry on meanwhile.
        assert psql(lab, "SELECT count(*) FROM cards").strip() == "300"
        assert brand(lab, card_id) == before  # nothing ran yet
        approvals(lab, tokens["lab-dba-1"], "approve", request["id"], "--reason", "ticket CHG-1042")
        code, out, err = finish(proc)
    finally:
        proc.kill()
    assert code == 0, err
    assert out.splitlines()[0] == before + "+"
    assert brand(lab, card_id) == before + "+"  # exactly once
    [decided] = [r for r in listing(lab, tokens["lab-dba-2"], "approved") if r["id"] == request["id"]]
    assert decided["votes"][0]["approver"]["subject"] == "lab-dba-1"
    assert decided["votes"][0]["reason"] == "ticket CHG-1042"
    # The audit log has the request, the decision with its approver and reason, and the
    # statement that ran under it.
    from tests.e2e.test_audit import records
    mine = wait_for(lambda: [r for r in records(lab) if r.get("approval") == request["id"]
                             and r["type"] in ("approval.request", "approval.decision", "statement")]
                    if len([r for r in records(lab) if r.get("approval") == request["id"]]) >= 3 else None,
                    "the approval's records")
    by_type = {r["type"]: r for r in mine}
    assert by_type["approval.request"]["user"] == "lab-agent" and by_type["approval.request"]["rule"] == \
        "card-changes-need-a-dba"
    assert by_type["approval.decision"]["decision"] == "approve"
    assert by_type["approval.decision"]["approver"] == "lab-dba-1"
    assert by_type["approval.decision"]["reason"] == "ticket CHG-1042"
    assert by_type["statement"]["outcome"] == "success" and f"WHERE id = {card_id}" in by_type["statement"]["text"]


def test_a_denied_statement_gets_an_error_naming_the_approval_and_the_reason(lab: Lab, tokens, card):
    card_id, before = card
    proc = start_psql(lab, f"UPDATE cards SET pan = '4111111111111111' WHERE id = {card_id}")
    try:
        request = held_request(lab, tokens["lab-dba-1"], f"WHERE id = {card_id}")
        assert "4111111111111111" not in request["sql"] and "411111******1111" in request["sql"]
        approvals(lab, tokens["lab-dba-2"], "deny", request["id"], "--reason", "not during the freeze")
        code, _, err = finish(proc)
    finally:
        proc.kill()
    assert code != 0
    assert f"approval {request['id']} was denied by lab-dba-2: not during the freeze" in err
    assert brand(lab, card_id) == before


def test_the_agent_cannot_approve_and_an_approver_cannot_vote_twice(lab: Lab, tokens, card):
    card_id, _ = card
    proc = start_psql(lab, f"UPDATE cards SET brand = brand WHERE id = {card_id}")
    try:
        request = held_request(lab, tokens["lab-dba-1"], f"WHERE id = {card_id}")
        refused = approvals(lab, tokens["lab-agent"], "approve", request["id"], "--reason", "looks fine", check=False)
        assert refused.returncode != 0 and b"self_approval" in refused.stderr + refused.stdout
        no_reason = approvals(lab, tokens["lab-dba-1"], "approve", request["id"], "--reason", " ", check=False)
        assert no_reason.returncode != 0 and b"reason" in no_reason.stderr + no_reason.stdout
        approvals(lab, tokens["lab-dba-1"], "deny", request["id"], "--reason", "cleanup")
        again = approvals(lab, tokens["lab-dba-1"], "approve", request["id"], "--reason", "changed my mind",
                          check=False)
        assert again.returncode != 0
        code, _, err = finish(proc)
    finally:
        proc.kill()
    assert code != 0 and "was denied by lab-dba-1: cleanup" in err


def test_a_dba_cannot_approve_their_own_statement_but_another_dba_can(lab: Lab, tokens, card, tmp_path: Path):
    card_id, before = card
    # lab-dba-1 enrolls an agent certificate of their own, into a home of their own — on the
    # agent's side (tmp_path: the agent's view hides only the lab's appliance files), with a
    # copy of their secret handed over as a person would.
    home = tmp_path / "dba-home"
    (home / ".postgresql").mkdir(parents=True, exist_ok=True)
    (home / "client.secret").write_bytes(lab.paths.client_secret_file("lab-dba-1").read_bytes())
    argv = lab_identity.enroll_agent_argv(lab.paths)
    argv[argv.index("--client-id") + 1] = "lab-dba-1"
    argv[argv.index("--client-secret-file") + 1] = str(home / "client.secret")
    argv[argv.index("--out-dir") + 1] = str(home / ".postgresql")
    (home / ".postgresql" / "root.crt").write_bytes(lab.paths.ca_cert.read_bytes())
    run(lab, "agent", argv)
    proc = start_psql(lab, f"UPDATE cards SET brand = brand || '!' WHERE id = {card_id}", home=home)
    try:
        request = held_request(lab, tokens["lab-dba-2"], f"WHERE id = {card_id}")
        assert request["requester"]["subject"] == "lab-dba-1"
        own = approvals(lab, tokens["lab-dba-1"], "approve", request["id"], "--reason", "mine", check=False)
        assert own.returncode != 0 and b"self_approval" in own.stderr + own.stdout
        approvals(lab, tokens["lab-dba-2"], "approve", request["id"], "--reason", "four eyes")
        code, _, err = finish(proc)
    finally:
        proc.kill()
    assert code == 0, err
    assert brand(lab, card_id) == before + "!"


def test_a_held_statement_times_out_with_a_clear_error(lab: Lab, tokens, card, lab_policy):
    card_id, before = card
    set_policy(lab, LAB_POLICY.replace('timeout = "10m"', 'timeout = "2s"'))
    proc = start_psql(lab, f"UPDATE cards SET brand = 'late' WHERE id = {card_id}")
    code, _, err = finish(proc)
    assert code != 0 and "timed out after 2s without a decision" in err
    request_id = err.split("approval ")[1].split()[0]
    [expired] = [r for r in listing(lab, tokens["lab-dba-1"], "expired") if r["id"] == request_id]
    assert expired["status"] == "expired"
    assert brand(lab, card_id) == before


def test_cancelling_a_held_statement_gives_57014_and_withdraws_the_request(lab: Lab, tokens, card):
    card_id, before = card
    proc = lab.popen("agent", ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-v", "VERBOSITY=verbose", lab.conninfo(),
                               "-c", f"UPDATE cards SET brand = 'cancelled' WHERE id = {card_id}"],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        request = held_request(lab, tokens["lab-dba-1"], f"WHERE id = {card_id}")
        proc.send_signal(signal.SIGINT)  # psql sends a CancelRequest, as on Ctrl-C
        code, _, err = finish(proc)
    finally:
        proc.kill()
    assert code != 0 and "57014" in err
    withdrawn = wait_for(lambda: [r for r in listing(lab, tokens["lab-dba-1"], "withdrawn")
                                  if r["id"] == request["id"]],
                         "the request to be withdrawn")
    assert withdrawn[0]["status"] == "withdrawn"
    late = approvals(lab, tokens["lab-dba-1"], "approve", request["id"], "--reason", "too late", check=False)
    assert late.returncode != 0
    assert brand(lab, card_id) == before


PIPELINE_SCRIPT = """
import json, sys, psycopg
with psycopg.connect(sys.argv[1]) as conn:  # a transaction block
    conn.execute("SELECT 1")
    with conn.pipeline():
        cur = conn.execute("UPDATE cards SET brand = %s WHERE id = %s RETURNING brand", ("piped", int(sys.argv[2])))
        after = conn.execute("SELECT 41 + 1")
    out = [cur.fetchone()[0], after.fetchone()[0], conn.info.transaction_status.name]
    conn.commit()
print(json.dumps(out))
"""


def test_an_extended_protocol_statement_in_a_pipeline_and_transaction_is_held_with_its_parameters(
        lab: Lab, tokens, card):
    card_id, _ = card
    proc = lab.popen("agent", [sys.executable, "-c", textwrap.dedent(PIPELINE_SCRIPT), lab.conninfo(), str(card_id)],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        request = held_request(lab, tokens["lab-dba-1"], "SET brand = $1")
        assert request["params"] == ["piped", str(card_id)]
        approvals(lab, tokens["lab-dba-1"], "approve", request["id"], "--reason", "pipeline ok")
        code, out, err = finish(proc)
    finally:
        proc.kill()
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == ["piped", 42, "INTRANS"]
    assert brand(lab, card_id) == "piped"


def test_a_time_boxed_grant_covers_the_approved_statement_and_a_shape_only_when_chosen(lab: Lab, tokens, card):
    card_id, _before = card

    def held_then(sql: str, *approve: str) -> dict[str, Any]:
        proc = start_psql(lab, sql)
        try:
            request = held_request(lab, tokens["lab-dba-1"], sql)
            approvals(lab, tokens["lab-dba-1"], *approve[:1], request["id"], "--reason", "expiry fix-ups today",
                      *approve[1:])
            finish(proc)
        finally:
            proc.kill()
        return request

    exact = f"UPDATE cards SET expiry = expiry WHERE id = {card_id}"
    request = held_then(exact, "approve", "--for-minutes", "5")
    granted = wait_for(lambda: [r for r in listing(lab, tokens["lab-dba-1"], "approved")
                                if r["id"] == request["id"] and r["grant"]], "the grant to be recorded")
    assert (granted[0]["grant"]["subject"], granted[0]["grant"]["scope"]) == ("lab-agent", "exact")
    # Exactly that statement runs again without asking (spelt differently: same statement) …
    assert psql(lab, exact.lower() + " -- again").strip() == "UPDATE 1"
    # … another constant is a new request: an exact grant does not cover it. Its approver
    # is shown what a shape grant would let vary, and chooses that.
    other = f"UPDATE cards SET expiry = expiry WHERE id = {card_id + 1}"
    second = held_then(other, "approve", "--for-minutes", "5", "--any-constants")
    assert second["free"] == [str(card_id + 1)]
    wait_for(lambda: [r for r in listing(lab, tokens["lab-dba-1"], "approved")
                      if r["id"] == second["id"] and r["grant"]], "the shape grant to be recorded")
    assert psql(lab, f"UPDATE cards SET expiry = expiry WHERE id = {card_id + 2}").strip() == "UPDATE 1"
    # A list of ids is another shape (one approved id must not become many): it waits, denied.
    listed = f"UPDATE cards SET expiry = expiry WHERE id IN ({card_id}, {card_id + 1})"
    proc = start_psql(lab, listed)
    try:
        denied = held_request(lab, tokens["lab-dba-1"], listed)
        approvals(lab, tokens["lab-dba-1"], "deny", denied["id"], "--reason", "not covered")
        assert finish(proc)[0] != 0
    finally:
        proc.kill()


PARSE_THEN_EXECUTE = """
import json, sys, psycopg
with psycopg.connect(sys.argv[1], autocommit=True) as conn:
    prepared = conn.pgconn.prepare(b"s1", b"UPDATE cards SET brand = $1 WHERE id = $2")  # a protocol Parse
    assert prepared.status == psycopg.pq.ExecStatus.COMMAND_OK, prepared.error_message
    ran = conn.pgconn.exec_(b"EXECUTE s1('via-execute', %d)" % int(sys.argv[2]))  # SQL, simple protocol
    print(json.dumps([ran.status == psycopg.pq.ExecStatus.COMMAND_OK, ran.command_status.decode(),
                      ran.error_message.decode()]))
"""


def test_sql_execute_of_a_protocol_parsed_update_to_cards_is_held_as_that_update(lab: Lab, tokens, card):
    card_id, before = card
    proc = lab.popen("agent", [sys.executable, "-c", textwrap.dedent(PARSE_THEN_EXECUTE), lab.conninfo(),
                               str(card_id)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        request = held_request(lab, tokens["lab-dba-1"], "EXECUTE s1(")
        assert request["sql"] == (f"EXECUTE s1('via-execute', {card_id})\n"
                                  "-- s1 is: UPDATE cards SET brand = $1 WHERE id = $2")
        assert request["rule"]["name"] == "card-changes-need-a-dba" and "write" in request["classes"]
        assert brand(lab, card_id) == before  # nothing ran yet
        approvals(lab, tokens["lab-dba-1"], "approve", request["id"], "--reason", "rename the brand")
        code, out, err = finish(proc)
    finally:
        proc.kill()
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == [True, "UPDATE 1", ""]
    assert brand(lab, card_id) == "via-execute"
    from tests.e2e.test_audit import records
    [statement] = wait_for(lambda: [r for r in records(lab) if r.get("approval") == request["id"]
                                    and r["type"] == "statement"] or None, "the statement's record")
    assert statement["executes"] == [{"name": "s1", "text": "UPDATE cards SET brand = $1 WHERE id = $2"}]
    assert statement["decision"] == "hold" and "write" in statement["classes"]


def _stderr_line(proc: subprocess.Popen[bytes], fragment: str) -> str:
    """Read psql's stderr until a line containing ``fragment`` (the process keeps running)."""
    assert proc.stderr is not None
    seen = []
    while line := proc.stderr.readline().decode():
        seen.append(line)
        if fragment in line:
            return line
    raise AssertionError(f"psql ended without printing {fragment!r}: {''.join(seen)}")


def test_a_held_agent_is_told_at_once_and_every_surface_names_one_session(lab: Lab, tokens, card):
    card_id, before = card
    proc = start_psql(lab, f"UPDATE cards SET brand = brand || '!' WHERE id = {card_id}")
    try:
        # psql prints the notice while the statement still waits: read before anyone decides.
        notice = _stderr_line(proc, "held for approval")
        request = held_request(lab, tokens["lab-dba-1"], f"WHERE id = {card_id}")
        assert request["status"] == "pending" and proc.poll() is None
        assert f"statement held for approval {request['id']} by policy rule 'card-changes-need-a-dba'" in notice
        hint = _stderr_line(proc, "HINT:")
        assert f"{lab_identity.enroll_url()}/approvals/{request['id']}" in hint
        # The live listing: the same session id as the request, held on that approval.
        live = json.loads(run(lab, "gw", [sys.executable, "-m", "appliance.cli", "sessions", "--live", "--json",
                                          "-c", str(lab.config_path)]).stdout)
        [mine] = [s for s in live if s["id"] == request["session_id"]]
        assert mine["held_on"] == request["id"] and f"WHERE id = {card_id}" in mine["statement"]
        assert mine["statement_age"] >= 0
        table = run(lab, "gw", [sys.executable, "-m", "appliance.cli", "sessions", "--live",
                                "-c", str(lab.config_path)]).stdout.decode()
        assert f"held {request['id']}" in table and request["session_id"] in table
        shown = approvals(lab, tokens["lab-dba-1"], "show", request["id"]).stdout.decode()
        assert f"session {request['session_id']}" in shown
        approvals(lab, tokens["lab-dba-1"], "approve", request["id"], "--reason", "one id")
        code, _, err = finish(proc)
    finally:
        proc.kill()
    assert code == 0, err
    assert brand(lab, card_id) == before + "!"
    # tollgate.log tells the decision too, with the same session id.
    wait_for(lambda: f"approval {request['id']} (session {request['session_id']}) approved by lab-dba-1"
             in lab.proxy_log.read_text(errors="replace"), "the decision in the proxy's log")
    from tests.e2e.test_audit import records, tollgate
    session = request["session_id"]
    ended = wait_for(lambda: next((r for r in records(lab) if r["type"] == "session.end" and r["session"] == session),
                                  None), "the session's end record")
    assert ended["statements"] >= 1
    replay = tollgate(lab, "replay", session, "-c", str(lab.config_path)).stdout.decode()
    assert f"WHERE id = {card_id}" in replay and request["id"] in replay
