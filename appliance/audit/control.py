"""Control-socket operations of the audit log, served by the running proxy.

The proxy is the log's only writer while it runs, so local commands that must write to
the log (an export is itself an access to the log, a key rotation is a key event) or need
a fresh checkpoint ask the proxy through its control socket (root-only, like the rest of
it). Only ``admin`` records (and the ``review`` records of ``tollgate audit review``) can
be appended this way: nothing else may be forged by a local command.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from appliance.proxy.control import ControlOps

ADMIN_FIELDS = ("action", "user", "origin", "object", "outcome")


def register_control_ops(ops: ControlOps, audit_log: Any) -> None:
    ops.register("audit", lambda request: {"audit": audit_log.status()})
    ops.register("audit.checkpoint", lambda request: {"checkpoint": audit_log.checkpoint_now()})
    ops.register("audit.append", lambda request: {"seq": _append_admin(audit_log, request)})
    ops.register("audit.rotate", lambda request: {"rotated": _rotate(audit_log, request)})


def _append_admin(audit_log: Any, request: dict[str, Any]) -> int:
    record = request.get("record")
    if not isinstance(record, dict):
        raise ValueError("audit.append needs a 'record' object")
    kind = record.get("type", "admin")
    if kind not in ("admin", "review"):
        raise ValueError("only 'admin' and 'review' records can be appended through the control socket")
    missing = [name for name in ADMIN_FIELDS if not isinstance(record.get(name), str) or not record.get(name)]
    if missing:
        raise ValueError(f"an admin record needs non-empty string fields: {', '.join(missing)}")
    if any(isinstance(v, float) for v in record.values()):
        raise ValueError("records hold no floating-point numbers")
    record = {k: v for k, v in record.items() if k not in ("seq", "time", "run")}
    record["type"] = kind
    seq = audit_log.append(record)
    audit_log.checkpoint_now()  # durable and signed before the command reports success
    return seq


def _rotate(audit_log: Any, request: dict[str, Any]) -> dict[str, Any]:
    from pathlib import Path

    from appliance.audit.keys import load_root_key
    root = load_root_key(audit_log.config, Path(request["root_key"]) if request.get("root_key") else None)
    new_key = audit_log.rotate_key(root, user=str(request.get("user") or "tollgate"),
                                   origin=str(request.get("origin") or "local"))
    return {"key": getattr(new_key, "key_id", str(new_key))}
