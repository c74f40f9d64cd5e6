"""The policy file: every error with its line; every matching rule of the semantics."""

from __future__ import annotations

import textwrap

import pytest

from appliance.model.decision import Action, HoldSpec, MaskMethod, StatementClass
from appliance.policy.engine import Policy
from appliance.policy.rules import PolicyError, load_rules, parse_duration, parse_rules


def parse(text: str):  # type: ignore[no-untyped-def]
    return parse_rules(textwrap.dedent(text), "policy.toml")


def error_of(text: str) -> str:
    with pytest.raises(PolicyError) as info:
        parse(text)
    return str(info.value)


# ---- loading ------------------------------------------------------------------------------


def test_the_documented_example_loads() -> None:
    rules = parse("""\
        default = "deny"
        default_message = "no policy rule allows this statement"

        [[rule]]
        name = "no-ddl-on-cardholder-data"
        groups = ["payments-agents"]
        targets = ["payments"]
        classes = ["ddl", "truncate"]
        relations = ["payments.*"]
        columns = ["payments.cards.pan"]
        functions = ["pg_read_file", "lo_*"]
        action = "block"
        message = "DDL on cardholder tables is not allowed for agents"

        [[rule]]
        name = "updates-need-a-dba"
        classes = ["write"]
        relations = ["payments.*"]
        action = "hold"
        approvers = ["dba"]
        min_approvals = 1
        timeout = "15m"

        [[rule]]
        name = "cards-readable-masked"
        classes = ["read"]
        relations = ["payments.cards"]
        action = "mask"
        mask = [{ columns = ["payments.cards.cvv"], method = "full" }]
        """)
    assert rules.default is Action.BLOCK
    assert [r.name for r in rules.rules] == ["no-ddl-on-cardholder-data", "updates-need-a-dba",
                                             "cards-readable-masked"]
    assert [r.line for r in rules.rules] == [4, 15, 24]
    first, hold, mask = rules.rules
    assert first.groups == {"payments-agents"} and first.targets == {"payments"}
    assert first.classes == {StatementClass.DDL, StatementClass.TRUNCATE}
    assert [str(p) for p in first.functions] == ["pg_read_file", "lo_*"]
    assert hold.hold == HoldSpec(("dba",), 1, 900.0)
    assert mask.masks[0].column == "payments.cards.cvv" and mask.masks[0].method is MaskMethod.FULL
    assert rules.search_path == ("public",)


def test_defaults() -> None:
    rules = parse("")
    assert rules.default is Action.BLOCK and rules.rules == ()
    assert parse('default = "allow"').default is Action.ALLOW


@pytest.mark.parametrize("text, expected", [
    # tomllib's own errors carry their line
    ('default = "deny"\n\n[[rule]]\nname = "x"\naction = \n', "policy.toml:5: "),
    ('default = "deny"\n[[rule]\n', "policy.toml:2: "),
    ('[[rule]]\nname = "a"\nname = "b"\n', "policy.toml:3: "),
    # semantic errors point at the key, or the rule's header
    ('[[rule]]\nname = "a"\naction = "block"\n\n[[rule]]\naction = "block"\n', "policy.toml:5: rule 2 has no name"),
    ('[[rule]]\nname = "a"\naction = "block"\n[[rule]]\n# x\nname = "a"\naction = "allow"\n',
     "policy.toml:6: duplicate rule name 'a' (first used at line 1)"),
    ('[[rule]]\nname = "a"\nclasses = ["read", "reed"]\naction = "allow"\n',
     "policy.toml:3: rule 'a': unknown class 'reed'"),
    ('[[rule]]\nname = "a"\n\naction = "permit"\n', "policy.toml:4: rule 'a': action must be one of"),
    ('[[rule]]\nname = "a"\n', "policy.toml:1: rule 'a': action is required"),
    ('[[rule]]\nname = "a"\nclasses = ["write"]\naction = "hold"\n',
     "policy.toml:4: rule 'a': action = \"hold\" needs approvers"),
    ('[[rule]]\nname = "a"\naction = "hold"\napprovers = ["dba"]\ntimeout = "15 minutes"\n',
     "policy.toml:5: rule 'a': timeout '15 minutes' is not a duration"),
    ('[[rule]]\nname = "a"\naction = "hold"\napprovers = ["dba"]\ntimeout = "3d"\n',
     "policy.toml:5: rule 'a': timeout '3d' is out of range"),
    ('[[rule]]\nname = "a"\naction = "hold"\napprovers = ["dba"]\nmin_approvals = 0\n',
     "policy.toml:5: rule 'a': min_approvals must be"),
    ('[[rule]]\nname = "a"\naction = "block"\nrelatons = ["x"]\n', "policy.toml:4: rule 'a': unknown key 'relatons'"),
    ('[[rule]]\nname = "a"\naction = "block"\napprovers = ["x"]\n',
     "policy.toml:4: rule 'a': approvers is only for action = \"hold\""),
    ('[[rule]]\nname = "a"\naction = "block"\nrelations = ["pay[ments.*"]\n',
     "policy.toml:4: rule 'a': relations: pattern 'pay[ments.*': unterminated"),
    ('[[rule]]\nname = "a"\naction = "block"\ngroups = []\n', "policy.toml:4: rule 'a': groups must not be empty"),
    ('[[rule]]\nname = "a"\naction = "block"\ntargets = "payments"\n',
     "policy.toml:4: rule 'a': targets must be an array of strings"),
    ('[[rule]]\nname = "a"\naction = "mask"\n', "policy.toml:3: rule 'a': action = \"mask\" needs mask"),
    ('[[rule]]\nname = "a"\naction = "mask"\nmask = [{ columns = ["payments.cards.cvv"], method = "blur" }]\n',
     "policy.toml:4: rule 'a': mask: method must be one of pan, last4, full, null"),
    ('[[rule]]\nname = "a"\naction = "mask"\nmask = [{ columns = ["cards.cvv"], method = "full" }]\n',
     "policy.toml:4: rule 'a': mask: 'cards.cvv' is not a schema.table.column name"),
    ('[[rule]]\nname = "a"\naction = "mask"\nmask = [{ columns = ["p.cards.*"], method = "full" }]\n',
     "policy.toml:4: rule 'a': mask: 'p.cards.*' is not a schema.table.column name"),
    ('[[rule]]\nname = "a"\naction = "allow"\nmask = [{ columns = ["p.c.x"], method = "full" }]\n',
     "policy.toml:4: rule 'a': mask is only for action = \"mask\""),
    ('[[rule]]\nname = "default"\naction = "allow"\n', "policy.toml:2: rule 'default': the name is reserved"),
    ('# policy\ndefault = "block"\n', "policy.toml:2: default must be \"deny\" or \"allow\""),
    ('\nsearch_path = []\n', "policy.toml:2: search_path must not be empty"),
    ('default = "deny"\nrules = []\n', "policy.toml:2: unknown key 'rules'"),
    ('default = "deny"\n\n[policy]\nx = 1\n', "policy.toml:3: unknown key 'policy'"),
    ('rule = 5\n', "policy.toml:1: rule must be an array of tables"),
])
def test_errors_carry_file_and_line(text: str, expected: str) -> None:
    assert error_of(text).startswith(expected), error_of(text)


def test_toml_error_line_is_tomllibs() -> None:
    message = error_of('default = "deny"\n\n[[rule]]\nname = "x\naction = "block"\n')
    assert message.startswith("policy.toml:4: ")
    assert "(column" in message


def test_load_rules_reports_unreadable_and_non_utf8(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PolicyError, match="cannot read"):
        load_rules(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'default = "deny"\n# caf\xe9\n')
    with pytest.raises(PolicyError, match=r"bad.toml:2: not valid UTF-8"):
        load_rules(bad)


@pytest.mark.parametrize("value, seconds", [("90s", 90), ("15m", 900), ("2h", 7200), ("1h30m", 5400),
                                            (300, 300), ("300", 300), (1.5, 1.5), ("1d", 86400)])
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["", "m", "15 minutes", "0s", "-5", "25h", True, [1]])
def test_bad_durations(value: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        parse_duration(value)


# ---- semantics ----------------------------------------------------------------------------


def policy(text: str) -> Policy:
    return Policy.parse(textwrap.dedent(text), "policy.toml")


def action(p: Policy, sql: str, groups: tuple[str, ...] = ("agents",), target: str = "payments") -> tuple[str, str]:
    d = p.decide(groups, target, sql)
    return d.action.value, d.rule


def test_first_match_wins() -> None:
    p = policy("""
        [[rule]]
        name = "first"
        classes = ["read"]
        action = "block"
        [[rule]]
        name = "second"
        classes = ["read"]
        action = "allow"
        """)
    assert action(p, "select 1") == ("block", "first")


def test_block_matches_any_allow_needs_to_cover() -> None:
    p = policy("""
        [[rule]]
        name = "no-cards-writes"
        classes = ["write", "truncate"]
        relations = ["payments.cards"]
        action = "block"
        [[rule]]
        name = "public-reads"
        classes = ["read"]
        relations = ["public.*"]
        action = "allow"
        """)
    # block: ANY class and ANY relation is enough, each dimension on its own (so copying
    # cards into scratch is caught too: it writes, and it touches payments.cards)
    assert action(p, "insert into scratch.x select * from payments.cards") == ("block", "no-cards-writes")
    assert action(p, "with x as (delete from payments.cards returning 1) select * from public.t") == \
        ("block", "no-cards-writes")
    # allow: ALL relations must be covered…
    assert action(p, "select * from public.t") == ("allow", "public-reads")
    assert action(p, "select * from public.t join payments.cards c on true") == ("block", "default")
    # …and ALL classes listed
    assert action(p, "select * from public.t for update") == ("block", "default")


def test_listed_dimensions_must_all_hit_for_block() -> None:
    p = policy("""
        default = "allow"
        [[rule]]
        name = "no-pan-from-cards"
        relations = ["payments.cards"]
        columns = ["payments.cards.pan"]
        action = "block"
        """)
    assert action(p, "select pan from payments.cards")[0] == "block"
    assert action(p, "select id from payments.cards")[0] == "allow"
    assert action(p, "select * from payments.cards")[0] == "block"  # * includes pan
    assert action(p, "select c from payments.cards c")[0] == "block"  # whole row includes pan


def test_bare_names_block_in_any_schema() -> None:
    p = policy("""
        default = "allow"
        [[rule]]
        name = "cards"
        relations = ["payments.cards"]
        action = "block"
        [[rule]]
        name = "files"
        functions = ["pg_read_file"]
        action = "block"
        """)
    assert action(p, "select * from cards")[0] == "block"  # the search path might resolve it there
    assert action(p, "select * from public.cards")[0] == "allow"
    assert action(p, "select pg_catalog.pg_read_file('x')")[1] == "files"
    assert action(p, "select pg_read_file('x')")[1] == "files"


def test_bare_names_allow_only_when_covered_in_every_search_path_schema() -> None:
    text = """
        search_path = [{path}]
        [[rule]]
        name = "public-reads"
        classes = ["read", "function_call"]
        relations = ["public.*"]
        functions = ["pg_catalog.*"]
        action = "allow"
        """
    narrow = policy(text.format(path='"public"'))
    wide = policy(text.format(path='"public", "payments"'))
    assert action(narrow, "select * from cards") == ("allow", "public-reads")
    assert action(wide, "select * from cards") == ("block", "default")
    # pg_catalog is searched first for catalog relations, so public.* doesn't cover them
    assert action(narrow, "select * from pg_authid")[0] == "block"
    # bare functions are pg_catalog's
    assert action(narrow, "select count(*), now() from t") == ("allow", "public-reads")
    assert action(narrow, "select public.evil() from t")[0] == "block"


def test_functions_patterns_without_schema_cover_bare_calls() -> None:
    p = policy("""
        [[rule]]
        name = "counting"
        classes = ["read", "function_call"]
        functions = ["count", "now"]
        action = "allow"
        """)
    assert action(p, "select count(*) from t")[0] == "allow"
    assert action(p, "select pg_catalog.count(*) from t")[0] == "allow"
    assert action(p, "select max(a) from t")[0] == "block"


def test_unscoped_ddl_is_not_covered_by_scoped_allow() -> None:
    p = policy("""
        [[rule]]
        name = "scratch-ddl"
        classes = ["ddl", "privilege"]
        relations = ["scratch.*"]
        action = "allow"
        """)
    assert action(p, "create table scratch.t (a int)")[0] == "allow"
    assert action(p, "drop table scratch.t")[0] == "allow"
    assert action(p, "drop schema payments cascade")[0] == "block"
    assert action(p, "create extension dblink")[0] == "block"
    assert action(p, "alter role agent superuser")[0] == "block"
    assert action(p, "create function public.f() returns int language sql as 'select 1'")[0] == "block"


def test_default_deny_and_default_allow() -> None:
    deny = policy('default_message = "ask the DBA team"')
    d = deny.decide(["agents"], "payments", "select 1")
    assert (d.action, d.rule, d.message, d.rule_line) == (Action.BLOCK, "default", "ask the DBA team", None)
    allow = policy('\ndefault = "allow"\n')
    d = allow.decide(["agents"], "payments", "drop table x")
    assert (d.action, d.rule, d.rule_line) == (Action.ALLOW, "default", 2)


def test_unparsable_is_blocked_unless_explicitly_allowed() -> None:
    assert action(policy('default = "allow"'), "selec 1") == ("block", "unparsable")
    anything = policy("""
        [[rule]]
        name = "everything"
        action = "allow"
        """)
    assert action(anything, "selec 1") == ("block", "unparsable")  # "any class" is not explicit
    assert action(anything, "select 1") == ("allow", "everything")
    explicit = policy("""
        [[rule]]
        name = "parse-errors-reach-the-server"
        classes = ["unparsable"]
        action = "allow"
        """)
    assert action(explicit, "selec 1") == ("allow", "parse-errors-reach-the-server")
    message = policy("").decide([], "t", "selec 1").message
    assert "cannot classify" in message and "syntax error" in message


def test_block_rule_may_claim_unparsable() -> None:
    p = policy("""
        [[rule]]
        name = "no-garbage"
        classes = ["unparsable"]
        action = "block"
        message = "fix your SQL"
        """)
    d = p.decide([], "t", "selec 1")
    assert (d.rule, d.message) == ("no-garbage", "fix your SQL")


def test_empty_statements_are_allowed() -> None:
    p = policy("""
        [[rule]]
        name = "suspended"
        groups = ["agents"]
        action = "block"
        """)
    assert action(p, "") == ("allow", "empty")
    assert action(p, "-- nothing") == ("allow", "empty")
    assert action(p, "select 1")[0] == "block"


def test_groups_and_targets_select_rules() -> None:
    p = policy("""
        [[rule]]
        name = "dbas"
        groups = ["dba", "sre"]
        action = "allow"
        [[rule]]
        name = "reporting"
        targets = ["reports"]
        classes = ["read"]
        action = "allow"
        """)
    assert action(p, "drop table x", groups=("sre",)) == ("allow", "dbas")
    assert action(p, "drop table x", groups=("agents",))[0] == "block"
    assert action(p, "select 1", groups=(), target="reports") == ("allow", "reporting")
    assert action(p, "select 1", groups=(), target="payments")[0] == "block"


def test_masks_follow_the_data_even_through_a_broader_allow() -> None:
    p = policy("""
        [[rule]]
        name = "cards-masked"
        classes = ["read"]
        relations = ["payments.cards"]
        action = "mask"
        mask = [{ columns = ["payments.cards.cvv"], method = "full" },
                { columns = ["payments.cards.pan"], method = "pan" }]
        [[rule]]
        name = "reads"
        classes = ["read"]
        action = "allow"
        """)
    d = p.decide([], "payments", "select * from payments.cards")
    assert (d.action, d.rule) == (Action.MASK, "cards-masked")
    assert {(m.column, m.method) for m in d.masks} == {("payments.cards.cvv", MaskMethod.FULL),
                                                        ("payments.cards.pan", MaskMethod.PAN)}
    # not covered by the mask rule (two tables): allowed by "reads", masks still attached
    d = p.decide([], "payments", "select * from payments.cards join public.x on true")
    assert (d.action, d.rule) == (Action.MASK, "reads")
    assert len(d.masks) == 2
    # a statement not touching cards carries no masks
    d = p.decide([], "payments", "select * from public.x")
    assert (d.action, d.masks) == (Action.ALLOW, ())
    assert p.masked_columns == ("payments.cards.cvv", "payments.cards.pan")


def test_function_globs_stay_within_the_name() -> None:
    p = policy("""
        [[rule]]
        name = "no-server-files"
        functions = ["pg_read_file", "pg_ls_*", "lo_*", "dblink*"]
        action = "block"
        [[rule]]
        name = "reads"
        classes = ["read", "function_call"]
        action = "allow"
        """)
    # a bare count() is pg_catalog's, not something in a schema called "lo_x"
    assert action(p, "select count(*), now() from t") == ("allow", "reads")
    assert action(p, "select pg_ls_dir('.')")[1] == "no-server-files"
    assert action(p, "select pg_catalog.lo_import('/etc/passwd')")[1] == "no-server-files"
    assert action(p, "select * from t where exists (select dblink_exec('x'))")[1] == "no-server-files"
