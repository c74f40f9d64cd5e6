"""Console page for grants: the live time-boxed grants, who gave them, until when; revoke one.

A grant lets one identity run an approved statement (or its shape) on one target again
without asking, until it expires. Revoking ends it at once in the store; the proxy's broker
reads the store's revision and drops it from its cache at its next poll.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, abort, g, redirect, render_template, url_for

from appliance.holds.service import ApprovalError
from webui.console import records
from webui.console.approvals import service
from webui.console.auth import signed_in

bp = Blueprint("grants_pages", __name__, url_prefix="/grants")


@bp.get("")
@signed_in("approver", "auditor", "admin")
def index() -> Any:
    svc = service()
    grants = svc.active_grants()
    requests = svc.store.get_many([gr.request_id for gr in grants]) if grants else {}
    rows = []
    for gr in grants:
        r = requests.get(gr.request_id)
        giver = next((v for v in reversed(r.votes) if v.verdict == "approve"), None) if r is not None else None
        rows.append({"grant": gr, "request": r, "giver": giver,
                     "may_revoke": r is not None and "approver" in g.roles
                     and bool(set(g.identity.groups) & set(r.approver_groups))})
    return render_template("grants.html", rows=rows)


@bp.post("/<request_id>/revoke")
@signed_in("approver")
def revoke(request_id: str) -> Any:
    try:
        service().revoke_grant(request_id, g.identity)
    except ApprovalError as exc:
        if exc.code in ("unknown_request", "not_an_approver"):
            abort(404, description=f"there is no grant of {request_id} you may revoke")
        abort(409, description=exc.message)
    records.admin("console.grant.revoke", identity=g.identity, object=f"approval:{request_id}")
    return redirect(url_for("grants_pages.index"))


__all__ = ["bp"]
