"""Fixtures for the lab's own tests: a shared lab (no proxy) and the preconditions to run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.lab import Lab


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
