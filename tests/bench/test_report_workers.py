"""The report's workers lines and scaling model, from made-up figures (no lab)."""

from __future__ import annotations

import pytest

from bench import CASES, report
from bench.pgbench import PgbenchResult, PgbenchRun
from bench.report import CaseResult, PathResult


def _two_workers(tps: float, parts: dict[str, float]) -> CaseResult:
    result = PgbenchResult(tps=tps, tps_kind="without initial connection time", latency_avg_ms=32 / tps * 1000,
                           transactions=int(tps * 10), clients=32)
    run = PgbenchRun(argv=[], returncode=0, wall_s=10.0, stdout="", stderr="", result=result)
    path = PathResult("tollgate", runs=[run], proxy_cpu_s=[parts["primary"] + parts["workers"]],
                      proxy_peak_rss_kb=[None], proxy_cpu_parts=[parts])
    return CaseResult(CASES["c32-simple-2-workers"], {"tollgate": path})


def test_the_model_is_bound_by_the_workers_until_the_serial_part_takes_over():
    # 10 µs serial + 5 µs other primary threads per tx: the primary allows 66,667 TPS.
    assert report.scaling_model(10.0, 5.0, 300.0, 16) == (pytest.approx(50_000), "workers")
    tps, bound = report.scaling_model(10.0, 5.0, 300.0, 64)
    assert bound == "the primary (serial)" and tps == pytest.approx(1e6 / 15)


def test_the_workers_lines_give_each_part_per_transaction_and_both_core_counts():
    # 10,000 TPS for 10 s: 100,000 transactions; 1 s of the primary's loop = 10 µs per tx.
    lines = report.workers_lines(_two_workers(10_000, {"primary_loop": 1.0, "primary": 1.5, "workers": 30.0}))
    assert "primary event loop 10.0 µs" in lines[0] and "other threads 5.0 µs" in lines[0]
    assert "2 workers 300.0 µs together" in lines[0]
    assert "16 cores ≈ 50,000 TPS (bound: workers)" in lines[1]
    assert "64 cores ≈ 66,667 TPS (bound: the primary (serial))" in lines[1]
    assert lines == [line for line in report.derived_lines([_two_workers(10_000, {
        "primary_loop": 1.0, "primary": 1.5, "workers": 30.0})]) if "c32-simple-2-workers:" in line]
