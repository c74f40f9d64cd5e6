"""``tollgate sessions --live``: the running proxy's sessions now, asked over its control socket."""

from __future__ import annotations

import argparse
import json

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
    # PID: the backend's, as pg_stat_activity and the agent (pg_backend_pid()) know it.
    print(f"{'ID':>5}  {'CLIENT':<24} {'IDENTITY':<28} {'GROUPS':<20} {'TARGET':<10} {'ROLE':<10} {'PID':>7} "
          f"{'TX':<2} PHASE")
    for s in sessions:
        who = s.get("identity") or "-"
        if s.get("identity_source") == "legacy-source-address":
            who += " (legacy: by address)"
        print(f"{s['id']:>5}  {s['client']:<24} {who:<28} {','.join(s.get('groups') or []) or '-':<20} "
              f"{s['target'] or '-':<10} {s['user'] or '-':<10} {s.get('backend_pid') or '-':>7} "
              f"{s['transaction_status']:<2} "
              f"{s['phase']}{' (held)' if s['held'] else ''}")
    return 0
