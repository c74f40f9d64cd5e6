"""``tollgate sessions --live``: the running proxy's sessions now, asked over its control socket."""

from __future__ import annotations

import argparse
import json
from typing import Any

from appliance.config import load_config
from appliance.proxy.control import control_request


def cmd_live_sessions(args: argparse.Namespace) -> int:
    """Registered with the audit commands (``tollgate sessions``), which read the log."""
    config = load_config(args.config)
    reply = control_request(config, {"op": "sessions"})
    sessions = reply.get("sessions", [])
    if args.json:
        print(json.dumps(sessions, indent=2))
        return 0
    # ID: the session's one id, as approvals, the audit records and `tollgate replay` name it.
    # PID: the backend's, as pg_stat_activity and the agent (pg_backend_pid()) know it.
    print(f"{'ID':<16} {'CLIENT':<24} {'IDENTITY':<28} {'GROUPS':<20} {'TARGET':<10} {'ROLE':<10} {'PID':>7} "
          f"{'TX':<2} {'STATE':<26} STATEMENT")
    for s in sessions:
        who = s.get("identity") or "-"
        if s.get("identity_source") == "legacy-source-address":
            who += " (legacy: by address)"
        print(f"{s['id']:<16} {s['client']:<24} {who:<28} {','.join(s.get('groups') or []) or '-':<20} "
              f"{s['target'] or '-':<10} {s['user'] or '-':<10} {s.get('backend_pid') or '-':>7} "
              f"{s['transaction_status']:<2} {state_of(s):<26} {statement_of(s)}")
    return 0


def state_of(session: dict[str, Any]) -> str:
    """``held apr-… 12s``, ``running 3.2s``, or the phase (``ready``: nothing in flight)."""
    age = session.get("statement_age")
    took = f" {age:.1f}s" if isinstance(age, (int, float)) else ""
    if session.get("held_on"):
        return f"held {session['held_on']}{took}"
    if session.get("held"):
        return f"held{took}"
    if session.get("statement") is not None:
        return f"running{took}"
    return str(session["phase"])


def statement_of(session: dict[str, Any], width: int = 60) -> str:
    text = " ".join(str(session.get("statement") or "-").split())
    return text if len(text) <= width else text[:width - 1] + "…"
