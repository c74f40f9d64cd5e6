"""The witness's directory: its key, the logs it follows, the latest checkpoint of each.

``DIR/witness.key`` is the Ed25519 private key (PKCS#8 PEM, 0600), ``DIR/witness.pub`` its
verifier key (``name+HHHHHHHH+base64(0x04 ‖ key)``, what the appliance and auditors are
given), ``DIR/witness.db`` an SQLite database (synchronous=FULL: a cosignature is given
only once the new state is on disk, so a crash can't make the witness forget what it
cosigned and later cosign a fork). Tables: ``logs`` (origin, verifier key: one row per
key, so a rotated log key is added beside the old), ``latest`` (origin, size, root, the
cosigned note).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from appliance.audit.cosignature import Cosigner
from appliance.audit.keys import write_atomic
from appliance.audit.note import VerifierKey, parse_verifier_key

KEY_FILE = "witness.key"
PUB_FILE = "witness.pub"
NAME_FILE = "witness.name"
DB_FILE = "witness.db"

SCHEMA = """
CREATE TABLE IF NOT EXISTS logs (origin TEXT NOT NULL, key TEXT NOT NULL, PRIMARY KEY (origin, key));
CREATE TABLE IF NOT EXISTS latest (origin TEXT PRIMARY KEY, size INTEGER NOT NULL, root BLOB NOT NULL,
                                   note TEXT NOT NULL);
"""


class WitnessStateError(Exception):
    """The witness directory is missing, incomplete or already set up."""


@dataclass(frozen=True)
class Latest:
    size: int
    root: bytes
    note: str  # the checkpoint with the log's signature and this witness's cosignature


def init_witness(directory: Path, name: str) -> Cosigner:
    """Create ``directory`` (0700) with a new key; WitnessStateError if one is there."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if (directory / KEY_FILE).exists():
        raise WitnessStateError(f"{directory}: a witness key is already there")
    cosigner = Cosigner.generate(name)
    write_atomic(directory / KEY_FILE, cosigner.to_pem(), 0o600)
    write_atomic(directory / NAME_FILE, (name + "\n").encode(), 0o644)
    write_atomic(directory / PUB_FILE, (str(cosigner.key) + "\n").encode(), 0o644)
    WitnessState(directory).close()  # the database, with its tables
    return cosigner


def load_cosigner(directory: Path) -> Cosigner:
    try:
        name = (directory / NAME_FILE).read_text().strip()
        return Cosigner.from_pem(name, (directory / KEY_FILE).read_bytes())
    except FileNotFoundError:
        raise WitnessStateError(f"{directory}: no witness here; run `tollgate witness init`") from None


class WitnessState:
    """The logs followed and their latest cosigned checkpoints; safe across threads."""

    def __init__(self, directory: Path) -> None:
        path = directory / DB_FILE
        if not directory.is_dir():
            raise WitnessStateError(f"{directory}: no such directory")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self.lock = threading.RLock()  # held across read-check-write of one log's state

    def close(self) -> None:
        self._db.close()

    def add_log(self, origin: str, key: str) -> VerifierKey:
        vkey = parse_verifier_key(key)
        with self.lock:
            self._db.execute("INSERT OR IGNORE INTO logs VALUES (?, ?)", (origin, str(vkey)))
        return vkey

    def log_keys(self, origin: str) -> list[VerifierKey]:
        with self.lock:
            rows = self._db.execute("SELECT key FROM logs WHERE origin = ?", (origin,)).fetchall()
        return [parse_verifier_key(r[0]) for r in rows]

    def logs(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        with self.lock:
            for origin, key in self._db.execute("SELECT origin, key FROM logs ORDER BY origin, key"):
                out.setdefault(origin, []).append(key)
        return out

    def latest(self, origin: str) -> Latest | None:
        with self.lock:
            row = self._db.execute("SELECT size, root, note FROM latest WHERE origin = ?", (origin,)).fetchone()
        return Latest(row[0], bytes(row[1]), row[2]) if row else None

    def set_latest(self, origin: str, latest: Latest) -> None:
        """Durably (synchronous=FULL commits are fsync'd) before the caller answers."""
        with self.lock:
            self._db.execute("INSERT INTO latest VALUES (?, ?, ?, ?) ON CONFLICT (origin) DO UPDATE SET "
                             "size = excluded.size, root = excluded.root, note = excluded.note",
                             (origin, latest.size, latest.root, latest.note))
