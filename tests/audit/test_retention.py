"""Retention across months with a clock the test controls: closed months are sealed into
bundles that verify as a chain, the online log loses only what is sealed (and keeps
verifying), old bundles expire, and a missing or altered sealed bundle is found."""

from __future__ import annotations

import itertools
import json
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from appliance.audit import store, store_checkpoints
from appliance.audit.export import export
from appliance.audit.keys import init_audit_dir
from appliance.audit.reader import AuditReader
from appliance.audit.retention import RetentionError, add_months, retain, sealed_months
from appliance.audit.store import AuditLog
from appliance.audit.verifier import main as verifier_main
from appliance.audit.verifier import verify_bundle
from appliance.config import Config, load_config
from tests.audit.records import session_records


class Clock:
    """time as the audit writer and its checkpoints see it: real time moved to ``now``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.offset = 0.0

        class Shifted:
            def __getattr__(_, name: str) -> Any:
                return getattr(time, name)

            @staticmethod
            def time() -> float:
                return time.time() + self.offset

            @staticmethod
            def time_ns() -> int:
                return time.time_ns() + int(self.offset * 1e9)

        monkeypatch.setattr(store, "time", Shifted())
        monkeypatch.setattr(store_checkpoints, "time", Shifted())

    def set(self, when: datetime) -> datetime:
        self.offset = when.timestamp() - time.time()
        return when


def write_config(tmp_path: Path) -> Config:
    path = tmp_path / "tollgate.toml"
    path.write_text('[audit]\ndir = "audit"\norigin = "tollgate.test/retention"\nsegment_bytes = 4096\n'
                    'online_months = 1\nretain_months = 3\n')
    config = load_config(path)
    assert config.audit is not None
    init_audit_dir(config.audit)
    return config


def month_of_traffic(config: Config, sid: str) -> None:
    assert config.audit is not None
    log = AuditLog.open(config.audit, version="t")
    for record in session_records(sid, 12):
        log.append(record)
    log.close()


def chain_ok(archive: Path, root: Path) -> int:
    return verifier_main([str(archive), "--chain", "--root-key", str(root), "--quiet"])


def test_a_log_aged_across_retention_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    audit = config.audit
    assert audit is not None
    root = audit.keys_dir / "root.pub"
    clock = Clock(monkeypatch)
    sealed_ranges: dict[str, tuple[int, int]] = {}
    month = "2025-01"
    for _ in range(7):  # January to July 2025
        now = clock.set(datetime(int(month[:4]), int(month[5:7]), 15, 12, tzinfo=UTC))
        month_of_traffic(config, month)
        result = retain(config, now)
        for sealed in result.sealed:
            data = json.loads((audit.archive / f"{sealed}.seal.json").read_text())
            sealed_ranges[sealed] = (data["first_seq"], data["last_seq"])
        # sealed bundles verify as a chain (from February on, when January was sealed)
        assert chain_ok(audit.archive, root) == (0 if sealed_ranges else 1), capsys.readouterr().out
        # nothing left the online log that is not sealed
        pruned = AuditReader(audit.dir).pruned_size()
        covered = sorted(sealed_ranges.values())
        assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(covered))
        assert pruned == 0 or (covered[0][0] == 0 and pruned <= covered[-1][1] + 1)
        # months before the online window are off the box once sealed; the current one never is
        assert all(m < month for m in sealed_ranges)
        month = add_months(month, 1)

    # In July: January–June sealed; January–March expired (older than 3 months); the
    # online log starts in (or before) June.
    assert sorted(sealed_ranges) == ["2025-01", "2025-02", "2025-03", "2025-04", "2025-05", "2025-06"]
    assert sorted(sealed_months(audit.archive)) == ["2025-04", "2025-05", "2025-06"]
    pruned = AuditReader(audit.dir).pruned_size()
    assert sealed_ranges["2025-04"][1] < pruned <= sealed_ranges["2025-06"][0]
    assert min(s for s, _ in AuditReader(audit.dir).segments()) == pruned

    # The pruned log still exports and verifies whole, and reopens without state.json.
    (audit.dir / "state.json").unlink()
    AuditLog.open(audit, version="t").close()
    whole = tmp_path / "whole.tar.gz"
    export(config, whole)
    report = verify_bundle(whole, root.read_text().strip())
    assert report.ok, report.summary()
    assert report.left_out >= pruned

    # A missing or altered sealed bundle is detected.
    missing = tmp_path / "missing"
    shutil.copytree(audit.archive, missing, ignore=shutil.ignore_patterns(".partial"))
    (missing / "2025-05.tar.gz").unlink()
    capsys.readouterr()
    assert chain_ok(missing, root) == 1
    assert "are in no sealed bundle" in capsys.readouterr().out
    altered = tmp_path / "altered"
    shutil.copytree(audit.archive, altered, ignore=shutil.ignore_patterns(".partial"))
    data = bytearray((altered / "2025-05.tar.gz").read_bytes())
    data[len(data) // 2] ^= 0x01
    (altered / "2025-05.tar.gz").write_bytes(bytes(data))
    assert chain_ok(altered, root) == 1
    assert "2025-05.tar.gz: does not verify" in capsys.readouterr().out

    # An altered bundle in the archive itself: retention stops, nothing more leaves the log.
    (audit.archive / "2025-05.tar.gz").write_bytes(bytes(data))
    clock.set(datetime(2025, 8, 15, 12, tzinfo=UTC))
    month_of_traffic(config, "2025-08")
    with pytest.raises(RetentionError, match="do not verify as a chain"):
        retain(config, datetime(2025, 8, 15, 12, tzinfo=UTC))
    assert AuditReader(audit.dir).pruned_size() == pruned
