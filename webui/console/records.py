"""What the console records in the audit log: sign-ins, decisions, exports.

The running proxy is the audit log's only writer; local tools append ``admin`` records
through its control socket (``audit.append``, :mod:`appliance.audit.control`), and so does
the console — no second writer. A decision is also recorded by the proxy itself
(``approval.decision``) when its broker sees it; the console's record adds that it was made
in the console, by whom, from where. When the proxy can't be reached the action is not
refused (a sign-in or a decision must still work while the proxy restarts) but logged as
unrecorded, loudly.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import current_app, request

from appliance.config import ConfigError
from appliance.model.identity import Identity
from appliance.proxy.control import control_request

log = logging.getLogger(__name__)


def admin(action: str, *, identity: Identity | None, outcome: str = "success", object: str = "console",
          **fields: Any) -> bool:
    """Append an ``admin`` record ``action`` for ``identity``; False when it could not be."""
    config = current_app.config["TOLLGATE_CONFIG"]
    record = {"type": "admin", "action": action, "outcome": outcome, "object": object,
              "user": identity.subject if identity is not None else "unknown",
              "origin": request.remote_addr or "unknown",
              **{k: v for k, v in fields.items() if v is not None and not isinstance(v, float)}}
    if config.audit is None or config.proxy.control_socket is None:
        return False
    try:
        reply = control_request(config, {"op": "audit.append", "record": record})
    except (ConfigError, OSError, ValueError) as exc:
        log.error("console: could not record %s for %s in the audit log: %s", action, record["user"], exc)
        return False
    if not reply.get("ok"):
        log.error("console: the audit log refused %s for %s: %s", action, record["user"], reply.get("error"))
        return False
    return True


__all__ = ["admin"]
