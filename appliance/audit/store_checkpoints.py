"""Signed checkpoints of the audit log: when one is due, signing it, and where it goes.

A checkpoint is signed every ``checkpoint_records`` records, ``checkpoint_seconds`` after
the first unsigned record, when one is requested (a session ended; at most one such every
REQUEST_INTERVAL seconds), and every ``heartbeat_seconds`` when idle.
:class:`Checkpointer` keeps that cadence, appends each checkpoint to ``checkpoints.jsonl``
(fdatasync'd: a checkpoint is what an auditor holds the log to), rewrites ``state.json``
and hands the note to the off-box sinks and the witnesses.

``state.json`` is the tree's compact range at the last checkpoint: it spares a restart
rehashing the whole log, so it is believed only where a recent checkpoint vouches for it
(:func:`load_state`).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.audit import canonical, merkle, note
from appliance.audit.keys import KeyRing, write_atomic
from appliance.audit.store_errors import AuditError
from appliance.audit.store_segments import NL, Snapshot
from appliance.config import AuditConfig

if TYPE_CHECKING:
    from appliance.audit.offbox import Shipper
    from appliance.audit.witnessing import Witnessing

log = logging.getLogger("tollgate.audit")

STATE_VERSION = 1
CHECKPOINT_TAIL = 1 << 20  # bytes of checkpoints.jsonl read at open to find the last one
RECENT_CHECKPOINTS = 64  # of which this many are kept to check state.json against
# A request (a session ended) signs at once unless a checkpoint was signed less than this
# long ago; then at that mark. Under connection churn every session end asked for one: a
# signature, a state.json, an off-box copy and a witness round trip per connection (about
# 4 ms of the proxy's CPU each, issue 15). Held back, the records are still signed within
# this interval — sooner than checkpoint_seconds would.
REQUEST_INTERVAL = 0.25


def checkpoint_time(unix: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


def checkpoint_root(entry: dict[str, Any]) -> bytes:
    """The root hash a checkpoints.jsonl entry's note states (signature not checked)."""
    return note.parse_checkpoint(note.split_note(entry["note"])[0]).root


class Checkpointer:
    """Signs checkpoints of durable positions, in order; see the module docstring.

    Only a caller holding the group commit's ``sign_lock`` calls :meth:`sign`.
    """

    def __init__(self, config: AuditConfig, keyring: KeyRing, fdatasync: Callable[[int], None]) -> None:
        self._config = config
        self._keyring = keyring
        self._fdatasync = fdatasync
        self._path = config.dir / "checkpoints.jsonl"
        self.shipper: Shipper | None = None
        self.witnessing: Witnessing | None = None
        self._fd = -1
        self._offset = 0
        self.last: dict[str, Any] | None = None  # the last entry of checkpoints.jsonl
        self.signed_size = -1  # the tree size last signed
        self.recent_roots: dict[int, bytes] = {}  # size -> root of the last checkpoints (for state.json)
        self._signed_mono = 0.0
        self.first_unsigned_mono: float | None = None
        self._requested = False
        self._failures = 0
        self._retry_at = 0.0

    def open(self) -> None:
        """Open checkpoints.jsonl for appending; read its last entry; cut a partial last line."""
        path = self._path
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._fd = fd
        end = os.fstat(fd).st_size
        tail = os.pread(fd, min(end, CHECKPOINT_TAIL), end - min(end, CHECKPOINT_TAIL))
        cut = 0
        if tail and not tail.endswith(NL):
            cut = len(tail) - (tail.rfind(NL) + 1)
            os.ftruncate(fd, end - cut)
            os.fsync(fd)
            end -= cut
            tail = tail[:len(tail) - cut]
            log.warning("audit: cut a partial checkpoint line (%d bytes) at the end of %s", cut, path)
        self._offset = end
        self.recent_roots = {}
        for n, line in enumerate(reversed(tail.split(NL))):
            if not line:
                continue
            try:
                entry = canonical.loads(line)
                root = checkpoint_root(entry)
            except (ValueError, KeyError, TypeError, note.NoteError) as exc:
                if self.last is None:
                    raise AuditError(f"{path}: the last checkpoint is unreadable ({exc})") from None
                break
            if self.last is None:
                self.last = entry
                self.signed_size = entry["size"]
            self.recent_roots.setdefault(entry["size"], root)
            if n >= RECENT_CHECKPOINTS:
                break
        self._signed_mono = time.monotonic()

    # --- the cadence -------------------------------------------------------------------------------

    def note_size(self, now: float, size: int) -> None:
        """The log holds ``size`` records at ``now``: the clock of checkpoint_seconds starts
        with the first record not signed yet."""
        if self.first_unsigned_mono is None and size > self.signed_size:
            self.first_unsigned_mono = now

    def due(self, now: float, size: int) -> bool:
        """Is a checkpoint of a log of ``size`` records due at ``now``?"""
        if now < self._retry_at:
            return False
        unsigned = size - self.signed_size
        if unsigned > 0:
            if unsigned >= self._config.checkpoint_records:
                return True
            if self._requested and now >= self._request_due():
                return True
            first = self.first_unsigned_mono
            if first is not None and now - first >= self._config.checkpoint_seconds:
                return True
        return now - self._signed_mono >= self._config.heartbeat_seconds

    def deadline(self) -> float:
        """When (monotonic) the next checkpoint falls due if no record comes."""
        deadline = self._signed_mono + self._config.heartbeat_seconds
        if self.first_unsigned_mono is not None:
            deadline = min(deadline, self.first_unsigned_mono + self._config.checkpoint_seconds)
            if self._requested:
                deadline = min(deadline, self._request_due())
        return max(deadline, self._retry_at)

    def _request_due(self) -> float:
        """When a requested checkpoint may be signed: REQUEST_INTERVAL after the last one."""
        return self._signed_mono + REQUEST_INTERVAL

    def wake_size(self) -> int:
        """The log size at which an append should wake the sync thread: the first record to
        sign, or the one that makes checkpoint_records unsigned."""
        if self.first_unsigned_mono is None:
            return self.signed_size + 1
        return self.signed_size + self._config.checkpoint_records

    def request(self) -> None:
        """Sign at the next opportunity, whatever the cadence says."""
        self._requested = True

    # --- signing ---------------------------------------------------------------------------------------

    def sign(self, snap: Snapshot) -> dict[str, Any] | None:
        """Sign ``snap`` (durable), append it to checkpoints.jsonl, save state, ship it.

        The checkpoints.jsonl entry ``{"note", "size", "time"}``; None if it could not be
        written (it is retried with a growing delay).
        """
        unix = int(time.time())
        stamp = checkpoint_time(unix)
        body = note.make_checkpoint(self._config.origin, snap.size, snap.tree.root(), stamp)
        text = note.sign_note(body, self._keyring.signing_key)
        entry = {"note": text, "size": snap.size, "time": stamp}
        line = canonical.dumps(entry) + NL
        offset = self._offset
        try:
            written = os.pwrite(self._fd, line, offset)
            if written != len(line):
                raise OSError(errno.ENOSPC, "short write")
            self._fdatasync(self._fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, offset)
            self._failures += 1
            self._retry_at = time.monotonic() + min(0.05 * 2 ** self._failures, 5.0)
            log.error("audit: cannot write a checkpoint to %s: %s (will retry)", self._path, exc.strerror or exc)
            return None
        self._offset = offset + len(line)
        self._failures = 0
        self._retry_at = 0.0
        self.last = entry
        self.signed_size = snap.size
        self._signed_mono = time.monotonic()
        self.first_unsigned_mono = None
        self._requested = False
        save_state(self._config.dir, snap)
        if self.shipper is not None:
            self.shipper.submit(text, snap.size, unix)
        if self.witnessing is not None:
            self.witnessing.submit(text, snap.size, snap.seg_start, snap.offset, snap.tree)
        return entry

    def close_file(self) -> None:
        if self._fd != -1:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1


# --- state.json ---------------------------------------------------------------------------------------


def save_state(directory: Path, snap: Snapshot) -> None:
    state = {"v": STATE_VERSION, "size": snap.size, "segment": snap.seg_start, "offset": snap.offset,
             "hashes": [base64.b64encode(h).decode() for h in snap.tree.hashes]}
    try:
        # No fsync: state.json only saves rehashing, and is checked against the
        # (fsync'd) checkpoint before it is believed.
        write_atomic(directory / "state.json", canonical.dumps(state) + NL, 0o600, sync=False)
    except OSError as exc:
        log.warning("audit: could not save %s: %s (restart will rehash)", directory / "state.json", exc.strerror)


def load_state(directory: Path, recent_roots: dict[int, bytes],
               segments: list[tuple[int, Path]]) -> tuple[int, int, int, merkle.CompactRange] | None:
    """(size, segment start, offset, tree) at the last checkpoint, if state.json agrees
    with a recent checkpoint's root (``recent_roots``) and with the segment files."""
    path = directory / "state.json"
    try:
        state = canonical.loads(path.read_bytes())
        if state.get("v") != STATE_VERSION:
            return None
        size, seg_start, offset = state["size"], state["segment"], state["offset"]
        tree = merkle.CompactRange(0, size, [base64.b64decode(h) for h in state["hashes"]])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if recent_roots.get(size) != tree.root():
        return None  # only state a (recent) checkpoint vouches for is believed
    seg = dict(segments).get(seg_start)
    if seg is None or seg_start > size:
        return None
    try:
        with open(seg, "rb") as f:
            if os.fstat(f.fileno()).st_size < offset:
                return None
            if offset:
                f.seek(offset - 1)
                if f.read(1) != NL:
                    return None
    except OSError:
        return None
    return size, seg_start, offset, tree
