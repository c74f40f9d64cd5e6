"""What a grant binds (appliance.policy.shape.grant_keys): the exact statement by default,
its shape — constants and parameters free, list lengths fixed — only when chosen."""

from __future__ import annotations

import pytest

from appliance.policy.shape import MAX_FREE_SHOWN, grant_keys

APPROVED = "update payments set merchant=merchant where id in (1)"


@pytest.mark.parametrize("same", [
    "UPDATE payments SET merchant = merchant WHERE id IN (1)",
    "update  payments\n set merchant=merchant -- fix\n where id in (1)",
    "update /* one */ payments set merchant=merchant where id in (1);",
    'update "payments" set merchant=merchant where id in (1)'.replace('"payments"', "PAYMENTS"),
])
def test_the_exact_key_ignores_whitespace_comments_and_case(same):
    assert grant_keys(same).exact == grant_keys(APPROVED).exact


@pytest.mark.parametrize("other", [
    "update payments set merchant=merchant where id in (2)",
    "update payments set merchant=merchant where id in (1, 2)",
    "update payments set merchant=merchant where id in ('1')",
    'update "Payments" set merchant=merchant where id in (1)',
    "update payments set merchant=merchant where id in (-1)",
])
def test_the_exact_key_binds_constants_and_quoted_names(other):
    assert grant_keys(other).exact != grant_keys(APPROVED).exact


def test_a_shape_lets_constants_vary_but_not_the_length_of_a_list():
    assert grant_keys("select * from t where id < 5").shape == grant_keys("select * from t where id < 100000").shape
    assert grant_keys("select * from t where id < 5").exact != grant_keys("select * from t where id < 100000").exact
    one = grant_keys(APPROVED)
    many = grant_keys("update payments set merchant=merchant where id in (" + ", ".join(map(str, range(1200))) + ")")
    assert one.shape != many.shape
    assert one.free == ("1",)
    assert len(many.free) == MAX_FREE_SHOWN + 1 and many.free[-1] == f"… {1200 - MAX_FREE_SHOWN} more"


def test_parameter_values_are_bound_exactly_and_free_in_a_shape():
    sql = "update cards set brand = $1 where id = $2"
    visa = grant_keys(sql, [(0, b"visa"), (0, b"7")])
    amex = grant_keys(sql, [(0, b"amex"), (0, b"7")])
    assert visa.exact != amex.exact and visa.shape == amex.shape
    assert grant_keys(sql, [(0, b"visa"), (0, None)]).exact != grant_keys(sql, [(0, b"visa"), (0, b"")]).exact
    assert visa.exact != grant_keys(sql).exact  # parameters given vs none
    assert visa.free == ("$1", "$2")


def test_text_that_cannot_be_lexed_matches_only_itself():
    keys = grant_keys("select 'unterminated")
    assert keys.free == () and keys.shape != grant_keys("select 'other").shape
    assert keys.exact.startswith("exact:") and keys.shape.startswith("text:")


def test_an_execute_is_keyed_with_the_statement_it_runs():
    update = "UPDATE cards SET brand = 'x' WHERE id = 1"
    one = grant_keys("EXECUTE s1", runs=[update])
    assert one.exact == grant_keys("execute s1", runs=[update]).exact
    assert one.exact != grant_keys("EXECUTE s1", runs=["UPDATE cards SET brand = 'x' WHERE id = 2"]).exact
    assert one.shape != grant_keys("EXECUTE s1", runs=["DELETE FROM cards"]).shape
    assert one.exact != grant_keys("EXECUTE s1").exact
    assert one.free == ("'x'", "1")
