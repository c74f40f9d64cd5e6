"""``Decision.read_only``: which statements may run while their audit record syncs. Only
what provably changes nothing in the database: a plain read calling no function and
locking no row, allowed by policy."""

from __future__ import annotations

import pytest

from appliance.model.decision import Action, Decision
from appliance.policy.classifier import classify


def decision(sql: str, action: Action = Action.ALLOW) -> Decision:
    return Decision(action, "test", statements=tuple(classify(sql)))


@pytest.mark.parametrize("sql", [
    "SELECT abalance FROM pgbench_accounts WHERE aid = 5",
    "SELECT 1", "TABLE t", "VALUES (1), (2)", "SELECT a::text FROM t",
    "SELECT x FROM t JOIN LATERAL (SELECT 1) s ON true", "SELECT 1; SELECT 2",
    "WITH r AS (SELECT n FROM t) SELECT n FROM r", "EXPLAIN SELECT n FROM t",
])
def test_plain_reads_are_read_only(sql: str) -> None:
    assert decision(sql).read_only
    assert decision(sql, Action.MASK).read_only


@pytest.mark.parametrize("sql", [
    "UPDATE t SET n = 1", "INSERT INTO t VALUES (1)", "DELETE FROM t",
    "SELECT n INTO u FROM t",  # creates a table
    "WITH d AS (DELETE FROM t RETURNING n) SELECT n FROM d",  # a data-modifying CTE
    "SELECT n FROM t FOR UPDATE", "SELECT n FROM t FOR SHARE",  # row locks
    "SELECT nextval('s')", "SELECT set_config('a.b', 'c', false)", "SELECT pg_advisory_lock(1)",
    "SELECT pg_notify('c', 'x')", "SELECT count(*) FROM t",  # any call at all
    "SELECT n FROM t WHERE n = (SELECT nextval('s'))",  # a call in a subquery
    "EXPLAIN ANALYZE DELETE FROM t", "EXPLAIN SELECT nextval('s')",  # planning may evaluate calls
    "SELECT 1; UPDATE t SET n = 1", "BEGIN", "SHOW work_mem", "SET work_mem = '1MB'", "FETCH 1 FROM c",
    "DECLARE c CURSOR FOR SELECT 1", "EXECUTE p", "PREPARE p AS SELECT 1", "LISTEN c", "COPY t TO STDOUT",
    "SELECT FROM", "",
])
def test_anything_else_is_not(sql: str) -> None:
    assert not decision(sql).read_only


@pytest.mark.parametrize("action", [Action.BLOCK, Action.HOLD])
def test_a_read_not_allowed_outright_is_not(action: Action) -> None:
    assert not decision("SELECT 1", action).read_only
