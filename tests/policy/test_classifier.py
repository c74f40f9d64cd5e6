"""The classifier: classes, objects, command tags and texts for every construct policy cares about."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.model.decision import Classification
from appliance.model.decision import StatementClass as C
from appliance.policy.classifier import classify, classify_uncached
from appliance.policy.classify_statements import Walker


def one(sql: str) -> Classification:
    result = classify_uncached(sql)
    assert len(result) == 1, result
    return result[0]


def classes(sql: str) -> set[C]:
    return set(one(sql).classes)


# ---- reads and writes ---------------------------------------------------------------------


@pytest.mark.parametrize("sql", ["SELECT 1", "VALUES (1), (2)", "TABLE t", "select * from t where a > 1"])
def test_reads(sql: str) -> None:
    assert classes(sql) == {C.READ}


def test_select_names_relations_and_columns_through_aliases() -> None:
    c = one("select a, t.b, t.* from s.t as t where t.c = 1")
    assert c.command == "SELECT"
    assert c.relations == {"s.t"}
    assert c.columns == {"s.t.a", "s.t.b", "s.t.*", "s.t.c"}


def test_unqualified_columns_name_every_candidate_table() -> None:
    assert one("select pan from cards, customers").columns == {"cards.pan", "customers.pan"}
    assert one("select pan from cards").columns == {"cards.pan"}
    assert one("select pan").columns == {"?.pan"}  # nothing in the SQL says which table


def test_star_and_whole_row_references_mean_every_column() -> None:
    assert one("select * from payments.cards").columns == {"payments.cards.*"}
    assert one("select c from payments.cards c").columns == {"payments.cards.*"}
    assert one("select (c).* from payments.cards c").columns == {"payments.cards.*"}
    assert one("select * from a join b on a.id = b.id").columns >= {"a.*", "b.*"}


def test_order_by_output_alias_is_not_a_column() -> None:
    assert one("select pan as p from cards order by p").columns == {"cards.pan"}


def test_schema_qualified_column_reference() -> None:
    assert "payments.cards.pan" in one("select payments.cards.pan from payments.cards").columns


@pytest.mark.parametrize("sql, command", [
    ("insert into t (a) values (1)", "INSERT"),
    ("update t set a = 1", "UPDATE"),
    ("delete from t", "DELETE"),
    ("merge into t using s on t.a = s.a when matched then delete", "MERGE"),
])
def test_writes(sql: str, command: str) -> None:
    c = one(sql)
    assert C.WRITE in c.classes
    assert "t" in c.relations
    assert c.command == command


def test_insert_columns_and_on_conflict() -> None:
    c = one("insert into payments.cards as z (pan) values ('x') on conflict (id) do update "
            "set cvv = excluded.cvv where z.active")
    assert c.classes == {C.WRITE}
    assert c.columns == {"payments.cards.pan", "payments.cards.cvv", "payments.cards.active"}
    assert one("insert into t values (1)").columns == {"t.*"}  # no column list: every column


def test_insert_select_reads_its_source() -> None:
    c = one("insert into scratch.x select * from payments.cards")
    assert c.classes == {C.READ, C.WRITE}
    assert c.relations == {"scratch.x", "payments.cards"}


def test_update_from_and_returning() -> None:
    c = one("update payments.cards c set pan = x.p from x where c.id = x.id returning c.cvv")
    assert c.classes == {C.READ, C.WRITE}
    assert {"payments.cards.pan", "x.p", "payments.cards.cvv"} <= c.columns
    assert classes("update t set a = 1") == {C.WRITE}


def test_delete_touches_every_column() -> None:
    assert one("delete from payments.cards where id = 1").columns >= {"payments.cards.*"}


def test_merge_reads_and_writes() -> None:
    c = one("merge into t using s on t.a = s.a when matched then update set b = 1 "
            "when not matched then insert values (1)")
    assert c.classes == {C.READ, C.WRITE}
    assert c.relations == {"t", "s"}
    assert {"t.b", "t.*"} <= c.columns


@pytest.mark.parametrize("sql, command", [
    ("select 1 into t2 from t", "SELECT INTO"),
    ("create table t2 as select 1 from t", "CREATE TABLE AS"),
])
def test_select_into_and_create_table_as_write_and_define(sql: str, command: str) -> None:
    c = one(sql)
    assert c.classes == {C.READ, C.WRITE, C.DDL}
    assert c.relations == {"t", "t2"}
    assert c.command == command


# ---- CTEs, subqueries, set operations -----------------------------------------------------


def test_cte_names_are_not_relations() -> None:
    c = one("with cards as (select 1 as pan) select pan from cards")
    assert c.classes == {C.READ}
    assert c.relations == frozenset()


def test_writable_cte_is_read_and_write() -> None:
    c = one("with gone as (delete from payments.cards returning *) select * from gone")
    assert c.classes == {C.READ, C.WRITE}
    assert c.relations == {"payments.cards"}
    c = one("with x as (update t set a = 1 returning a) insert into log select * from x")
    assert c.classes == {C.READ, C.WRITE}
    assert c.relations == {"t", "log"}


def test_non_recursive_cte_sees_only_earlier_ctes() -> None:
    # Inside a, "b" is still the real table b: the CTE named b comes later.
    assert one("with a as (select * from b), b as (select 1) select * from a").relations == {"b"}
    assert one("with recursive r(n) as (select 1 union all select n + 1 from r) select * from r").relations \
        == frozenset()


@pytest.mark.parametrize("sql", [
    "select * from t where id in (select id from payments.cards)",
    "select * from t where exists (select 1 from payments.cards c where c.id = t.id)",
    "select (select max(pan) from payments.cards) from t",
    "select * from t, lateral (select * from payments.cards c where c.id = t.id) x",
    "select * from (select * from payments.cards) sub",
    "select * from t union select * from payments.cards",
    "select 1 from t intersect select 1 from payments.cards except select 2 from t",
    "select * from t where a = any(array(select pan from payments.cards))",
])
def test_subqueries_anywhere_are_seen(sql: str) -> None:
    c = one(sql)
    assert "payments.cards" in c.relations
    assert C.READ in c.classes


def test_functions_in_subqueries() -> None:
    c = one("select * from t where exists (select 1 from u where pg_read_file('/etc/passwd') is not null)")
    assert "pg_read_file" in c.functions
    assert c.classes == {C.READ, C.FUNCTION_CALL}
    c = one("select * from t where x in (select lo_import('/x') from u)")
    assert c.functions == {"lo_import"}


def test_functions_qualified_as_written() -> None:
    c = one("select count(*), pg_catalog.now(), s.f(1) from t")
    assert c.functions == {"count", "pg_catalog.now", "s.f"}
    assert C.FUNCTION_CALL in c.classes


def test_functions_in_from() -> None:
    c = one("select * from generate_series(1, 3) g(x), dblink('c', 'select 1') d(a int)")
    assert c.functions == {"generate_series", "dblink"}


# ---- DO, COPY, PREPARE/EXECUTE ------------------------------------------------------------


def test_do_block_is_its_own_class() -> None:
    c = one("DO $$ BEGIN PERFORM pg_sleep(1); DELETE FROM payments.cards; END $$")
    assert c.classes == {C.DO_BLOCK}
    assert c.command == "DO"
    assert c.relations == frozenset()  # the body is opaque


def test_copy_out_and_in() -> None:
    out = one("copy payments.cards to stdout")
    assert out.classes == {C.COPY_OUT}
    assert out.relations == {"payments.cards"}
    assert out.columns == {"payments.cards.*"}
    into = one("copy payments.cards (pan, cvv) from stdin")
    assert into.classes == {C.COPY_IN}
    assert into.columns == {"payments.cards.pan", "payments.cards.cvv"}
    assert out.command == into.command == "COPY"


def test_copy_query_carries_the_query() -> None:
    c = one("copy (select pan from payments.cards where pg_sleep(0) is null) to stdout")
    assert c.classes == {C.COPY_OUT, C.READ, C.FUNCTION_CALL}
    assert c.relations == {"payments.cards"}
    assert "payments.cards.pan" in c.columns
    c = one("copy (delete from t returning *) to stdout")
    assert {C.COPY_OUT, C.WRITE} <= c.classes


def test_prepare_carries_the_inner_statement() -> None:
    c = one("prepare upd(text) as update payments.cards set pan = $1")
    assert c.classes == {C.PREPARED, C.WRITE}
    assert c.relations == {"payments.cards"}
    assert c.prepared_name == "upd"
    assert c.command == "PREPARE"


def test_execute_and_deallocate() -> None:
    c = one("execute upd('x')")
    assert c.classes == {C.PREPARED}
    assert c.prepared_name == "upd"
    assert c.command == "EXECUTE"
    assert one("deallocate upd").prepared_name == "upd"
    assert one("deallocate all").prepared_name is None
    assert classes("deallocate prepare upd") == {C.PREPARED}
    # parameters are expressions too
    assert "payments.cards" in one("execute p((select pan from payments.cards limit 1))").relations


# ---- transactions, sessions, roles --------------------------------------------------------


@pytest.mark.parametrize("sql, command", [
    ("begin", "BEGIN"), ("start transaction isolation level serializable", "START TRANSACTION"),
    ("commit", "COMMIT"), ("rollback", "ROLLBACK"), ("savepoint a", "SAVEPOINT"), ("release savepoint a", "RELEASE"),
    ("rollback to savepoint a", "ROLLBACK"), ("prepare transaction 'x'", "PREPARE TRANSACTION"),
    ("commit prepared 'x'", "COMMIT PREPARED"), ("rollback prepared 'x'", "ROLLBACK PREPARED"), ("end", "COMMIT"),
])
def test_transaction_control(sql: str, command: str) -> None:
    c = one(sql)
    assert c.classes == {C.TRANSACTION}
    assert c.command == command
    assert c.prepared_name is None  # PREPARE TRANSACTION is not a prepared statement


@pytest.mark.parametrize("sql", [
    "set statement_timeout = 5", "set local work_mem = '1MB'", "reset statement_timeout", "show search_path",
    "discard plans", "listen ch", "unlisten *", "notify ch, 'x'", "set search_path = public",
])
def test_session(sql: str) -> None:
    assert classes(sql) == {C.SESSION}


@pytest.mark.parametrize("sql", [
    "set role admin", "set local role admin", "set session role admin", "reset role", "set role none",
    "set session authorization 'bob'", "set session authorization default", "reset session authorization",
    "SET ROLE TO DEFAULT",
])
def test_role_changes(sql: str) -> None:
    assert C.ROLE_CHANGE in classes(sql)
    assert C.SESSION not in classes(sql)


def test_reset_all_and_discard_all_change_role_too() -> None:
    assert classes("reset all") == {C.SESSION, C.ROLE_CHANGE}
    assert classes("discard all") == {C.SESSION, C.ROLE_CHANGE}


@pytest.mark.parametrize("sql", [
    "select set_config('role', 'admin', false)",
    "select pg_catalog.set_config('ROLE', 'admin', true)",
    "select set_config('session_authorization', 'bob', false)",
    "select 1 from t where exists (select set_config('role', 'x', false))",
])
def test_set_config_role_is_a_role_change(sql: str) -> None:
    assert C.ROLE_CHANGE in classes(sql)


def test_set_config_of_a_setting_named_by_an_expression_is_refused() -> None:
    # It could be role, or a setting Tollgate pins (tests/policy/test_pins.py): fail closed.
    [c] = classify("select * from t where set_config(t.name, 'x', false) is not null")
    assert c.command == "REFUSED" and C.UNPARSABLE in c.classes


def test_set_config_of_an_ordinary_setting_is_not() -> None:
    assert C.ROLE_CHANGE not in classes("select set_config('search_path', 'x', false)")


def test_set_transaction() -> None:
    assert classes("set transaction isolation level serializable") == {C.TRANSACTION}


# ---- calls, DDL, privileges, locks, maintenance, cursors, explain -------------------------


def test_call() -> None:
    c = one("call payments.refund(1, now())")
    assert c.classes == {C.FUNCTION_CALL}
    assert c.functions == {"payments.refund", "now"}
    assert c.command == "CALL"


def test_truncate() -> None:
    c = one("truncate payments.cards, t")
    assert c.classes == {C.TRUNCATE}
    assert c.relations == {"payments.cards", "t"}
    assert c.command == "TRUNCATE TABLE"


@pytest.mark.parametrize("sql, command, relations", [
    ("drop table payments.cards, t", "DROP TABLE", {"payments.cards", "t"}),
    ("drop view v", "DROP VIEW", {"v"}),
    ("drop schema payments cascade", "DROP SCHEMA", {"payments.*"}),
    ("alter table payments.cards add column x int", "ALTER TABLE", {"payments.cards"}),
    ("alter table t rename to u", "ALTER TABLE", {"t"}),
    ("create table scratch.t (a int)", "CREATE TABLE", {"scratch.t"}),
    ("create index on payments.cards (pan)", "CREATE INDEX", {"payments.cards"}),
    ("comment on table payments.cards is 'x'", "COMMENT", {"payments.cards"}),
    ("create schema scratch", "CREATE SCHEMA", {"scratch.*"}),
    ("create function scratch.f() returns int language sql as 'select 1'", "CREATE FUNCTION", {"scratch.f"}),
    ("drop function scratch.f(int)", "DROP FUNCTION", {"scratch.f"}),
    ("create extension dblink", "CREATE EXTENSION", {"*.*"}),
    ("alter table t set schema payments", "ALTER TABLE", {"t", "payments.*"}),
    ("create trigger tr after insert on payments.cards for each row execute function f()", "CREATE TRIGGER",
     {"payments.cards"}),
    ("drop database payments", "DROP DATABASE", {"*.*"}),
])
def test_ddl(sql: str, command: str, relations: set[str]) -> None:
    c = one(sql)
    assert C.DDL in c.classes
    assert c.command == command
    assert c.relations == relations


def test_ddl_column_changes_name_the_column() -> None:
    assert one("alter table payments.cards drop column pan").columns == {"payments.cards.pan"}
    assert one("comment on column payments.cards.pan is 'x'").columns == {"payments.cards.pan"}
    assert {"t.a", "t.b"} <= one("alter table t rename column a to b").columns


def test_stored_bodies_are_objects_not_actions() -> None:
    c = one("create view v as select pan from payments.cards")
    assert c.classes == {C.DDL}  # defining a view reads nothing now
    assert c.relations == {"v", "payments.cards"}
    c = one("create rule r as on insert to t do also delete from payments.cards")
    assert c.classes == {C.DDL}
    assert "payments.cards" in c.relations


@pytest.mark.parametrize("sql, command", [
    ("grant select on payments.cards to agent", "GRANT"),
    ("revoke all on payments.cards from agent", "REVOKE"),
    ("grant admin to agent", "GRANT ROLE"),
    ("create role agent login", "CREATE ROLE"),
    ("alter role agent superuser", "ALTER ROLE"),
    ("drop role agent", "DROP ROLE"),
    ("alter default privileges in schema payments grant select on tables to agent", "ALTER DEFAULT PRIVILEGES"),
])
def test_privileges(sql: str, command: str) -> None:
    c = one(sql)
    assert C.PRIVILEGE in c.classes
    assert c.command == command


def test_grant_objects() -> None:
    assert one("grant select (pan) on payments.cards to a").columns == {"payments.cards.pan"}
    assert one("grant select on all tables in schema payments to a").relations == {"payments.*"}
    assert one("grant usage on schema payments to a").relations == {"payments.*"}
    assert one("create role a").relations == {"*.*"}  # cluster-wide: no particular relation


def test_locks() -> None:
    c = one("lock table payments.cards in exclusive mode")
    assert c.classes == {C.LOCK}
    assert c.relations == {"payments.cards"}
    assert classes("select * from payments.cards for update") == {C.READ, C.LOCK}
    assert classes("select * from t for share of t nowait") == {C.READ, C.LOCK}
    assert one("select 1 from t for update of t").relations == {"t"}


@pytest.mark.parametrize("sql, command, relations", [
    ("vacuum", "VACUUM", {"*.*"}),
    ("vacuum full payments.cards", "VACUUM", {"payments.cards"}),
    ("analyze t (a)", "ANALYZE", {"t"}),
    ("cluster t using i", "CLUSTER", {"t"}),
    ("reindex table t", "REINDEX", {"t"}),
    ("reindex schema payments", "REINDEX", {"payments.*"}),
    ("checkpoint", "CHECKPOINT", {"*.*"}),
    ("load 'auto_explain'", "LOAD", {"*.*"}),
])
def test_maintenance(sql: str, command: str, relations: set[str]) -> None:
    c = one(sql)
    assert c.classes == {C.MAINTENANCE}
    assert c.command == command
    assert c.relations == relations


def test_cursors() -> None:
    c = one("declare cur cursor for select pan from payments.cards")
    assert c.classes == {C.CURSOR, C.READ}
    assert c.relations == {"payments.cards"}
    assert c.command == "DECLARE CURSOR"
    for sql, command in (("fetch 10 from cur", "FETCH"), ("move 5 in cur", "MOVE"), ("close cur", "CLOSE CURSOR"),
                         ("close all", "CLOSE CURSOR")):
        c = one(sql)
        assert c.classes == {C.CURSOR}
        assert c.command == command


def test_explain_names_objects_without_running() -> None:
    c = one("explain delete from payments.cards")
    assert c.classes == {C.READ}
    assert c.relations == {"payments.cards"}
    assert c.command == "EXPLAIN"
    assert classes("explain (analyze false) delete from t") == {C.READ}


@pytest.mark.parametrize("sql", [
    "explain analyze delete from payments.cards",
    "explain (analyze) delete from payments.cards",
    "explain (analyze true, buffers) delete from payments.cards",
])
def test_explain_analyze_runs_the_statement(sql: str) -> None:
    c = one(sql)
    assert {C.READ, C.WRITE} <= c.classes
    assert c.command == "EXPLAIN ANALYZE"


def test_explain_analyze_execute_follows_the_prepared_statement() -> None:
    c = one("explain analyze execute upd('x')")
    assert C.PREPARED in c.classes
    assert c.prepared_name == "upd"


# ---- texts, multi-statement strings, failures ---------------------------------------------


def test_multi_statement_string() -> None:
    result = classify_uncached("select 1; update t set a = 1;\n -- trailing\n drop table t;")
    assert [r.command for r in result] == ["SELECT", "UPDATE", "DROP TABLE"]
    assert [r.text for r in result] == ["select 1", "update t set a = 1", "-- trailing\n drop table t"]


def test_texts_are_cut_by_characters_not_bytes() -> None:
    first, second = classify_uncached("select 'é€😀' as x from t; select 2")
    assert first.text == "select 'é€😀' as x from t"
    assert second.text == "select 2"


@pytest.mark.parametrize("sql", ["", "   ", "-- just a comment", "/* block */", ";", " ; ; "])
def test_empty(sql: str) -> None:
    c = one(sql)
    assert c.classes == {C.EMPTY}


@pytest.mark.parametrize("sql", ["selec 1", "select from where", "select 1; drop tabel x", "'unterminated"])
def test_unparsable_carries_the_parser_message(sql: str) -> None:
    c = one(sql)
    assert c.classes == {C.UNPARSABLE}
    assert (c.error and "syntax error" in c.error) or "unterminated" in (c.error or "")
    assert c.text == sql


def test_nul_is_unparsable() -> None:
    c = one("select 1\x00; drop table payments.cards")
    assert c.classes == {C.UNPARSABLE}


def test_walker_failure_fails_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object) -> None:
        raise KeyError("surprise")
    monkeypatch.setattr(Walker, "statement", boom)
    c = one("select 1")
    assert c.classes == {C.UNPARSABLE}
    assert "KeyError" in (c.error or "")


def test_deep_expressions_are_classified() -> None:
    sql = "select " + " + ".join(["a"] * 1500) + " from payments.cards"
    c = one(sql)
    assert c.classes == {C.READ}
    assert c.relations == {"payments.cards"}


def test_quoted_names_cannot_pose_as_qualified() -> None:
    c = one('select * from "payments.cards"')
    assert c.relations == {'"payments.cards"'}
    assert one('select * from "Payments"."Cards"').relations == {"Payments.Cards"}


def test_classify_is_cached() -> None:
    sql = "select pan from payments.cards where id = 42"
    assert classify(sql) is classify(sql)


# ---- fuzz: never raises, always an answer -------------------------------------------------

_TOKENS = [
    "select", "insert", "update", "delete", "from", "where", "into", "values", "set", "role", "with", "as", "(",
    ")", ",", ";", "*", "=", "'x'", "$1", "$$", "do", "copy", "to", "stdin", "prepare", "execute", "begin",
    "commit", "t", "payments.cards", "pan", "union", "lateral", "join", "on", "returning", "explain",
    "analyze", "create", "table", "drop", "grant", "call", "f(", "set_config(", "--", "/*", "*/", "\"q\"",
    "e'\\x'", "::int", "[", "]", "1", "null", "not", "exists", "in", "limit", "order", "by", "for", "lock",
    "vacuum", "declare", "cursor", "fetch", "merge", "using", "when", "matched", "then", "\n", "é",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_fuzz_random_text(text: str) -> None:
    result = classify_uncached(text)
    assert len(result) >= 1
    assert all(isinstance(r, Classification) and r.classes for r in result)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_TOKENS), max_size=40))
def test_fuzz_sql_token_soup(tokens: list[str]) -> None:
    result = classify_uncached(" ".join(tokens))
    assert len(result) >= 1
    assert all(isinstance(r, Classification) and r.classes for r in result)


# Grammar-shaped SQL: exercises the walker (token soup mostly stops at the parser).
_tables = st.sampled_from(["t", "u", "s.t", "payments.cards"])
_columns = st.sampled_from(["a", "t.a", "x.b", "pan", "cards.pan", "*"])


def _sql_expr() -> st.SearchStrategy[str]:
    leaves = st.sampled_from(["a", "t.a", "x.b", "pan", "1", "'x'", "$1", "null", "now()"])

    def extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        return st.one_of(
            st.tuples(inner, st.sampled_from(["+", "=", "and", "or", "||", "<"]), inner).map(" ".join),
            st.tuples(st.sampled_from(["coalesce", "pg_read_file", "lower", "count"]), inner)
            .map(lambda p: f"{p[0]}({p[1]})"),
            st.tuples(inner, _tables, inner).map(lambda p: f"exists (select {p[0]} from {p[1]} where {p[2]})"),
            st.tuples(inner, _tables).map(lambda p: f"(select {p[0]} from {p[1]} limit 1)"),
            st.tuples(inner, inner).map(lambda p: f"case when {p[0]} then {p[1]} end"),
        )
    return st.recursive(leaves, extend, max_leaves=8)


_expr = _sql_expr()


def _from_items() -> st.SearchStrategy[str]:
    def extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        return st.one_of(
            st.tuples(inner, inner, _expr).map(lambda p: f"{p[0]} join {p[1]} on {p[2]}"),
            st.tuples(_expr, _tables, _expr).map(lambda p: f"lateral (select {p[0]} from {p[1]} where {p[2]}) x"),
            st.tuples(inner, _tables).map(lambda p: f"{p[0]}, {p[1]} y"),
        )
    return st.recursive(_tables, extend, max_leaves=4)


_select = st.tuples(st.one_of(_expr, _columns), _from_items(), _expr).map(
    lambda p: f"select {p[0]} from {p[1]} where {p[2]}")
_statement = st.one_of(
    _select,
    st.tuples(_select, _select).map(lambda p: f"{p[0]} union all {p[1]}"),
    st.tuples(_select, _select).map(lambda p: f"with w as ({p[0]}) {p[1]}"),
    st.tuples(_tables, _expr).map(lambda p: f"with w as (delete from {p[0]} where {p[1]} returning *) select * from w"),
    st.tuples(_tables, _select).map(lambda p: f"insert into {p[0]} {p[1]}"),
    st.tuples(_tables, _expr, _expr).map(lambda p: f"update {p[0]} set a = {p[1]} where {p[2]}"),
    st.tuples(_select).map(lambda p: f"copy ({p[0]}) to stdout"),
    st.tuples(_select).map(lambda p: f"prepare q as {p[0]}"),
    st.tuples(_select).map(lambda p: f"explain analyze {p[0]}"),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_statement)
def test_fuzz_grammar_shaped_sql_sees_every_table_and_call(sql: str) -> None:
    result = classify_uncached(sql)
    assert len(result) == 1
    c = result[0]
    assert not (c.error or "").startswith("could not"), c.error  # the walker never trips
    if C.UNPARSABLE in c.classes:
        return
    if "payments.cards" in sql:
        assert "payments.cards" in c.relations, sql
    if "pg_read_file(" in sql:
        assert "pg_read_file" in c.functions, sql
        assert C.FUNCTION_CALL in c.classes
