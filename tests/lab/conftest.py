"""Fixtures for the lab's own tests: a shared lab (no proxy) and the preconditions to run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterator

import pytest

from appliance.lab import Lab, gc
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


@pytest.fixture(scope="module")
def lab(lab_host: None) -> Iterator[Lab]:
    with Lab.create(owner_pid=os.getpid(), proxy=False) as lab:
        yield lab


def lab_leftovers(lab: Lab) -> list[str]:
    """Anything of ``lab`` that still exists on the host."""
    left = [f"namespace {ns}" for ns in lab.namespaces.values() if Path("/run/netns", ns).exists()]
    if lab.dir.exists():
        left.append(f"directory {lab.dir}")
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if str(lab.dir).encode() in cmdline:
                command = cmdline.replace(b"\0", b" ").decode(errors="replace")
                left.append(f"process {proc.name}: {command}")
    return left
