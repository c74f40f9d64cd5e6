"""Lineage and function rules for agents: a corpus of attacks (refused) and controls (allowed).

Each entry is a statement and what the policy must say for an agent: ``ok`` (allowed; a
plain projection is masked in the data path as any result), ``lineage`` (a cardholder
column used other than as a plain projection), ``qualify`` (refused as ``lineage`` because
an unqualified name could be a cardholder column), or ``function`` (a call of a function
the policy can't see into). Every statement is also run against a real PostgreSQL with a
schema that has them all, so the corpus is SQL the server accepts: the attacks are real
(and return or change data there, as superuser), and the controls are ordinary queries.
"""

from __future__ import annotations

import textwrap

import pytest

from appliance.model.decision import Action, HoldSpec
from appliance.policy.engine import Policy

POLICY = textwrap.dedent("""\
    default = "allow"
    search_path = ["public"]
    cardholder_columns = ["public.cards.pan"]
    agent_groups = ["agents"]
    trusted_functions = ["scratch.trusted_*"]

    [[rule]]
    name = "customers-masked"
    action = "mask"
    relations = ["public.customers"]
    mask = [{ columns = ["public.customers.card_number"], method = "pan" }]
    """)

SCHEMA = """
create table public.customers (id int primary key, name text, card_number text);
create table public.cards (id int primary key, customer_id int, pan text unique, expiry text, brand text);
create table public.payments (id bigint primary key, card_id int, amount numeric, status text, merchant text,
                              created_at timestamptz);
create table public.other (id int, pan text, note text);
create schema scratch;
create table scratch.t (id int, note text);
create table scratch.cards (id int, pan text);
create function scratch.f() returns int language sql as 'update public.cards set expiry = ''00/00''; select 1';
create function scratch.trusted_answer() returns int language sql as 'select 42';
insert into public.customers values (1, 'Ada', '5555555555554444');
insert into public.cards values (1, 1, '4111111111111111', '12/30', 'visa'), (2, 1, '5500005555555559', '01/29', 'mc');
insert into public.payments values (1, 1, 9.5, 'ok', 'Acme', now()), (2, 2, 3, 'ok', 'Kite', now());
insert into public.other values (1, '4000000000000002', 'a pan that is no cardholder column');
insert into scratch.cards values (1, 'x');
"""

ATTACKS = [
    # Transforms in the result: the leaks.
    ("select reverse(pan) from cards", "lineage"),
    ("select substr(pan, 1, 8), substr(pan, 9) from cards", "lineage"),
    ("select translate(pan, '0123456789', 'abcdefghij') from cards", "lineage"),
    ("select replace(pan, '1', 'x') from cards", "lineage"),
    ("select encode(pan::bytea, 'base64') from cards", "lineage"),
    ("select encode(convert_to(pan, 'UTF8'), 'hex') from cards", "lineage"),
    ("select to_hex(pan::bigint) from cards", "lineage"),
    ("select pan::bigint + 1 from cards", "lineage"),
    ("select to_char(pan::numeric, '9,999,999,999,999,999') from cards", "lineage"),
    ("select string_agg(pan, '') from cards", "lineage"),
    ("select lpad(pan, 20, '0') from cards", "lineage"),
    ("select md5(pan) from cards", "lineage"),
    ("select pan || pan from cards", "lineage"),
    ("select regexp_replace(pan, '(....)', '\\1.', 'g') from cards", "lineage"),
    ("select array[ascii(pan)] from cards", "lineage"),
    ("select pan::text from cards", "lineage"),
    ("select cast(pan as varchar(30)) from cards", "lineage"),
    ("select pan collate \"C\" from cards", "lineage"),
    ("select case when pan like '4%' then 1 else 0 end from cards", "lineage"),
    ("select coalesce(pan, '') from cards", "lineage"),
    ("select pan = '4111111111111111' from cards", "lineage"),
    ("select count(pan) from cards", "lineage"),
    ("select max(pan) from cards", "lineage"),
    ("select first_value(pan) over () from cards", "lineage"),
    ("select row(pan, id) from cards", "lineage"),
    ("select (select pan from cards limit 1)", "lineage"),
    ("select array(select pan from cards)", "lineage"),
    ("select set_config('application_name', pan, false) from cards where id = 1", "lineage"),
    ("select pg_notify('x', pan) from cards", "lineage"),
    ("select 1 as x, pan from cards union select 2, pan from cards", "lineage"),
    ("select pan from cards union all select 'x'", "lineage"),
    ("select pan from cards except select pan from cards where id = 1", "lineage"),
    ("select customers.card_number || '' from customers", "lineage"),
    # Whole-row references.
    ("select c from cards c", "lineage"),
    ("select to_json(c) from cards c", "lineage"),
    ("select row_to_json(c.*) from cards c", "lineage"),
    ("select (c).pan from cards c", "lineage"),
    ("select pan(c) from cards c", "function"),  # functional notation for c.pan, seen as a call
    ("select count(c.*) from cards c", "lineage"),
    ("select row_to_json(s) from (select pan from cards) s", "lineage"),
    ("select hstore_x from (select c::text as hstore_x from cards c) s", "lineage"),
    # Subqueries, CTEs and derived tables that transform it.
    ("select x from (select lower(pan) as x from cards) s", "lineage"),
    ("with x as (select pan || '' as p from cards) select p from x", "lineage"),
    (("with recursive r(n, p) as (select 1, pan from cards union all select n + 1, p from r where n < 2) "
     "select * from r"), "lineage"),
    ("select * from cards c, lateral (select upper(c.pan) as u) s", "lineage"),
    ("select * from cards c, lateral unnest(array[c.pan]) u", "lineage"),
    ("select * from cards c cross join lateral generate_series(1, length(c.pan)) g", "lineage"),
    ("select x from cards c(x, y, z) where z = '1'", "lineage"),
    ("select reverse(U&\"\\0070an\") from U&\"\\0063ards\"", "lineage"),  # names spelled in escapes
    # WITH RECURSIVE lets a CTE read one defined after it.
    ("with recursive a as (select x from b where x like '4%'), b as (select pan as x from cards) select * from a",
     "lineage"),
    (("with recursive a as (select x from b), b as (select y as x from c where y > '4'), "
     "c as (select pan as y from cards) select * from a"), "lineage"),
    # Predicates, joins, ordering, grouping: digit oracles.
    ("select id from cards where pan like '4111%'", "lineage"),
    ("select id from cards where substr(pan, 7, 1) = '3'", "lineage"),
    ("select id from cards where pan > '4'", "lineage"),
    ("select id from cards c where c.pan between '4' and '5'", "lineage"),
    ("select id from public.cards where public.cards.pan is not null and pan ~ '^4'", "lineage"),
    ("select count(*) from cards having max(pan) > '5'", "lineage"),
    ("select count(*) from cards group by pan", "lineage"),
    ("select count(*) from cards group by substr(pan, 1, 1)", "lineage"),
    ("select pan from cards order by pan", "lineage"),
    ("select pan as p from cards order by p", "lineage"),
    ("select pan from cards order by 1", "lineage"),
    ("select id, pan from cards order by 1", "lineage"),  # a position could be any column: refused
    ("select id from cards order by pan desc limit 1", "lineage"),
    ("select distinct pan from cards", "lineage"),
    ("select distinct on (pan) id from cards", "lineage"),
    ("select row_number() over (partition by pan) from cards", "lineage"),
    ("select rank() over w from cards window w as (order by pan)", "lineage"),
    ("select id from cards limit (select length(pan) from cards limit 1)", "lineage"),
    ("select p.id from payments p join cards c on c.pan like '4%' and c.id = p.card_id", "lineage"),
    ("select * from cards join other using (pan)", "lineage"),
    ("select * from cards natural join other", "lineage"),
    ("select * from cards natural join scratch.t", "lineage"),
    ("select id from payments where card_id in (select id from cards where pan like '5%')", "lineage"),
    ("select id from payments where exists (select 1 from cards where pan like '5%')", "lineage"),
    ("select id from payments where card_id = any (select pan::bigint from cards)", "lineage"),
    ("explain analyze select id from cards where pan like '4%'", "lineage"),
    ("explain select id from cards where pan like '4%'", "lineage"),
    ("declare cur cursor for select id from cards order by pan", "lineage"),
    ("prepare q as select id from cards where pan = $1", "lineage"),
    ("delete from cards where pan like '4%'", "lineage"),
    ("update cards set expiry = '01/30' where pan = '4111111111111111'", "lineage"),
    # Into a write.
    ("create table scratch.copy as select pan from cards", "lineage"),
    ("create table scratch.copy as select * from cards", "lineage"),
    ("create materialized view scratch.mv as select pan from cards", "lineage"),
    ("select pan into scratch.copy from cards", "lineage"),
    (("prepare lineage_q as select pan from cards; create table scratch.copy as execute lineage_q; "
     "deallocate lineage_q"), "lineage"),
    ("insert into scratch.t select id, pan from cards", "lineage"),
    ("insert into scratch.t (id, note) values (1, (select pan from cards limit 1))", "lineage"),
    ("update scratch.t set note = c.pan from cards c where c.id = t.id", "lineage"),
    ("update scratch.t set note = (select pan from cards limit 1)", "lineage"),
    ("update cards set expiry = pan", "lineage"),
    ("update cards set brand = substr(pan, 1, 1)", "lineage"),
    ("insert into scratch.t select 1, 'x' from cards on conflict do nothing returning note", "ok"),
    (("insert into cards (id, customer_id, pan, expiry, brand) values (9, 1, '4', '01/30', 'x') "
     "on conflict (id) do update set brand = cards.pan"), "lineage"),
    ("merge into scratch.t t using cards c on t.id = c.id when not matched then insert values (c.id, c.pan)",
     "lineage"),
    ("merge into scratch.t t using cards c on t.id = c.id when matched then update set note = c.pan",
     "lineage"),
    ("merge into scratch.t t using cards c on t.note = c.pan when matched then delete", "lineage"),
    ("with w as (insert into scratch.t select id, pan from cards returning id) select * from w", "lineage"),
    ("with w as (update cards set expiry = pan returning id) select * from w", "lineage"),
    ("copy (select pan from cards) to stdout", "lineage"),
    ("copy (select id from cards where pan like '4%') to stdout", "lineage"),
    ("copy cards to stdout", "lineage"),
    ("copy cards (id, pan) to stdout", "lineage"),
    ("update cards set expiry = '01/30' where id = 1 returning pan", "lineage"),
    ("delete from cards where id = 99 returning *", "lineage"),
    ("create view scratch.v as select pan from cards", "lineage"),
    ("create view scratch.v as select id from cards where pan like '4%'", "lineage"),
    ("create table scratch.fk (p text references public.cards (pan))", "lineage"),
    ("alter table scratch.t add constraint fk foreign key (note) references cards (pan)", "lineage"),
    ("create rule r as on insert to scratch.t do also insert into scratch.t select id, pan from cards", "lineage"),
    # Relations that hold sampled values of every column, and other sessions' SQL.
    ("select most_common_vals from pg_stats where tablename = 'cards'", "lineage"),
    ("select reverse(histogram_bounds::text) from pg_catalog.pg_stats", "lineage"),
    ("select query from pg_stat_activity", "lineage"),
    ("select query from pg_stat_get_activity(null)", "function"),
    ("select reverse(pg_stat_get_backend_activity(s)) from pg_stat_get_backend_idset() s", "function"),
    # Attribute notation: t.f is f(t) when t has no column f, a call on the whole row.
    ("select reverse(c.to_jsonb->>'pan') from cards c", "lineage"),
    ("select id from cards c where c.to_jsonb->>'pan' like '4111%'", "lineage"),
    ("select id from cards c order by c.row_to_json->>'pan'", "lineage"),
    ("select md5(cards.record_out::text) from cards", "lineage"),
    ("select reverse(public.cards.to_json->>'pan') from public.cards", "lineage"),
    ("select c.hash_record from cards c", "lineage"),
    ("select reverse(c.json_agg->0->>'pan') from cards c", "lineage"),
    ("select c.array_agg::text from cards c", "lineage"),
    ("select x.jsonb_agg from (select pan from cards) x", "lineage"),
    ("select reverse(c.concat) from cards c", "lineage"),
    ("select reverse(x.to_jsonb->>'p') from (select pan as p from cards) x", "lineage"),
    ("with w as (select pan from cards) select reverse(w.quote_literal) from w", "lineage"),
    ("insert into scratch.t select 1, c.row_to_json::text from cards c", "lineage"),
    # Names the classifier can't settle without the catalog: refused, asking to qualify.
    ("select (select pan from other limit 1) from cards", "qualify"),
    ("select id from cards where exists (select 1 from other where pan = '1')", "qualify"),
    ("select * from cards c where c.id in (select id from other where pan is null)", "qualify"),
    # Functions the policy can't see into.
    ("select scratch.f()", "function"),
    ("do $$ begin perform 1; end $$", "function"),
    ("select * from scratch.f()", "function"),
    ("select id, scratch.f() from payments", "function"),
    ("select query_to_xml('select pan from cards', true, false, '')", "function"),
    ("select table_to_xml('cards', true, false, '')", "function"),
    ("select pg_catalog.query_to_xml('select reverse(pan) from cards', true, false, '')", "function"),
]

CONTROLS = [
    "select pan from cards",
    "select c.brand, upper(c.expiry), p.to_jsonb from cards c join payments p on p.card_id = c.id",
    "select x.to_jsonb from (select id, brand from cards) x",
    "select pan from cards where id = 1",
    "select c.pan as x from cards c",
    ("select c.pan, p.amount from cards c join payments p on p.card_id = c.id where p.status = 'ok' "
    "order by p.created_at, c.id"),
    "select * from cards",
    "table cards",
    "select c.* from cards c join payments p on p.card_id = c.id",
    "select * from cards c join payments p on p.card_id = c.id order by p.id",
    "select public.cards.pan from public.cards",
    "select \"pan\" from \"cards\"",
    "select x from (select pan as x from cards) s",
    "with x as (select pan, id from cards) select pan from x where id = 2",
    "select s.pan from cards c, lateral (select c.pan) s",
    "select id, expiry, brand from cards where id = 2 order by expiry",
    "select count(*), min(id), max(expiry) from cards",
    "select count(*) from cards c join payments p on p.card_id = c.id group by c.brand",
    "select id from cards where id = 4000000000000002 order by id",
    "select id from cards order by id desc limit 1 offset 0",
    "select distinct brand from cards",
    "select card_id, sum(amount) from payments group by card_id having sum(amount) > 1 order by 2",
    "select now(), current_date, lower('X'), coalesce(null, 1), extract(epoch from now())",
    "select 1",
    "values (1, 'x')",
    "select pan from cards for update",
    "select cards.pan from cards where exists (select 1 from payments p where p.card_id = cards.id)",
    "select id from cards where customer_id in (select id from customers where name = 'Ada')",
    "select c.id from cards c join customers u using (id)",
    "select * from cards c join payments p using (id)",
    # Columns named like the cardholder column, in tables that hold none.
    "select pan from other order by pan",
    "select o.pan from other o where o.pan like '4%' order by o.pan",
    "select reverse(pan), md5(pan) from other",
    "select pan from scratch.cards where pan like 'x%' order by pan",
    "select (select o.pan from other o limit 1) from cards",
    "select id from cards where exists (select 1 from other o where o.pan = '1')",
    "with cards as (select 1 as pan) select pan from cards where pan = 1 order by pan",
    "select upper(pan) from (select 'x' as pan) s",
    "with pg_stats as (select 1 as x) select x from pg_stats",
    "select * from other natural join scratch.t",
    # Writes that read no cardholder value.
    "insert into scratch.t select id, brand from cards",
    "insert into scratch.t values (1, 'x')",
    "create table scratch.copy as select id, expiry from cards",
    "update scratch.t set note = c.brand from cards c where c.id = t.id",
    "update cards set expiry = '01/30' where id = 1",
    "update cards set pan = '4111111111111111' where id = 1",
    "delete from cards where id = 99",
    "copy cards (id, expiry) to stdout",
    "copy (select id, brand from cards) to stdout",
    "merge into scratch.t t using cards c on t.id = c.id when not matched then insert values (c.id, c.brand)",
    "update cards set expiry = '01/30' where id = 1 returning id, expiry",
    "create view scratch.v as select id, brand from cards",
    "create table scratch.fk (card int references public.cards (id))",
    "explain select pan from cards where id = 1",
    "declare cur cursor for select pan from cards",
    # Trusted and built-in functions.
    "select scratch.trusted_answer()",
    "select pg_catalog.lower('A'), upper('b'), length('c')",
    "select string_agg(brand, ',') from cards",
]

NAMES = {"lineage": "lineage", "qualify": "lineage", "function": "untrusted-function"}


def _policy() -> Policy:
    return Policy.parse(POLICY, "policy.toml")


@pytest.mark.parametrize("sql, expected", ATTACKS)
def test_attack_is_refused_for_agents(sql: str, expected: str) -> None:
    decision = _policy().decide(["agents"], "db", sql)
    if expected == "ok":
        assert decision.action in (Action.ALLOW, Action.MASK), decision.message
        return
    assert (decision.action, decision.rule) == (Action.BLOCK, NAMES[expected]), decision
    assert decision.message.startswith("Tollgate refuses this for agents: ")
    if expected == "qualify":
        assert "qualify it" in decision.message


@pytest.mark.parametrize("sql", CONTROLS)
def test_control_is_allowed_for_agents(sql: str) -> None:
    decision = _policy().decide(["agents"], "db", sql)
    assert decision.action in (Action.ALLOW, Action.MASK), decision.message


def test_non_agents_keep_the_rules_behaviour() -> None:
    p = _policy()
    for sql, _ in ATTACKS:
        assert p.decide(["dbas"], "db", sql).action in (Action.ALLOW, Action.MASK), sql


def test_messages_name_the_column_and_the_place() -> None:
    p = _policy()
    message = p.decide(["agents"], "db", "select id from cards where pan like '4%'").message
    assert "public.cards.pan is used in a condition (WHERE)" in message
    message = p.decide(["agents"], "db", "select (select pan from other limit 1) from cards").message
    assert "could be public.cards.pan or a column of other" in message and "(other.pan)" in message
    message = p.decide(["agents"], "db", "select scratch.f()").message
    assert "scratch.f is not a built-in function" in message and "trusted_functions" in message


def test_a_pan_masked_column_is_a_cardholder_column() -> None:
    p = _policy()
    assert p.decide(["agents"], "db", "select card_number from customers").action is Action.MASK
    assert p.decide(["agents"], "db", "select reverse(card_number) from customers").rule == "lineage"


def test_bare_cardholder_table_names_count_in_any_schema() -> None:
    # The session's search_path can change; a bare name is taken to the safe side.
    p = Policy.parse('cardholder_columns = ["payments.cards.pan"]\nagent_groups = ["agents"]\ndefault = "allow"\n')
    assert p.decide(["agents"], "db", "select reverse(pan) from cards").rule == "lineage"
    assert p.decide(["agents"], "db", "select reverse(pan) from public.cards").action is Action.ALLOW


def test_a_function_call_message_is_refused_for_agents() -> None:
    p = _policy()
    decision = p.decide_function_call(["agents"], "db", 1234)
    assert (decision.action, decision.rule) == (Action.BLOCK, "untrusted-function")
    assert p.decide_function_call(["dbas"], "db", 1234).action is Action.ALLOW


def test_agents_without_cardholder_columns_still_get_the_function_rule() -> None:
    p = Policy.parse('agent_groups = ["agents"]\ndefault = "allow"\n')
    assert p.decide(["agents"], "db", "select reverse(pan) from cards").action is Action.ALLOW
    assert p.decide(["agents"], "db", "select scratch.f()").rule == "untrusted-function"


def test_a_refusal_beats_every_rule() -> None:
    p = Policy.parse(textwrap.dedent("""\
        cardholder_columns = ["public.cards.pan"]
        agent_groups = ["agents"]
        [[rule]]
        name = "everything"
        action = "allow"
        """))
    assert p.decide(["agents"], "db", "select 1; select md5(pan) from cards").rule == "lineage"


@pytest.fixture(scope="module")
def server(postgres):  # type: ignore[no-untyped-def]
    conn = postgres.connect()
    conn.autocommit = True
    conn.execute("drop schema if exists scratch cascade")
    for table in ("customers", "cards", "payments", "other"):
        conn.execute(f"drop table if exists public.{table} cascade")
    conn.execute(SCHEMA)
    yield conn
    conn.close()


CARD_PANS = (b"4111111111111111", b"5500005555555559")


def _run(server, sql: str) -> list:  # type: ignore[no-untyped-def]
    """Run ``sql`` in a rolled-back transaction: its results, or fail with the server's errors."""
    from psycopg import pq

    pgconn = server.pgconn
    assert pgconn.exec_(b"BEGIN").status == pq.ExecStatus.COMMAND_OK
    results, errors = [], []
    try:
        pgconn.send_query(sql.encode())
        while (result := pgconn.get_result()) is not None:
            if result.status == pq.ExecStatus.COPY_OUT:
                while pgconn.get_copy_data(0)[0] > 0:
                    pass
            elif result.status == pq.ExecStatus.FATAL_ERROR:
                errors.append((result.error_message or b"").decode())
            else:
                results.append(result)
    finally:
        pgconn.exec_(b"ROLLBACK")
    assert not errors, f"{sql!r}: {errors}"
    return results


@pytest.mark.parametrize("sql", [s for s, _ in ATTACKS] + CONTROLS)
def test_the_corpus_is_sql_the_server_runs(server, sql: str) -> None:  # type: ignore[no-untyped-def]
    _run(server, sql)


@pytest.mark.parametrize("sql", CONTROLS + [s for s, e in ATTACKS if e == "ok"])
def test_every_card_number_an_allowed_statement_returns_carries_the_columns_identity(
        server, sql: str) -> None:  # type: ignore[no-untyped-def]
    """What lineage allows is what masking can recognise: a result column that shows a card
    number is described by the server as public.cards.pan itself (table OID and column
    number), so a mask rule on the column applies to it whatever the query called it."""
    row = server.execute("select c.oid, a.attnum from pg_class c join pg_attribute a on a.attrelid = c.oid "
                         "where c.oid = 'public.cards'::regclass and a.attname = 'pan'").fetchone()
    for result in _run(server, sql):
        for column in range(result.nfields):
            values = [result.get_value(r, column) for r in range(result.ntuples)]
            if any(v is not None and any(p in v for p in CARD_PANS) for v in values):
                assert (result.ftable(column), result.ftablecol(column)) == row, (
                    f"{sql!r}: column {column + 1} shows a card number without public.cards.pan's identity")


# ---- the lab's policy ----------------------------------------------------------------------

LAB_AGENT = ["payments-agents", "ci"]


@pytest.mark.parametrize("sql, rule", [
    # The laundering example, both halves.
    (("create function scratch.f() returns int language sql as "
     "'update public.cards set expiry = ''00/00''; select 1'"), "no-stored-code-for-agents"),
    ("create or replace procedure scratch.p() language sql as 'delete from public.cards'",
     "no-stored-code-for-agents"),
    ("select scratch.f()", "untrusted-function"),
    ("call scratch.p()", "untrusted-function"),
    ("create trigger t after insert on scratch.t for each row execute function scratch.f()",
     "no-stored-code-for-agents"),
    ("create rule r as on insert to scratch.t do also delete from public.cards", "no-stored-code-for-agents"),
    ("alter function scratch.f() security definer", "no-stored-code-for-agents"),
    ("create aggregate scratch.a(int) (sfunc = int4pl, stype = int)", "no-stored-code-for-agents"),
    ("create view scratch.v as select pan from cards", "lineage"),
    ("create view scratch.v as select id from public.cards", "no-destructive-ddl-on-cardholder-data"),
    ("create materialized view scratch.m as select 1", "default"),
    ("select reverse(pan) from cards", "lineage"),
    ("select id from cards where pan like '4111%'", "lineage"),
    ("insert into scratch.t select id, pan from cards", "lineage"),
    ("select query_to_xml('select pan from cards', true, false, '')", "untrusted-function"),
])
def test_the_lab_policy_refuses_laundering_for_agents(sql: str, rule: str) -> None:
    from appliance.lab.policy import LAB_POLICY

    decision = Policy.parse(LAB_POLICY).decide(LAB_AGENT, "payments", sql)
    assert (decision.action, decision.rule) == (Action.BLOCK, rule), decision.message


@pytest.mark.parametrize("sql", [
    "select pan from cards where id = 1",
    "select c.pan, p.amount from cards c join payments p on p.card_id = c.id order by p.created_at",
    "create schema scratch",
    "create table scratch.t (id int, note text)",
    "insert into scratch.t values (1, 'x')",
    "create view scratch.v as select id, note from scratch.t",
    "create table scratch.u as select id, note from scratch.t",
    "drop table scratch.u",
    "select count(*), lower(brand) from cards group by brand",
])
def test_the_lab_policy_still_lets_agents_work(sql: str) -> None:
    from appliance.lab.policy import LAB_POLICY

    decision = Policy.parse(LAB_POLICY).decide(LAB_AGENT, "payments", sql)
    assert decision.action in (Action.ALLOW, Action.MASK), decision.message


def test_commands_narrow_a_rule_to_command_tags() -> None:
    p = Policy.parse(textwrap.dedent("""\
        [[rule]]
        name = "no-functions"
        commands = ["create  function", "CREATE PROCEDURE"]
        action = "block"
        [[rule]]
        name = "tables-only"
        classes = ["ddl"]
        commands = ["CREATE TABLE", "DROP TABLE"]
        action = "allow"
        """))
    assert p.decide([], "db", "create function f() returns int language sql as 'select 1'").rule == "no-functions"
    assert p.decide([], "db", "create table t (a int)").rule == "tables-only"
    assert p.decide([], "db", "create view v as select 1").rule == "default"  # not covered: falls through


@pytest.mark.parametrize("sql", [
    # Found by the non-interference fuzz: a second output column of the same name hid the first.
    "select distinct *, c.id as pan from cards c",
    "select s.b from (select id as pan, pan from cards) s(a, b) where s.b like '4%'",
    "select * from (select pan, id as pan from cards) s union all select * from (select pan, id from cards) t",
])
def test_a_column_of_the_same_name_does_not_hide_a_cardholder_column(sql: str) -> None:
    assert _policy().decide(["agents"], "db", sql).rule == "lineage"


def _holding_policy(extra: str = "") -> Policy:
    return Policy.parse(textwrap.dedent("""\
        default = "allow"
        cardholder_columns = ["public.cards.pan"]
        agent_groups = ["agents"]
        cardholder_writes = { action = "hold", approvers = ["dbas"], timeout = "5m" }
        """) + extra)


@pytest.mark.parametrize("sql", [
    "insert into scratch.t select id, pan from cards",
    "create table scratch.copy as select * from cards",
    "update scratch.t set note = c.pan from cards c where c.id = t.id",
    "merge into scratch.t t using cards c on t.id = c.id when not matched then insert values (c.id, c.pan)",
])
def test_cardholder_writes_can_be_held_instead_of_refused(sql: str) -> None:
    decision = _holding_policy().decide(["agents"], "db", sql)
    assert (decision.action, decision.rule) == (Action.HOLD, "lineage"), decision.message
    assert decision.hold == HoldSpec(("dbas",), 1, 300.0)
    assert decision.message.startswith("this statement needs approval (cardholder_writes): public.cards.pan")


@pytest.mark.parametrize("sql", [
    "insert into scratch.t select id, reverse(pan) from cards",  # a transform is no copy
    "insert into scratch.t select id, pan from cards where pan like '4%'",  # nor is an oracle
    "with w as (insert into scratch.t select id, pan from cards returning note) select * from w",  # RETURNING
    "copy (select pan from cards) to stdout",  # out to the agent, unmasked: no table
    "create view scratch.v as select pan from cards",
])
def test_only_a_plain_copy_into_a_table_is_held(sql: str) -> None:
    decision = _holding_policy().decide(["agents"], "db", sql)
    assert (decision.action, decision.rule) == (Action.BLOCK, "lineage"), decision.message


def test_the_rules_still_block_or_hold_a_held_copy_first() -> None:
    p = _holding_policy(textwrap.dedent("""\
        [[rule]]
        name = "no-scratch"
        relations = ["scratch.blocked"]
        action = "block"
        [[rule]]
        name = "sre-holds"
        relations = ["scratch.held"]
        action = "hold"
        approvers = ["sre"]
        """))
    assert p.decide(["agents"], "db", "insert into scratch.blocked select id, pan from cards").rule == "no-scratch"
    decision = p.decide(["agents"], "db", "insert into scratch.held select id, pan from cards")
    assert (decision.action, decision.rule, decision.hold.approver_groups) == (Action.HOLD, "sre-holds", ("sre",))


@pytest.mark.parametrize("text, expected", [
    ('cardholder_writes = "hold"\n', 'cardholder_writes must be "refuse" or { action = "hold"'),
    ('cardholder_writes = { action = "hold" }\n', "cardholder_writes: a hold needs approvers"),
    ('cardholder_writes = { action = "hold", approvers = ["x"], timeout = "9d" }\n', "cardholder_writes: timeout"),
    ('cardholder_writes = { action = "hold", approvers = ["x"], who = 1 }\n', "unknown key 'who'"),
])
def test_cardholder_writes_errors(text: str, expected: str) -> None:
    from appliance.policy.rules import PolicyError

    with pytest.raises(PolicyError, match=r"policy\.toml:1: ") as info:
        Policy.parse(text, "policy.toml")
    assert expected in str(info.value)


@pytest.mark.parametrize("sql, says", [
    ("copy (select 1) to program 'id'", "PROGRAM runs a command"),
    ("COPY scratch.t FROM PROGRAM 'cat /etc/passwd'", "PROGRAM runs a command"),
    ("copy scratch.t to '/tmp/rows'", "a file on the database server"),
    ("copy scratch.t from '/var/lib/postgresql/data/base/1/1259'", "a file on the database server"),
    ("select 1; copy (select 1) to program 'id'", "PROGRAM runs a command"),
])
def test_server_side_copy_is_refused_for_agents(sql: str, says: str) -> None:
    """COPY to or from the server's files or programs: out of the proxy's sight."""
    from appliance.lab.policy import LAB_POLICY

    decision = Policy.parse(LAB_POLICY).decide(LAB_AGENT, "payments", sql)
    assert (decision.action, decision.rule) == (Action.BLOCK, "untrusted-function"), decision
    assert says in decision.message
    everything = Policy.parse('agent_groups = ["agents"]\ndefault = "allow"\n')
    assert everything.decide(["agents"], "db", sql).rule == "untrusted-function"
    assert everything.decide(["others"], "db", sql).action is Action.ALLOW
    assert Policy.parse(LAB_POLICY).decide(LAB_AGENT, "payments", "copy scratch.t to stdout").action is Action.ALLOW


def test_logical_decoding_is_refused_for_agents() -> None:
    p = Policy.parse('agent_groups = ["agents"]\ndefault = "allow"\n')
    for sql in ("select * from pg_logical_slot_peek_changes('s', null, null)",
                "select data from pg_catalog.pg_logical_slot_get_changes('s', null, null)"):
        decision = p.decide(["agents"], "db", sql)
        assert decision.rule == "untrusted-function" and "rows other sessions wrote" in decision.message, decision
