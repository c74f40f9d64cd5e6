"""Fixtures for the masking tests: a real PostgreSQL.

The server is a throwaway PostgreSQL 15 cluster in a temporary directory, on a Unix socket
and 127.0.0.1 (no lab namespaces): the masking tests need its type input and output
functions, to get real wire encodings and to check that what we hand a client parses, and
its catalog, for the column-mask lookup.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.lab.database import PG_BIN


class Postgres:
    """A running throwaway cluster."""

    def __init__(self, root: Path, user: str, port: int):
        self.root, self.user, self.port = root, user, port
        self.socket_dir = root / "sock"

    def connect(self, **kw):  # type: ignore[no-untyped-def]
        import psycopg

        return psycopg.connect(host=str(self.socket_dir), port=self.port, user="postgres", dbname="postgres",
                               autocommit=True, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_owner(argv: list[str], user: str) -> list[str]:
    return ["runuser", "-u", user, "--", *argv] if os.geteuid() == 0 else argv


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"PostgreSQL 15 is not installed ({PG_BIN})")
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres OS user to run the server as")
        user = "postgres"
    else:
        owner, user = None, pwd.getpwuid(os.geteuid()).pw_name
    root = Path(tempfile.mkdtemp(prefix="tollgate-masking-pg-"))
    pg = Postgres(root, user, _free_port())
    data = root / "data"
    pg.socket_dir.mkdir()
    if owner is not None:
        os.chown(root, owner.pw_uid, owner.pw_gid)
        os.chown(pg.socket_dir, owner.pw_uid, owner.pw_gid)
    try:
        subprocess.run(_as_owner([str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                                  "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"], user),
                       check=True, capture_output=True, cwd=root, timeout=120)
        subprocess.run(_as_owner([str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w",
                                  "-o", f"-k {pg.socket_dir} -p {pg.port} -c listen_addresses=127.0.0.1 -c fsync=off",
                                  "start"], user),
                       check=True, capture_output=True, cwd=root, timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"could not start PostgreSQL: {getattr(exc, 'stderr', b'')!r}")
    try:
        yield pg
    finally:
        subprocess.run(_as_owner([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], user),
                       capture_output=True, cwd=root, timeout=60, check=False)
        shutil.rmtree(root, ignore_errors=True)
