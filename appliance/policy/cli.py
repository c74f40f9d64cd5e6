"""``tollgate policy check`` (what would the policy do with this SQL?) and ``tollgate policy validate``.

``check`` runs the same engine the proxy runs, so an operator can try a rule change before
saving it and an assessor can see why a statement was blocked. Exit status:

====  ====================================================================
0     allow or mask
1     block
3     hold (needs approval)
2     error: unreadable or invalid policy or config, bad arguments
====  ====================================================================

``validate`` prints ``ok: N rules`` (exit 0) or the ``FILE:LINE: reason`` (exit 1); then
the cardholder columns and agent groups, if the file declares them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from appliance.config import load_config
from appliance.model.decision import Action, Classification, Decision
from appliance.policy.engine import Policy, Verdict
from appliance.policy.rules import PolicyError

EXIT_ALLOW, EXIT_BLOCK, EXIT_ERROR, EXIT_HOLD = 0, 1, 2, 3
_EXIT = {Action.ALLOW: EXIT_ALLOW, Action.MASK: EXIT_ALLOW, Action.BLOCK: EXIT_BLOCK, Action.HOLD: EXIT_HOLD}


def register(sub: argparse._SubParsersAction) -> None:
    policy = sub.add_parser("policy", help="the enforcement policy: check a statement, validate a file")
    policy_sub = policy.add_subparsers(dest="policy_command", metavar="ACTION", required=True)

    check = policy_sub.add_parser(
        "check", help="what the policy decides for SQL from given groups on a target",
        description="Exit status: 0 allow/mask, 1 block, 3 hold, 2 error.")
    source = check.add_mutually_exclusive_group(required=True)
    source.add_argument("-c", "--config", type=Path, help="the appliance config (its [policy] file is used)")
    source.add_argument("--policy", type=Path, help="a policy file")
    check.add_argument("--as", dest="groups", action="append", default=[], metavar="GROUP",
                       help="an identity group of the requester (repeat for several; none = no groups)")
    check.add_argument("--target", required=True, help="the target name the SQL is sent to")
    check.add_argument("--sql", required=True, help="the SQL (several statements allowed; '-' reads stdin)")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(handler=cmd_check)

    validate = policy_sub.add_parser("validate", help="check a policy file: 'ok: N rules' or FILE:LINE: error")
    validate.add_argument("file", type=Path)
    validate.set_defaults(handler=cmd_validate)


def _error(message: str) -> int:
    print(f"tollgate: {message}", file=sys.stderr)
    return EXIT_ERROR


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        policy = Policy.load(args.file)
    except PolicyError as exc:
        print(exc, file=sys.stderr)  # bare FILE:LINE: reason, as editors and CI parse it
        return 1
    count = len(policy.rules)
    print(f"ok: {count} rule{'s' if count != 1 else ''}")
    if policy.cardholder_columns:
        print(f"cardholder columns: {', '.join(policy.cardholder_columns)}")
    if policy.agent_groups:
        print(f"agents (lineage and function rules): {', '.join(sorted(policy.agent_groups))}")
    elif policy.cardholder_columns:
        print("note: no agent_groups, so the lineage and function rules apply to nobody")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    if args.config is not None:
        config = load_config(args.config)  # ConfigError: reported by main() with exit 2
        if config.policy is None:
            return _error(f"{config.path}: has no [policy] section (or use --policy FILE)")
        known = {t.name for t in config.targets}
        if args.target not in known:
            return _error(f"{config.path}: no target named {args.target!r} "
                          f"(targets: {', '.join(sorted(known)) or 'none'})")
        path = config.policy.file
    else:
        path = args.policy
    try:
        policy = Policy.load(path)
    except PolicyError as exc:
        return _error(str(exc))
    sql = sys.stdin.read() if args.sql == "-" else args.sql
    decision = policy.decide(args.groups, args.target, sql)
    verdicts = [policy.judge(args.groups, args.target, s) for s in decision.statements]
    if args.json:
        print(json.dumps(_as_json(policy, args, decision, verdicts), indent=2))
    else:
        _print_text(policy, decision, verdicts)
    return _EXIT[decision.action]


def _where(policy: Policy, line: int | None) -> str:
    return f" ({policy.path}:{line})" if line else ""


def _list(values: Any) -> str:
    return ", ".join(sorted(values)) or "-"


def _duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    return f"{seconds:g}s"


def _print_text(policy: Policy, decision: Decision, verdicts: list[Verdict]) -> None:
    print(f"decision:  {decision.action.value.upper()} by rule {decision.rule!r}{_where(policy, decision.rule_line)}")
    if decision.message:
        print(f"message:   {decision.message}")
    if decision.hold is not None:
        hold = decision.hold
        print(f"hold:      approvers {', '.join(hold.approver_groups)}; {hold.min_approvals} approval(s) needed; "
              f"times out after {_duration(hold.timeout_seconds)}")
    if decision.masks:
        print("masks:     " + ", ".join(f"{m.column} ({m.method.value})" for m in decision.masks))
    for number, (statement, verdict) in enumerate(zip(decision.statements, verdicts, strict=True), 1):
        print()
        print(f"statement {number}: {statement.command or '(empty)'}")
        print(f"  text:      {_one_line(statement.text)}")
        print(f"  classes:   {_list(c.value for c in statement.classes)}")
        print(f"  relations: {_list(statement.relations)}")
        print(f"  columns:   {_list(statement.columns)}")
        print(f"  functions: {_list(statement.functions)}")
        if statement.prepared_name is not None:
            print(f"  prepared:  {statement.prepared_name}")
        if statement.error:
            print(f"  error:     {statement.error}")
        print(f"  verdict:   {verdict.action.value} by rule {verdict.rule!r}{_where(policy, verdict.line)}")


def _one_line(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit] + "…"


def _statement_json(statement: Classification, verdict: Verdict) -> dict[str, Any]:
    return {
        "command": statement.command, "text": statement.text,
        "classes": sorted(c.value for c in statement.classes),
        "relations": sorted(statement.relations), "columns": sorted(statement.columns),
        "functions": sorted(statement.functions), "prepared_name": statement.prepared_name,
        "error": statement.error,
        "verdict": {"action": verdict.action.value, "rule": verdict.rule, "line": verdict.line,
                    "message": verdict.message},
    }


def _as_json(policy: Policy, args: argparse.Namespace, decision: Decision,
             verdicts: list[Verdict]) -> dict[str, Any]:
    hold = decision.hold
    return {
        "policy": str(policy.path), "groups": list(args.groups), "target": args.target,
        "action": decision.action.value, "rule": decision.rule, "rule_line": decision.rule_line,
        "message": decision.message,
        "hold": None if hold is None else {"approver_groups": list(hold.approver_groups),
                                           "min_approvals": hold.min_approvals,
                                           "timeout_seconds": hold.timeout_seconds},
        "masks": [{"column": m.column, "method": m.method.value} for m in decision.masks],
        "statements": [_statement_json(s, v) for s, v in zip(decision.statements, verdicts, strict=True)],
    }
