"""Lineage and function rules end to end: the lab's agent, through the real proxy.

The lab's policy declares ``public.cards.pan`` a cardholder column and ``payments-agents``
agents (appliance/lab/policy.py). A plain select of the column still works, masked; the
issue's transforms, oracles, writes and function laundering are refused before they reach
the database.
"""

from __future__ import annotations

import re

import pytest

from appliance.lab import Lab
from tests.e2e.conftest import psql, python_json, superuser_sql

ERRORS = """
import json, sys, psycopg
out = []
with psycopg.connect(sys.argv[1], autocommit=True) as conn:
    for sql in sys.argv[2:]:
        try:
            cursor = conn.execute(sql)
            rows = cursor.fetchall() if cursor.description is not None else []
            out.append(["ok", [[str(v) for v in row] for row in rows]])
        except psycopg.Error as exc:
            out.append([exc.sqlstate, exc.diag.message_primary])
print(json.dumps(out))
"""

ATTACKS = [
    ("SELECT reverse(pan) FROM cards WHERE id = 1", "lineage"),
    ("SELECT substr(pan, 1, 8), substr(pan, 9) FROM cards WHERE id = 1", "lineage"),
    ("SELECT encode(pan::bytea, 'base64') FROM cards WHERE id = 1", "lineage"),
    ("SELECT set_config('application_name', pan, false) FROM cards WHERE id = 1", "lineage"),
    ("SELECT id FROM cards WHERE pan LIKE '4%' ORDER BY id LIMIT 1", "lineage"),
    ("SELECT id FROM cards ORDER BY pan LIMIT 1", "lineage"),
    ("SELECT query_to_xml('SELECT reverse(pan) FROM cards', true, false, '')", "untrusted-function"),
]


def errors(lab: Lab, *statements: str) -> list:
    return python_json(lab, ERRORS, lab.conninfo(), *statements)  # type: ignore[return-value]


def test_transforms_and_oracles_are_refused_and_a_plain_select_is_masked(lab: Lab):
    clear = superuser_sql(lab, "SELECT pan FROM cards WHERE id = 1").strip()
    assert re.fullmatch(r"\d{13,19}", clear)
    out = errors(lab, "SELECT pan FROM cards WHERE id = 1", *(sql for sql, _ in ATTACKS))
    [[status, rows]] = out[:1]
    assert status == "ok"
    [[shown]] = rows
    assert clear not in shown and len(re.sub(r"\D", "", shown)) <= 10, shown  # at most BIN and last four
    for (sql, rule), (sqlstate, message) in zip(ATTACKS, out[1:], strict=True):
        assert sqlstate == "42501", (sql, sqlstate, message)
        assert message.startswith("Tollgate refuses this for agents"), (sql, message)
        assert ("not a built-in" in message or "runs SQL" in message) if rule == "untrusted-function" \
            else "public.cards.pan" in message, (sql, message)
    # application_name never took the card number: the set_config never ran.
    assert clear not in psql(lab, "SELECT current_setting('application_name')")
    # Tools' catalog queries name the table and column too, and still work.
    assert "pan" in psql(lab, "\\d cards")


@pytest.fixture
def laundering_function(lab: Lab):
    """The issue's function, created by an administrator (agents may not create one)."""
    superuser_sql(lab, "CREATE SCHEMA lineage_e2e; CREATE FUNCTION lineage_e2e.f() RETURNS int LANGUAGE sql AS "
                       "$$ UPDATE public.cards SET expiry = '00/00' WHERE id = 2; SELECT 1 $$; "
                       "GRANT USAGE ON SCHEMA lineage_e2e TO PUBLIC")
    try:
        yield "lineage_e2e.f"
    finally:
        superuser_sql(lab, "DROP SCHEMA lineage_e2e CASCADE")


def test_functions_cannot_launder_a_write_to_cards(lab: Lab, laundering_function: str):
    before = superuser_sql(lab, "SELECT expiry FROM cards WHERE id = 2").strip()
    created, called = errors(
        lab,
        "CREATE FUNCTION scratch.g() RETURNS int LANGUAGE sql AS $$ UPDATE public.cards SET expiry = '00/00'; "
        "SELECT 1 $$",
        f"SELECT {laundering_function}()")
    assert created == ["42501", ("agents may not create or change functions, procedures, triggers, rules or other "
                                "stored code")]
    assert called[0] == "42501" and f"{laundering_function} is not a built-in function" in called[1]
    assert superuser_sql(lab, "SELECT expiry FROM cards WHERE id = 2").strip() == before != "00/00"
