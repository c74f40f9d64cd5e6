"""The bench harness's own behaviour: signals in forked children, and a case that fails."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from bench import CASES, Case, pgbench, report
from bench import __main__ as harness
from bench.report import CaseResult, PathResult


def test_the_signal_handler_raises_in_the_bench_process() -> None:
    with pytest.raises(harness.Interrupted, match="SIGTERM"):
        harness._on_signal(signal.SIGTERM, None)


def test_a_forked_child_that_gets_a_signal_exits_without_unwinding_the_parents_stack(tmp_path: Path) -> None:
    cleanup = tmp_path / "the parent's clean-up ran in the child"
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            try:
                harness._on_signal(signal.SIGTERM, None)
            finally:
                cleanup.touch()
        except BaseException:  # noqa: BLE001 - any unwinding is the failure this test looks for
            os._exit(99)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 128 + signal.SIGTERM
    assert not cleanup.exists()


def test_a_case_that_could_not_run_is_reported_as_failed_runs() -> None:
    case = next(iter(CASES.values()))
    failed = harness.failed_case(case, ["direct", "tollgate"], "FileNotFoundError: masked-1m.sql")
    assert all(not p.ok and p.error == "FileNotFoundError: masked-1m.sql" for p in failed.paths.values())
    table = report.render_table([failed])
    assert case.name in table


def _ran(tps: float) -> pgbench.PgbenchRun:
    out = (f"number of transactions actually processed: {int(tps * 10)}\nlatency average = 1.0 ms\n"
           f"tps = {tps} (without initial connection time)\n")
    return pgbench.PgbenchRun(argv=[], returncode=0, wall_s=10.0, stdout=out, stderr="", result=pgbench.parse(out))


def _result(case: Case, **tps: float) -> CaseResult:
    return CaseResult(case, {path: PathResult(path, runs=[_ran(value)], proxy_cpu_s=[None], proxy_peak_rss_kb=[None])
                             for path, value in tps.items()})


def test_each_layer_left_out_is_a_row_of_the_settings_table_in_order() -> None:
    names = ("c8-simple", "c8-simple-audit-write", "c8-simple-audit-off", "c8-simple-no-masking",
             "c8-simple-core-only")
    results = [_result(CASES["c8-simple"], direct=1000.0, tollgate=100.0),
               *(_result(CASES[n], tollgate=tps) for n, tps in zip(names[1:], (200.0, 400.0, 500.0, 800.0),
                                                                       strict=True))]
    rows = report.audit_rows(list(reversed(results)))
    assert [(r.audit, r.ratio_to_direct) for r in rows] == [
        ("fsync", 0.1), ("write", 0.2), ("off", 0.4), ("off, no masking", 0.5), ("off, no masking, no policy", 0.8)]
