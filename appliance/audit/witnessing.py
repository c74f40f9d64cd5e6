"""Submitting each signed checkpoint to the witnesses, and keeping their cosignatures.

For every witness of ``[audit] witnesses`` a thread of its own (:class:`Witnessing`)
POSTs the newest checkpoint with a consistency proof from the size the witness last
cosigned (c2sp.org/tlog-witness; :mod:`appliance.audit.witness_protocol`). The proof is
built from the tree's compact range at that size and the leaves written since, read back
from the segment files from the position that checkpoint had — so a log changed on disk
behind the writer gives a proof the witness refuses (422), which is logged and shown.

The data path never waits for a witness: a witness that is down or refuses is logged as
an error (again every minute while it lasts), shown in ``tollgate audit status`` under
``witnesses`` (its error, since when, and the last size it cosigned), recorded in the log
itself (``audit.witness``, outcome failure, when it starts failing; success when it
cosigns again), and retried with a growing delay and whenever a new checkpoint is signed. Only the newest checkpoint is
submitted: a witness needs no intermediate one to stay consistent.

Cosignatures go to ``cosignatures.jsonl`` (one line per witness and checkpoint: size,
sha256 of the checkpoint's note text, witness name, signature line), fsync'd; export
adds them to the bundle's checkpoint notes. ``witnesses/<name>.json`` keeps what a proof
from the witness's size needs (its size, the segment position and the compact range), so
a restart does not rehash the log; when it is missing or the witness says it has another
size (409), the leaves are read from the start of the log once.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import logging
import os
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.audit import canonical, merkle, note
from appliance.audit.cosignature import WitnessKey, cosignatures, merge_signature_lines, parse_witness_key
from appliance.audit.keys import make_dir, write_atomic
from appliance.audit.reader import AuditReader
from appliance.audit.store_errors import AuditError
from appliance.audit.store_segments import NL, list_segments
from appliance.audit.witness_protocol import (
    ADD_CHECKPOINT,
    SIZE_TYPE,
    format_add_checkpoint,
    ssl_context,
)
from appliance.config import AuditConfig, WitnessConfig

log = logging.getLogger("tollgate.audit.witness")

COSIGNATURES = "cosignatures.jsonl"
STATE_DIR = "witnesses"
REPEAT_ERROR_SECONDS = 60.0
MAX_RETRY_SECONDS = 30.0
TIMEOUT_SECONDS = 10.0
STATE_VERSION = 1


class WitnessRefused(Exception):
    """The witness answered with an error status."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body.strip()[:200]}")
        self.status = status
        self.body = body


class WitnessConflict(WitnessRefused):
    """409: the witness has another size for this log (``size``; None if it did not say)."""

    def __init__(self, status: int, body: str, size: int | None) -> None:
        super().__init__(status, body)
        self.size = size


@dataclass
class Position:
    """A checkpointed tree: its size, where its last record ends on disk, its compact range."""

    size: int
    seg_start: int
    offset: int
    tree: merkle.CompactRange


def text_sha256(checkpoint_note: str) -> str:
    return hashlib.sha256(note.split_note(checkpoint_note)[0].encode("utf-8")).hexdigest()


class WitnessClient:
    """The add-checkpoint call to one witness."""

    def __init__(self, config: WitnessConfig, timeout: float = TIMEOUT_SECONDS) -> None:
        self.config = config
        self.timeout = timeout
        url = urllib.parse.urlsplit(config.url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"witness {config.name}: bad url {config.url!r}")
        self._url = url

    def add_checkpoint(self, old: int, proof: list[bytes], checkpoint_note: str) -> str:
        """POST it; the cosignature line(s) the witness answers with."""
        url = self._url
        if url.scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                url.hostname or "", url.port, timeout=self.timeout, context=ssl_context(self.config.ca_file))
        else:
            conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=self.timeout)
        try:
            body = format_add_checkpoint(old, proof, checkpoint_note)
            conn.request("POST", url.path.rstrip("/") + ADD_CHECKPOINT, body, {"Content-Type": "text/plain"})
            resp = conn.getresponse()
            answer = resp.read(64 * 1024).decode("utf-8", "replace")
        finally:
            conn.close()
        if resp.status == 200:
            return answer
        if resp.status == 409:
            size = None
            if (resp.getheader("Content-Type") or "").startswith(SIZE_TYPE) and answer.strip().isdigit():
                size = int(answer.strip())
            raise WitnessConflict(resp.status, answer, size)
        raise WitnessRefused(resp.status, answer)


def read_leaves(directory: Path, start: Position, count: int) -> list[bytes]:
    """The leaf hashes of the ``count`` records after ``start``, read from the segments."""
    out: list[bytes] = []
    segments = [s for s in list_segments(directory) if s[0] >= start.seg_start]
    for first, path in segments:
        if len(out) >= count:
            break
        with open(path, "rb") as f:
            if first == start.seg_start:
                f.seek(start.offset)
            while len(out) < count:
                line = f.readline()
                if not line.endswith(NL):
                    break  # end of this segment (or a record still being written)
                out.append(merkle.leaf_hash(line[:-1]))
    if len(out) != count:
        raise OSError(f"the segments hold {len(out)} records after seq {start.size - 1}, not {count}")
    return out


class _Witness:
    """One witness: what it has cosigned, what waits for it, how it is doing."""

    def __init__(self, config: WitnessConfig, directory: Path) -> None:
        self.config = config
        self.key: WitnessKey = parse_witness_key(config.key)
        self.client = WitnessClient(config)
        # Witness names are key names, often origin-like ("witness.example/lab"): quoted, so a
        # slash never names a directory that does not exist.
        self.state_path = directory / STATE_DIR / f"{urllib.parse.quote(config.name, safe='')}.json"
        self.position: Position | None = None  # the tree at the size the witness has
        self.witness_size: int | None = None  # its size, once known
        self.pending: tuple[str, Position, int] | None = None  # note, position, submission number
        self.cosigned_size: int | None = None
        self.cosigned_time: str | None = None
        self.error: str | None = None
        self.failing_since: float | None = None
        self.last_logged = 0.0
        self.failures = 0
        self.retry_at = 0.0
        self.tried = 0  # the submission number last tried (delivered or failed)
        self._load()

    def _load(self) -> None:
        try:
            state = canonical.loads(self.state_path.read_bytes())
            if state.get("v") != STATE_VERSION:
                return
            tree = merkle.CompactRange(0, state["size"], [base64.b64decode(h) for h in state["hashes"]])
            self.position = Position(state["size"], state["segment"], state["offset"], tree)
            self.witness_size = state["size"]
        except (OSError, ValueError, KeyError, TypeError):
            return

    def save(self) -> None:
        pos = self.position
        assert pos is not None
        state = {"v": STATE_VERSION, "size": pos.size, "segment": pos.seg_start, "offset": pos.offset,
                 "hashes": [base64.b64encode(h).decode() for h in pos.tree.hashes]}
        try:
            write_atomic(self.state_path, canonical.dumps(state) + NL, 0o600, sync=False)
        except OSError as exc:
            log.warning("audit: could not save %s: %s", self.state_path, exc)

    def status(self) -> dict[str, Any]:
        return {"witness": self.config.name, "url": self.config.url, "cosigned_size": self.cosigned_size,
                "cosigned_time": self.cosigned_time, "pending": self.pending[1].size if self.pending else None,
                "error": self.error,
                "failing_since": (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.failing_since))
                                  if self.failing_since else None)}


class Witnessing:
    """Submits checkpoints to the witnesses on threads of their own; never blocks the caller."""

    def __init__(self, config: AuditConfig) -> None:
        self._dir = config.dir
        self.quorum = config.witness_quorum
        make_dir(self._dir / STATE_DIR)
        try:
            self._witnesses = [_Witness(w, self._dir) for w in config.witnesses]
        except (note.NoteError, ValueError) as exc:  # fail closed: the log does not open
            raise AuditError(f"[[audit.witnesses]]: {exc}") from None
        self._cond = threading.Condition()
        self._cosigned: dict[str, set[str]] = {}  # checkpoint text sha256 -> witnesses that cosigned it
        self._closing = False
        # Told (on the witness's thread, no lock held) when a witness starts failing and when
        # it cosigns again: the log records both (``audit.witness``).
        self.on_change: Callable[[dict[str, Any]], None] | None = None
        self._submitted = 0
        self._file_lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(w,), name=f"audit-witness-{w.config.name}",
                                          daemon=True) for w in self._witnesses]
        for t in self._threads:
            t.start()

    def submit(self, checkpoint_note: str, size: int, seg_start: int, offset: int, tree: merkle.CompactRange) -> None:
        position = Position(size, seg_start, offset, tree.copy())
        with self._cond:
            self._submitted += 1
            for w in self._witnesses:
                w.pending = (checkpoint_note, position, self._submitted)
                w.retry_at = 0.0
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every witness was tried with the latest checkpoint (cosigned or failed)."""
        with self._cond:
            target = self._submitted
            return self._cond.wait_for(lambda: all(w.tried >= target for w in self._witnesses), timeout)

    def wait_for_quorum(self, checkpoint_note: str, timeout: float) -> bool:
        """Wait until ``quorum`` witnesses cosigned this checkpoint (or ``timeout`` passes)."""
        digest = text_sha256(checkpoint_note)
        with self._cond:
            return self._cond.wait_for(lambda: len(self._cosigned.get(digest, ())) >= self.quorum, timeout)

    def status(self) -> list[dict[str, Any]]:
        with self._cond:
            return [w.status() for w in self._witnesses]

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)

    # --- the threads ----------------------------------------------------------------------------

    def _run(self, w: _Witness) -> None:
        while True:
            with self._cond:
                while not self._closing:
                    now = time.monotonic()
                    if w.pending is not None and now >= w.retry_at:
                        break
                    self._cond.wait(None if w.pending is None else w.retry_at - now)
                if self._closing:
                    return
                assert w.pending is not None
                checkpoint_note, position, attempt = w.pending
            try:
                lines = self._submit(w, checkpoint_note, position)
            except Exception as exc:  # noqa: BLE001 - any failure: say so, keep the checkpoint, retry
                self._failed(w, position, exc)
            else:
                self._store(w, checkpoint_note, position, lines)
            with self._cond:
                w.tried = max(w.tried, attempt)
                self._cond.notify_all()

    def _submit(self, w: _Witness, checkpoint_note: str, position: Position) -> str:
        for _attempt in range(2):  # a 409 tells the witness's size: one more try with the right proof
            old = w.witness_size if w.witness_size is not None else 0
            proof = self._proof(w, old, position)
            try:
                return w.client.add_checkpoint(old, proof, checkpoint_note)
            except WitnessConflict as exc:
                if exc.size is None or exc.size == old:
                    raise
                w.witness_size, w.position = exc.size, None
        raise WitnessRefused(409, "the witness's size changed twice while submitting")

    def _proof(self, w: _Witness, old: int, new: Position) -> list[bytes]:
        if old == 0 or old >= new.size:
            return []
        pos = w.position
        if pos is not None and pos.size == old and pos.size <= new.size:
            return merkle.consistency_proof_from_range(pos.tree, read_leaves(self._dir, pos, new.size - old))
        # The witness's size is not one this writer remembers: hash the log from the start.
        leaves = [e.leaf for e in AuditReader(self._dir).records(0, new.size)]
        if len(leaves) != new.size:
            raise OSError(f"the log holds {len(leaves)} records, the checkpoint covers {new.size}")
        return merkle.consistency_proof(leaves, old, new.size)

    def _failed(self, w: _Witness, position: Position, exc: Exception) -> None:
        now = time.monotonic()
        with self._cond:
            w.error = f"{type(exc).__name__}: {exc}"
            w.failures += 1
            w.retry_at = now + min(0.5 * 2 ** min(w.failures, 10), MAX_RETRY_SECONDS)
            first = w.failing_since is None
            if first:
                w.failing_since = time.time()
            if first or now - w.last_logged >= REPEAT_ERROR_SECONDS:
                w.last_logged = now
                log.error("audit: witness %s did not cosign checkpoint %d: %s (will retry; statements go on)",
                          w.config.name, position.size, w.error)
            error = w.error
        if first:
            self._tell(w, "failure", {"error": error, "size": position.size})

    def _tell(self, w: _Witness, outcome: str, details: dict[str, Any]) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change({"type": "audit.witness", "user": "tollgate", "outcome": outcome, "origin": "local",
                            "object": "audit-log", "witness": w.config.name, "url": w.config.url, **details})
        except Exception as exc:  # noqa: BLE001 - the status and the log still say it
            log.error("audit: could not record witness %s's state: %s", w.config.name, exc)

    def _store(self, w: _Witness, checkpoint_note: str, position: Position, answer: str) -> None:
        merged = merge_signature_lines(checkpoint_note, [line + "\n" for line in answer.splitlines() if line])
        valid, problems = cosignatures(merged, [w.key])
        if not valid or problems:
            self._failed(w, position, ValueError(f"the witness answered without a valid cosignature by "
                                                 f"{w.key.label}: {'; '.join(problems) or answer[:200]!r}"))
            return
        digest = text_sha256(checkpoint_note)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(valid[0].timestamp))
        own = [line for line in answer.splitlines() if line.startswith(f"{note.SIG_PREFIX}{w.key.name} ")]
        entries = b"".join(canonical.dumps({"size": position.size, "text_sha256": digest,
                                            "witness": w.config.name, "line": line}) + NL for line in own)
        try:
            with self._file_lock:
                fd = os.open(self._dir / COSIGNATURES, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    os.write(fd, entries)
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            self._failed(w, position, exc)
            return
        with self._cond:
            w.position = position
            w.witness_size = position.size
            w.cosigned_size, w.cosigned_time = position.size, stamp
            if w.pending is not None and w.pending[1] is position:
                w.pending = None
            recovered = w.failing_since is not None
            if recovered:
                log.warning("audit: witness %s cosigns again (size %d)", w.config.name, position.size)
            w.error, w.failing_since, w.failures = None, None, 0
        w.save()
        if recovered:  # recorded before anyone waiting for this cosignature hears of it
            self._tell(w, "success", {"size": position.size})
        with self._cond:
            self._cosigned.setdefault(digest, set()).add(w.config.name)
            if len(self._cosigned) > 256:
                self._cosigned.pop(next(iter(self._cosigned)))
            self._cond.notify_all()


def load_cosignatures(directory: Path) -> dict[str, list[str]]:
    """checkpoint text sha256 -> the cosignature lines stored for it."""
    out: dict[str, list[str]] = {}
    with contextlib.suppress(FileNotFoundError), open(directory / COSIGNATURES, "rb") as f:
        for raw in f:
            if not raw.endswith(NL):
                break
            try:
                entry = canonical.loads(raw[:-1])
                out.setdefault(entry["text_sha256"], []).append(entry["line"])
            except (ValueError, KeyError, TypeError):
                continue
    return out


def with_cosignatures(checkpoint_note: str, stored: dict[str, list[str]]) -> str:
    """The note with the stored cosignature lines for its text appended."""
    lines = stored.get(text_sha256(checkpoint_note))
    return merge_signature_lines(checkpoint_note, lines) if lines else checkpoint_note
