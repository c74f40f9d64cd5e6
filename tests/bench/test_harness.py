"""The bench harness's own behaviour: signals in forked children, and a case that fails."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from bench import CASES, report
from bench import __main__ as harness


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
