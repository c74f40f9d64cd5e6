"""``tollgate-verify BUNDLE --root-key KEY --report report.html``: a PCI DSS evidence report.

Made by the standalone verifier from the bundle alone (stdlib and what the verifier
already uses), so an assessor regenerates it from the same signed evidence instead of
trusting a document the appliance wrote. The bundle is verified first; the report says
whether it held, and every section is computed from the bundle's records only.

One section per requirement (docs/audit.md, docs/operations.md): what the control is,
the evidence from this bundle (counts, identities, masked samples, approvals with
approvers and reasons, the verification), and what the bundle cannot show. A plain HTML
page with its own print style: the browser's print makes the PDF.
"""

from __future__ import annotations

import html
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.audit.bundle_reader import open_bundle
from appliance.audit.verify_report import Report

REQUIRED_FIELDS = ("user", "type", "time", "outcome", "origin", "object")
SAMPLES = 5


@dataclass
class Evidence:
    """What the records of one bundle say, gathered in one pass."""

    records: int = 0
    first_time: str | None = None
    last_time: str | None = None
    types: Counter[str] = field(default_factory=Counter)
    decisions: Counter[str] = field(default_factory=Counter)
    rules: Counter[str] = field(default_factory=Counter)
    identities: dict[str, dict[str, Any]] = field(default_factory=dict)
    unidentified_sessions: int = 0
    masked_values: int = 0
    masked_samples: list[dict[str, Any]] = field(default_factory=list)
    blocked: list[dict[str, Any]] = field(default_factory=list)
    approvals: list[dict[str, Any]] = field(default_factory=list)
    auth_failures: list[dict[str, Any]] = field(default_factory=list)
    admin: Counter[str] = field(default_factory=Counter)
    admin_samples: list[dict[str, Any]] = field(default_factory=list)
    certificates: list[dict[str, Any]] = field(default_factory=list)
    policy_reloads: list[dict[str, Any]] = field(default_factory=list)
    key_events: list[dict[str, Any]] = field(default_factory=list)
    log_runs: list[dict[str, Any]] = field(default_factory=list)
    reviews: list[dict[str, Any]] = field(default_factory=list)
    retention: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    missing_fields: int = 0
    ddl: list[dict[str, Any]] = field(default_factory=list)

    def take(self, r: dict[str, Any]) -> None:
        self.records += 1
        kind = str(r.get("type"))
        self.types[kind] += 1
        when = r.get("time")
        if isinstance(when, str):
            self.first_time = min(self.first_time or when, when)
            self.last_time = max(self.last_time or when, when)
        if any(not isinstance(r.get(f), str) or not r.get(f) for f in REQUIRED_FIELDS):
            self.missing_fields += 1
        handler = getattr(self, "_" + kind.replace(".", "_").replace("-", "_"), None)
        if handler is not None:
            handler(r)

    def _session_start(self, r: dict[str, Any]) -> None:
        user = str(r.get("user"))
        if user.startswith("unidentified"):
            self.unidentified_sessions += 1
        seen = self.identities.setdefault(user, {"sessions": 0, "groups": set(), "serials": set(),
                                                 "source": r.get("identity_source")})
        seen["sessions"] += 1
        seen["groups"].update(r.get("groups") or [])
        if r.get("cert_serial"):
            seen["serials"].add(str(r["cert_serial"]))

    def _statement(self, r: dict[str, Any]) -> None:
        self.decisions[str(r.get("decision"))] += 1
        if r.get("rule"):
            self.rules[str(r["rule"])] += 1
        if r.get("decision") == "block" and len(self.blocked) < SAMPLES:
            self.blocked.append(r)
        if "ddl" in (r.get("classes") or []) and len(self.ddl) < SAMPLES:
            self.ddl.append(r)

    def _result(self, r: dict[str, Any]) -> None:
        masked = r.get("masked")
        if isinstance(masked, int) and masked > 0:
            self.masked_values += masked
            if isinstance(r.get("sample"), dict) and len(self.masked_samples) < SAMPLES:
                self.masked_samples.append(r)

    def _approval_decision(self, r: dict[str, Any]) -> None:
        self.approvals.append(r)

    def _auth_failure(self, r: dict[str, Any]) -> None:
        self.auth_failures.append(r)

    def _session_refused(self, r: dict[str, Any]) -> None:
        self.auth_failures.append(r)

    def _admin(self, r: dict[str, Any]) -> None:
        action = str(r.get("action"))
        self.admin[action] += 1
        if action.startswith(("certificate.", "identity.")):
            self.certificates.append(r)
        elif action == "audit.retain":
            self.retention.append(r)
        elif action == "siem.drop":
            self.failures.append(r)
        if len(self.admin_samples) < 3 * SAMPLES:
            self.admin_samples.append(r)

    def _review(self, r: dict[str, Any]) -> None:
        self.reviews.append(r)

    def _policy_reload(self, r: dict[str, Any]) -> None:
        self.policy_reloads.append(r)

    def _key_generate(self, r: dict[str, Any]) -> None:
        self.key_events.append(r)

    def _key_rotate(self, r: dict[str, Any]) -> None:
        self.key_events.append(r)

    def _log_start(self, r: dict[str, Any]) -> None:
        self.log_runs.append(r)

    def _log_stop(self, r: dict[str, Any]) -> None:
        self.log_runs.append(r)

    def _audit_failure(self, r: dict[str, Any]) -> None:
        self.failures.append(r)

    def _audit_unrecorded(self, r: dict[str, Any]) -> None:
        self.failures.append(r)

    def _flow_unmatched(self, r: dict[str, Any]) -> None:
        self.failures.append(r)

    def _session_end(self, r: dict[str, Any]) -> None:
        if "failed closed" in str(r.get("reason", "")):
            self.failures.append(r)


def gather(bundle_path: str | Path) -> Evidence:
    evidence = Evidence()
    with open_bundle(bundle_path) as bundle:
        for name in sorted(n for n in bundle.names if n.startswith("records/") and n.endswith(".jsonl")):
            for line in bundle.read(name).splitlines():
                if line:
                    evidence.take(json.loads(line))
    return evidence


# --- HTML ----------------------------------------------------------------------------------

def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(headers: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    rows = list(rows)
    if not rows:
        return '<p class="none">None in this bundle.</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _counts(counter: Counter[str]) -> str:
    return _table(("", "records"), sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))


def _section(ident: str, title: str, control: str, evidence: str, cannot: str) -> str:
    return (f'<section id="req-{_e(ident)}"><h2>{_e(ident)} — {_e(title)}</h2>'
            f'<p class="control"><b>Control.</b> {control}</p>'
            f'<div class="evidence"><h3>Evidence from this bundle</h3>{evidence}</div>'
            f'<p class="cannot"><b>What this bundle cannot show.</b> {cannot}</p></section>')


CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:60em;color:#111;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.2em;border-bottom:2px solid #333;margin-top:2em}
h3{font-size:1em;margin:.8em 0 .3em} table{border-collapse:collapse;width:100%;margin:.4em 0}
th,td{border:1px solid #bbb;padding:.25em .5em;text-align:left;vertical-align:top;font-size:.92em}
th{background:#eee} .ok{color:#075e0b;font-weight:bold} .bad{color:#a00;font-weight:bold}
.cannot{background:#fff6e0;border-left:4px solid #d89b00;padding:.4em .7em}
.control{color:#333} .none{color:#666;font-style:italic} code{font-size:.92em}
section{page-break-inside:avoid} nav li{display:inline;margin-right:1em}
@media print{nav{display:none} body{margin:0;max-width:none} h2{page-break-after:avoid}}
"""


def render(report: Report, evidence: Evidence, bundle_name: str) -> str:
    ev = evidence
    verified = ('<span class="ok">verified: everything holds</span>' if report.ok else
                f'<span class="bad">FAILED verification: {report.failure_count} problem(s)</span>')
    sections = [
        _section("3.4.1", "PAN masked when displayed",
                 "Card numbers leaving the database through Tollgate are masked before the agent sees them "
                 "(first six and last four at most); the audit log keeps a sample of each result as the agent "
                 "saw it.",
                 f"<p>{ev.masked_values} card number(s) masked in {ev.types['result']} recorded result(s).</p>"
                 + _table(("time", "user", "session", "columns", "rows as the agent saw them"),
                          ((r.get("time"), r.get("user"), r.get("session"),
                            ", ".join(map(str, r["sample"].get("columns", []))),
                            "; ".join(" | ".join(map(str, row)) for row in r["sample"].get("rows", [])[:3]))
                           for r in ev.masked_samples)),
                 "Masking on paths that bypass Tollgate (direct database access, backups, other applications), "
                 "and the rows of results beyond each sample."),
        _section("3.5.1", "PAN unreadable wherever stored (the audit log)",
                 "Every record is scrubbed of card numbers before it is written; the verifier scans every "
                 "record of the bundle for a clear PAN (Luhn-valid digits in any field).",
                 f"<p>{report.records_valid} of {report.records_total} record(s) valid; clear PANs found: "
                 f"{sum(1 for f in report.failures if f.kind == 'pan') + report.suppressed.get('pan', 0)}.</p>",
                 "Storage outside the audit log (the database itself, its backups, the agents' own copies)."),
        _section("7.2", "Access by need to know, enforced by policy",
                 "Each statement is classified and decided against the policy in force (allow, mask, hold, "
                 "block); the policy file's SHA-256 is recorded at start and at every reload.",
                 "<h3>Decisions</h3>" + _counts(ev.decisions) + "<h3>Rules applied</h3>" + _counts(ev.rules)
                 + "<h3>Statements blocked (sample)</h3>"
                 + _table(("time", "user", "rule", "statement"),
                          ((r.get("time"), r.get("user"), r.get("rule"), str(r.get("text"))[:160])
                           for r in ev.blocked)),
                 "Whether the policy itself grants only what each role needs: that is a judgement on its "
                 "rules, which the bundle identifies (by digest) but does not contain."),
        _section("8.2.1", "Unique identification of users and agents",
                 "Agents authenticate with short-lived client certificates (or legacy sources mapped to an "
                 "identity); every session record names the identity, its groups and certificate serial.",
                 f"<p>{len(ev.identities)} distinct identit(ies); {ev.unidentified_sessions} session(s) "
                 "without an identity.</p>"
                 + _table(("identity", "sessions", "groups", "certificate serials", "source"),
                          ((u, d["sessions"], ", ".join(sorted(d["groups"])), ", ".join(sorted(d["serials"]))[:120],
                            d["source"] or "-") for u, d in sorted(ev.identities.items()))),
                 "That each identity is held by one person or one agent (a shared OIDC account would look "
                 "like one user); identities of people using the database directly."),
        _section("10.2.1", "Audit logs capture the events of 10.2.1.1–10.2.1.7",
                 "One record per event, written before the statement reaches the database (fail closed).",
                 _table(("requirement", "records in this bundle"), (
                     ("10.2.1.1 individual access to cardholder data (statements, results)",
                      ev.types["statement"] + ev.types["result"]),
                     ("10.2.1.2 actions by administrators (admin, policy, keys, approvals)",
                      sum(ev.admin.values()) + len(ev.policy_reloads) + len(ev.key_events) + len(ev.approvals)),
                     ("10.2.1.3 access to audit logs (exports, verifications)",
                      ev.admin["audit.export"] + ev.admin["audit.verify"] + ev.admin["audit.review"]),
                     ("10.2.1.4 invalid logical access attempts", len(ev.auth_failures)),
                     ("10.2.1.5 changes to identification (certificates issued, revoked)", len(ev.certificates)),
                     ("10.2.1.6 audit log started, stopped", len(ev.log_runs)),
                     ("10.2.1.7 system-level objects created or deleted (DDL)", len(ev.ddl))))
                 + "<h3>Administrative actions</h3>" + _counts(ev.admin)
                 + "<h3>Certificates</h3>"
                 + _table(("time", "action", "by", "object", "subject / reason"),
                          ((r.get("time"), r.get("action"), r.get("user"), r.get("object"),
                            r.get("subject") or r.get("reason") or "") for r in ev.certificates[:20]))
                 + "<h3>Invalid access attempts</h3>"
                 + _table(("time", "type", "user", "origin", "reason"),
                          ((r.get("time"), r.get("type"), r.get("user"), r.get("origin"), r.get("reason"))
                           for r in ev.auth_failures[:20])),
                 "Events outside Tollgate (operating-system logins, direct database sessions); a bundle filtered "
                 "by time or session holds only that part of the log (its other records are proved by hash)."),
        _section("10.2.2", "Each record holds user, type, time, outcome, origin, object",
                 "The writer refuses records without these fields; the verifier checks every record.",
                 f"<p>{ev.records} record(s); {ev.missing_fields} without all six fields.</p>",
                 "Whether the origin recorded (an address) is the person's own machine."),
        _section("10.3", "Audit logs protected from change (10.3.1–10.3.4)",
                 "Records are leaves of a Merkle tree; checkpoints are signed with Ed25519 keys certified by "
                 "the root key you pinned, copied off the box and (when configured) cosigned by witnesses.",
                 f"<p>Bundle <code>{_e(bundle_name)}</code>: {verified}.</p>"
                 + _table(("check", "valid", "total"), (
                     ("checkpoints", report.checkpoints_valid, report.checkpoints_total),
                     ("records", report.records_valid, report.records_total),
                     ("files", report.files_valid, report.files_total),
                     ("proofs of records left out", report.proofs_valid, report.proofs_total),
                     ("off-box checkpoint copies", report.offbox_valid, report.offbox_total)))
                 + f"<p>Log origin <code>{_e(report.origin)}</code>, size {_e(report.log_size)}, manifest signed "
                   f"by <code>{_e(report.manifest_key)}</code>; witnesses: quorum {report.witness_quorum}, "
                   f"witnessed up to size {_e(report.witnessed_size)}.</p>"
                 + _table(("key event", "time", "key"), ((r.get("type"), r.get("time"), r.get("key"))
                                                         for r in ev.key_events)),
                 "A tail cut after the bundle's last checkpoint, unless off-box copies or witnesses newer than "
                 "it were given to the verifier (--offbox, --witness-checkpoint)."),
        _section("10.4.1.1", "Automated review of audit logs",
                 "<code>tollgate audit review</code> runs on a timer: it verifies the log, then reports blocked "
                 "statements, denied and timed-out approvals, failed authentications, fail-closed events, PANs "
                 "in records, unmatched flows and heartbeat gaps, and records a signed review.",
                 f"<p>{len(ev.reviews)} review(s) recorded.</p>"
                 + _table(("time", "by", "records", "verified", "findings"),
                          ((r.get("time"), r.get("user"), f"{r.get('from_seq')}–{r.get('to_seq')}",
                            r.get("verified"), json.dumps(r.get("counts", {}), sort_keys=True))
                           for r in ev.reviews[-20:])),
                 "That someone acted on the findings (the review's alerts go to a webhook or syslog)."),
        _section("10.5.1", "Audit log history retained for 12 months, 3 online",
                 "Closed months are sealed into verified bundles kept retain_months; the online log keeps "
                 "online_months; <code>tollgate-verify --chain</code> checks the archive for gaps.",
                 f"<p>Records in this bundle span {_e(ev.first_time)} to {_e(ev.last_time)}.</p>"
                 + _table(("time", "months sealed", "expired", "pruned through seq"),
                          ((r.get("time"), r.get("sealed"), r.get("expired"), r.get("pruned_through", "-"))
                           for r in ev.retention)),
                 "The archive itself: give the verifier the archive directory (--chain) to show twelve months "
                 "are there and chain."),
        _section("10.7", "Failures of critical security controls detected and reported",
                 "The writer records its own failures (audit.failure, audit.unrecorded) and refuses statements "
                 "it can't record; an addon failure ends the session (fail closed) and is recorded; the flow "
                 "ledger records flows no session matches; a dropped SIEM backlog is recorded.",
                 _table(("time", "type", "what"), ((r.get("time"), r.get("type") if r.get("type") != "admin"
                                                    else r.get("action"),
                                                    r.get("error") or r.get("reason") or r.get("object"))
                                                   for r in ev.failures[:30])),
                 "Failures that stopped the appliance before it could write (see the log.start records after a "
                 "crash: what recovery cut) and controls outside Tollgate."),
        _section("change approval", "Changes approved before they run (holds) and policy changes",
                 "Statements the policy holds wait for approvers from the configured groups; each decision "
                 "names the approvers and their reasons. Policy reloads are recorded with the file's digest.",
                 "<h3>Approvals</h3>"
                 + _table(("time", "approval", "decision", "approver", "reason", "votes"),
                          ((r.get("time"), r.get("approval"), r.get("decision"), r.get("approver"), r.get("reason"),
                            "; ".join(f"{v.get('approver')}: {v.get('verdict')} ({v.get('reason')})"
                                      for v in r.get("votes") or [])) for r in ev.approvals[:30]))
                 + "<h3>Policy in force and reloads</h3>"
                 + _table(("time", "outcome", "file", "sha256", "error"),
                          ((r.get("time"), r.get("outcome"), r.get("file"), r.get("sha256"), r.get("error") or "")
                           for r in ev.policy_reloads[:30])),
                 "Who edited the policy file (the file's history lives in its repository); changes made "
                 "without Tollgate."),
    ]
    nav = "".join(f'<li><a href="#req-{_e(s)}">{_e(s)}</a></li>' for s in
                  ("3.4.1", "3.5.1", "7.2", "8.2.1", "10.2.1", "10.2.2", "10.3", "10.4.1.1", "10.5.1", "10.7",
                   "change approval"))
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>PCI DSS evidence — '
            f'{_e(report.origin)}</title><style>{CSS}</style></head><body>'
            f'<h1>PCI DSS evidence report</h1><p>Log <code>{_e(report.origin)}</code>, bundle '
            f'<code>{_e(bundle_name)}</code>, {ev.records} record(s) from {_e(ev.first_time)} to '
            f'{_e(ev.last_time)}: {verified}.</p><p>Made by <code>tollgate-verify --report</code> from the bundle '
            'alone: regenerate it with the same command and your pinned root key.</p>'
            f'<nav><ul>{nav}</ul></nav>{"".join(sections)}</body></html>\n')


def write_report(path: str | Path, report: Report, bundle: str | Path) -> None:
    Path(path).write_text(render(report, gather(bundle), Path(bundle).name), "utf-8")
