"""Fixtures for the masking tests: a real PostgreSQL.

The server is a throwaway PostgreSQL 15 cluster in a temporary directory, on a Unix socket
and 127.0.0.1 (no lab namespaces): the masking tests need its type input and output
functions, to get real wire encodings and to check that what we hand a client parses, and
its catalog, for the column-mask lookup.

It is used once ``pg_ctl -w`` has seen it ready and ``pg_isready`` has reached it on its TCP
port; a server that cannot start fails the tests that need it, with its log — a missing
PostgreSQL installation is the only reason to skip them.
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


# Safety nets for a server that hangs, never a bound on one that is slow to start.
START_SECONDS = 120
# A free port is only free until someone else takes it: another try gets another port.
PORT_TRIES = 3


def _start(pg: Postgres, data: Path) -> None:
    """pg_ctl start -w on a free port, then pg_isready over TCP; pytest.fail with the log if
    the server does not come up."""
    log = pg.root / "log"
    for _ in range(PORT_TRIES):
        pg.port = _free_port()
        started = subprocess.run(
            _as_owner([str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", str(START_SECONDS),
                       "-o", f"-k {pg.socket_dir} -p {pg.port} -c listen_addresses=127.0.0.1 -c fsync=off",
                       "start"], pg.user),
            capture_output=True, text=True, cwd=pg.root, timeout=START_SECONDS + 30)
        said = log.read_text(errors="replace") if log.exists() else ""
        if started.returncode != 0 and "could not bind" in said:
            log.unlink()
            continue  # the port was taken meanwhile
        if started.returncode != 0:
            pytest.fail(f"could not start PostgreSQL: {started.stderr.strip()}\n{said[-3000:]}")
        ready = subprocess.run([str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(pg.port),
                                "-t", str(START_SECONDS)], capture_output=True, text=True, timeout=START_SECONDS + 30)
        if ready.returncode != 0:
            pytest.fail(f"PostgreSQL started but does not answer on 127.0.0.1:{pg.port}: {ready.stdout.strip()}\n"
                        f"{said[-3000:]}")
        return
    pytest.fail(f"PostgreSQL found no free port in {PORT_TRIES} tries:\n{said[-3000:]}")


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
    pg = Postgres(root, user, 0)  # the port is chosen when it starts
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
    except BaseException:
        subprocess.run(_as_owner([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], user),
                       capture_output=True, cwd=root, timeout=60, check=False)
        shutil.rmtree(root, ignore_errors=True)
        raise
    try:
        yield pg
    finally:
        subprocess.run(_as_owner([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], user),
                       capture_output=True, cwd=root, timeout=60, check=False)
        shutil.rmtree(root, ignore_errors=True)
