"""bench/audit_writer.py measures what it says: every statement's two records reach the one log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.audit.reader import AuditReader
from bench.audit_writer import measure


def test_the_writer_bench_puts_every_record_in_the_log_and_reports_per_record_cost(tmp_path: Path):
    result = measure(200, 4, tmp_path)
    assert (result["statements"], result["records"]) == (200, 400)
    records = [json.loads(e.line) for e in AuditReader(tmp_path / "audit").records()]
    mine = [r for r in records if r.get("object") == "payments/pgbench_accounts"]
    assert len(mine) == 400 and {r["type"] for r in mine} == {"statement", "result"}
    assert result["loop_cpu_us_per_statement"] == pytest.approx(2 * result["loop_cpu_us_per_record"])
    assert result["loop_cpu_us_per_record"] > 0
