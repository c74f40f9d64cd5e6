"""The lab's provisioned ``agent`` role, through the real proxy: what the policy allows,
the database still refuses — and a plain read of the cards shows the masked display."""

from __future__ import annotations

import pytest

from appliance.lab import Lab
from appliance.lab.pans import make_test_pans
from appliance.lab.schema import CARDS, DEFAULT_SEED
from tests.e2e.conftest import lab, python_json  # noqa: F401 -- the session's lab fixture

pytestmark = pytest.mark.lab

ERRORS = """
import json, sys, psycopg
out = []
with psycopg.connect(sys.argv[1], autocommit=True) as conn:
    for sql in sys.argv[2:]:
        try:
            out.append(["ok", [list(map(str, r)) for r in conn.execute(sql).fetchall()]])
        except psycopg.Error as exc:
            out.append([exc.sqlstate, exc.diag.message_primary])
print(json.dumps(out))
"""


def test_agent_role_reads_masked_and_the_database_refuses_the_rest(lab: Lab):  # noqa: F811 -- fixture
    pans = make_test_pans(DEFAULT_SEED, CARDS)
    got = python_json(lab, ERRORS, lab.conninfo("agent"),
                      "SELECT current_user, pan FROM cards WHERE id = 1",
                      "SELECT pan FROM public.cards WHERE id = 1",
                      "SELECT brand FROM public.cards WHERE id = 1")
    [user_pan, clear, brand] = got  # type: ignore[misc]
    pan = str(pans[0])
    assert user_pan == ["ok", [["agent", pan[:6] + "*" * (len(pan) - 10) + pan[-4:]]]]
    # The policy lets a plain projection through (masking would star it): the database refuses it.
    assert clear == ["42501", "permission denied for table cards"]
    assert brand[0] == "ok"
