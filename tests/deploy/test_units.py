"""The systemd units: systemd-analyze finds nothing wrong with them, and each is within its
exposure target (`systemd-analyze security --offline`)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deploy.units import EXPOSURE_TARGETS, SYSTEMD_DIR, UNITS, analyzer, exposure, offline_exposure

pytestmark = pytest.mark.skipif(analyzer() is None, reason="systemd-analyze is not installed")


def test_units_verify_cleanly(tmp_path: Path) -> None:
    """verify loads each unit with the system's own units around it, in a root of its own
    where the commands the units run exist; any warning (an unknown key, a typo) fails."""
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    for unit in UNITS:
        shutil.copy(SYSTEMD_DIR / unit, root / "etc/systemd/system" / unit)
    for command in ("/opt/tollgate/bin/tollgate", "/bin/kill"):
        path = root / command.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        os.chmod(path, 0o755)
    result = subprocess.run([analyzer() or "", "verify", f"--root={root}", "--man=no", *UNITS],
                            capture_output=True, text=True, check=False, timeout=120)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_a_broken_unit_is_caught(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key is reported."""
    unit = tmp_path / "broken.service"
    unit.write_text("[Service]\nExecStart=/bin/true\nProtectSystm=strict\n")
    result = subprocess.run([analyzer() or "", "verify", "--man=no", str(unit)],
                            capture_output=True, text=True, check=False, timeout=120)
    assert "Unknown key" in result.stderr


@pytest.mark.parametrize("unit", sorted(EXPOSURE_TARGETS))
def test_exposure_within_target(unit: str) -> None:
    assert offline_exposure(SYSTEMD_DIR / unit) <= EXPOSURE_TARGETS[unit]


def test_exposure_parsing() -> None:
    assert exposure("...\n→ Overall exposure level for x.service: 1.7 OK 🙂\n") == 1.7
    with pytest.raises(AssertionError, match="no exposure level"):
        exposure("Failed to open unit")


def test_an_unhardened_unit_scores_worse(tmp_path: Path) -> None:
    unit = tmp_path / "plain.service"
    unit.write_text("[Service]\nExecStart=/bin/true\n")
    assert offline_exposure(unit) > max(EXPOSURE_TARGETS.values())
