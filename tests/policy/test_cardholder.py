"""The cardholder declaration: ``cardholder_columns``, ``agent_groups`` and the API on Policy."""

from __future__ import annotations

import textwrap

import pytest

from appliance.policy.engine import Policy
from appliance.policy.rules import PolicyError


def policy(text: str) -> Policy:
    return Policy.parse(textwrap.dedent(text), "policy.toml")


def test_declared_and_pan_masked_columns_are_cardholder_columns() -> None:
    p = policy("""\
        cardholder_columns = ["public.cards.pan", "public.cards.pan", '"odd.schema".t."card no"']
        agent_groups = ["payments-agents"]

        [[rule]]
        name = "masked"
        action = "mask"
        mask = [{ columns = ["payments.cards.pan"], method = "pan" },
                { columns = ["payments.cards.cvv"], method = "full" }]
        """)
    # cvv is masked, but not as a card number: only the pan method makes a cardholder column.
    assert p.cardholder_columns == ('"odd.schema".t."card no"', "payments.cards.pan", "public.cards.pan")
    assert p.cardholder_column_parts() == (("odd.schema", "t", "card no"), ("payments", "cards", "pan"),
                                           ("public", "cards", "pan"))
    assert p.agent_groups == frozenset({"payments-agents"})
    assert p.is_agent(["payments-agents", "other"])
    assert not p.is_agent(["payments-dbas"])
    assert not p.is_agent([])


def test_without_a_declaration_nobody_is_an_agent() -> None:
    p = policy('default = "allow"\n')
    assert p.cardholder_columns == ()
    assert p.agent_groups == frozenset()
    assert not p.is_agent(["payments-agents"])


@pytest.mark.parametrize("text, expected", [
    ('cardholder_columns = ["cards.pan"]\n',
     "policy.toml:1: cardholder_columns: 'cards.pan' is not a schema.table.column name"),
    ('default = "deny"\ncardholder_columns = ["public.cards.*"]\n',
     "policy.toml:2: cardholder_columns: 'public.cards.*' is not a schema.table.column name"),
    ('cardholder_columns = "public.cards.pan"\n', "policy.toml:1: cardholder_columns must be an array of strings"),
    ('cardholder_columns = []\n', "policy.toml:1: cardholder_columns must not be empty"),
    ('agent_groups = [1]\n', "policy.toml:1: agent_groups must hold non-empty strings"),
    ('trusted_functions = ["scratch.[a"]\n', "policy.toml:1: trusted_functions:"),
    ('[[rule]]\nname = "lineage"\naction = "allow"\n', "reserved for the built-in decisions"),
])
def test_declaration_errors_carry_their_line(text: str, expected: str) -> None:
    with pytest.raises(PolicyError) as info:
        policy(text)
    assert expected in str(info.value)


def test_validate_shows_the_declaration(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from appliance.policy.cli import cmd_validate

    path = tmp_path / "policy.toml"
    path.write_text('cardholder_columns = ["public.cards.pan"]\nagent_groups = ["agents"]\n')
    assert cmd_validate(type("Args", (), {"file": path})()) == 0
    assert capsys.readouterr().out.splitlines() == [
        "ok: 0 rules", "cardholder columns: public.cards.pan", "agents (lineage and function rules): agents"]
    path.write_text('cardholder_columns = ["public.cards.pan"]\n')
    assert cmd_validate(type("Args", (), {"file": path})()) == 0
    assert capsys.readouterr().out.splitlines()[-1] == \
        "note: no agent_groups, so the lineage and function rules apply to nobody"
