"""Enforcement end to end: policy decisions on the real path, in the lab.

The agent (group payments-agents) connects through Tollgate with its enrolled certificate;
the lab's policy (appliance/lab/policy.py) is what these tests hold it to.
"""

from __future__ import annotations

import pytest

from appliance.lab import Lab
from appliance.lab.policy import LAB_POLICY
from tests.e2e.conftest import proxy_request, psql, python_json, set_policy, superuser_sql, wait_for

ERRORS = """
import json, sys, psycopg
out = []
with psycopg.connect(sys.argv[1], autocommit=True) as conn:
    for sql in sys.argv[2:]:
        try:
            conn.execute(sql)
            out.append(None)
        except psycopg.Error as exc:
            out.append([exc.sqlstate, exc.diag.message_primary])
print(json.dumps(out))
"""


def errors(lab: Lab, *statements: str, direct: bool = False) -> list:
    return python_json(lab, ERRORS, lab.conninfo(direct=direct), *statements)  # type: ignore[return-value]


@pytest.mark.parametrize("sql", ["DROP TABLE cards", "TRUNCATE payments", "ALTER TABLE cards ADD COLUMN note text",
                                 "DROP TABLE IF EXISTS public.customers CASCADE", "GRANT ALL ON cards TO PUBLIC"])
def test_destructive_ddl_on_cardholder_tables_is_blocked_for_agents(lab: Lab, sql: str):
    [error] = errors(lab, sql)
    assert error == ["42501", "DROP, TRUNCATE, ALTER and GRANT on cardholder tables are not allowed for agents"]
    assert superuser_sql(lab, "SELECT count(*) FROM cards").strip() == "300"  # never reached the database
    assert "note" not in superuser_sql(lab, "SELECT string_agg(attname, ',') FROM pg_attribute "
                                            "WHERE attrelid = 'cards'::regclass")


def test_a_block_inside_a_transaction_leaves_it_failed_exactly_like_a_server_error(lab: Lab):
    script = """
    import json, sys, psycopg
    out = []
    with psycopg.connect(sys.argv[1]) as conn:  # not autocommit: a transaction block
        conn.execute("SELECT 1")
        for sql in ("DROP TABLE cards", "SELECT 1"):
            try:
                conn.execute(sql)
            except psycopg.Error as exc:
                out.append(exc.sqlstate)
        out.append(conn.info.transaction_status.name)
        conn.rollback()
        out.append(conn.execute("SELECT count(*) FROM cards").fetchone()[0])
        # Extended protocol, in one pipeline: the statements after the block are skipped
        # by the server, as after any error, up to the Sync.
        conn.rollback()
        try:
            with conn.pipeline():
                conn.execute("SELECT 1")
                conn.execute("TRUNCATE cards")
                conn.execute("SELECT 2")
        except psycopg.Error as exc:
            out.append(exc.sqlstate)
        out.append(conn.info.transaction_status.name)
    print(json.dumps(out))
    """
    out = python_json(lab, script, lab.conninfo())
    assert out == ["42501", "25P02", "INERROR", 300, "42501", "INERROR"]


def test_a_statement_no_rule_allows_is_denied_by_default(lab: Lab):
    assert errors(lab, "CREATE TABLE public.agent_notes (note text)") == [
        ["42501", "no policy rule allows this statement for your groups"]]


def test_sql_pglast_cannot_parse_is_blocked_not_passed_on(lab: Lab):
    [through] = errors(lab, "SELEC pan FROM cards")
    assert through[0] == "42501" and "cannot classify" in through[1] and "syntax error" in through[1]


def test_allowed_reads_go_through(lab: Lab):
    assert psql(lab, "SELECT count(*) FROM cards WHERE brand = 'visa'").strip().isdigit()


def test_a_policy_change_reaches_live_sessions_and_a_broken_file_is_refused(lab: Lab, lab_policy: None):
    script = """
    import json, sys, psycopg
    from pathlib import Path
    out = []
    with psycopg.connect(sys.argv[1], autocommit=True) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        prepared = "SELECT brand FROM cards WHERE id = %s"
        out.append(conn.execute(prepared, (1,), prepare=True).fetchone()[0] is not None)
        print("ready", flush=True)
        sys.stdin.readline()  # the test changes the policy
        for sql, params, prepare in (("SELECT count(*) FROM cards", None, False), (prepared, (1,), True)):
            try:
                conn.execute(sql, params, prepare=prepare)
                out.append("allowed")
            except psycopg.Error as exc:
                out.append([exc.sqlstate, exc.diag.message_primary])
        out.append(conn.execute("SELECT pg_backend_pid()").fetchone()[0] == pid)
    print(json.dumps(out))
    """
    import subprocess
    import sys
    import textwrap
    proc = lab.popen("agent", [sys.executable, "-c", textwrap.dedent(script), lab.conninfo()],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        no_card_reads = LAB_POLICY.replace('name = "no-role-changes-or-procedural-code"',
                                           '''name = "no-card-reads-today"
classes = ["read"]
relations = ["public.cards"]
action = "block"
message = "card reads are paused"

[[rule]]
name = "no-role-changes-or-procedural-code"''')
        set_policy(lab, no_card_reads)
        out, _ = proc.communicate("go\n", timeout=60)
    finally:
        proc.kill()
    import json
    assert json.loads(out.strip().splitlines()[-1]) == [
        True, ["42501", "card reads are paused"], ["42501", "card reads are paused"], True]

    # A broken edit: refused with its line, and the policy in force stays.
    before = proxy_request(lab, {"op": "policy"})
    lab.policy_path.write_text(no_card_reads + '\n[[rule]]\nname = "broken"\naction = "explode"\n')
    status = wait_for(lambda: (s := proxy_request(lab, {"op": "policy"}))["last_error"] and s,
                      "the proxy to refuse the broken policy")
    assert f"{lab.policy_path}:" in status["last_error"] and "action" in status["last_error"]
    assert status["sha256"] == before["sha256"]
    assert errors(lab, "SELECT count(*) FROM cards") == [["42501", "card reads are paused"]]
