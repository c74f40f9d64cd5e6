"""Console page: the policy tester — SQL, groups and a target in; the decision and its rule out.

The CLI's ``tollgate policy check`` in a page: it loads the configured policy file as the
proxy has it now and asks it exactly as the proxy would, without running anything.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, abort, current_app, render_template, request

from appliance.config import Config
from appliance.policy.engine import Policy
from appliance.policy.rules import PolicyError
from webui.console.auth import signed_in

bp = Blueprint("policy_pages", __name__, url_prefix="/policy")

MAX_SQL = 64 * 1024


def config() -> Config:
    return current_app.config["TOLLGATE_CONFIG"]


def approver_groups(config: Config) -> set[str]:
    """Every group the policy names as approvers (who gets the console's approver role)."""
    if config.policy is None:
        return set()
    try:
        policy = Policy.load(config.policy.file)
    except (PolicyError, OSError):
        return set()
    groups = {g for rule in policy.rules if rule.hold is not None for g in rule.hold.approver_groups}
    writes = policy.ruleset.cardholder_writes
    if writes is not None:
        groups |= set(writes.approver_groups)
    return groups


@bp.route("", methods=["GET", "POST"])
@signed_in("approver", "auditor", "admin")
def tester() -> Any:
    cfg = config()
    if cfg.policy is None:
        abort(404, description="this appliance has no policy ([policy] is not configured)")
    targets = [t.name for t in cfg.targets]
    form = request.form if request.method == "POST" else {}
    sql = form.get("sql", "")
    groups = [g.strip() for g in form.get("groups", "").replace(",", " ").split() if g.strip()]
    target = form.get("target", targets[0] if targets else "")
    result = error = None
    if request.method == "POST":
        if not sql.strip():
            error = "enter the SQL to test"
        elif len(sql) > MAX_SQL:
            error = f"the SQL is longer than {MAX_SQL} characters"
        elif target not in targets:
            error = f"no target named {target!r}"
        else:
            try:
                policy = Policy.load(cfg.policy.file)
            except PolicyError as exc:
                error = f"the policy file does not load: {exc}"
            else:
                decision = policy.decide(groups, target, sql)
                result = {"decision": decision,
                          "verdicts": [(s, policy.judge(groups, target, s)) for s in decision.statements]}
    return render_template("policy.html", sql=sql, groups=" ".join(groups), target=target, targets=targets,
                           result=result, error=error)


__all__ = ["approver_groups", "bp"]
