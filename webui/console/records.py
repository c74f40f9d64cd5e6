"""What the console records in the audit log: sign-ins, decisions, exports.

The running proxy is the audit log's only writer; local tools append ``admin`` records
through its control socket (``audit.append``, :mod:`appliance.audit.control`), and so does
the console — no second writer. A decision is also recorded by the proxy itself
(``approval.decision``) when its broker sees it; the console's record adds that it was made
in the console, by whom, from where; when the proxy can't take it, the decision stands (the
proxy records it itself when it next reads the store) and the web service's log says so. A
sign-in that can't be recorded is refused (503): nobody works in the console unrecorded.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import current_app, request

from appliance.model.identity import Identity
from appliance.proxy.control import AdminUnrecorded, record_admin

log = logging.getLogger(__name__)


def admin(action: str, *, identity: Identity | None, outcome: str = "success", object: str = "console",
          **fields: Any) -> bool:
    """Append an ``admin`` record ``action`` for ``identity`` through the proxy (the log's only
    writer); False when it could not be recorded (the caller decides whether that refuses)."""
    config = current_app.config["TOLLGATE_CONFIG"]
    record = {"action": action, "outcome": outcome, "object": object,
              "user": identity.subject if identity is not None else "unknown",
              "origin": request.remote_addr or "unknown",
              **{k: v for k, v in fields.items() if v is not None and not isinstance(v, float)}}
    try:
        record_admin(config, record)
    except AdminUnrecorded as exc:
        log.error("console: %s for %s is not in the audit log: %s", action, record["user"], exc)
        return False
    return True


__all__ = ["admin"]
