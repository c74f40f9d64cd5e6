"""Console pages for approvals: the inbox (live), one request, its decision, the history.

``/approvals`` lists the pending requests the signed-in approver may decide, newest first;
a small script of ours (``static/console.js``) listens on ``/approvals/events`` (server-sent
events: the store's revision, sent whenever it moves) and reloads the list's fragment
(``/approvals/list``), so a new hold shows without reloading the page. ``/approvals/<id>``
is everything an approver needs to judge one request; its form POSTs to
``/approvals/<id>/decide`` (approve or deny, a reason required, optionally a grant for N
minutes). ``/approvals/history`` searches decided, expired and withdrawn requests.

Who sees what is the approvals API's rule (:func:`appliance.holds.service.may_see`):
approvers their groups' requests and their own; auditors and admins (read-only) all of them.
Deciding is for approvers only; the service's rules (no self-approval, one vote each, a
reason) answer with a page that says why.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Response, abort, current_app, g, redirect, render_template, request, url_for

from appliance.holds.service import ApprovalError, ApprovalService
from appliance.holds.store import STATUSES, ApprovalRequest
from webui.approvals import EXTENSION as API_EXTENSION
from webui.approvals import HTTP_STATUS
from webui.console import records
from webui.console.auth import signed_in

bp = Blueprint("approvals_pages", __name__, url_prefix="/approvals")

INBOX_LIMIT = 200
HISTORY_LIMIT = 500
# How long one event stream stays open: the browser reconnects by itself (EventSource),
# so a worker thread is never held for good by one open page.
STREAM_SECONDS = 55.0
STREAM_POLL_SECONDS = 0.25


def service() -> ApprovalService:
    return current_app.extensions[API_EXTENSION].service


def _viewer() -> Any:
    """Auditors and admins read everything; an approver what the API would show them."""
    return None if {"auditor", "admin"} & set(g.roles) else g.identity


def may_decide(r: ApprovalRequest) -> bool:
    identity = g.identity
    return r.pending and "approver" in g.roles and bool(set(identity.groups) & set(r.approver_groups)) \
        and identity.subject != r.requester.subject


def waited(r: ApprovalRequest) -> str:
    end = r.decided_at or datetime.now(UTC)
    seconds = max(0, int((end - r.created_at).total_seconds()))
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


def _pending() -> list[ApprovalRequest]:
    svc = service()
    svc.expire_overdue()
    found = svc.list("pending", INBOX_LIMIT, viewer=_viewer())
    if "approver" in g.roles and not {"auditor", "admin"} & set(g.roles):
        found = [r for r in found if set(g.identity.groups) & set(r.approver_groups)
                 or r.requester.subject == g.identity.subject]
    return found


@bp.get("")
@signed_in()
def inbox() -> Any:
    return render_template("approvals.html", requests=_pending(), waited=waited, may_decide=may_decide,
                           revision=service().store.revision())


@bp.get("/list")
@signed_in()
def inbox_list() -> Any:
    """The inbox's table alone, for the script to swap in when the events say it changed."""
    return render_template("approvals_list.html", requests=_pending(), waited=waited, may_decide=may_decide)


@bp.get("/events")
@signed_in()
def events() -> Response:
    """Server-sent events: ``revision`` with the store's revision now and whenever it moves."""
    store = service().store

    def stream() -> Iterator[str]:
        yield "retry: 1000\n\n"
        last = None
        deadline = time.monotonic() + STREAM_SECONDS
        while time.monotonic() < deadline:
            revision = store.revision()
            if revision != last:
                last = revision
                yield f"event: revision\ndata: {json.dumps({'revision': revision})}\n\n"
            else:
                yield ": idle\n\n"  # a comment: finds a closed connection, keeps proxies from timing out
            time.sleep(STREAM_POLL_SECONDS)

    response = Response(stream(), mimetype="text/event-stream")
    response.headers["X-Accel-Buffering"] = "no"
    return response


@bp.get("/history")
@signed_in()
def history() -> Any:
    status = request.args.get("status", "")
    if status and status not in STATUSES:
        abort(400, description=f"status must be one of {', '.join(STATUSES)}")
    text = request.args.get("q", "").strip().lower()
    found = service().list(status or None, HISTORY_LIMIT, viewer=_viewer())
    if not status:
        found = [r for r in found if not r.pending]
    if text:
        found = [r for r in found if text in " ".join((r.id.lower(), r.sql.lower(), r.requester.subject.lower(),
                                                       r.rule.lower(), r.target.lower(), r.status,
                                                       *(v.approver_subject.lower() for v in r.votes),
                                                       *(v.reason.lower() for v in r.votes)))]
    return render_template("history.html", requests=found, status=status, q=request.args.get("q", ""),
                           statuses=STATUSES, waited=waited)


def _load(request_id: str) -> ApprovalRequest:
    svc = service()
    svc.expire_overdue()
    try:
        return svc.get(request_id, viewer=_viewer())
    except ApprovalError as exc:
        abort(404, description=exc.message)


def recent_statements(r: ApprovalRequest, limit: int = 10) -> list[dict[str, Any]]:
    """The session's last statements before the held one, from the audit records."""
    config = current_app.config["TOLLGATE_CONFIG"]
    if config.audit is None or not r.session_id:
        return []
    from webui.console.evidence import session_records
    statements = [rec for rec in session_records(config.audit, r.session_id) if rec.get("type") == "statement"]
    return statements[-limit:]


@bp.get("/<request_id>")
@signed_in()
def show(request_id: str, error: str | None = None, status: int = 200) -> Any:
    r = _load(request_id)
    own = r.requester.subject == g.identity.subject
    page = render_template("request.html", r=r, waited=waited, may_decide=may_decide(r), own=own,
                           recent=recent_statements(r), error=error,
                           max_grant=service().max_grant_minutes)
    return page, status


@bp.post("/<request_id>/decide")
@signed_in("approver")
def decide(request_id: str) -> Any:
    action = request.form.get("action")
    if action not in ("approve", "deny"):
        abort(400, description="action must be approve or deny")
    reason = request.form.get("reason", "")
    minutes_text = request.form.get("grant_minutes", "").strip()
    grant_minutes: int | None = None
    if action == "approve" and minutes_text:
        if not minutes_text.isdigit():
            return show(request_id, error="grant minutes must be a whole number", status=400)
        grant_minutes = int(minutes_text) or None
    scope = request.form.get("grant_scope") or None
    try:
        decided = service().decide(request_id, g.identity, action == "approve", reason, grant_minutes,
                                   scope if grant_minutes else None)
    except ApprovalError as exc:
        records.admin("console.decision", identity=g.identity, outcome="failure", object=f"approval:{request_id}",
                      decision=action, reason=exc.code)
        if exc.code in ("unknown_request", "not_an_approver"):
            abort(404, description=f"there is no approval request {request_id} you may decide")
        return show(request_id, error=exc.message, status=HTTP_STATUS.get(exc.code, 400))
    records.admin("console.decision", identity=g.identity, object=f"approval:{decided.id}", decision=action,
                  reason=reason.strip(), status=decided.status, grant_minutes=grant_minutes)
    return redirect(url_for("approvals_pages.show", request_id=decided.id))


__all__ = ["bp"]
