"""``tollgate policy check`` and ``tollgate policy validate``, run through the real CLI entry point."""

from __future__ import annotations

import io
import json
import textwrap
from pathlib import Path

import pytest

from appliance.cli import main

POLICY = textwrap.dedent("""\
    default = "deny"

    [[rule]]
    name = "no-ddl-on-cardholder-data"
    groups = ["payments-agents"]
    classes = ["ddl", "truncate"]
    relations = ["payments.*"]
    action = "block"
    message = "DDL on cardholder tables is not allowed for agents"

    [[rule]]
    name = "updates-need-a-dba"
    classes = ["write"]
    relations = ["payments.*"]
    action = "hold"
    approvers = ["dba"]
    timeout = "15m"

    [[rule]]
    name = "cards-readable-masked"
    classes = ["read"]
    relations = ["payments.cards"]
    action = "mask"
    mask = [{ columns = ["payments.cards.cvv"], method = "full" }]

    [[rule]]
    name = "reads"
    classes = ["read", "transaction"]
    action = "allow"
    """)


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    return path


def check(policy_file: Path, sql: str, *extra: str) -> list[str]:
    return ["policy", "check", "--policy", str(policy_file), "--as", "payments-agents", "--target", "payments",
            "--sql", sql, *extra]


def test_allow_exits_0(policy_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(check(policy_file, "begin; select a from public.t")) == 0
    out = capsys.readouterr().out
    assert "decision:  ALLOW by rule 'reads'" in out
    assert "statement 1: BEGIN" in out and "statement 2: SELECT" in out
    assert "relations: public.t" in out and "columns:   public.t.a" in out


def test_mask_exits_0_and_shows_masks(policy_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(check(policy_file, "select pan, cvv from payments.cards order by 1")) == 0
    out = capsys.readouterr().out
    assert f"decision:  MASK by rule 'cards-readable-masked' ({policy_file}:19)" in out
    assert "masks:     payments.cards.cvv (full)" in out
    assert "columns:   payments.cards.cvv, payments.cards.pan" in out


def test_block_exits_1_with_rule_and_line(policy_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(check(policy_file, "drop table payments.cards")) == 1
    out = capsys.readouterr().out
    assert f"decision:  BLOCK by rule 'no-ddl-on-cardholder-data' ({policy_file}:3)" in out
    assert "message:   DDL on cardholder tables is not allowed for agents" in out
    assert "classes:   ddl" in out


def test_hold_exits_3_with_spec(policy_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(check(policy_file, "update payments.cards set pan = 'x'")) == 3
    out = capsys.readouterr().out
    assert "decision:  HOLD by rule 'updates-need-a-dba'" in out
    assert "hold:      approvers dba; 1 approval(s) needed; times out after 15m" in out


def test_groups_matter(policy_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["policy", "check", "--policy", str(policy_file), "--target", "payments", "--sql",
            "drop table payments.cards"]
    assert main(argv) == 1
    assert "rule 'default'" in capsys.readouterr().out  # no groups: the block rule isn't theirs


def test_json_output(policy_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(check(policy_file, "select cvv from payments.cards; selec", "--json")) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["action"] == "block" and data["rule"] == "unparsable"
    assert data["groups"] == ["payments-agents"] and data["target"] == "payments"
    assert [s["command"] for s in data["statements"]] == ["UNPARSABLE"]
    assert data["statements"][0]["error"].startswith("syntax error")


def test_json_statements(policy_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(check(policy_file, "select cvv from payments.cards; update payments.x set a = 1", "--json")) == 3
    data = json.loads(capsys.readouterr().out)
    assert data["hold"] == {"approver_groups": ["dba"], "min_approvals": 1, "timeout_seconds": 900.0}
    assert data["masks"] == [{"column": "payments.cards.cvv", "method": "full"}]
    first, second = data["statements"]
    assert first["classes"] == ["read"] and first["columns"] == ["payments.cards.cvv"]
    assert first["verdict"] == {"action": "mask", "rule": "cards-readable-masked", "line": 19, "message": ""}
    assert second["verdict"]["action"] == "hold"


def test_sql_from_stdin(policy_file: Path, capsys: pytest.CaptureFixture[str],
                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("truncate payments.cards"))
    assert main(check(policy_file, "-")) == 1


def test_with_appliance_config(tmp_path: Path, policy_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "tollgate.toml"
    config.write_text(textwrap.dedent(f"""\
        [policy]
        file = "{policy_file.name}"

        [[targets]]
        name = "payments"
        addresses = ["10.0.0.5:5432"]
        """))
    argv = ["policy", "check", "-c", str(config), "--as", "payments-agents", "--target", "payments",
            "--sql", "drop table payments.cards"]
    assert main(argv) == 1
    argv[argv.index("payments", argv.index("--target"))] = "nope"
    assert main(argv) == 2
    assert "no target named 'nope' (targets: payments)" in capsys.readouterr().err
    config.write_text('[[targets]]\nname = "payments"\naddresses = ["10.0.0.5:5432"]\n')
    argv[argv.index("nope")] = "payments"
    assert main(argv) == 2
    assert "has no [policy] section" in capsys.readouterr().err


def test_check_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(check(tmp_path / "missing.toml", "select 1")) == 2
    err = capsys.readouterr().err
    assert err.startswith("tollgate: ") and "missing.toml: cannot read" in err
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rule]]\nname = "x"\naction = "nope"\n')
    assert main(check(bad, "select 1")) == 2
    assert f"{bad}:3: rule 'x': action must be one of" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # argparse: both sources, or neither
        main(["policy", "check", "--target", "t", "--sql", "x"])
    assert info.value.code == 2


def test_validate(policy_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "validate", str(policy_file)]) == 0
    assert capsys.readouterr().out.strip() == "ok: 4 rules"
    bad = tmp_path / "bad.toml"
    bad.write_text('default = "deny"\n\n[[rule]]\nname = "x"\nclasses = ["reed"]\naction = "block"\n')
    assert main(["policy", "validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{bad}:5: rule 'x': unknown class 'reed'")
    one = tmp_path / "one.toml"
    one.write_text('[[rule]]\nname = "x"\naction = "allow"\n')
    assert main(["policy", "validate", str(one)]) == 0
    assert capsys.readouterr().out.strip() == "ok: 1 rule"
