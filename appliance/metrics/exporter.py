"""The proxy's Prometheus metrics, counted from what the audit log records.

Every event worth counting (a session, a statement and its decision, a hold, a masked
value, a failure, a certificate, a flow) is already an audit record, so the metrics are
counted from the records as the log appends them (:meth:`Metrics.recorded`): one source
of truth, no second set of hooks in the data path, and nothing counted that the log did
not take. The cost on the hot path is a dict lookup and a counter increment per record
(under the log's lock, so no extra locking); nothing is allocated per statement beyond
the label lookup, which prometheus-client caches per label value.

The log's own timings come from the writer: how long an append holds the lock
(:meth:`appended`), how long each ``fdatasync`` takes and how many records it made
durable at once — the group-commit size (:meth:`synced`).

Holds pending and the age of the oldest are computed at scrape time from the
``approval.request`` and ``approval.decision`` records seen since the proxy started.

The endpoint (:func:`serve_metrics`) is prometheus-client's own HTTP server on its own
thread, never the event loop: a slow scraper can't hold a session up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("tollgate.metrics")

# Latencies of an append (microseconds normally) and an fdatasync (a millisecond or more).
APPEND_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 0.025, 0.1)
FSYNC_BUCKETS = (1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)
# How the proxy words an addon's failure that refused a statement or ended a session.
FAILED_CLOSED = "failed closed"
GROUP_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)

# Record types that are failures, by kind (the label of tollgate_failures_total).
_FAILURE_KINDS = {
    "auth.failure": "authentication",
    "session.refused": "session_refused",
    "audit.failure": "audit_log",
    "audit.unrecorded": "audit_unrecorded",
    "flow.unmatched": "flow_unmatched",
    "flow.overflow": "flow_overflow",
}


class _Holds(Collector):
    """Holds waiting for a decision now, and how long the oldest has waited."""

    def __init__(self, pending: dict[str, float]) -> None:
        self._pending = pending

    def collect(self) -> Iterator[GaugeMetricFamily]:
        pending = list(self._pending.values())  # a copy: the log's thread may change it meanwhile
        yield GaugeMetricFamily("tollgate_holds_pending", "Held statements waiting for a decision", len(pending))
        age = time.monotonic() - min(pending) if pending else 0.0
        yield GaugeMetricFamily("tollgate_holds_oldest_age_seconds",
                                "How long the oldest pending hold has waited (0 when none)", age)


class Metrics:
    """The counters, histograms and gauges, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.sessions = Counter("tollgate_sessions", "Agent sessions started", registry=r)
        # Sessions by id, so an end whose start came before the metrics (a restart) counts nothing.
        self._open: set[str] = set()
        self.sessions_open = Gauge("tollgate_sessions_open", "Agent sessions open now", registry=r)
        self.sessions_open.set_function(lambda: len(self._open))
        self.statements = Counter("tollgate_statements", "Statements, by the policy's decision",
                                  ["decision"], registry=r)
        self.masked = Counter("tollgate_masked_values", "Card numbers masked in results", registry=r)
        self.holds = Counter("tollgate_holds", "Statements held for approval", registry=r)
        self.hold_decisions = Counter("tollgate_hold_decisions", "Holds decided, by decision",
                                      ["decision"], registry=r)
        self.failures = Counter("tollgate_failures", "Failures, by kind", ["kind"], registry=r)
        self.policy_reloads = Counter("tollgate_policy_reloads", "Policy reloads, by outcome", ["outcome"],
                                      registry=r)
        self.certificates = Counter("tollgate_certificates", "Client certificates issued and revoked",
                                    ["event"], registry=r)
        self.admin = Counter("tollgate_admin_actions", "Administrative actions recorded", ["action"], registry=r)
        self.flows = Counter("tollgate_flows", "Flows the eBPF ledger recorded, by verdict", ["verdict"],
                             registry=r)
        self.records = Counter("tollgate_audit_records", "Records appended to the audit log", registry=r)
        self.append_seconds = Histogram("tollgate_audit_append_seconds", "Time to append one audit record",
                                        buckets=APPEND_BUCKETS, registry=r)
        self.fsync_seconds = Histogram("tollgate_audit_fsync_seconds", "Time of one fdatasync of the audit log",
                                       buckets=FSYNC_BUCKETS, registry=r)
        self.group_commit = Histogram("tollgate_audit_group_commit_records",
                                      "Records one fdatasync made durable (group commit size)",
                                      buckets=GROUP_BUCKETS, registry=r)
        self._pending: dict[str, float] = {}
        r.register(_Holds(self._pending))
        self._record_count = self.records.inc
        self._by_type = {
            "session.start": self._session_start,
            "session.end": self._session_end,
            "statement": self._statement,
            "result": self._result,
            "approval.request": self._hold,
            "approval.decision": self._hold_decided,
            "policy.reload": self._policy_reload,
            "admin": self._admin,
            "flow": self._flow,
        }

    # --- what the audit log tells us ----------------------------------------------------------

    def recorded(self, record: dict[str, Any]) -> None:
        """A record the log appended (called under its lock: counting only)."""
        self._record_count()
        kind = record.get("type")
        handler = self._by_type.get(kind)  # type: ignore[arg-type]
        if handler is not None:
            handler(record)
        failure = _FAILURE_KINDS.get(kind)  # type: ignore[arg-type]
        if failure is not None:
            self.failures.labels(failure).inc()

    def appended(self, seconds: float) -> None:
        self.append_seconds.observe(seconds)

    def synced(self, seconds: float, records: int) -> None:
        self.fsync_seconds.observe(seconds)
        if records > 0:
            self.group_commit.observe(records)

    # --- by record type -----------------------------------------------------------------------

    def _session_start(self, record: dict[str, Any]) -> None:
        self.sessions.inc()
        self._open.add(str(record.get("session")))

    def _session_end(self, record: dict[str, Any]) -> None:
        self._open.discard(str(record.get("session")))
        if FAILED_CLOSED in str(record.get("reason", "")):
            self.failures.labels("fail_closed").inc()

    def _statement(self, record: dict[str, Any]) -> None:
        self.statements.labels(record.get("decision", "unchecked")).inc()
        if record.get("outcome") == "failure" and FAILED_CLOSED in str(record.get("message", "")):
            self.failures.labels("fail_closed").inc()

    def _result(self, record: dict[str, Any]) -> None:
        masked = record.get("masked")
        if isinstance(masked, int) and masked > 0:
            self.masked.inc(masked)

    def _hold(self, record: dict[str, Any]) -> None:
        self.holds.inc()
        self._pending[str(record.get("approval"))] = time.monotonic()

    def _hold_decided(self, record: dict[str, Any]) -> None:
        self.hold_decisions.labels(str(record.get("decision"))).inc()
        self._pending.pop(str(record.get("approval")), None)

    def _policy_reload(self, record: dict[str, Any]) -> None:
        outcome = str(record.get("outcome"))
        self.policy_reloads.labels(outcome).inc()
        if outcome == "failure":
            self.failures.labels("policy_reload").inc()

    def _admin(self, record: dict[str, Any]) -> None:
        action = str(record.get("action"))
        self.admin.labels(action).inc()
        if action in ("certificate.issue", "certificate.issue-server"):
            self.certificates.labels("issued").inc()
        elif action == "certificate.revoke":
            self.certificates.labels("revoked").inc()
        elif action == "identity.revoke":
            serials = str(record.get("serials") or "")
            self.certificates.labels("revoked").inc(len([s for s in serials.split(",") if s]))

    def _flow(self, record: dict[str, Any]) -> None:
        self.flows.labels(str(record.get("verdict", "unknown"))).inc()


def serve_metrics(metrics: Metrics, listen: str) -> Any:
    """Serve ``/metrics`` on ``listen`` (``HOST:PORT``, ``[V6]:PORT``) from a thread; the server."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    server, _thread = start_http_server(int(port), addr=host, registry=metrics.registry)
    log.info("metrics on http://%s/metrics", listen)
    return server
