"""Results: medians over repeats, comparisons, the printed table and the JSON file.

Per (case, path) the figures are medians over the successful repeats, each metric on its
own. "Added latency per statement" is computed from ``clients / TPS`` (pgbench's own
latency average, at a resolution it does not print) — for a one-client select-only case
one transaction is one statement. "proxy CPU" is the user+system CPU time the proxy
process (pgbouncer or Tollgate) used during the run, per transaction.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import BASELINE, REFERENCE, Case
from bench.pgbench import PgbenchRun

SUBJECT = "tollgate"


def _median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


@dataclass
class PathResult:
    """Every repeat of one case on one path."""

    path: str
    runs: list[PgbenchRun] = field(default_factory=list)
    proxy_cpu_s: list[float | None] = field(default_factory=list)  # per run; None: no proxy on this path
    proxy_peak_rss_kb: list[int | None] = field(default_factory=list)  # per run, VmHWM since the run began
    # Tollgate only, per run: CPU seconds of the primary's event loop, the whole primary,
    # and its workers (see bench.__main__.cpu_parts_s).
    proxy_cpu_parts: list[dict[str, float] | None] = field(default_factory=list)

    @property
    def ok_runs(self) -> list[PgbenchRun]:
        return [r for r in self.runs if r.ok]

    @property
    def ok(self) -> bool:
        return bool(self.ok_runs)

    @property
    def error(self) -> str | None:
        errors = [r.error for r in self.runs if r.error]
        return errors[0] if errors else None

    @property
    def tps(self) -> float | None:
        return _median(r.result.tps for r in self.ok_runs)

    @property
    def latency_ms(self) -> float | None:
        return _median(r.result.latency_avg_ms for r in self.ok_runs)

    @property
    def latency_from_tps_ms(self) -> float | None:
        return _median(r.result.latency_from_tps_ms for r in self.ok_runs)

    @property
    def proxy_cpu_us_per_tx(self) -> float | None:
        per_tx = []
        for run, cpu in zip(self.runs, self.proxy_cpu_s, strict=True):
            if run.ok and cpu is not None and run.result.transactions:
                per_tx.append(cpu * 1e6 / run.result.transactions)
        return _median(per_tx)

    def cpu_part_us_per_tx(self, part: str) -> float | None:
        per_tx = []
        for run, parts in zip(self.runs, self.proxy_cpu_parts, strict=False):
            if run.ok and parts is not None and run.result.transactions:
                per_tx.append(parts[part] * 1e6 / run.result.transactions)
        return _median(per_tx)

    @property
    def proxy_peak_rss_mb(self) -> float | None:
        values = [v for v in self.proxy_peak_rss_kb if v is not None]
        return max(values) / 1024 if values else None

    def summary(self) -> dict[str, Any]:
        return {"ok": self.ok, "repeats": len(self.runs), "ok_repeats": len(self.ok_runs), "error": self.error,
                "tps": self.tps, "latency_ms": self.latency_ms, "latency_from_tps_ms": self.latency_from_tps_ms,
                "proxy_cpu_us_per_tx": self.proxy_cpu_us_per_tx, "proxy_peak_rss_mb": self.proxy_peak_rss_mb,
                "proxy_cpu_parts_us_per_tx": {part: self.cpu_part_us_per_tx(part)
                                              for part in ("primary_loop", "primary", "workers")},
                "tps_all": [r.result.tps for r in self.ok_runs]}


@dataclass
class CaseResult:
    case: Case
    paths: dict[str, PathResult] = field(default_factory=dict)

    def ratio(self, path: str, to: str = BASELINE) -> float | None:
        a, b = self.paths.get(path), self.paths.get(to)
        if not a or not b or a.tps is None or not b.tps:
            return None
        return a.tps / b.tps

    def added_us(self, path: str, to: str = BASELINE) -> float | None:
        """Latency per statement ``path`` adds over ``to`` (µs); per-statement cases only."""
        a, b = self.paths.get(path), self.paths.get(to)
        if not self.case.per_statement or not a or not b:
            return None
        if a.latency_from_tps_ms is None or b.latency_from_tps_ms is None:
            return None
        return (a.latency_from_tps_ms - b.latency_from_tps_ms) * 1000.0

    def comparison(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            path: {"tps_ratio_to_direct": self.ratio(path), "added_us_per_statement_vs_direct": self.added_us(path)}
            for path in self.paths
        }
        out[f"{SUBJECT}_vs_{REFERENCE}"] = {"tps_ratio": self.ratio(SUBJECT, REFERENCE),
                                            "added_us_per_statement": self.added_us(SUBJECT, REFERENCE)}
        return out


# --- the table -------------------------------------------------------------------------

def _fmt(value: float | None, spec: str, *, signed: bool = False) -> str:
    if value is None:
        return "—"
    return format(value, ("+" if signed else "") + spec)


def render_table(results: Sequence[CaseResult]) -> str:
    headers = ("case", "path", "TPS", "lat ms", "× direct", "+µs/stmt", "proxy CPU µs/tx", "proxy peak MB")
    rows: list[tuple[str, ...]] = []
    for cr in results:
        for i, (path, pr) in enumerate(cr.paths.items()):
            name = cr.case.name if i == 0 else ""
            if not pr.ok:
                rows.append((name, path, "FAILED", (pr.error or "")[:60], "", "", "", ""))
                continue
            added = None if path == BASELINE else cr.added_us(path)
            rows.append((name, path, _fmt(pr.tps, ",.0f"), _fmt(pr.latency_ms, ".3f"), _fmt(cr.ratio(path), ".2f"),
                         _fmt(added, ".1f", signed=True) if cr.case.per_statement and path != BASELINE else "",
                         _fmt(pr.proxy_cpu_us_per_tx, ".1f") if pr.proxy_cpu_s and pr.proxy_cpu_s[0] is not None
                         else "",
                         _fmt(pr.proxy_peak_rss_mb, ".0f") if pr.proxy_peak_rss_mb is not None else ""))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    numeric = {2, 3, 4, 5, 6, 7}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in numeric and cells is not headers else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    out = [line(headers), line(tuple("-" * w for w in widths))]
    for i, r in enumerate(rows):
        if i and r[0]:
            out.append("")
        if r[2] == "FAILED":
            out.append("  ".join([r[0].ljust(widths[0]), r[1].ljust(widths[1]), "FAILED: " + r[3]]))
        else:
            out.append(line(r))
    return "\n".join(out)


def summary_line(results: Sequence[CaseResult]) -> str:
    """Tollgate vs pgbouncer across the cases that ran both."""
    parts, ratios = [], []
    for cr in results:
        ratio = cr.ratio(SUBJECT, REFERENCE)
        if ratio is None:
            continue
        ratios.append(ratio)
        added = cr.added_us(SUBJECT, REFERENCE)
        parts.append(f"{cr.case.name} ×{ratio:.2f}" + (f" ({added:+.1f} µs/stmt)" if added is not None else ""))
    if not parts:
        return f"{SUBJECT} vs {REFERENCE}: no case has results on both paths"
    geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    return (f"{SUBJECT} vs {REFERENCE} (TPS ratio; latency added per statement): " + ", ".join(parts)
            + f"; geometric mean TPS ×{geo:.2f}")


def derived_lines(results: Sequence[CaseResult]) -> list[str]:
    """What the table can't show: a case against another (holds pending vs none) and rows
    per second for the large-result cases."""
    by_name = {cr.case.name: cr for cr in results}
    out = []
    for cr in results:
        other = by_name.get(cr.case.compare_to or "")
        if other is not None:
            for path, pr in cr.paths.items():
                base = other.paths.get(path)
                if pr.tps and base is not None and base.tps:
                    out.append(f"{cr.case.name} on {path}: {pr.tps:,.0f} TPS = ×{pr.tps / base.tps:.2f} "
                               f"of {other.case.name} ({base.tps:,.0f} TPS)")
        if cr.case.rows_per_tx:
            parts = []
            for path, pr in cr.paths.items():
                if pr.tps:
                    rss = f", proxy peak RSS {pr.proxy_peak_rss_mb:.0f} MB" if pr.proxy_peak_rss_mb else ""
                    ratio = cr.ratio(path)
                    parts.append(f"{path} {pr.tps * cr.case.rows_per_tx:,.0f} rows/s"
                                 + (f" (×{ratio:.2f} of direct)" if ratio is not None and path != BASELINE else "")
                                 + rss)
            if parts:
                out.append(f"{cr.case.name}: " + "; ".join(parts))
        if cr.case.workers > 1:
            out += workers_lines(cr)
    return out


MODEL_CORES = (16, 64)


def scaling_model(serial_us: float, primary_other_us: float, worker_us: float, cores: int) -> tuple[float, str]:
    """Tollgate's throughput ceiling on ``cores`` cores of its own: the primary on one
    core (its event loop handles every audit record: the serial part; its sync and
    checkpoint threads share that core), ``cores - 1`` workers in parallel. TPS, and which
    bound it is."""
    workers = (cores - 1) * 1e6 / worker_us
    primary = 1e6 / (serial_us + primary_other_us)
    return (workers, "workers") if workers <= primary else (primary, "the primary (serial)")


def workers_lines(cr: CaseResult) -> list[str]:
    """The CPU per transaction of each part of a proxy with workers, and the model."""
    pr = cr.paths.get(SUBJECT)
    if pr is None or not pr.ok:
        return []
    loop = pr.cpu_part_us_per_tx("primary_loop")
    primary = pr.cpu_part_us_per_tx("primary")
    workers = pr.cpu_part_us_per_tx("workers")
    if loop is None or primary is None or not workers:
        return []
    other = max(0.0, primary - loop)
    out = [(f"{cr.case.name}: proxy CPU per transaction: primary event loop {loop:.1f} µs (serial: every audit "
           f"record passes through it), primary's other threads {other:.1f} µs, {cr.case.workers} workers "
           f"{workers:.1f} µs together")]
    model = []
    for cores in MODEL_CORES:
        tps, bound = scaling_model(loop, other, workers, cores)
        model.append(f"{cores} cores ≈ {tps:,.0f} TPS (bound: {bound})")
    out.append(f"{cr.case.name}: scaling model from these figures, Tollgate's own ceiling with the cores to "
               f"itself: " + "; ".join(model) + f"; the serial part alone allows {1e6 / (loop + other):,.0f} TPS")
    return out


# --- the audit log's settings side by side, and the targets ------------------------

AUDIT_ORDER = ("fsync", "write", "off")


@dataclass
class AuditRow:
    """One case through Tollgate under one setting of its layers (the audit log's, and
    without masking or policy), against the case's direct path."""

    case: str
    audit: str  # Case.setting: "fsync", "write", "off", "off, no masking", …
    tps: float | None
    ratio_to_direct: float | None
    added_us: float | None  # per statement vs direct; one-client cases only
    proxy_cpu_us_per_tx: float | None


def audit_rows(results: Sequence[CaseResult]) -> list[AuditRow]:
    """Each case that has variants (cases naming it in ``compare_to`` with another audit
    setting or layers left out), with them: shipped (fsync), write, off, then fewer layers —
    every figure against the base case's direct path, measured in the same run. Each step
    down the table is what one layer costs."""
    variants: dict[str, list[CaseResult]] = {}
    for cr in results:
        if cr.case.compare_to and cr.case.setting != "fsync":
            variants.setdefault(cr.case.compare_to, []).append(cr)
    rows = []
    for base in results:
        if base.case.name not in variants or base.case.setting != "fsync":
            continue
        direct = base.paths.get(BASELINE)
        group = sorted([base, *variants[base.case.name]],
                       key=lambda cr: (AUDIT_ORDER.index(cr.case.audit) if cr.case.audit in AUDIT_ORDER
                                       else len(AUDIT_ORDER), len(cr.case.without)))
        for cr in group:
            pr = cr.paths.get(SUBJECT)
            if pr is None or not pr.ok:
                rows.append(AuditRow(base.case.name, cr.case.setting, None, None, None, None))
                continue
            ratio = pr.tps / direct.tps if direct is not None and direct.tps and pr.tps is not None else None
            added = None
            if base.case.per_statement and direct is not None and direct.latency_from_tps_ms is not None \
                    and pr.latency_from_tps_ms is not None:
                added = (pr.latency_from_tps_ms - direct.latency_from_tps_ms) * 1000.0
            rows.append(AuditRow(base.case.name, cr.case.setting, pr.tps, ratio, added, pr.proxy_cpu_us_per_tx))
    return rows


def render_audit_table(rows: Sequence[AuditRow]) -> str:
    headers = ("case", "audit", "TPS", "× direct", "+µs/stmt", "proxy CPU µs/tx")
    cells = [(r.case, r.audit, _fmt(r.tps, ",.0f") if r.tps is not None else "FAILED", _fmt(r.ratio_to_direct, ".2f"),
              _fmt(r.added_us, ".1f", signed=True) if r.added_us is not None else "",
              _fmt(r.proxy_cpu_us_per_tx, ".1f")) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(row: Sequence[str], numeric: bool = True) -> str:
        return "  ".join(c.rjust(w) if numeric and i >= 2 else c.ljust(w)
                         for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()

    out = [line(headers, numeric=False), line(tuple("-" * w for w in widths), numeric=False)]
    previous = None
    for c in cells:
        out.append(line((c[0] if c[0] != previous else "", *c[1:])))
        previous = c[0]
    return "\n".join(out)


def targets(results: Sequence[CaseResult], fdatasync_median_us: float | None) -> list[dict[str, Any]]:
    """The issue's targets, each with the figure measured, its bound (from the same run)
    and whether it is met. Only those whose figures this run has."""
    by_name = {cr.case.name: cr for cr in results}
    rows = {(r.case, r.audit): r for r in audit_rows(results)}
    out: list[dict[str, Any]] = []

    def add(target: str, value: float | None, bound: float | None, unit: str) -> None:
        if value is not None and bound is not None:
            out.append({"target": target, "value": round(value, 3), "bound": round(bound, 3), "unit": unit,
                        "met": value >= bound if unit == "×direct" else value <= bound})

    for name in ("c8-simple", "c8-extended"):
        cr = by_name.get(name)
        if cr is not None:
            add(f"{name}: Tollgate's TPS ratio to direct ≥ pgbouncer's", cr.ratio(SUBJECT), cr.ratio(REFERENCE),
                "×direct")
    c1 = by_name.get("c1-simple")
    off = rows.get(("c1-simple", "off"))
    if c1 is not None:
        pgb = c1.added_us(REFERENCE)
        if off is not None:
            add("c1-simple, audit off: added µs/stmt ≤ pgbouncer's + 10", off.added_us,
                pgb + 10.0 if pgb is not None else None, "µs")
            add("c1-simple, audit fsync: added µs/stmt ≤ fdatasync median + the audit-off figure",
                c1.added_us(SUBJECT),
                fdatasync_median_us + off.added_us if fdatasync_median_us is not None and off.added_us is not None
                else None, "µs")
    c8 = by_name.get("c8-simple")
    c8_off = rows.get(("c8-simple", "off"))
    if c8 is not None and c8_off is not None and REFERENCE in c8.paths:
        add("c8-simple: proxy CPU µs/tx, audit off, ≤ pgbouncer's", c8_off.proxy_cpu_us_per_tx,
            c8.paths[REFERENCE].proxy_cpu_us_per_tx, "µs")
    return out


def target_lines(found: Sequence[dict[str, Any]]) -> list[str]:
    return [f"target: {t['target']}: {t['value']:,.2f} vs {t['bound']:,.2f} {t['unit']} — "
            f"{'met' if t['met'] else 'NOT met'}" for t in found]


def fdatasync_median_us(meta: dict[str, Any]) -> float | None:
    """The audit disk's fdatasync median measured before the cases (the header's figure)."""
    return ((meta.get("audit_disk") or {}).get("before") or {}).get("median_us")


def summary(results: Sequence[CaseResult], fdatasync_us: float | None = None) -> dict[str, Any]:
    ratios = [r for r in (cr.ratio(SUBJECT, REFERENCE) for cr in results) if r is not None]
    return {
        "line": summary_line(results),
        "derived": derived_lines(results),
        f"{SUBJECT}_vs_{REFERENCE}_tps_ratio_geomean":
            math.exp(sum(math.log(r) for r in ratios) / len(ratios)) if ratios else None,
        f"{SUBJECT}_vs_{REFERENCE}_added_us":
            {cr.case.name: cr.added_us(SUBJECT, REFERENCE) for cr in results if cr.case.per_statement},
        f"{SUBJECT}_vs_{BASELINE}_added_us":
            {cr.case.name: cr.added_us(SUBJECT, BASELINE) for cr in results if cr.case.per_statement},
        "audit": [dataclasses.asdict(r) for r in audit_rows(results)],
        "targets": targets(results, fdatasync_us),
    }


# --- JSON ------------------------------------------------------------------------------

def document(meta: dict[str, Any], results: Sequence[CaseResult], *, raw: bool = False) -> dict[str, Any]:
    return {
        **meta,
        "cases": [
            {
                "name": cr.case.name,
                "description": cr.case.description,
                "pgbench_args": list(cr.case.args),
                "per_statement": cr.case.per_statement,
                "script": cr.case.script,
                "conninfo_extra": dict(cr.case.conninfo),
                "paths": {
                    path: {**pr.summary(),
                           "runs": [{**run.to_dict(raw=raw), "proxy_cpu_s": cpu, "proxy_peak_rss_kb": rss}
                                    for run, cpu, rss in zip(pr.runs, pr.proxy_cpu_s, pr.proxy_peak_rss_kb,
                                                             strict=True)]}
                    for path, pr in cr.paths.items()
                },
                "comparison": cr.comparison(),
            }
            for cr in results
        ],
        "summary": summary(results, fdatasync_median_us(meta)),
    }


def timestamp(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")


def write_json(doc: dict[str, Any], directory: Path, stamp: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stamp}.json"
    n = 1
    while path.exists():
        n += 1
        path = directory / f"{stamp}-{n}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    tmp.rename(path)
    return path
