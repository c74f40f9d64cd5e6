"""Console pages for sessions: live (from the proxy), recorded (from the audit log), one replayed.

``/sessions`` shows the running proxy's sessions now (asked over its control socket, as
``tollgate sessions --live`` does: identity, origin, target, the statement running and its
age, the transaction state, the approval a held one waits on, linked) and the recorded ones,
filterable by identity, target, time, decision and masked count. ``/sessions/<id>`` replays
one from its signed records, with a verified mark earned by :mod:`webui.console.evidence`;
``/sessions/<id>/bundle`` downloads its export bundle (recorded as an export). Session ids
are the one id every surface shows (``<proxy run>-<n>``).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Blueprint, abort, after_this_request, current_app, g, render_template, request, send_file

from appliance.config import Config, ConfigError
from appliance.proxy.control import control_request
from webui.console import evidence
from webui.console.auth import signed_in

bp = Blueprint("sessions_pages", __name__, url_prefix="/sessions")

READERS = ("approver", "auditor", "admin")


def config() -> Config:
    return current_app.config["TOLLGATE_CONFIG"]


def live_sessions() -> tuple[list[dict[str, Any]], str | None]:
    """The proxy's sessions now, or ([], why not)."""
    try:
        reply = control_request(config(), {"op": "sessions"})
    except (ConfigError, OSError, ValueError) as exc:
        return [], str(exc)
    if not reply.get("ok"):
        return [], str(reply.get("error"))
    return list(reply.get("sessions", [])), None


def _matches(row: Any, args: Any) -> bool:
    who, target = args.get("identity", "").strip().lower(), args.get("target", "").strip().lower()
    since, until = args.get("since", "").strip(), args.get("until", "").strip()
    decision, masked = args.get("decision", ""), args.get("masked", "")
    if who and who not in row.user.lower():
        return False
    if target and target not in row.target.lower():
        return False
    if since and (row.start or "") < since:
        return False
    if until and (row.start or "") > until + "\uffff":
        return False
    if decision == "refused" and not row.blocked:
        return False
    if decision == "clean" and row.blocked:
        return False
    return not ((masked == "yes" and not row.masked) or (masked == "no" and row.masked))


@bp.get("")
@signed_in(*READERS)
def index() -> Any:
    live, live_error = live_sessions()
    audit = config().audit
    recorded = []
    if audit is not None:
        recorded = [r for r in evidence.session_rows(audit) if _matches(r, request.args)]
        recorded.reverse()  # newest first
    return render_template("sessions.html", live=live, live_error=live_error, recorded=recorded[:500],
                           total=len(recorded), args=request.args, audit=audit is not None)


@dataclass(slots=True)
class ReplayItem:
    """One statement of a replay, its fields ready to print (a 10,000-statement page renders
    each of these once, so the template does no lookups of its own)."""

    num: str
    decision: str
    rule: str
    at: str
    text: str
    refused: bool
    params: str | None = None
    approval: str | None = None
    approved: str | None = None  # "approve by dba@… — reason"
    error: str | None = None
    result: str | None = None
    columns: list[str] | None = None
    rows: list[list[str]] | None = None


def _result_line(res: dict[str, Any]) -> str:
    parts = [f"ERROR {res['sqlstate']}" if res.get("sqlstate") else str(res.get("tag") or "")]
    if res.get("skipped"):
        parts = ["skipped (an earlier statement failed)"]
    parts.append(f"{res.get('rows', 0)} row(s)")
    if res.get("masked"):
        parts.append(f"{res['masked']} masked")
    if isinstance(res.get("duration_us"), int):
        parts.append(f"{res['duration_us'] / 1000:.1f} ms")
    return " · ".join(p for p in parts if p)


def _cell(value: Any) -> str:
    return "∅" if value is None else str(value)


def _replay_items(found: list[dict[str, Any]]) -> tuple[dict[str, Any], list[ReplayItem], dict[str, Any]]:
    """(the session's start record, its statements with their results and approvals, its end)."""
    start: dict[str, Any] = {}
    end: dict[str, Any] = {}
    statements: dict[Any, dict[str, Any]] = {}
    results: dict[Any, dict[str, Any]] = {}
    decisions: dict[str, dict[str, Any]] = {}
    for r in found:
        kind = r.get("type")
        if kind == "statement":
            statements[r.get("stmt")] = r
        elif kind == "result":
            results[r.get("stmt")] = r
        elif kind == "session.start" or (kind == "auth.success" and not start):
            start = r
        elif kind == "session.end":
            end = r
        elif kind == "approval.decision" and r.get("approval"):
            decisions[r["approval"]] = r
    items = []
    for number, s in statements.items():
        refused = s.get("outcome") == "failure"
        item = ReplayItem(str(number if number is not None else "?"), str(s.get("decision", "?")),
                          str(s.get("rule") or ""), str(s.get("time") or "")[11:23], str(s.get("text", "")), refused)
        if s.get("params") is not None:
            item.params = ", ".join(_cell(v) for v in s["params"])
        approval = s.get("approval")
        if approval:
            item.approval = approval
            decided = decisions.get(approval)
            if decided is not None:
                item.approved = (f"{decided.get('decision', '?')} by {decided.get('approver', '?')} — "
                                 f"{decided.get('reason', '')}")
        if refused and s.get("message"):
            item.error = f"{s.get('sqlstate', '')} {s['message']}".strip()
        res = results.get(number)
        if res is not None:
            item.result = _result_line(res)
            sample = res.get("sample")
            if isinstance(sample, dict) and sample.get("rows"):
                item.columns = [str(c) for c in sample.get("columns", [])]
                item.rows = [[_cell(v) for v in row] for row in sample["rows"]]
        items.append(item)
    return start, items, end


@bp.get("/<session_id>")
@signed_in(*READERS)
def replay(session_id: str) -> Any:
    audit = config().audit
    if audit is None:
        abort(404, description="this appliance keeps no audit log ([audit] is not configured)")
    found = list(evidence.session_records(audit, session_id))
    if not found:
        abort(404, description=f"no records of session {session_id} in the audit log")
    start, items, end = _replay_items(found)
    inclusion = evidence.verify_inclusion(audit, [r["seq"] for r in found if isinstance(r.get("seq"), int)])
    return render_template("replay.html", session_id=session_id, start=start, items=items, end=end,
                           inclusion=inclusion, records=len(found))


@bp.get("/<session_id>/bundle")
@signed_in("auditor", "admin")
def bundle(session_id: str) -> Any:
    from appliance.audit.export import ExportError, export
    from appliance.audit.store_errors import AuditError
    if config().audit is None:
        abort(404, description="this appliance keeps no audit log")
    directory = Path(tempfile.mkdtemp(prefix="tollgate-console-"))
    out = directory / f"session-{session_id}.tar.gz"
    try:
        summary = export(config(), out, session=session_id, who=(g.identity.subject, request.remote_addr or "console"))
    except (ExportError, AuditError, ConfigError, OSError, ValueError) as exc:
        abort(500, description=f"the export failed: {exc}")

    @after_this_request
    def remove(response: Any) -> Any:
        out.unlink(missing_ok=True)
        directory.rmdir()
        return response

    # export() recorded itself (audit.export) as made by this person from their address.
    del summary
    return send_file(out, mimetype="application/gzip", as_attachment=True, download_name=out.name)


__all__ = ["bp", "live_sessions"]
