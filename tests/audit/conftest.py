"""Fixtures more than one audit test module uses."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.audit.synthetic_log import Log, make_log


@pytest.fixture(scope="session")
def log() -> Log:
    """The synthetic signed log of tests/audit/synthetic_log.py, made once: read it, never change it."""
    return make_log()


@pytest.fixture
def tiny_fs() -> Iterator[Path]:
    """A 256 KiB tmpfs, unmounted afterwards: a file system the test can fill."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where = Path(tempfile.mkdtemp(prefix="tollgate-full-"))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(where)],
                          check=False, capture_output=True, text=True)
    if done.returncode != 0:
        where.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        where.rmdir()


def fill(path: Path) -> None:
    """Write ``path`` until its file system is full."""
    def write_forever(fd: int) -> None:
        while True:
            os.write(fd, b"\0" * 4096)

    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError, match="No space left on device"):
            write_forever(fd)
    finally:
        os.close(fd)
