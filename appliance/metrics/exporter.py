"""The proxy's Prometheus metrics, counted from what the audit log records.

Every event worth counting (a session, a statement and its decision, a hold, a masked
value, a failure, a certificate, a flow) is already an audit record, so the metrics are
counted from the records as the log appends them (:meth:`Metrics.recorded`): one source
of truth, no second set of hooks in the data path, and nothing counted that the log did
not take. The cost on the hot path is a dict lookup and a counter increment per record
(under the log's lock, so no lock of ours); the exposition's families are built only when
scraped.

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
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
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


class _Histogram:
    """Bucket counts kept as plain ints: observed under a lock the caller already holds
    (the log's), turned into the exposition's cumulative buckets only when scraped."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        counts, total = list(self.counts), self.sum  # a copy: the writer may go on meanwhile
        cumulative, buckets = 0, []
        for bound, count in zip((*self.bounds, float("inf")), counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=total)


class Metrics(Collector):
    """The proxy's metrics: plain counters the audit log's writer bumps, exposed at scrape time.

    Nothing here takes a lock of its own on the hot path: :meth:`recorded` and
    :meth:`appended` run under the log's lock, :meth:`synced` under its commit lock, and
    a scrape copies what it reads (a count a moment old is what a scrape is anyway)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.sessions = 0
        self._open: set[str] = set()  # by id: an end whose start came before us counts nothing
        self.statements: Counter[str] = Counter()
        self.masked = 0
        self.holds = 0
        self.hold_decisions: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.policy_reloads: Counter[str] = Counter()
        self.certificates: Counter[str] = Counter()
        self.admin: Counter[str] = Counter()
        self.flows: Counter[str] = Counter()
        self.records = 0
        self.append_seconds = _Histogram(APPEND_BUCKETS)
        self.fsync_seconds = _Histogram(FSYNC_BUCKETS)
        self.group_commit = _Histogram(GROUP_BUCKETS)
        self._pending: dict[str, float] = {}
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
        self.registry.register(self)

    # --- what the audit log tells us ----------------------------------------------------------

    def recorded(self, record: dict[str, Any]) -> None:
        """A record the log appended (called under its lock: counting only)."""
        self.records += 1
        kind = record.get("type")
        handler = self._by_type.get(kind)  # type: ignore[arg-type]
        if handler is not None:
            handler(record)
        failure = _FAILURE_KINDS.get(kind)  # type: ignore[arg-type]
        if failure is not None:
            self.failures[failure] += 1

    def appended(self, seconds: float) -> None:
        self.append_seconds.observe(seconds)

    def synced(self, seconds: float, records: int) -> None:
        self.fsync_seconds.observe(seconds)
        if records > 0:
            self.group_commit.observe(records)

    # --- by record type -----------------------------------------------------------------------

    def _session_start(self, record: dict[str, Any]) -> None:
        self.sessions += 1
        self._open.add(str(record.get("session")))

    def _session_end(self, record: dict[str, Any]) -> None:
        self._open.discard(str(record.get("session")))
        if FAILED_CLOSED in str(record.get("reason", "")):
            self.failures["fail_closed"] += 1

    def _statement(self, record: dict[str, Any]) -> None:
        self.statements[record.get("decision", "unchecked")] += 1
        if record.get("outcome") == "failure" and FAILED_CLOSED in str(record.get("message", "")):
            self.failures["fail_closed"] += 1

    def _result(self, record: dict[str, Any]) -> None:
        masked = record.get("masked")
        if isinstance(masked, int) and masked > 0:
            self.masked += masked

    def _hold(self, record: dict[str, Any]) -> None:
        self.holds += 1
        self._pending[str(record.get("approval"))] = time.monotonic()

    def _hold_decided(self, record: dict[str, Any]) -> None:
        self.hold_decisions[str(record.get("decision"))] += 1
        self._pending.pop(str(record.get("approval")), None)

    def _policy_reload(self, record: dict[str, Any]) -> None:
        outcome = str(record.get("outcome"))
        self.policy_reloads[outcome] += 1
        if outcome == "failure":
            self.failures["policy_reload"] += 1

    def _admin(self, record: dict[str, Any]) -> None:
        action = str(record.get("action"))
        self.admin[action] += 1
        if action in ("certificate.issue", "certificate.issue-server"):
            self.certificates["issued"] += 1
        elif action == "certificate.revoke":
            self.certificates["revoked"] += 1
        elif action == "identity.revoke":
            serials = str(record.get("serials") or "")
            self.certificates["revoked"] += len([s for s in serials.split(",") if s])

    def _flow(self, record: dict[str, Any]) -> None:
        self.flows[str(record.get("verdict", "unknown"))] += 1

    # --- the scrape ---------------------------------------------------------------------------

    def collect(self) -> Iterator[Any]:
        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        def by(name: str, doc: str, label: str, counts: Counter[str]) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=[label])
            for key, value in sorted(dict(counts).items()):
                family.add_metric([str(key)], value)
            return family

        yield counter("tollgate_sessions", "Agent sessions started", self.sessions)
        yield GaugeMetricFamily("tollgate_sessions_open", "Agent sessions open now", len(self._open))
        yield by("tollgate_statements", "Statements, by the policy's decision", "decision", self.statements)
        yield counter("tollgate_masked_values", "Card numbers masked in results", self.masked)
        yield counter("tollgate_holds", "Statements held for approval", self.holds)
        yield by("tollgate_hold_decisions", "Holds decided, by decision", "decision", self.hold_decisions)
        pending = list(self._pending.values())
        yield GaugeMetricFamily("tollgate_holds_pending", "Held statements waiting for a decision", len(pending))
        yield GaugeMetricFamily("tollgate_holds_oldest_age_seconds",
                                "How long the oldest pending hold has waited (0 when none)",
                                time.monotonic() - min(pending) if pending else 0.0)
        yield by("tollgate_failures", "Failures, by kind", "kind", self.failures)
        yield by("tollgate_policy_reloads", "Policy reloads, by outcome", "outcome", self.policy_reloads)
        yield by("tollgate_certificates", "Client certificates issued and revoked", "event", self.certificates)
        yield by("tollgate_admin_actions", "Administrative actions recorded", "action", self.admin)
        yield by("tollgate_flows", "Flows the eBPF ledger recorded, by verdict", "verdict", self.flows)
        yield counter("tollgate_audit_records", "Records appended to the audit log", self.records)
        yield self.append_seconds.family("tollgate_audit_append_seconds", "Time to append one audit record")
        yield self.fsync_seconds.family("tollgate_audit_fsync_seconds", "Time of one fdatasync of the audit log")
        yield self.group_commit.family("tollgate_audit_group_commit_records",
                                       "Records one fdatasync made durable (group commit size)")


def serve_metrics(metrics: Metrics, listen: str) -> Any:
    """Serve ``/metrics`` on ``listen`` (``HOST:PORT``, ``[V6]:PORT``) from a thread; the server."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    server, _thread = start_http_server(int(port), addr=host, registry=metrics.registry)
    log.info("metrics on http://%s/metrics", listen)
    return server
