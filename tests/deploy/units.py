"""The systemd units under systemd/ and their exposure targets: shared by the unit checks
and the booted-host test."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

SYSTEMD_DIR = Path(__file__).resolve().parents[2] / "systemd"
UNITS = ("tollgate-proxy.service", "tollgate-web.service", "tollgate-audit-verify.service",
         "tollgate-audit-verify.timer", "tollgate-audit-review.service", "tollgate-audit-review.timer",
         "tollgate-audit-retain.service", "tollgate-audit-retain.timer")
# Issue 17's targets for `systemd-analyze security` (lower is better; Debian 12's own
# hardened units score 1.2 to 4.3).
# The audit timers' services are held to the web services' target.
EXPOSURE_TARGETS = {"tollgate-proxy.service": 3.5, "tollgate-web.service": 2.5,
                    "tollgate-audit-verify.service": 2.5, "tollgate-audit-review.service": 2.5,
                    "tollgate-audit-retain.service": 2.5}
_OVERALL = re.compile(r"Overall exposure level for (\S+): (\d+\.\d+)")


def analyzer() -> str | None:
    return shutil.which("systemd-analyze")


def exposure(output: str) -> float:
    """The overall exposure in ``systemd-analyze security UNIT``'s output."""
    found = _OVERALL.search(output)
    if found is None:
        raise AssertionError(f"no exposure level in systemd-analyze's output:\n{output}")
    return float(found.group(2))


def offline_exposure(unit: Path) -> float:
    result = subprocess.run([analyzer() or "systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
                            capture_output=True, text=True, check=False, timeout=120)
    return exposure(result.stdout + result.stderr)
