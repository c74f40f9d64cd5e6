"""The lab's provisioned ``agent`` role, through the real proxy: what the policy allows,
the database still refuses — and a plain read of the cards shows the masked display.

The second test is the defence in depth the issue asks for: with the policy allowing
everything (no lineage, no function rules), the issue's attacks run as ``agent`` through
Tollgate leak nothing that the same statements show ``app`` directly, because PostgreSQL
refuses every use of ``public.cards.pan`` and the view on the agent's search path holds only
the masked display.
"""

from __future__ import annotations

import pytest

from appliance.lab import Lab
from appliance.lab.pans import make_test_pans
from appliance.lab.policy import PERMISSIVE_POLICY, POLICIES
from appliance.lab.schema import CARDS, DEFAULT_SEED
from tests.e2e.conftest import lab, python_json, set_policy  # noqa: F401 -- the session's lab fixture

pytestmark = pytest.mark.lab

RUN = """
import json, sys, psycopg
out = []
with psycopg.connect(sys.argv[1], autocommit=True) as conn:
    for sql in sys.argv[2:]:
        try:
            if sql.startswith("COPY"):
                with conn.cursor().copy(sql) as copy:
                    rows = [[bytes(b"".join(bytes(c) for c in copy)).decode()]]
            else:
                cur = conn.execute(sql)
                rows = [list(map(str, r)) for r in cur.fetchall()] if cur.description else []
            out.append(["ok", rows])
        except psycopg.Error as exc:
            out.append([exc.sqlstate, exc.diag.message_primary])
print(json.dumps(out))
"""


def test_agent_role_reads_masked_and_the_database_refuses_the_rest(lab: Lab):  # noqa: F811 -- fixture
    pans = make_test_pans(DEFAULT_SEED, CARDS)
    got = python_json(lab, RUN, lab.conninfo("agent"),
                      "SELECT current_user, pan FROM cards WHERE id = 1",
                      "SELECT pan FROM public.cards WHERE id = 1",
                      "SELECT brand FROM public.cards WHERE id = 1")
    [user_pan, clear, brand] = got  # type: ignore[misc]
    pan = str(pans[0])
    assert user_pan == ["ok", [["agent", pan[:6] + "*" * (len(pan) - 10) + pan[-4:]]]]
    # The policy lets a plain projection through (masking would star it): the database refuses it.
    assert clear == ["42501", "permission denied for table cards"]
    assert brand[0] == "ok"


@pytest.mark.parametrize("role", ["legacy_md5", "clear_tls"])
def test_the_other_agent_facing_logins_are_provisioned_too(lab: Lab, role: str):  # noqa: F811 -- fixture
    pan = str(make_test_pans(DEFAULT_SEED, CARDS)[0])
    got = python_json(lab, RUN, lab.conninfo(role), "SELECT pan FROM cards WHERE id = 1",
                      "SELECT pan FROM public.cards WHERE id = 1")
    assert got == [["ok", [[pan[:6] + "*" * (len(pan) - 10) + pan[-4:]]]],
                   ["42501", "permission denied for table cards"]]


# The transforms, encodings, oracles and launderings, each written against a table
# name that {t} fills: the masked view the agent's search path finds, and the table itself.
ATTACKS = (
    "SELECT reverse(pan) FROM {t} ORDER BY id LIMIT 3",
    "SELECT substr(pan, 1, 8), substr(pan, 9) FROM {t} ORDER BY id LIMIT 3",
    "SELECT translate(pan, '0123456789', 'abcdefghij') FROM {t} ORDER BY id LIMIT 3",
    "SELECT replace(pan, '1', 'x') FROM {t} ORDER BY id LIMIT 3",
    "SELECT encode(pan::bytea, 'base64'), encode(pan::bytea, 'hex') FROM {t} ORDER BY id LIMIT 3",
    "SELECT to_hex(pan::bigint) FROM {t} WHERE pan ~ '^[0-9]+$' ORDER BY id LIMIT 3",
    "SELECT array(SELECT ascii(substr(pan, i, 1)) FROM generate_series(1, 19) i) FROM {t} ORDER BY id LIMIT 3",
    "SELECT string_agg(pan, '' ORDER BY id) FROM (SELECT id, pan FROM {t} ORDER BY id LIMIT 2) s",
    "SELECT pan || pan FROM {t} ORDER BY id LIMIT 3",
    "SELECT lpad(pan, 20, '0') FROM {t} ORDER BY id LIMIT 3",
    "SELECT regexp_replace(pan, '([0-9]{{4}})', '\\1.', 'g') FROM {t} ORDER BY id LIMIT 3",
    "SELECT to_char(pan::numeric, 'FM9,999,999,999,999,999,999') FROM {t} WHERE pan ~ '^[0-9]+$' ORDER BY id LIMIT 3",
    "SELECT (pan::numeric + 1)::text FROM {t} WHERE pan ~ '^[0-9]+$' ORDER BY id LIMIT 3",
    "SELECT md5(pan) FROM {t} ORDER BY id LIMIT 3",
    "SELECT to_json(c)::text FROM {t} c ORDER BY id LIMIT 3",
    "SELECT count(*) FROM {t} WHERE substr(pan, 7, 1) = '3'",
    "SELECT id FROM {t} WHERE pan LIKE '______3%' ORDER BY id LIMIT 3",  # a hidden digit
    "SELECT set_config('application_name', reverse(pan), false) FROM {t} WHERE id = 1",
    "SELECT query_to_xml('SELECT reverse(pan) FROM {t} ORDER BY id LIMIT 3', true, true, '')::text",
    "COPY (SELECT reverse(pan) FROM {t} ORDER BY id LIMIT 3) TO STDOUT",
)


def test_with_the_policy_allowing_everything_the_database_alone_keeps_the_card_numbers(lab: Lab):  # noqa: F811
    statements = [a.format(t=t) for a in ATTACKS for t in ("cards", "public.cards")]
    set_policy(lab, PERMISSIVE_POLICY)
    try:
        through = python_json(lab, RUN, lab.conninfo("agent"), *statements)
    finally:
        set_policy(lab, POLICIES[lab.policy])
    # The same statements as the tables' owner, straight to the server (from the gateway, whose
    # own connections are never diverted): what a leak looks like.
    direct = python_json(lab, RUN, lab.conninfo("app", direct=True), *statements, node="gw")
    refused_by_database = 0
    for sql, got, clear in zip(statements, through, direct, strict=True):  # type: ignore[arg-type]
        assert clear[0] == "ok" and clear[1], f"the attack must work for the owner: {sql}: {clear}"
        if got[0] == "42501":
            refused_by_database += 1
            continue
        assert got[0] == "ok", f"{sql}: {got}"
        leaked = {v for row in clear[1] for v in row if len(v) >= 4}
        shown = {v for row in got[1] for v in row}
        assert got[1] != clear[1] and not leaked & shown, f"{sql} leaked: {got}"
    # Every attack on the table itself is refused by PostgreSQL; those on the view see the display.
    assert refused_by_database >= len(ATTACKS)
