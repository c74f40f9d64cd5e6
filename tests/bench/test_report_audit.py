"""The report's audit table and the issue's targets, from made-up pgbench results (no lab)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import CASES, report
from bench.audit_log import fdatasync_median
from bench.pgbench import PgbenchResult, PgbenchRun
from bench.report import CaseResult, PathResult


def _path(path: str, tps: float, clients: int, proxy_cpu_s: float | None = None) -> PathResult:
    result = PgbenchResult(tps=tps, tps_kind="without initial connection time", latency_avg_ms=clients / tps * 1000,
                           transactions=int(tps * 10), clients=clients)
    run = PgbenchRun(argv=[], returncode=0, wall_s=10.0, stdout="", stderr="", result=result)
    return PathResult(path, runs=[run], proxy_cpu_s=[proxy_cpu_s], proxy_peak_rss_kb=[None])


def _case(name: str, **paths: tuple[float, float | None]) -> CaseResult:
    case = CASES[name]
    return CaseResult(case, {p: _path(p, tps, case.clients, cpu) for p, (tps, cpu) in paths.items()})


@pytest.fixture
def results() -> list[CaseResult]:
    return [
        _case("c8-simple", direct=(20_000, None), pgbouncer=(15_000, 0.3), tollgate=(4_000, 1.0)),
        _case("c1-simple", direct=(5_000, None), pgbouncer=(4_000, 0.2), tollgate=(1_000, 0.5)),  # 200 / 250 / 1000 µs
        _case("c8-simple-audit-write", tollgate=(8_000, 1.2)),
        _case("c1-simple-audit-write", tollgate=(2_000, 0.4)),
        _case("c8-simple-audit-off", tollgate=(16_000, 1.6)),
        _case("c1-simple-audit-off", tollgate=(4_000, 0.3)),  # 250 µs
    ]


def test_each_case_with_variants_is_shown_under_every_audit_setting_against_its_direct_path(results):
    rows = report.audit_rows(results)
    assert [(r.case, r.audit) for r in rows] == [("c8-simple", "fsync"), ("c8-simple", "write"), ("c8-simple", "off"),
                                                 ("c1-simple", "fsync"), ("c1-simple", "write"), ("c1-simple", "off")]
    by = {(r.case, r.audit): r for r in rows}
    assert by["c8-simple", "off"].ratio_to_direct == pytest.approx(0.8)
    assert by["c8-simple", "fsync"].added_us is None  # eight clients: latency is queueing
    assert by["c1-simple", "fsync"].added_us == pytest.approx(800.0)
    assert by["c1-simple", "off"].added_us == pytest.approx(50.0)
    assert by["c8-simple", "off"].proxy_cpu_us_per_tx == pytest.approx(1.6e6 / 160_000)
    table = report.render_audit_table(rows)
    assert "c8-simple" in table and "+800.0" in table and table.count("c1-simple") == 1


def test_the_targets_say_what_was_met_with_the_bound_from_the_same_run(results):
    found = {t["target"].split(":")[0] + "/" + t["unit"]: t for t in report.targets(results, 300.0)}
    c8 = found["c8-simple/×direct"]
    assert (c8["value"], c8["bound"], c8["met"]) == (0.2, 0.75, False)
    off = found["c1-simple, audit off/µs"]
    assert (off["value"], off["bound"], off["met"]) == (50.0, 60.0, True)  # pgbouncer's +50 µs, + 10
    fsync = found["c1-simple, audit fsync/µs"]
    assert (fsync["value"], fsync["bound"], fsync["met"]) == (800.0, 350.0, False)  # fdatasync 300 + 50
    cpu = found["c8-simple/µs"]
    assert cpu["value"] == pytest.approx(10.0) and cpu["bound"] == pytest.approx(2.0) and not cpu["met"]
    assert all(("NOT met" in line) != t["met"] for line, t in zip(report.target_lines(list(found.values())),
                                                                  found.values(), strict=True))


def test_without_an_fdatasync_figure_the_fsync_target_is_left_out(results):
    assert not any("fsync" in t["target"] for t in report.targets(results, None))


def test_fdatasync_median_measures_the_directory_given_and_leaves_nothing(tmp_path: Path):
    figures = fdatasync_median(tmp_path, count=5)
    assert figures["count"] == 5 and figures["dir"] == str(tmp_path)
    assert 0 < figures["median_us"] <= figures["p90_us"]
    assert list(tmp_path.iterdir()) == []
