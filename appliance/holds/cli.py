"""``tollgate approvals list|show|approve|deny``: decide held statements from a terminal.

Talks to the approvals API over HTTPS (see :mod:`appliance.holds.client`): ``--url``, or
``[approvals] api_url`` from ``-c CONFIG``; the server's CA from ``--ca-file`` or
``[approvals] api_ca_file``. The caller is whoever the token names: ``--token-file FILE``
or the environment variable ``TOLLGATE_TOKEN`` (an ID token or access token from the
identity provider; never on the command line, where ``ps`` would show it).

The API shows a caller only the requests they may decide (one of their groups approves
it) and those they asked for; ``list`` shows those, ``show`` of any other says there is no
such request.

Output is meant to be read at 2 a.m.: who asks, to do what, where, under which rule, with
which parameters, who voted so far and how long is left. ``--json`` prints the API's JSON.
Exit status: 0 done; 1 the API refused or could not be reached (one line saying why);
2 usage (bad arguments, no URL, no token, unreadable config).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.holds.client import DEFAULT_TIMEOUT, ApprovalsClient, ClientError
from appliance.holds.store import STATUSES

TOKEN_ENV = "TOLLGATE_TOKEN"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
STATEMENT_WIDTH = 100
PROG = "tollgate approvals"


class UsageError(Exception):
    """Something the caller must fix in how the command was run."""


def register(sub: argparse._SubParsersAction) -> None:
    approvals = sub.add_parser("approvals", help="held statements: list, show, approve, deny",
                               description="Decide statements Tollgate holds for approval. The token (an ID or "
                                           f"access token) comes from --token-file or ${TOKEN_ENV}.")
    verbs = approvals.add_subparsers(dest="approvals_command", metavar="ACTION", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", type=Path, help="appliance config: its [approvals] api_url and api_ca_file "
                                                          "are the defaults")
    common.add_argument("--url", help="the appliance web service, https://HOST:PORT")
    common.add_argument("--ca-file", type=Path, metavar="FILE",
                        help="CA to trust for the web service (default: api_ca_file, else the system's CAs)")
    common.add_argument("--token-file", type=Path, metavar="FILE",
                        help=f"read the bearer token from FILE (default: ${TOKEN_ENV})")
    common.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per request")
    common.add_argument("--json", action="store_true", help="print the API's JSON")

    ls = verbs.add_parser("list", parents=[common],
                          help="approval requests you may decide or asked for, newest first")
    ls.add_argument("--status", choices=[*STATUSES, "all"], default="pending",
                    help="which requests (default: %(default)s)")
    ls.add_argument("--limit", type=int, default=50, help="at most this many (default: %(default)s)")
    ls.set_defaults(handler=cmd_list)

    show = verbs.add_parser("show", parents=[common], help="one request in full")
    show.add_argument("id", help="the request id, e.g. apr-7F3K2Q")
    show.set_defaults(handler=cmd_show)

    approve = verbs.add_parser("approve", parents=[common], help="approve a held statement")
    approve.add_argument("id")
    approve.add_argument("--reason", required=True, help="why (recorded with your vote)")
    approve.add_argument("--for-minutes", type=int, metavar="N",
                         help="also allow exactly this statement (same constants and parameters) for this "
                              "identity on this target for N minutes")
    approve.add_argument("--any-constants", action="store_true",
                         help="with --for-minutes: allow the statement's shape instead, with any constants and "
                              "parameters (the request's 'may vary' parts); list lengths stay as approved")
    approve.set_defaults(handler=cmd_approve)

    deny = verbs.add_parser("deny", parents=[common], help="deny a held statement")
    deny.add_argument("id")
    deny.add_argument("--reason", required=True, help="why (the agent is told, and it is recorded)")
    deny.set_defaults(handler=cmd_deny)


# --- plumbing ---------------------------------------------------------------------------------

def _client(args: argparse.Namespace) -> ApprovalsClient:
    url, ca_file = args.url, args.ca_file
    if args.config is not None:
        from appliance.config import (
            load_config,  # ConfigError: main() reports it, exit 2
        )
        config = load_config(args.config)
        url = url or config.approvals.api_url
        ca_file = ca_file or config.approvals.api_ca_file
    if not url:
        raise UsageError("no approvals API URL: give --url https://HOST:PORT, or -c CONFIG with [approvals] api_url")
    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except OSError as exc:
            raise UsageError(f"cannot read the token file {args.token_file}: {exc.strerror}") from None
        if not token:
            raise UsageError(f"the token file {args.token_file} is empty")
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
        if not token:
            raise UsageError(f"no token: give --token-file FILE or set {TOKEN_ENV}")
    try:
        return ApprovalsClient(url, token, ca_file=ca_file, timeout=args.timeout)
    except ClientError as exc:
        raise UsageError(exc.message) from None


def _run(fn: Callable[[argparse.Namespace, ApprovalsClient], int]) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        try:
            return fn(args, _client(args))
        except UsageError as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except ClientError as exc:
            code = f" [{exc.code}]" if exc.code else ""
            print(f"{PROG}: {exc.message}{code}", file=sys.stderr)
            return EXIT_FAILED
    handler.__name__ = fn.__name__
    return handler


# --- formatting -------------------------------------------------------------------------------

def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text)


def duration(seconds: float) -> str:
    """``42s``, ``7m05s``, ``3h12m``, ``2d4h``."""
    seconds = int(abs(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _stamp(when: datetime | None) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S UTC") if when else "-"


def _expiry(r: dict[str, Any], now: datetime) -> str:
    if r["status"] != "pending":
        return "-"
    left = (_parse_time(r["expires_at"]) - now).total_seconds()  # type: ignore[operator]
    return f"in {duration(left)}" if left > 0 else "now"


def _one_line(sql: str, width: int = STATEMENT_WIDTH) -> str:
    flat = " ".join(sql.split())
    return flat if len(flat) <= width else flat[:width - 1] + "…"


def _requester(r: dict[str, Any]) -> str:
    who = r["requester"]
    return f"{who['kind']} {who['display']}"


def _votes(r: dict[str, Any]) -> str:
    return f"{r['approvals']}/{r['min_approvals']}"


def format_list(requests: list[dict[str, Any]], now: datetime) -> str:
    rows = [("ID", "AGE", "STATUS", "REQUESTER", "TARGET/DB", "RULE", "VOTES", "EXPIRES")]
    for r in requests:
        age = duration((now - _parse_time(r["created_at"])).total_seconds())  # type: ignore[operator]
        rows.append((r["id"], age, r["status"], _requester(r), f"{r['target']}/{r['database']}", r["rule"]["name"],
                     _votes(r), _expiry(r, now)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i:
            lines.append("    " + _one_line(requests[i - 1]["sql"]))
    return "\n".join(lines)


def format_request(r: dict[str, Any], now: datetime) -> str:
    created, expires = _parse_time(r["created_at"]), _parse_time(r["expires_at"])
    decided = _parse_time(r.get("decided_at"))
    head = f"{r['id']}  {r['status'].upper()}"
    if r["status"] == "pending":
        head += f" — expires {_expiry(r, now)} ({_stamp(expires)})"
    elif decided is not None:
        head += f" at {_stamp(decided)}" + (f": {r['status_reason']}" if r.get("status_reason") else "")
    who = r["requester"]
    origin = ", ".join(part for part in (
        f"from {r['client']}" if r.get("client") else "", f"as role {r['role']}" if r.get("role") else "",
        f"session {r['session_id']}" if r.get("session_id") else "") if part)
    rule = r["rule"]
    rule_text = rule["name"] + (f" (line {rule['line']})" if rule.get("line") else "")
    if rule.get("message"):
        rule_text += f": {rule['message']}"
    lines = [
        head,
        f"  requested  {duration((now - created).total_seconds())} ago ({_stamp(created)})",  # type: ignore[operator]
        f"  requester  {who['kind']} {who['display']}"
        + (f" (subject {who['subject']})" if who["display"] != who["subject"] else "")
        + (f"  [{', '.join(who['groups'])}]" if who["groups"] else "  [no groups]"),
    ]
    if origin:
        lines.append(f"             {origin}")
    lines += [
        f"  target     {r['target']}, database {r['database']}",
        f"  rule       {rule_text}",
        f"  approvers  {', '.join(r['approver_groups'])}: {r['approvals']} of {r['min_approvals']} approval(s)",
        f"  classes    {', '.join(r['classes']) or '-'}",
    ]
    relations = sorted({rel for s in r.get("statements", []) for rel in s.get("relations", [])})
    if relations:
        lines.append(f"  relations  {', '.join(relations)}")
    lines.append("  statement")
    lines += ["    " + line for line in (r["sql"].splitlines() or [""])]
    if r.get("params") is not None:
        lines.append("  params" + ("" if r["params"] else "     (none)"))
        lines += [f"    ${i} = {value}" for i, value in enumerate(r["params"], 1)]
    if r.get("free"):
        lines.append("  may vary   only with a shape grant (--any-constants): " + ", ".join(r["free"]))
    if r["votes"]:
        lines.append("  votes")
        for v in r["votes"]:
            grant = (f" (grant {v['grant_minutes']} min, {v.get('grant_scope') or 'shape'})"
                     if v.get("grant_minutes") else "")
            lines.append(f"    {v['verdict']:<7} {v['approver']['display']} at {_stamp(_parse_time(v['at']))}{grant}")
            for paragraph in v["reason"].splitlines():  # the approver's own line breaks are kept
                lines += textwrap.wrap(paragraph, 96, initial_indent=" " * 12, subsequent_indent=" " * 12) or [""]
    else:
        lines.append("  votes      none yet")
    if r.get("grant"):
        grant = r["grant"]
        lines.append(f"  grant      {_covers(grant)} for {grant['subject']} on {grant['target']} until "
                     f"{_stamp(_parse_time(grant['expires_at']))}")
    return "\n".join(lines)


def _now() -> datetime:
    return datetime.now(UTC)


def _print_json(document: Any) -> None:
    print(json.dumps(document, indent=2))


# --- commands ---------------------------------------------------------------------------------

@_run
def cmd_list(args: argparse.Namespace, client: ApprovalsClient) -> int:
    if not 1 <= args.limit <= 1000:
        raise UsageError("--limit must be between 1 and 1000")
    found = client.list(None if args.status == "all" else args.status, args.limit)
    if args.json:
        _print_json(found)
    elif not found:
        print("no approval requests" + ("" if args.status == "all" else f" {args.status}")
              + " that you may decide or asked for")
    else:
        print(format_list(found, _now()))
    return EXIT_OK


@_run
def cmd_show(args: argparse.Namespace, client: ApprovalsClient) -> int:
    found = client.get(args.id)
    if args.json:
        _print_json(found)
    else:
        print(format_request(found, _now()))
    return EXIT_OK


def _outcome(verb: str, r: dict[str, Any]) -> str:
    if r["status"] == "pending":
        return (f"your vote to {verb} {r['id']} is recorded: {r['approvals']} of {r['min_approvals']} approval(s), "
                "still pending")
    line = f"{r['id']} is {r['status']}"
    if r.get("grant"):
        line += (f"; {r['grant']['subject']} may run {_covers(r['grant'])} on {r['grant']['target']} until "
                 f"{_stamp(_parse_time(r['grant']['expires_at']))}")
    return line


def _covers(grant: dict[str, Any]) -> str:
    if grant.get("scope") == "exact":
        return "exactly this statement (same constants and parameters)"
    return "this statement shape (any constants)"


@_run
def cmd_approve(args: argparse.Namespace, client: ApprovalsClient) -> int:
    if args.any_constants and args.for_minutes is None:
        raise UsageError("--any-constants widens a grant: give --for-minutes too")
    decided = client.approve(args.id, args.reason, args.for_minutes, "shape" if args.any_constants else None)
    if args.json:
        _print_json(decided)
    else:
        print(_outcome("approve", decided))
    return EXIT_OK


@_run
def cmd_deny(args: argparse.Namespace, client: ApprovalsClient) -> int:
    decided = client.deny(args.id, args.reason)
    if args.json:
        _print_json(decided)
    else:
        print(_outcome("deny", decided))
    return EXIT_OK


__all__ = ["TOKEN_ENV", "duration", "format_list", "format_request", "register"]
