"""The engine: combining statements into one decision, messages, caching, FunctionCall."""

from __future__ import annotations

import textwrap

from appliance.model.decision import Action, HoldSpec, MaskMethod, StatementClass
from appliance.policy.classifier import classify
from appliance.policy.engine import Policy

POLICY = textwrap.dedent("""\
    default = "deny"

    [[rule]]
    name = "no-drops"
    classes = ["ddl"]
    relations = ["payments.*"]
    action = "block"

    [[rule]]
    name = "card-writes-held"
    classes = ["write"]
    relations = ["payments.cards"]
    action = "hold"
    approvers = ["dba"]
    min_approvals = 2
    timeout = "10m"

    [[rule]]
    name = "other-writes-held"
    classes = ["write"]
    action = "hold"
    approvers = ["sre"]

    [[rule]]
    name = "cards-masked"
    classes = ["read"]
    relations = ["payments.cards"]
    action = "mask"
    mask = [{ columns = ["payments.cards.pan"], method = "pan" }]

    [[rule]]
    name = "cvv-hidden"
    classes = ["read"]
    columns = ["payments.cards.cvv"]
    action = "mask"
    mask = [{ columns = ["payments.cards.cvv", "payments.cards.pan"], method = "null" }]

    [[rule]]
    name = "reads"
    classes = ["read", "transaction", "function_call"]
    action = "allow"
    """)


def policy() -> Policy:
    return Policy.parse(POLICY, "/etc/tollgate/policy.toml")


def test_single_statements() -> None:
    p = policy()
    assert p.decide([], "db", "select a from t").action is Action.ALLOW
    d = p.decide([], "db", "drop table payments.cards")
    assert (d.action, d.rule, d.rule_line) == (Action.BLOCK, "no-drops", 3)
    assert d.message == "blocked by policy rule 'no-drops' (policy.toml:3)"


def test_block_wins_over_everything() -> None:
    d = policy().decide([], "db", "select pan from payments.cards; update payments.cards set pan = 'x'; "
                                  "drop table payments.cards; commit")
    assert (d.action, d.rule) == (Action.BLOCK, "no-drops")
    assert len(d.statements) == 4
    assert d.hold is None and d.masks == ()


def test_first_hold_wins_and_masks_ride_along() -> None:
    d = policy().decide([], "db", "begin; select pan from payments.cards; update t set a = 1; "
                                  "update payments.cards set pan = 'x'")
    assert (d.action, d.rule) == (Action.HOLD, "other-writes-held")
    assert d.hold == HoldSpec(("sre",), 1, 900.0)
    assert "needs approval under policy rule 'other-writes-held' (policy.toml:" in d.message
    assert [m.column for m in d.masks] == ["payments.cards.pan"]
    assert d.classes == {StatementClass.TRANSACTION, StatementClass.READ, StatementClass.WRITE}


def test_masks_are_the_union_and_the_strictest_method_wins() -> None:
    d = policy().decide([], "db", "select pan from payments.cards; select cvv from payments.cards")
    assert d.action is Action.MASK
    assert d.rule == "cards-masked"
    assert {m.column: m.method for m in d.masks} == {"payments.cards.pan": MaskMethod.NULL,
                                                     "payments.cards.cvv": MaskMethod.NULL}


def test_all_allowed_is_allow() -> None:
    d = policy().decide([], "db", "begin; select a from t; commit")
    assert (d.action, d.rule, d.masks) == (Action.ALLOW, "reads", ())


def test_statement_naming_no_relation_is_covered_vacuously_without_masks() -> None:
    # "select 1" touches no relation, so the cards rule covers it -- but has nothing to mask.
    d = policy().decide([], "db", "select 1")
    assert (d.action, d.rule, d.masks) == (Action.ALLOW, "cards-masked", ())


def test_empty_request_and_empty_statements() -> None:
    d = policy().decide([], "db", "")
    assert (d.action, d.rule) == (Action.ALLOW, "empty")
    assert policy().decide_classified([], "db", ()).action is Action.ALLOW


def test_decide_classified_matches_decide() -> None:
    p = policy()
    sql = "select pan from payments.cards"
    assert p.decide_classified(["x"], "db", classify(sql)) == p.decide(["x"], "db", sql)


def test_decisions_are_cached_per_target_and_groups() -> None:
    p = policy()
    sql = "select pan from payments.cards where id = 7"
    first = p.decide(["a", "b"], "db", sql)
    assert p.decide(["b", "a"], "db", sql) is first
    assert p.decide(("a", "b"), "db", sql) is first
    assert p.decide(["a"], "db", sql) is not first
    assert p.decide(["a", "b"], "other", sql) is not first
    # a reloaded policy is a new Policy with its own cache
    assert Policy(p.ruleset).decide(["a", "b"], "db", sql) is not first


def test_long_statements_are_decided_without_caching() -> None:
    p = policy()
    sql = "select a from t where a <> '" + "y" * 40000 + "'"
    assert p.decide([], "db", sql).action is Action.ALLOW


def test_function_call_by_oid() -> None:
    p = Policy.parse(textwrap.dedent("""\
        [[rule]]
        name = "no-large-objects"
        functions = ["lo_*"]
        action = "block"
        [[rule]]
        name = "calls"
        classes = ["function_call"]
        action = "allow"
        """), "policy.toml")
    d = p.decide_function_call([], "db", 764)
    # an OID could be any function, so function-pattern blocks catch it
    assert (d.action, d.rule) == (Action.BLOCK, "no-large-objects")
    assert d.statements[0].functions == {"oid:764"}
    assert p.decide_function_call([], "db", 764) is d
    calls_only = Policy.parse('[[rule]]\nname = "calls"\nclasses = ["function_call"]\naction = "allow"\n')
    assert calls_only.decide_function_call([], "db", 1).action is Action.ALLOW


def test_default_deny_message_and_unparsable() -> None:
    p = policy()
    d = p.decide([], "db", "vacuum")
    assert (d.action, d.rule, d.message) == (Action.BLOCK, "default", "no policy rule allows this statement")
    d = p.decide([], "db", "select 1; selec 2")
    assert (d.action, d.rule) == (Action.BLOCK, "unparsable")


def test_judge_gives_each_statements_verdict() -> None:
    p = policy()
    verdicts = [p.judge([], "db", s) for s in classify("select a from t; update t set a = 1")]
    assert [(v.action, v.rule) for v in verdicts] == [(Action.ALLOW, "reads"), (Action.HOLD, "other-writes-held")]
