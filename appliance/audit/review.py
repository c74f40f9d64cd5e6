"""``tollgate audit review``: the automated log review of PCI DSS 10.4.1.1.

1. **Verify**: the whole log is exported to a temporary bundle and verified as an auditor
   would (the pinned ``keys/root.pub``, the off-box checkpoint copies of ``offbox_dir``,
   the configured witnesses). A log that does not verify is itself a finding.
2. **Look for anomalies** in the records since the last review (the last ``review``
   record's ``to_seq``; the whole log the first time) and in the checkpoints signed since:

   ================== ===========================================================
   blocked_statement  a statement the policy blocked
   approval_denied    a hold denied by an approver
   approval_timeout   a hold nobody decided in time
   auth_failure       an agent's identity refused (``auth.failure``)
   session_refused    a session refused after authentication
   fail_closed        an addon failed and Tollgate failed closed; the audit log
                      failing (``audit.failure``) or missing records (``audit.unrecorded``)
   pan_in_record      a clear card number in a record (the scrubber missed one)
   unmatched_flow     a flow to a protected database no proxy session matches
                      (``flow.unmatched``, the eBPF ledger), or flows lost (``flow.overflow``)
   heartbeat_gap      more than ``heartbeat_gap`` seconds between two checkpoints while
                      the proxy was running (the idle heartbeat re-signs every
                      ``heartbeat_seconds``: a gap means the writer was stopped without a
                      ``log.stop``, hung, or the clock jumped)
   verification       the log did not verify
   ================== ===========================================================

3. **Record** a signed ``review`` record (through the proxy's control socket when it
   runs): the range reviewed, whether it verified, the findings by kind.
4. **Alert** when there are findings: a JSON POST to ``--alert-webhook`` (HMAC-SHA256 in
   ``X-Tollgate-Signature`` with the approvals webhook secret, when configured) and/or one
   syslog line (authpriv.warning) to ``--alert-syslog``.

Exit status: 0 nothing found; 3 findings (alerted); 1 the review itself failed.
A timer should run ``tollgate audit review -c /etc/tollgate/tollgate.toml`` daily (or
more often), with the alert options the site uses.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import socket
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.audit.reader import AuditReader, parse
from appliance.audit.verify_pan import find_clear_pans, line_may_hold_pan, redact_digits
from appliance.config import Config, ConfigError

log = logging.getLogger("tollgate.audit.review")

MAX_LISTED = 200  # findings listed in the record and the alert; the rest are counted
LOG_AUTHPRIV, LOG_WARNING = 10, 4
FAILED_CLOSED = b"failed closed"

# Records no finding can come from, recognised from their bytes without parsing.
_QUIET = (b'"type":"result"', b'"type":"session.start"', b'"type":"auth.success"', b'"type":"flow"',
          b'"type":"approval.request"', b'"type":"policy.reload"', b'"type":"admin"', b'"type":"key.')


@dataclass
class Finding:
    kind: str
    seq: int | None
    time: str | None
    summary: str

    def as_dict(self) -> dict[str, Any]:
        return _no_none({"kind": self.kind, "seq": self.seq, "time": self.time, "summary": self.summary})


@dataclass
class Review:
    from_seq: int
    to_seq: int = 0
    verified: bool = False
    verification: str = ""
    findings: list[Finding] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    record_seq: int | None = None

    def add(self, kind: str, seq: int | None, when: str | None, summary: str) -> None:
        self.counts[kind] += 1
        if len(self.findings) < MAX_LISTED:
            # Redacted: a summary quoting a record that holds a card number must not copy it on.
            self.findings.append(Finding(kind, seq, when, redact_digits(summary[:300])))

    @property
    def clean(self) -> bool:
        return self.verified and not self.counts

    def as_dict(self) -> dict[str, Any]:
        return {"from_seq": self.from_seq, "to_seq": self.to_seq, "verified": self.verified,
                "verification": self.verification, "findings": sum(self.counts.values()),
                "counts": dict(sorted(self.counts.items())), "listed": [f.as_dict() for f in self.findings],
                "record_seq": self.record_seq}


# --- the steps ------------------------------------------------------------------------------

def review(config: Config, *, heartbeat_gap: float | None = None, access: Any = None,
           alert_webhook: str | None = None, alert_syslog: str | None = None) -> Review:
    """Verify, look for anomalies since the last review, record the review, alert."""
    from appliance.audit.export import LogAccess, cli_identity
    audit = config.audit
    if audit is None:
        raise ConfigError(f"{config.path}: has no [audit] section")
    gap = heartbeat_gap if heartbeat_gap is not None else 3 * audit.heartbeat_seconds
    own = access is None
    access = access or LogAccess(config, version="review")
    try:
        reader = AuditReader(audit.dir)
        result = Review(from_seq=_last_reviewed(reader))
        _verify(config, access, result)
        result.to_seq = reader.size()
        _scan(reader, result, gap)
        user, origin = cli_identity()
        record = {"type": "review", "action": "audit.review", "user": user, "origin": origin,
                  "object": "audit-log", "outcome": "success" if result.clean else "failure",
                  "from_seq": result.from_seq, "to_seq": result.to_seq, "verified": result.verified,
                  "findings": sum(result.counts.values()), "counts": dict(sorted(result.counts.items())),
                  "listed": [f.as_dict() for f in result.findings[:20]]}
        result.record_seq = access.append_admin(_no_none(record))
    finally:
        if own:
            access.close("audit review done")
    if not result.clean:
        _alert(config, result, alert_webhook, alert_syslog)
    return result


def _last_reviewed(reader: AuditReader) -> int:
    """Where the last review stopped (its ``to_seq``), or 0."""
    last = 0
    marker = b'"type":"review"'
    for entry in reader.records():
        if marker in entry.line:
            to_seq = parse(entry.line).get("to_seq")
            if isinstance(to_seq, int):
                last = to_seq
    return last


def _verify(config: Config, access: Any, result: Review) -> None:
    from appliance.audit.export import ExportError, export
    from appliance.audit.verifier import verify_bundle
    audit = config.audit
    assert audit is not None
    root = (audit.keys_dir / "root.pub").read_text().strip()
    offbox = [audit.offbox_dir] if audit.offbox_dir is not None else []
    with tempfile.TemporaryDirectory(prefix="tollgate-review-") as tmp:
        bundle = Path(tmp) / "review.tar.gz"
        try:
            export(config, bundle, access=access)
        except ExportError as exc:
            result.verification = f"could not export the log to verify it: {exc}"
            result.add("verification", None, None, result.verification)
            return
        report = verify_bundle(bundle, root, offbox, workers=1,
                               witnesses=[w.key for w in audit.witnesses],
                               witness_quorum=audit.witness_quorum if audit.witnesses else None)
    result.verified = report.ok
    result.verification = report.summary().strip().splitlines()[-1]
    for failure in report.failures:
        result.add("verification", None, None, f"{failure.kind}: {failure}")
    for kind, n in report.suppressed.items():
        result.add("verification", None, None, f"{kind}: {n} more failures not listed")


def _scan(reader: AuditReader, result: Review, gap: float) -> None:
    runs: list[tuple[int, str]] = []  # (seq, "start" | "stop") of the writer's runs
    for entry in reader.records(result.from_seq, result.to_seq):
        line = entry.line
        if line_may_hold_pan(line):
            found = find_clear_pans(parse(line))
            if found:
                result.add("pan_in_record", entry.seq, _time(line), f"a clear card number at {found[0][0]}")
        if any(q in line for q in _QUIET):
            continue
        if b'"type":"statement"' in line and b'"decision":"block"' not in line and FAILED_CLOSED not in line:
            continue
        _classify(parse(line), entry.seq, result, runs)
    _heartbeats(reader, result, runs, gap)


def _classify(r: dict[str, Any], seq: int, result: Review, runs: list[tuple[int, str]]) -> None:
    kind, when = r.get("type"), r.get("time")
    who = f"{r.get('user')} from {r.get('origin')} on {r.get('object')}"
    if kind == "statement":
        if r.get("decision") == "block":
            result.add("blocked_statement", seq, when, f"{who}: rule {r.get('rule')}: {str(r.get('text'))[:120]}")
        if FAILED_CLOSED.decode() in str(r.get("message", "")):
            result.add("fail_closed", seq, when, f"{who}: {r.get('message')}")
    elif kind == "approval.decision":
        decision = r.get("decision")
        if decision in ("deny", "timeout"):
            result.add("approval_denied" if decision == "deny" else "approval_timeout", seq, when,
                       f"approval {r.get('approval')} for {who}: {decision} by {r.get('approver')}: "
                       f"{r.get('reason', '')}")
    elif kind == "auth.failure":
        result.add("auth_failure", seq, when, f"{who}: {r.get('reason')}")
    elif kind == "session.refused":
        result.add("session_refused", seq, when, f"{who}: {r.get('reason')}")
    elif kind == "session.end":
        if FAILED_CLOSED.decode() in str(r.get("reason", "")):
            result.add("fail_closed", seq, when, f"session {r.get('session')} of {who}: {r.get('reason')}")
    elif kind in ("audit.failure", "audit.unrecorded"):
        result.add("fail_closed", seq, when, f"{kind}: {r.get('error') or r.get('reason') or r.get('damage')}")
    elif kind in ("flow.unmatched", "flow.overflow"):
        result.add("unmatched_flow", seq, when, f"{kind}: {r.get('origin')} -> {r.get('object')}")
    elif kind == "log.start":
        runs.append((seq, "start"))
    elif kind == "log.stop":
        runs.append((seq, "stop"))


def _heartbeats(reader: AuditReader, result: Review, runs: list[tuple[int, str]], gap: float) -> None:
    """Gaps between consecutive checkpoints longer than ``gap`` while the writer ran."""
    checkpoints = [c for c in reader.checkpoints() if c.get("size", 0) >= result.from_seq]
    previous: tuple[int, float] | None = None
    for c in checkpoints:
        at = _unix(c.get("time"))
        if at is None:
            continue
        size = int(c["size"])
        if previous is not None and at - previous[1] > gap and not _stopped_at(runs, previous[0]):
            result.add("heartbeat_gap", None, c.get("time"),
                       f"{int(at - previous[1])} s without a checkpoint after tree size {previous[0]} "
                       f"(limit {int(gap)} s) and no log.stop before it")
        previous = (size, at)


def _stopped_at(runs: list[tuple[int, str]], size: int) -> bool:
    """Was the writer's last event before tree size ``size`` a ``log.stop``?"""
    state = None
    for seq, event in runs:
        if seq < size:
            state = event
    return state == "stop"


# --- alerts ---------------------------------------------------------------------------------

def _alert(config: Config, result: Review, webhook: str | None, syslog: str | None) -> None:
    counts = ", ".join(f"{k}={n}" for k, n in sorted(result.counts.items()))
    if webhook:
        body = json.dumps({"event": "audit.review", "origin": config.audit.origin if config.audit else None,
                           **result.as_dict()}).encode()
        request = urllib.request.Request(webhook, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        secret = config.approvals.webhook_secret_file
        if secret is not None:
            digest = hmac.new(secret.read_bytes().strip(), body, hashlib.sha256).hexdigest()
            request.add_header("X-Tollgate-Signature", f"sha256={digest}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                response.read()
        except OSError as exc:
            raise ReviewAlertError(f"the review found {counts} but the webhook {webhook} failed: {exc}") from None
    if syslog:
        message = (f"<{LOG_AUTHPRIV * 8 + LOG_WARNING}>{time.strftime('%b %e %H:%M:%S')} tollgate[{os.getpid()}]: "
                   f"tollgate-review findings {sum(result.counts.values())} ({counts}) records "
                   f"{result.from_seq}..{result.to_seq} review seq {result.record_seq}").encode()
        try:
            _send_syslog(syslog, message)
        except OSError as exc:
            raise ReviewAlertError(f"the review found {counts} but syslog {syslog} failed: {exc}") from None


class ReviewAlertError(Exception):
    """The review found something and could not say so."""


def _send_syslog(address: str, message: bytes) -> None:
    if address.startswith("unix:"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            sock.connect(address[len("unix:"):])
            sock.send(message)
    elif address.startswith("udp:"):
        host, _, port = address[len("udp:"):].rpartition(":")
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(message, (host.strip("[]"), int(port)))
    else:
        raise OSError(f"{address!r}: want unix:/PATH or udp:HOST:PORT")


# --- helpers --------------------------------------------------------------------------------

def _time(line: bytes) -> str | None:
    from appliance.audit.reader import record_time
    return record_time(line)


def _unix(stamp: Any) -> float | None:
    if not isinstance(stamp, str):
        return None
    try:
        return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def _no_none(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if v is not None}
