"""``tollgate db discover`` against a real PostgreSQL: a PAN column is found, ids are not,
the declaration is compared, and no card number is ever printed."""

from __future__ import annotations

import json

import pytest

from appliance.cli import main
from appliance.dbadmin.columns import ColumnName
from appliance.dbadmin.discover import discover, pan_count
from tests.dbadmin.conftest import PANS, Database

CARDS_PAN = ColumnName("public", "cards", "pan")
BACKUP_PAN = ColumnName("legacy", "card_backup", "pan")  # a domain over varchar
WALLET_PANS = ColumnName("legacy", "wallets", "pans")  # int8[]


def test_sampling_finds_the_pan_columns_and_not_luhn_valid_ids(database: Database):
    with database.connect() as conn:
        report = discover(conn, [CARDS_PAN])
    found = {s.column: s for s in report.samples}
    assert found[CARDS_PAN].with_pan == found[CARDS_PAN].sampled == len(PANS)
    assert [s.column for s in report.declared_found()] == [CARDS_PAN]
    assert [s.column for s in report.undeclared()] == [BACKUP_PAN, WALLET_PANS]
    # Random 16-digit ids starting with 4: some pass Luhn by chance, far below the threshold.
    ids = found[ColumnName("public", "accounts", "id")]
    assert ids.sampled == 200 and 0 < ids.with_pan < 60
    assert ids in report.below_threshold()
    # Luhn-valid ids with no issuer prefix are not card numbers at all.
    assert found[ColumnName("public", "accounts", "ref")].with_pan == 0
    assert found[ColumnName("public", "cards", "pan_last4")].with_pan == 0


def test_sample_is_bounded(database: Database):
    with database.connect() as conn:
        report = discover(conn, [CARDS_PAN], sample_rows=7)
    assert {s.sampled for s in report.samples if s.readable} == {7}


def test_declared_but_absent_and_unreadable_columns_are_named(database: Database):
    ghost = ColumnName("public", "cards", "cvv")
    with database.connect() as conn:
        conn.execute("REVOKE SELECT ON legacy.card_backup FROM " + database.agent)
    with database.connect(database.agent) as conn:
        report = discover(conn, [CARDS_PAN, ghost])
    assert report.role == database.agent
    assert ghost in report.missing and ghost in report.declared_not_found()
    assert BACKUP_PAN in [s.column for s in report.unreadable()]
    assert [s.column for s in report.undeclared()] == [WALLET_PANS]


def test_pan_count_ignores_nulls_and_counts_brands():
    sampled, with_pan, brands = pan_count([None, PANS[0], "no digits", f"card {PANS[1]} on file"])
    assert (sampled, with_pan) == (3, 2)
    assert sum(brands.values()) == 2


@pytest.mark.parametrize("as_json", [False, True])
def test_cli_exit_status_says_whether_undeclared_candidates_exist_and_prints_no_pan(
        database: Database, capsys: pytest.CaptureFixture[str], as_json: bool):
    base = ["db", "discover", "-c", str(database.config), "--database", database.name, "--column", str(CARDS_PAN)]
    flags = ["--json"] if as_json else []
    # With the held credential, as the proxy logs in: the agent role reads both PAN columns.
    assert main(base + flags) == 1
    out = capsys.readouterr().out
    assert not any(pan in out for pan in PANS)
    if as_json:
        report = json.loads(out)
        assert [c["column"] for c in report["undeclared_candidates"]] == [str(BACKUP_PAN), str(WALLET_PANS)]
        assert report["declared"][0]["with_pan"] == len(PANS)
    else:
        assert "UNDECLARED candidates" in out and str(BACKUP_PAN) in out
    assert main([*base, "--column", str(BACKUP_PAN), "--column", str(WALLET_PANS), *flags]) == 0
    assert not any(pan in capsys.readouterr().out for pan in PANS)


def test_cli_names_a_bad_column(database: Database, capsys: pytest.CaptureFixture[str]):
    assert main(["db", "discover", "-c", str(database.config), "--database", database.name,
                 "--column", "cards.pan"]) == 2
    assert "'cards.pan' is not schema.table.column" in capsys.readouterr().err


def test_cli_reads_the_policys_declaration(database: Database, capsys: pytest.CaptureFixture[str]):
    policy = database.config.parent / "policy.toml"
    policy.write_text('default = "deny"\n'
                      'cardholder_columns = ["public.cards.pan", "legacy.card_backup.pan", "legacy.wallets.pans"]\n')
    database.config.write_text(database.config.read_text() + f'\n[policy]\nfile = "{policy}"\n')
    assert main(["db", "discover", "-c", str(database.config), "--database", database.name, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(c["column"] for c in report["declared"]) == [str(BACKUP_PAN), str(WALLET_PANS), str(CARDS_PAN)]
    assert report["undeclared_candidates"] == []


def test_a_column_that_cannot_be_sampled_in_time_is_named_and_never_counted_clean(
        database: Database, capsys: pytest.CaptureFixture[str]):
    declared = ["--column", str(CARDS_PAN), "--column", str(BACKUP_PAN), "--column", str(WALLET_PANS)]
    with database.connect() as holder, holder.transaction():
        holder.execute("LOCK TABLE legacy.card_backup IN ACCESS EXCLUSIVE MODE")
        with database.connect() as conn:
            report = discover(conn, [CARDS_PAN, BACKUP_PAN, WALLET_PANS], timeout=0.2)
        code = main(["db", "discover", "-c", str(database.config), "--database", database.name, *declared,
                     "--timeout", "0.2"])
    [skipped] = report.not_sampled()
    assert skipped.column == BACKUP_PAN and "timeout" in skipped.not_sampled
    assert report.undeclared() == () and not report.clean
    assert {s.column for s in report.declared_found()} == {CARDS_PAN, WALLET_PANS}
    assert code == 1 and "NOT SAMPLED in time" in capsys.readouterr().out
    assert main(["db", "discover", "-c", str(database.config), "--database", database.name, *declared]) == 0
