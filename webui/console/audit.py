"""Console page for the audit log: its status, checkpoints and keys, off-box copies, an export.

Status is the running proxy's (``audit`` over the control socket: size, durable size,
current key, last checkpoint, off-box sinks and witnesses, any failure); checkpoints and the
trust file's keys are read from the audit directory. ``POST /audit/export`` writes a bundle
for a time range (the same code as ``tollgate audit export``, recorded in the log as made by
the signed-in person) in the background (:mod:`webui.console.exports`); its page shows how
far it has got and then offers the bundle.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, abort, current_app, g, redirect, render_template, request, send_file, url_for

from appliance.audit.note import NoteError, parse_verifier_key
from appliance.audit.reader import AuditReader, ReaderError
from appliance.audit.trust import parse_trust
from appliance.config import Config, ConfigError
from appliance.proxy.control import control_request
from webui.console import exports
from webui.console.auth import signed_in

bp = Blueprint("audit_pages", __name__, url_prefix="/audit")

CHECKPOINTS_SHOWN = 20


def config() -> Config:
    return current_app.config["TOLLGATE_CONFIG"]


def _status() -> tuple[dict[str, Any] | None, str | None]:
    try:
        reply = control_request(config(), {"op": "audit"})
    except (ConfigError, OSError, ValueError) as exc:
        return None, str(exc)
    return (reply.get("audit"), None) if reply.get("ok") else (None, str(reply.get("error")))


@bp.get("")
@signed_in("auditor", "admin")
def index() -> Any:
    audit = config().audit
    if audit is None:
        abort(404, description="this appliance keeps no audit log ([audit] is not configured)")
    status, status_error = _status()
    checkpoints: list[dict[str, Any]] = []
    keys: list[dict[str, Any]] = []
    trust_error = None
    try:
        checkpoints = AuditReader(audit.dir).checkpoints()[-CHECKPOINTS_SHOWN:][::-1]
        root = parse_verifier_key((audit.keys_dir / "root.pub").read_text().strip())
        trust = parse_trust((audit.dir / "trust.note").read_text(), root)
        keys = [{"label": e.key.label, "range": e.range_text} for e in trust.entries]
    except (OSError, ValueError, NoteError, ReaderError) as exc:
        trust_error = str(exc)
    return render_template("audit.html", status=status, status_error=status_error, checkpoints=checkpoints,
                           keys=keys, trust_error=trust_error, origin=audit.origin)


def _when(text: str, what: str) -> datetime | None:
    if not text.strip():
        return None
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        abort(400, description=f"{what} must be a date and time (YYYY-MM-DDTHH:MM), not {text!r}")
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


@bp.post("/export")
@signed_in("auditor", "admin")
def export_range() -> Any:
    """Start an export in the background; its page shows the progress, then the download."""
    frm, to = _when(request.form.get("from", ""), "from"), _when(request.form.get("to", ""), "to")
    if frm is not None and to is not None and frm > to:
        abort(400, description="the range ends before it starts")
    job = exports.start(config(), frm, to, who=(g.identity.subject, request.remote_addr or "console"))
    return redirect(url_for("audit_pages.export_job", job=job))


@bp.get("/exports/<job>")
@signed_in("auditor", "admin")
def export_job(job: str) -> Any:
    state = _job(job)
    return render_template("export.html", job=job, state=state)


@bp.get("/exports/<job>/bundle")
@signed_in("auditor", "admin")
def export_download(job: str) -> Any:
    state = _job(job)
    if state["state"] != "done":
        abort(409, description="the export is not finished")
    return send_file(exports.bundle_path(config(), job), mimetype="application/gzip", as_attachment=True,
                     download_name=f"audit-export-{job}.tar.gz")


def _job(job: str) -> dict[str, Any]:
    state = exports.read(config(), job)
    # Another person's export is not there for you (as an unknown id).
    if state is None or state.get("user") != g.identity.subject:
        abort(404, description=f"there is no export {job} of yours")
    return state


__all__ = ["bp"]
