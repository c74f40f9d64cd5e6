"""``tollgate flows``: the flow ledger, live (the running proxy's kernel map, through its
control socket) or recorded (the flow records in the audit log), filtered.

An entry point beside ``appliance.cli``: it reads both the proxy (live) and the audit log
(recorded), which the feature packages can't import from one another.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from appliance.audit.reader import AuditReader, parse
from appliance.config import ConfigError, load_config
from appliance.proxy.control import control_request

FILTERS = ("verdict", "reason", "src", "dst", "dport", "protocol")
RECORD_TYPES = ("flow", "flow.unmatched", "flow.overflow")


def register(sub: argparse._SubParsersAction) -> None:
    flows = sub.add_parser("flows", help="the eBPF flow ledger: live flows and counters, or the recorded ones",
                           description="Flows from the agents as the bypass guard saw them: live from the running "
                                       "proxy, or as recorded (signed) in the audit log.")
    flows.add_argument("-c", "--config", required=True, type=Path, help="Tollgate configuration (TOML)")
    flows.add_argument("--recorded", action="store_true",
                       help="the flow records in the audit log (flow, flow.unmatched, flow.overflow)")
    flows.add_argument("--counters", action="store_true", help="only the guard's state and counters (live)")
    flows.add_argument("--unmatched", action="store_true", help="recorded: only flow.unmatched records")
    flows.add_argument("--session", help="recorded: only this session's flows")
    for name in FILTERS:
        flows.add_argument(f"--{name}", help=f"only flows whose {name} is this")
    flows.add_argument("--limit", type=int, default=1000, help="at most this many flows (default 1000)")
    flows.add_argument("--json", action="store_true", help="machine-readable output")
    flows.set_defaults(handler=cmd_flows)


def cmd_flows(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    wanted = {name: getattr(args, name) for name in FILTERS if getattr(args, name) is not None}
    if args.recorded:
        return _recorded(config, args, wanted)
    request: dict[str, Any] = {"op": "flows", "limit": args.limit, "status_only": args.counters, **wanted}
    reply = control_request(config, request)
    if not reply.pop("ok", False):
        print(f"tollgate: flows: {reply.get('error')}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(reply, indent=2))
        return 0
    print(f"guard: mode {reply['mode']}, {reply['state']}"
          + (f" on {', '.join(reply.get('attached') or [])}" if reply.get("attached") else "")
          + (f" ({reply['error']})" if reply.get("error") else ""))
    counters = reply.get("counters")
    if counters:
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(counters["dropped"].items())) or "none"
        print(f"packets: intercepted {counters['intercepted']}, passed {counters['passed']}, "
              f"recorded bypasses {counters['recorded']}; dropped: {dropped}")
        print(f"ledger: overflow {counters['overflow']}, events lost {counters['events_lost']} "
              f"(map of {reply.get('max_flows')} flows)")
    for flow in reply.get("flows", []):
        print(_line(flow))
    return 0


def _recorded(config: Any, args: argparse.Namespace, wanted: dict[str, str]) -> int:
    if config.audit is None:
        raise ConfigError(f"{config.path}: no [audit]: flows are recorded only in the audit log")
    shown = 0
    for entry in AuditReader(config.audit.dir).records():
        if b'"type":"flow' not in entry.line:  # cheap before parsing
            continue
        record = parse(entry.line)
        if record.get("type") not in RECORD_TYPES or (args.unmatched and record["type"] != "flow.unmatched"):
            continue
        if args.session and record.get("session") != args.session:
            continue
        if any(str(record.get(k)) != v for k, v in wanted.items()):
            continue
        print(json.dumps(record, sort_keys=True) if args.json else _line(record))
        shown += 1
        if shown >= args.limit:
            break
    return 0


def _line(flow: dict[str, Any]) -> str:
    if flow.get("type") == "flow.overflow":
        return (f"{flow.get('time', '')} OVERFLOW overflow {flow.get('overflow_total')} "
                f"lost {flow.get('events_lost_total')}")
    if flow.get("type") == "flow.unmatched":
        return f"{flow.get('time', '')} UNMATCHED {flow.get('what')} {flow.get('origin')} → {flow.get('object')}"
    src = f"[{flow['src']}]" if ":" in str(flow.get("src")) else flow.get("src")
    dst = f"[{flow['dst']}]" if ":" in str(flow.get("dst")) else flow.get("dst")
    reason = f" ({flow['reason']})" if flow.get("reason") else ""
    session = f" session {flow['session']}" if flow.get("session") else ""
    return (f"{flow.get('first_seen')} {flow.get('verdict')}{reason} {flow.get('protocol')} {src}:{flow.get('sport')} "
            f"→ {dst}:{flow.get('dport')} pkts {flow.get('packets_in')}/{flow.get('packets_out')} "
            f"bytes {flow.get('bytes_in')}/{flow.get('bytes_out')} flags {flow.get('tcp_flags_in') or '-'}/"
            f"{flow.get('tcp_flags_out') or '-'} {flow.get('end')}{session}")
