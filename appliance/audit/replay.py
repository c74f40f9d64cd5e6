"""Sessions in the terminal, from the audit records: a table of sessions, and one replayed.

Everything here works on parsed records (dicts, see docs/audit-format.md) and returns
text; :mod:`appliance.audit.cli` reads the log and prints. Times are shown in UTC, as the
records hold them. Values are shown as stored: masked where masking applied, PAN-scrubbed
everywhere — a replay can't show what the record never held.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

CELL_WIDTH = 40  # a sampled value wider than this is cut (with …) in the replay's tables
SQL_INDENT = "      "


# --- the sessions table ---------------------------------------------------------------------

@dataclass
class SessionRow:
    """One session as the sessions table shows it, gathered from its records."""

    session: str
    user: str = "?"
    groups: list[str] = field(default_factory=list)
    source: str = "?"
    target: str = "?"
    start: str | None = None
    end: str | None = None
    duration_us: int | None = None
    statements: int = 0
    blocked: int = 0
    masked: int = 0
    state: str = "open"  # open, ended, refused
    reason: str | None = None

    def identify(self, record: dict[str, Any]) -> None:
        """Who, from where, to what — from any record of the session, until a better one."""
        if self.user == "?":
            self.user = record.get("user", "?")
            self.source = record.get("origin", self.source)
            self.target = record.get("object", self.target)

    def take(self, record: dict[str, Any]) -> None:
        kind = record.get("type")
        t = record.get("time")
        if self.start is None and isinstance(t, str):
            self.start = t
        self.identify(record)
        if kind in ("session.start", "auth.success", "auth.failure", "session.refused"):
            self.user = record.get("user", self.user)
            self.source = record.get("origin", self.source)
            self.target = record.get("object", self.target)
            if record.get("groups"):
                self.groups = list(record["groups"])
        if kind == "statement":
            self.statements += 1
            if record.get("decision") == "block" or record.get("outcome") == "failure":
                self.blocked += 1
        elif kind == "result":
            self.masked += int(record.get("masked") or 0)
        elif kind == "session.end":
            self.end = t
            self.state = "ended"
            self.reason = record.get("reason")
            if isinstance(record.get("duration_us"), int):
                self.duration_us = record["duration_us"]
            if isinstance(record.get("masked"), int):
                self.masked = max(self.masked, record["masked"])
            if isinstance(record.get("statements"), int):
                self.statements = max(self.statements, record["statements"])
        elif kind in ("session.refused", "auth.failure"):
            self.end = t
            self.state = "refused"
            self.reason = record.get("reason")


def summarize(records: Iterable[dict[str, Any]]) -> list[SessionRow]:
    """Sessions (in the order they started) from records that carry a ``session`` field."""
    rows: dict[str, SessionRow] = {}
    for record in records:
        sid = record.get("session")
        if not isinstance(sid, str):
            continue
        row = rows.get(sid)
        if row is None:
            row = rows[sid] = SessionRow(sid)
        row.take(record)
    return list(rows.values())


def _duration(us: int | None) -> str:
    if us is None:
        return "-"
    seconds = us / 1e6
    if seconds < 1:
        return f"{us // 1000}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _span_us(start: str | None, end: str | None) -> int | None:
    if not start or not end:
        return None
    try:
        a = datetime.fromisoformat(start)
        b = datetime.fromisoformat(end)
    except ValueError:
        return None
    return int((b - a).total_seconds() * 1e6)


def short_time(t: str | None, with_date: bool = True) -> str:
    """``2024-05-01 12:00:00`` (UTC) from a record time, or ``-``."""
    if not t:
        return "-"
    date, _, rest = t.partition("T")
    clock = rest[:8]
    return f"{date} {clock}" if with_date else clock


def sessions_table(rows: list[SessionRow]) -> str:
    header = ("SESSION", "USER", "GROUPS", "SOURCE", "TARGET/DB", "START (UTC)", "END / DURATION",
              "STMTS", "BLOCKED", "MASKED")
    table: list[tuple[str, ...]] = [header]
    for r in rows:
        if r.state == "open":
            end = "(open)"
        elif r.state == "refused":
            end = f"refused {short_time(r.end, False)}"
        else:
            duration = r.duration_us if r.duration_us is not None else _span_us(r.start, r.end)
            end = f"{short_time(r.end, False)} / {_duration(duration)}"
        table.append((r.session, r.user, ",".join(r.groups) or "-", r.source, r.target, short_time(r.start), end,
                      str(r.statements), str(r.blocked), str(r.masked)))
    return _align(table, right={7, 8, 9})


def _align(table: list[tuple[str, ...]], right: frozenset[int] | set[int] = frozenset()) -> str:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = []
    for row in table:
        cells = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


# --- one session replayed ----------------------------------------------------------------------

def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    text = str(value).replace("\n", "\\n").replace("\t", "\\t")
    return text if len(text) <= CELL_WIDTH else text[:CELL_WIDTH - 1] + "…"


def sample_table(sample: dict[str, Any], indent: str = SQL_INDENT) -> list[str]:
    """A result sample as a small aligned table (values as stored: masked)."""
    columns = [str(c) for c in sample.get("columns") or []]
    rows = [[_cell(v) for v in row] for row in sample.get("rows") or []]
    if not columns and not rows:
        return []
    width = max([len(columns)] + [len(r) for r in rows])
    columns += [""] * (width - len(columns))
    grid = [columns] + [r + [""] * (width - len(r)) for r in rows]
    widths = [max(len(row[i]) for row in grid) for i in range(width)]
    out = [indent + " | ".join(c.ljust(widths[i]) for i, c in enumerate(columns)).rstrip(),
           indent + "-+-".join("-" * w for w in widths)]
    out.extend(indent + " | ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in grid[1:])
    if sample.get("truncated"):
        out.append(indent + "… (more rows not kept)")
    return out


def _clock(t: str | None) -> str:
    if not t:
        return "--:--:--.------"
    return t.partition("T")[2].rstrip("Z")


def _indent(text: str, prefix: str = SQL_INDENT) -> list[str]:
    return [prefix + line for line in text.splitlines() or [""]]


def _fmt_params(params: list[Any]) -> str:
    return "[" + ", ".join("NULL" if p is None else repr(p) for p in params) + "]"


def replay_lines(records: Iterable[dict[str, Any]], *, results: bool = True) -> Iterator[str]:
    """The session told in order: its start (identity, TLS), each statement with its
    decision, rule and approval and then its result (tag, rows, SQLSTATE, duration, the
    sampled rows), approvals, and the end."""
    day = None
    for r in records:
        kind = r.get("type")
        t = r.get("time")
        if isinstance(t, str) and t[:10] != day:
            day = t[:10]
            yield f"── {day} (UTC) ──"
        at = _clock(t)
        if kind == "auth.success":
            serial = f", certificate serial {r['cert_serial']}" if r.get("cert_serial") else ""
            yield (f"{at}  authenticated {r.get('user')} (via {r.get('identity_source') or 'unknown'}{serial}) "
                   f"for {r.get('target', '?')}")
        elif kind == "auth.failure":
            yield f"{at}  AUTHENTICATION FAILED for {r.get('user')} from {r.get('origin')}: {r.get('reason', '')}"
        elif kind == "session.start":
            yield f"{at}  session {r.get('session')} started"
            yield f"{SQL_INDENT}user      {r.get('user')}  groups: {', '.join(r.get('groups') or []) or '-'}"
            source = r.get("identity_source") or "-"
            serial = r.get("cert_serial")
            yield f"{SQL_INDENT}identity  {source}{f'  certificate serial {serial}' if serial else ''}"
            yield f"{SQL_INDENT}from      {r.get('origin')}"
            yield (f"{SQL_INDENT}target    {r.get('target', '?')} database {r.get('database', '?')} "
                   f"as {r.get('db_user', '?')}" + (f"  (application {r['application_name']})"
                                                   if r.get("application_name") else ""))
            yield (f"{SQL_INDENT}TLS       agent: {_tls(r.get('client_tls'))}; database: {_tls(r.get('upstream_tls'))}"
                   + (f"; backend pid {r['backend_pid']}" if r.get("backend_pid") is not None else ""))
            if r.get("client_encoding") not in (None, "UTF8"):
                yield f"{SQL_INDENT}encoding  {r['client_encoding']} (statement text below converted from it)"
        elif kind == "statement":
            decision = str(r.get("decision", "?")).upper()
            extra = []
            if r.get("rule"):
                extra.append(f"rule {r['rule']}")
            if r.get("approval"):
                extra.append(f"approval {r['approval']}")
            if r.get("classes"):
                extra.append("classes " + ",".join(r["classes"]))
            refused = r.get("outcome") == "failure"
            head = f"{at}  #{r.get('stmt', '?')} {r.get('kind', 'query')}  {decision}"
            if extra:
                head += f" ({'; '.join(extra)})"
            if refused:
                head += "  — REFUSED"
            yield head
            yield from _indent(str(r.get("text", "")))
            if r.get("params") is not None:
                yield f"{SQL_INDENT}params: {_fmt_params(r['params'])}"
            if refused and r.get("message"):
                yield f"{SQL_INDENT}→ {r.get('sqlstate', '')} {r['message']}".rstrip()
        elif kind == "result":
            parts = []
            if r.get("skipped"):
                parts.append("skipped (an earlier statement failed)")
            if r.get("tag"):
                parts.append(str(r["tag"]))
            if r.get("sqlstate"):
                parts.append(f"ERROR {r['sqlstate']}")
            parts.append(f"{r.get('rows', 0)} row{'s' if r.get('rows') != 1 else ''}")
            if r.get("masked"):
                parts.append(f"{r['masked']} masked")
            if isinstance(r.get("duration_us"), int):
                parts.append(_duration_ms(r["duration_us"]))
            yield f"{at}  #{r.get('stmt', '?')} → " + " · ".join(parts)
            if results and isinstance(r.get("sample"), dict):
                yield from sample_table(r["sample"])
        elif kind == "approval.request":
            yield (f"{at}  approval {r.get('approval')} requested by {r.get('requester', r.get('user'))} "
                   f"(rule {r.get('rule', '-')}; approvers {', '.join(r.get('approvers') or []) or '-'}; "
                   f"needs {r.get('min_approvals', 1)})")
        elif kind == "approval.decision":
            grant = f" (grant {r['grant_minutes']} min)" if r.get("grant_minutes") else ""
            yield (f"{at}  approval {r.get('approval')}: {str(r.get('decision', '?')).upper()} by "
                   f"{r.get('approver', '?')}{grant}" + (f" — {r['reason']}" if r.get("reason") else ""))
        elif kind == "session.end":
            yield (f"{at}  session ended: {r.get('reason', '-')} — {r.get('statements', 0)} statements, "
                   f"{r.get('masked', 0)} values masked, {_duration(r.get('duration_us'))}")
        elif kind == "session.refused":
            yield f"{at}  session REFUSED: {r.get('reason', '-')}"
        elif kind == "flow":  # the eBPF ledger's record of the session's connection (appliance.flows)
            reason = f" ({r['reason']})" if r.get("reason") else ""
            yield (f"{at}  flow {r.get('origin')} → {str(r.get('object', '')).removeprefix('flow:')} "
                   f"{r.get('verdict', '?')}{reason}, {r.get('end', '?')}: packets {r.get('packets_in')}/"
                   f"{r.get('packets_out')}, bytes {r.get('bytes_in')}/{r.get('bytes_out')}, "
                   f"TCP flags {r.get('tcp_flags_in') or '-'}/{r.get('tcp_flags_out') or '-'}")
        else:
            yield f"{at}  {kind} ({r.get('outcome', '')})"


def _duration_ms(us: int) -> str:
    return f"{us / 1000:.1f} ms" if us < 10_000_000 else _duration(us)


def _tls(value: Any) -> str:
    if value is None or value is False or value == "":
        return "none"
    if value is True:
        return "yes"
    return str(value)
