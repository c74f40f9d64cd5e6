"""The state stores' two backends for their tests: a SQLite file, or a fresh database on a
real PostgreSQL 15 the session starts once (the masking tests' throwaway cluster, a
second instance of it). The repository tests of the certificate registry and the
approvals store take ``state_where`` and run once on each."""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.masking.conftest import PG_BIN, START_SECONDS, Postgres, _as_owner, _start

Where = Callable[[str], "str | Path"]


@contextmanager
def running_postgres() -> Iterator[Postgres]:
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"PostgreSQL 15 is not installed ({PG_BIN})")
    owner = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
    user = "postgres" if owner is not None else pwd.getpwuid(os.geteuid()).pw_name
    root = Path(tempfile.mkdtemp(prefix="tollgate-state-pg-"))
    pg = Postgres(root, user, 0)
    data = root / "data"
    pg.socket_dir.mkdir()
    if owner is not None:
        os.chown(root, owner.pw_uid, owner.pw_gid)
        os.chown(pg.socket_dir, owner.pw_uid, owner.pw_gid)
    try:
        initdb = subprocess.run(_as_owner([str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                                           "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"], user),
                                capture_output=True, text=True, cwd=root, timeout=START_SECONDS)
        if initdb.returncode != 0:
            pytest.fail(f"initdb failed ({initdb.returncode}): {initdb.stderr.strip()}")
        _start(pg, data)
        yield pg
    finally:
        subprocess.run(_as_owner([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], user),
                       capture_output=True, cwd=root, timeout=60, check=False)
        shutil.rmtree(root, ignore_errors=True)


def fresh_database(pg: Postgres) -> str:
    """A new empty database on ``pg``; its URL (trust authentication over TCP)."""
    name = "t_" + secrets.token_hex(6)
    with pg.connect() as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"postgresql://postgres@127.0.0.1:{pg.port}/{name}"
