"""Fixtures shared by the whole suite: whether this host can run a lab at all."""

from __future__ import annotations

import os
import shutil

import pytest

from appliance.lab import gc
from appliance.lab.database import PG_BIN


def lab_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces)"
    if not shutil.which("ip"):
        return "iproute2 `ip` is missing"
    if not (PG_BIN / "postgres").exists():
        return f"PostgreSQL 15 is missing ({PG_BIN}); run `make host-deps`"
    return None


@pytest.fixture(scope="session")
def lab_host() -> None:
    """Skip lab tests on a host that can't run a lab; collect labs of dead earlier runs."""
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    gc()


