"""``tollgate db provision`` against a real PostgreSQL: idempotent, and afterwards the
database itself refuses the agent role's writes, laundering and clear reads with 42501."""

from __future__ import annotations

import json

import pytest
from psycopg import errors

from appliance.cli import main
from appliance.dbadmin import provision as prov
from appliance.dbadmin.columns import ColumnName
from tests.dbadmin.conftest import PANS, Database

CARDS_PAN = "public.cards.pan"


def provision(database: Database, *extra: str) -> int:
    return main(["db", "provision", "-c", str(database.config), "--database", database.name,
                 "--column", CARDS_PAN, "--dsn", database.dsn(), *extra])


def pci_masked(pan: str) -> str:
    return pan[:6] + "*" * (len(pan) - 10) + pan[-4:]


@pytest.fixture
def provisioned(database: Database) -> Database:
    assert provision(database, "--apply") == 0
    return database


def refused(database: Database, sql: str) -> str:
    """The server's message for ``sql`` run as the agent role, which must be 42501."""
    with database.connect(database.agent) as conn, pytest.raises(errors.InsufficientPrivilege) as raised:
        conn.execute(sql)
    assert raised.value.sqlstate == "42501"
    return str(raised.value)


def test_apply_twice_is_idempotent_and_checked(database: Database, capsys: pytest.CaptureFixture[str]):
    assert provision(database) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("BEGIN;\n") and printed.endswith("COMMIT;\n")
    assert provision(database, "--apply") == 0
    first = capsys.readouterr().out
    assert "check: no agent role can read a cardholder column in clear" in first
    assert provision(database, "--apply") == 0
    assert capsys.readouterr().out == first
    # The script it prints runs as is, a third time, with psql's own parser.
    assert provision(database) == 0
    with database.connect() as conn:
        conn.execute(capsys.readouterr().out)
    assert provision(database, "--check") == 0


@pytest.mark.parametrize("sql", [
    "UPDATE public.cards SET brand = 'x' WHERE id = 1",
    "UPDATE cards SET brand = 'x' WHERE id = 1",  # the masked view first on the search_path
    "INSERT INTO public.cards VALUES (999, '4111111111111111', '1111', 'visa')",
    "DELETE FROM public.cards",
    "TRUNCATE public.cards",
    "CREATE TABLE public.notes (n text)",
    "CREATE VIEW public.v AS SELECT 1",
    "CREATE FUNCTION public.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    "CREATE TEMP TABLE t (n int)",
    "CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    "CREATE SCHEMA mine",
    "SELECT pan FROM public.cards",
    "SELECT reverse(pan) FROM public.cards",
    "SELECT * FROM public.cards",
    "SELECT count(*) FROM public.cards WHERE pan LIKE '4%'",
    "SELECT set_config('application_name', pan, false) FROM public.cards WHERE id = 1",
    "SELECT pan FROM legacy.card_backup",  # still readable: not declared (discover finds it)
    "SELECT lo_from_bytea(0, 'x')",
    "SELECT query_to_xml('SELECT 1', true, true, '')",
])
def test_the_database_refuses_the_agent(provisioned: Database, sql: str):
    if "legacy" in sql:
        with provisioned.connect(provisioned.agent) as conn:
            assert conn.execute(sql).fetchone() is not None
        return
    refused(provisioned, sql)


def test_planner_statistics_of_a_cardholder_column_are_hidden_from_the_agent(provisioned: Database):
    # pg_stats shows most-common values and histogram bounds: the column's values. It lists
    # only the columns the reader may SELECT.
    stats = "SELECT count(*) FROM pg_stats WHERE schemaname = 'public' AND tablename = 'cards' AND attname = %s"
    with provisioned.connect() as conn:
        assert conn.execute(stats, ("pan",)).fetchone()[0] == 1
    with provisioned.connect(provisioned.agent) as conn:
        assert conn.execute(stats, ("pan",)).fetchone()[0] == 0
        assert conn.execute(stats, ("brand",)).fetchone()[0] == 1


def test_functions_the_agent_calls_run_with_its_privileges(provisioned: Database):
    with provisioned.connect() as conn:
        conn.execute("""
            CREATE FUNCTION public.touch_cards() RETURNS void LANGUAGE sql
                AS 'UPDATE public.cards SET brand = ''x'' WHERE id = 1';
            CREATE FUNCTION public.dynamic(q text) RETURNS SETOF text LANGUAGE plpgsql
                AS 'BEGIN RETURN QUERY EXECUTE q; END';
        """)
        conn.execute(f"GRANT EXECUTE ON FUNCTION public.touch_cards(), public.dynamic(text) TO {provisioned.agent}")
    refused(provisioned, "SELECT public.touch_cards()")
    refused(provisioned, "SELECT public.dynamic('SELECT reverse(pan) FROM public.cards')")
    with provisioned.connect() as conn:
        assert conn.execute("SELECT count(*) FROM public.cards WHERE brand = 'x'").fetchone()[0] == 0


def test_reads_through_the_search_path_show_the_masked_display(provisioned: Database):
    with provisioned.connect(provisioned.agent) as conn:
        rows = conn.execute("SELECT id, pan, pan_last4, reverse(pan) FROM cards ORDER BY id").fetchall()
        # Columns that are not declared still read from the table itself, qualified or not.
        assert conn.execute("SELECT max(id) FROM public.cards").fetchone()[0] == len(PANS)
    assert [r[1] for r in rows] == [pci_masked(p) for p in PANS]
    assert [r[2] for r in rows] == [p[-4:] for p in PANS]
    assert [r[3] for r in rows] == [pci_masked(p)[::-1] for p in PANS]


def test_an_agent_role_that_owns_a_cardholder_table_is_refused(database: Database,
                                                               capsys: pytest.CaptureFixture[str]):
    with database.connect() as conn:
        conn.execute(f"ALTER TABLE public.cards OWNER TO {database.agent}")
    assert provision(database) == 2
    assert f"agent role {database.agent} owns a cardholder table" in capsys.readouterr().err


@pytest.mark.parametrize("role", ["owner", "pg_read_all_data", "pg_monitor"])
def test_an_agent_role_that_can_act_as_an_owner_or_read_everything_is_refused(
        database: Database, capsys: pytest.CaptureFixture[str], role: str):
    granted = database.owner if role == "owner" else role
    with database.connect() as conn:
        conn.execute(f"GRANT {granted} TO {database.agent}")
    try:
        assert provision(database) == 2
        assert f"agent role {database.agent} is a member of {granted}" in capsys.readouterr().err
    finally:
        with database.connect() as conn:
            conn.execute(f"REVOKE {granted} FROM {database.agent}")


def test_an_agent_role_with_replication_is_refused(database: Database, capsys: pytest.CaptureFixture[str]):
    with database.connect() as conn:
        conn.execute(f"ALTER ROLE {database.agent} REPLICATION")
    assert provision(database) == 2
    assert f"agent role {database.agent} has REPLICATION" in capsys.readouterr().err


def test_check_names_views_and_definer_functions_that_reach_a_cardholder_column(
        provisioned: Database, capsys: pytest.CaptureFixture[str]):
    with provisioned.connect() as conn:
        conn.execute(f"SET ROLE {provisioned.owner}")
        conn.execute("CREATE VIEW public.all_cards AS SELECT id, pan FROM public.cards")
        conn.execute("CREATE FUNCTION public.pan_of(i int) RETURNS text LANGUAGE sql SECURITY DEFINER "
                     "AS 'SELECT pan FROM public.cards WHERE id = i'")
        conn.execute(f"GRANT SELECT ON public.all_cards TO {provisioned.agent}")
    capsys.readouterr()
    assert provision(provisioned, "--check") == 1
    out = capsys.readouterr().out
    assert "SELECT on view all_cards, which reads public.cards.pan" in out
    assert "EXECUTE on SECURITY DEFINER function pan_of(integer)" in out


def test_held_writes_leave_the_other_columns_writable_and_never_the_pan(database: Database):
    assert provision(database, "--apply", "--writes", "held") == 0
    with database.connect(database.agent) as conn:
        assert conn.execute("UPDATE public.cards SET brand = 'y' WHERE id = 2").rowcount == 1
        # A bare name resolves to the masked view, which passes the write on; its WHERE
        # sees only the masked display.
        assert conn.execute("UPDATE cards SET brand = 'w' WHERE id = 3 RETURNING pan").fetchone()[0] \
            == pci_masked(PANS[2])
        assert conn.execute("UPDATE cards SET brand = 'v' WHERE pan = %s", (PANS[3],)).rowcount == 0
        with pytest.raises(errors.FeatureNotSupported, match='cannot update column "pan" of view "cards"'):
            conn.execute("UPDATE cards SET pan = '4111111111111111' WHERE id = 2")
    refused(database, "UPDATE public.cards SET pan = '4111111111111111' WHERE id = 2")
    refused(database, "UPDATE public.cards SET brand = 'z' WHERE pan LIKE '4%'")
    refused(database, "UPDATE public.cards SET brand = 'z' WHERE id = 2 RETURNING pan")
    # Back to refused: the writes granted for held are taken back, on the view too.
    assert provision(database, "--apply") == 0
    refused(database, "UPDATE cards SET brand = 'u' WHERE id = 3")
    refused(database, "DELETE FROM public.cards WHERE id = 3")


def test_plan_masks_numbers_in_their_own_type_and_honours_last4():
    snapshot = prov.Snapshot(
        "db", "owner", (prov.Table("public", "cards", "owner",
                                   (prov.Column("id", "integer", "int4"), prov.Column("pan", "bigint", "int8"),
                                    prov.Column("doc", "jsonb", "jsonb")),
                                   frozenset({"pan", "doc"})),),
        (prov.Role("agent", False, False, False, ()),), ())
    sql = "\n".join(prov.plan(snapshot, prov.Options(pan_format="last4")))
    assert '"tollgate_masked".pan_display_number("pan"::numeric)::bigint AS "pan"' in sql
    assert "right(d, 4)::numeric" in sql and "left(d, 6)" not in sql
    assert 'GRANT SELECT ("id") ON TABLE "public"."cards" TO "agent"' in sql
    assert 'NULL::jsonb AS "doc"' in sql  # no display for this type: nothing shown, type kept


def test_the_masked_number_display_keeps_bin_and_last_four(provisioned: Database):
    with provisioned.connect() as conn:
        shown = conn.execute("SELECT tollgate_masked.pan_display_number(%s::numeric)", (PANS[0],)).fetchone()[0]
    assert str(shown) == PANS[0][:6] + "0" * (len(PANS[0]) - 10) + PANS[0][-4:]


def test_a_missing_declared_column_is_refused(database: Database):
    with database.connect() as conn:
        snapshot = prov.read_snapshot(conn, [ColumnName("public", "cards", "cvv")], [database.agent])
    with pytest.raises(prov.ProvisionError, match=r"declared column public\.cards\.cvv is not in database"):
        prov.plan(snapshot)



def test_other_masked_columns_of_a_cardholder_table_are_protected_and_shown_by_their_method(
        database: Database, capsys: pytest.CaptureFixture[str]):
    policy = database.config.parent / "policy.toml"
    policy.write_text("""\
default = "deny"
cardholder_columns = ["public.cards.pan"]

[[rule]]
name = "cards-masked"
relations = ["public.cards"]
classes = ["read"]
action = "mask"
mask = [{ columns = ["public.cards.brand"], method = "full" },
        { columns = ["public.cards.pan_last4"], method = "null" }]
""")
    database.config.write_text(database.config.read_text() + f'\n[policy]\nfile = "{policy}"\n')
    assert main(["db", "provision", "-c", str(database.config), "--database", database.name,
                 "--dsn", database.dsn(), "--apply"]) == 0
    capsys.readouterr()
    with database.connect(database.agent) as conn:
        rows = conn.execute("SELECT brand, pan_last4 FROM cards ORDER BY id").fetchall()
    assert set(rows) == {("****", None)}
    refused(database, "SELECT brand FROM public.cards")
    refused(database, "SELECT reverse(pan_last4) FROM public.cards")


def test_check_finds_a_privilege_given_back_directly_or_through_public(provisioned: Database,
                                                                       capsys: pytest.CaptureFixture[str]):
    with provisioned.connect() as conn:
        conn.execute(f"GRANT UPDATE ON public.cards TO {provisioned.agent}")
        conn.execute("GRANT SELECT (pan) ON public.cards TO PUBLIC")
        conn.execute(f"GRANT TEMPORARY ON DATABASE {provisioned.name} TO PUBLIC")
        conn.execute("GRANT EXECUTE ON FUNCTION lo_from_bytea(oid, bytea) TO PUBLIC")
    capsys.readouterr()
    assert provision(provisioned, "--check") == 1
    out = capsys.readouterr().out
    for finding in ("UPDATE on public.cards", "SELECT on cardholder column public.cards.pan",
                    f"TEMPORARY on database {provisioned.name}", "EXECUTE on lo_from_bytea(oid,bytea)"):
        assert f"{provisioned.agent}: {finding}" in out
    assert provision(provisioned, "--apply") == 0  # and provisioning again takes them back


def test_printing_reads_the_catalog_with_the_held_credential_and_names_the_agent_roles(
        database: Database, capsys: pytest.CaptureFixture[str]):
    assert main(["db", "provision", "-c", str(database.config), "--database", database.name,
                 "--column", CARDS_PAN, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["agent_roles"] == [database.agent] and out["applied"] is False and "findings" not in out
    assert f'REVOKE ALL ON TABLE "public"."cards" FROM PUBLIC, "{database.agent}"' in out["sql"]
    assert not any(s.startswith("--") for s in out["sql"])
    # Nothing was changed: the agent still reads the column in clear.
    with database.connect(database.agent) as conn:
        assert conn.execute("SELECT pan FROM public.cards WHERE id = 1").fetchone()[0] == PANS[0]


def test_apply_without_an_admin_conninfo_is_refused(database: Database, capsys: pytest.CaptureFixture[str]):
    assert main(["db", "provision", "-c", str(database.config), "--database", database.name,
                 "--column", CARDS_PAN, "--apply"]) == 2
    assert "--apply and --check need --dsn" in capsys.readouterr().err


def test_a_column_added_after_provisioning_stays_closed_until_provisioned_again(provisioned: Database):
    with provisioned.connect() as conn:
        conn.execute(f"SET ROLE {provisioned.owner}")
        conn.execute("ALTER TABLE public.cards ADD COLUMN note text DEFAULT 'n'")
    refused(provisioned, "SELECT note FROM public.cards")
    with provisioned.connect(provisioned.agent) as conn:
        assert conn.execute("SELECT count(*) FROM cards").fetchone()[0] == len(PANS)  # the view as it was
    assert provision(provisioned, "--apply") == 0
    with provisioned.connect(provisioned.agent) as conn:
        assert conn.execute("SELECT DISTINCT note FROM cards").fetchall() == [("n",)]


@pytest.mark.parametrize("agent_groups, expected", [('agent_groups = ["agents"]\n', 0), ("", 2)])
def test_default_agent_roles_are_those_the_policys_agent_groups_may_log_in_as(
        database: Database, capsys: pytest.CaptureFixture[str], agent_groups: str, expected: int):
    pw = database.config.parent / "pw"
    policy = database.config.parent / "policy.toml"
    policy.write_text(f'default = "deny"\ncardholder_columns = ["public.cards.pan"]\n{agent_groups}')
    database.config.write_text(database.config.read_text().replace(
        '[targets.credentials.app]\n', '[targets.credentials.app]\ngroups = ["agents"]\n') + f"""
[targets.credentials.owner]
upstream_user = "{database.owner}"
password_file = "{pw}"
groups = ["dbas"]

[policy]
file = "{policy}"
""")
    code = main(["db", "provision", "-c", str(database.config), "--database", database.name, "--json"])
    out = capsys.readouterr()
    assert code == expected
    if expected == 0:
        # The owner's credential is bound to the DBAs: not an agent role, so not provisioned.
        assert json.loads(out.out)["agent_roles"] == [database.agent]
    else:
        # Without agent_groups nobody can tell, so every held role is an agent role, and the owner can't be one.
        assert f"agent role {database.owner} owns a cardholder table" in out.err
