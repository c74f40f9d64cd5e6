"""A small SQLite helper: WAL mode, numbered migrations, one connection per thread.

The appliance's state is shared by processes (the proxy reads, the CLI writes) and by
threads within one, so every thread gets its own connection, readers never block the
writer (WAL), and writes take the lock up front (``BEGIN IMMEDIATE``) so two writers
queue on ``busy_timeout`` instead of deadlocking on a lock upgrade.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

# Migration N (1-based) is MIGRATIONS[N-1]: a tuple of SQL statements run in one
# transaction. The applied number is kept in SQLite's own ``PRAGMA user_version``.
Migration = Sequence[str]
BUSY_TIMEOUT_MS = 10_000


class StateError(Exception):
    """A state database that can't be opened or used, phrased for the operator."""


class ConstraintError(StateError):
    """A write the database itself refused (a UNIQUE or CHECK constraint), on PostgreSQL."""


# What a refused write raises, whichever the backend.
CONSTRAINT_ERRORS: tuple[type[Exception], ...] = (sqlite3.IntegrityError, ConstraintError)


class Database:
    """One SQLite file, migrated to the latest schema when opened."""

    dialect = "sqlite"

    def __init__(self, path: str | Path, migrations: Sequence[Migration], *, create: bool = True):
        self.path = Path(path)
        self.migrations = tuple(migrations)
        if not self.path.exists():
            if not create:
                raise StateError(f"{self.path} does not exist")
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Identities and revocations are not for other users; SQLite gives its -wal and
            # -shm files the database file's mode.
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._migrate()

    def connection(self) -> sqlite3.Connection:
        """This thread's connection (autocommit; use :meth:`transaction` to group writes)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                # isolation_level=None: we issue BEGIN ourselves, so the module never
                # opens a transaction behind our back. check_same_thread=False only so
                # close() may run anywhere; each connection is still used by one thread.
                conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                       timeout=BUSY_TIMEOUT_MS / 1000)
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                conn.execute("PRAGMA journal_mode = WAL")
                # FULL: a revocation acknowledged to the operator must survive a power cut.
                conn.execute("PRAGMA synchronous = FULL")
                conn.execute("PRAGMA foreign_keys = ON")
            except sqlite3.Error as exc:
                raise StateError(f"{self.path}: cannot open: {exc}") from None
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """A transaction on this thread's connection: committed on success, else rolled back.

        A read transaction (``write=False``) sees one consistent snapshot across queries.
        """
        conn = self.connection()
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN DEFERRED")
        try:
            yield conn
        except BaseException:
            # SQLite already rolled back after some errors (a full disk, for one).
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @property
    def schema_version(self) -> int:
        return self.connection().execute("PRAGMA user_version").fetchone()[0]

    def _migrate(self) -> None:
        latest = len(self.migrations)
        with self.transaction() as conn:
            current = conn.execute("PRAGMA user_version").fetchone()[0]
            if current > latest:
                raise StateError(f"{self.path}: schema version {current} is newer than this Tollgate "
                                 f"understands ({latest}); was it written by a later release?")
            for number in range(current + 1, latest + 1):
                for statement in self.migrations[number - 1]:
                    conn.execute(statement)
            if current != latest:
                # user_version lives in the file header and is transactional like a table.
                conn.execute(f"PRAGMA user_version = {latest}")

    def close(self) -> None:
        """Close every thread's connection; the object can't be used afterwards."""
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()
        self._local = threading.local()
