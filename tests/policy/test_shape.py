"""Statement shapes: numbers replaced, everything that could change a decision kept."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.lab.policy import LAB_POLICY
from appliance.policy.classifier import classify_uncached
from appliance.policy.engine import Policy
from appliance.policy.shape import shape


@pytest.mark.parametrize("sql, shaped", [
    ("SELECT abalance FROM pgbench_accounts WHERE aid = 12345;",
     "SELECT abalance FROM pgbench_accounts WHERE aid = 0;"),
    ("select * from t1 where x = 1.5e3 and y = 'a1'", "select * from t1 where x = 0 and y = 'a1'"),
    ('select "t 1" from x where a = 5 -- 7', 'select "t 1" from x where a = 0 -- 7'),
    ("SELECT set_config('role', 'x', false) LIMIT 3", "SELECT set_config('role', 'x', false) LIMIT 0"),
])
def test_numbers_are_replaced_and_strings_names_comments_kept(sql: str, shaped: str):
    assert shape(sql) == shaped


@pytest.mark.parametrize("sql", [
    "select 1; select 2",              # two statements: texts kept exactly
    "select $1", "select $$1$$",       # parameters and dollar quoting
    "select E'\\x31'", "select '1",    # escape strings, an unterminated quote
    "select a from t",                 # nothing to replace
    "select 1 /* a /* b */ 2 */",      # nested comments
])
def test_text_that_cannot_be_shaped_with_certainty_is_left_alone(sql: str):
    assert shape(sql) is None


SQLISH = st.lists(st.sampled_from([
    "SELECT", "UPDATE cards SET brand =", "FROM", "cards", "payments", "t1", "WHERE", "id =", "LIMIT", "1", "42",
    "3.14", "1e5", "'a1'", "'4111'", '"t 2"', ",", "(", ")", "-- 9\n", "/* 8 */", ";", "x5", ".5", "::int",
]), min_size=1, max_size=14).map(" ".join)


@settings(max_examples=400, deadline=None)
@given(SQLISH)
def test_a_shape_classifies_exactly_as_the_statement_itself(sql: str):
    shaped = shape(sql)
    if shaped is None:
        return
    ours, theirs = classify_uncached(sql), classify_uncached(shaped)

    def strip(cs):
        return [(c.classes, c.relations, c.columns, c.functions, c.command, c.prepared_name) for c in cs]

    if any(c.error for c in ours):
        assert any(c.error for c in theirs)  # unparsable stays unparsable (and blocked)
        return
    assert strip(ours) == strip(theirs)


def test_decisions_by_shape_carry_each_statements_own_text():
    policy = Policy.parse(LAB_POLICY)
    groups = ("payments-agents",)
    a = policy.decide(groups, "payments", "SELECT brand FROM cards WHERE id = 1")
    b = policy.decide(groups, "payments", "SELECT brand FROM cards WHERE id = 2")
    assert a.rule == b.rule and a.action == b.action
    assert a.statements[0].text.endswith("= 1") and b.statements[0].text.endswith("= 2")
