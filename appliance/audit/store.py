"""The audit log's single writer: segments, the Merkle tree, group commit, checkpoints.

One process writes an audit directory at a time (an exclusive ``flock`` on ``dir/LOCK``):
the proxy while it runs, else a CLI command. The formats are in docs/audit-format.md.

Threads and what runs where
---------------------------

* :meth:`AuditLog.append` is synchronous and cheap (encode, one ``pwritev``, one leaf
  hash, a compact-range update). The proxy calls it on its event-loop thread; it is
  thread-safe (one lock), so a CLI may call it from anywhere.
* :meth:`AuditLog.durable` returns an asyncio future on the loop given to
  :meth:`AuditLog.start` that resolves once an ``fdatasync`` covers the record.
* A background *sync thread* (started by :meth:`AuditLog.start`) does the group commit:
  it snapshots the write position under the lock, ``fdatasync``\\ s outside it, publishes
  the durable point and resolves every future it covers with one
  ``loop.call_soon_threadsafe``. With ``durability = "fsync"`` and a loop, the first
  append of each loop iteration schedules one ``call_soon`` that wakes the thread once the
  iteration is over: every task the iteration ran has appended by then, so one
  ``fdatasync`` covers them all (group commit without a timer, no wake per record).
* The same thread signs checkpoints (every ``checkpoint_records`` records,
  ``checkpoint_seconds`` after the first unsigned record, on :meth:`request_checkpoint`,
  and every ``heartbeat_seconds`` when idle), appends them to ``checkpoints.jsonl``
  (fsync'd), rewrites ``state.json`` and hands each to the off-box sinks (their own
  thread: a slow or dead sink never holds the log up).
* A sync round and anything else that signs (:meth:`checkpoint_now`, :meth:`rotate_key`,
  :meth:`close`) are serialised by a second lock, so a checkpoint is always over exactly
  what was made durable, with the key valid at that size.

Failure
-------

A write that fails (ENOSPC, EIO, a short write) is cut back off the segment, the record's
seq and tree leaf are not taken, and ``append`` raises :class:`AuditUnavailable`. An
``fdatasync`` that fails rolls the segment and the tree back to the last durable point
and fails the futures beyond it (their statements were never forwarded). Either way the
failure is remembered, and the first append that succeeds afterwards is preceded by an
``audit.failure`` record: the error, since when, how many statements the proxy refused
meanwhile (:meth:`note_refused`) and which seqs were rolled back. Nothing needs to be
restarted: appends work again as soon as the disk takes them.

A process killed at any point leaves at worst a partial last line: :meth:`AuditLog.open`
cuts it (it was never acknowledged, so its statement never ran) and says so in the
``log.start`` record; ``state.json`` (the compact range at the last checkpoint) spares it
rehashing the whole log, and is checked against ``checkpoints.jsonl`` before it is used.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import logging
import os
import re
import secrets
import threading
import time
from asyncio import (
    _get_running_loop as _running_loop,  # C: None off the loop, no exception
)
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from appliance.audit import canonical, keys, merkle, note
from appliance.audit.keys import KeyRing, fsync_dir, make_dir, write_atomic
from appliance.config import AuditConfig

if TYPE_CHECKING:
    import asyncio

    from appliance.audit.offbox import Shipper

log = logging.getLogger("tollgate.audit")

SEGMENT_RE = re.compile(r"^(\d{12})\.jsonl$")
STATE_VERSION = 1
CHECKPOINT_TAIL = 1 << 20  # bytes of checkpoints.jsonl read at open to find the last one
RECENT_CHECKPOINTS = 64  # of which this many are kept to check state.json against
READ_CHUNK = 1 << 23
_NL = b"\n"
_APPLIANCE = {"user": "tollgate", "outcome": "success", "origin": "local", "object": "audit-log"}


class AuditError(Exception):
    """The audit log can't be opened or used (locked, corrupt, misconfigured)."""


class AuditUnavailable(AuditError):
    """A record could not be written or made durable: what depends on it must not proceed."""

    def __init__(self, message: str, errno_: int | None = None):
        super().__init__(message)
        self.errno = errno_


def segment_name(start: int) -> str:
    return f"{start:012d}.jsonl"


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    """(first seq, path) of each segment file, in order."""
    segments = directory / "segments"
    try:
        names = os.listdir(segments)
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        m = SEGMENT_RE.match(name)
        if m:
            out.append((int(m.group(1)), segments / name))
    out.sort()
    return out


def checkpoint_time(unix: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


def checkpoint_root(entry: dict[str, Any]) -> bytes:
    """The root hash a checkpoints.jsonl entry's note states (signature not checked)."""
    return note.parse_checkpoint(note.split_note(entry["note"])[0]).root


class _Clock:
    """``YYYY-MM-DDTHH:MM:SS.ffffffZ`` now, formatting the seconds once per second."""

    __slots__ = ("_prefix", "_sec")

    def __init__(self) -> None:
        self._sec = -1
        self._prefix = ""

    def now(self) -> str:
        sec, ns = divmod(time.time_ns(), 1_000_000_000)
        if sec != self._sec:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
            self._sec = sec
        return f"{self._prefix}.{ns // 1000:06d}Z"


@dataclass(slots=True)
class _Snap:
    """A write position: everything before it is in the segment files (and, once synced, durable)."""

    size: int
    seg_start: int
    offset: int
    tree: merkle.CompactRange
    fd: int = -1
    retired: tuple[int, ...] = ()
    dir_dirty: bool = False


@dataclass(slots=True)
class _Failure:
    error: str
    since: str
    lost: tuple[int, int] | None = None  # (first, last) seq rolled back


class AuditLog:
    """The one writer of an audit directory. Make it with :meth:`open`."""

    def __init__(self, config: AuditConfig, keyring: KeyRing, lock_fd: int, *, version: str, run: str):
        self.config = config
        self.keyring = keyring
        self.version = version
        self.run = run
        self._lock_fd = lock_fd
        self._dir = config.dir
        self._segdir = config.dir / "segments"
        self._fsync_mode = config.durability == "fsync"
        self._segment_bytes = config.segment_bytes
        self._clock = _Clock()
        self._lock = threading.RLock()  # the write position (appends, snapshots, rollbacks)
        self._commit = threading.Lock()  # sync rounds and signing, in order
        # write position (under _lock)
        self._fd = -1
        self._seg_start = 0
        self._offset = 0
        self._size = 0
        self._tree = merkle.CompactRange()
        self._retired: list[int] = []
        self._dir_dirty = False
        self._broken: str | None = None  # a rollback after a failed sync that is not complete yet
        self._tail_dirty = False  # a failed write could not be cut off the segment yet
        self._repair_at = 0.0
        self._closed = False
        # durable point (published by whoever synced, under _lock)
        self._durable = _Snap(0, 0, 0, merkle.CompactRange())
        self._durable_size = 0
        self._epoch = 0
        # failures
        self._failure: _Failure | None = None
        self._refused = 0
        self._failures_total = 0
        # checkpoints
        self._ckpt_fd = -1
        self._ckpt_offset = 0
        self._last_ckpt: dict[str, Any] | None = None
        self._last_ckpt_size = -1
        self._last_ckpt_mono = 0.0
        self._first_unsigned_mono: float | None = None
        self._ckpt_requested = False
        self._ckpt_failures = 0
        self._ckpt_retry_at = 0.0
        self._recent_roots: dict[int, bytes] = {}  # size -> root of the last checkpoints (for state.json)
        # the sync thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._waiting = False
        self._wake_at = 1
        self._kicked = False  # a _kick is scheduled on the loop
        self._kick_loop: asyncio.AbstractEventLoop | None = None  # fsync mode: appends on it ask for syncs
        self._sync_target = 0  # records up to here have someone waiting: sync them
        self._stopping = False
        self._waiters: deque[tuple[int, int, asyncio.Future[None]]] = deque()
        self._shipper: Shipper | None = None
        # for tests: what syncs (fault injection of fsync errors without a failing disk)
        self._fdatasync: Callable[[int], None] = os.fdatasync

    # --- opening -----------------------------------------------------------------------------

    @classmethod
    def open(cls, config: AuditConfig, *, version: str, run: str | None = None,
             sinks: Iterable[Any] | None = None) -> AuditLog:
        """Lock the directory, load the keys, recover, append ``log.start``, sign a checkpoint.

        ``sinks``: off-box checkpoint sinks (default: from ``offbox_dir``/``offbox_syslog``).
        The sync thread is not running yet: call :meth:`start`.
        """
        directory = config.dir
        if not (directory / "trust.note").exists():
            raise AuditError(f"{directory}: no audit directory here (no trust.note); run `tollgate audit init`")
        lock_fd = _take_lock(directory)
        try:
            keyring = KeyRing.load(config)
            self = cls(config, keyring, lock_fd, version=version, run=run or secrets.token_hex(6))
            if sinks is None:
                from appliance.audit.offbox import sinks_for
                sinks = sinks_for(config)
            sinks = list(sinks)
            if sinks:
                from appliance.audit.offbox import Shipper
                self._shipper = Shipper(sinks)
            try:
                self._recover()
            except BaseException:
                self._close_fds()
                raise
        except BaseException:
            os.close(lock_fd)
            raise
        return self

    def _recover(self) -> None:
        config = self.config
        make_dir(self._segdir)
        self._open_checkpoints()  # a cut checkpoint line is no record: not in truncated_bytes
        truncated = 0
        last = self._last_ckpt
        last_size = last["size"] if last else 0
        segments = list_segments(self._dir)
        state = self._load_state(segments)
        if state is not None:
            size, seg_start, offset, tree = state
        else:
            size, seg_start, offset, tree = 0, (segments[0][0] if segments else 0), 0, merkle.CompactRange()
            if segments and segments[0][0] != 0:
                raise AuditError(f"{segments[0][1]}: the first segment must start at seq 0 (segments are missing)")
        last_root = checkpoint_root(last) if last else None
        later = [s for s in segments if s[0] >= seg_start]
        last_line = b""
        for i, (start, path) in enumerate(later):
            final = i == len(later) - 1
            if start != size and not (i == 0 and start == seg_start):
                raise AuditError(f"{path}: starts at seq {start}, but the segments before it end at {size - 1}")
            size, cut, tail = _rehash(path, offset if i == 0 else 0, tree, size, last_size, last_root)
            if tail:
                last_line = tail
            if cut:
                if not final:
                    raise AuditError(f"{path}: ends in a partial line although later segments exist (corrupt)")
                _truncate(path, os.path.getsize(path) - cut)
                truncated += cut
            offset = os.path.getsize(path) if final else 0
            seg_start = start
        if last is not None and size < last_size:
            raise AuditError(f"{self._dir}: the segments hold {size} records but the last checkpoint covers "
                             f"{last_size}: records were lost or removed (restore them, or start a new log "
                             "with `tollgate audit init --force`)")
        if last_line == b"" and size:
            last_line = _last_line(list_segments(self._dir))
        previous_run = None
        if last_line:
            try:
                record = canonical.loads(last_line)
                if record.get("seq") != size - 1:
                    raise AuditError(f"{self._dir}: the last record says seq {record.get('seq')}, but it is record "
                                     f"{size - 1} of the log")
                previous_run = record.get("run")
            except canonical.CanonicalError as exc:
                raise AuditError(f"{self._dir}: the last record is not valid JSON ({exc})") from None
        # open (or create) the current segment
        if not later and not segments:
            seg_start = 0
        path = self._segdir / segment_name(seg_start)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.fsync(fd)  # what a killed writer left in the page cache is durable from here
        fsync_dir(self._segdir)
        self._fd, self._seg_start, self._offset = fd, seg_start, os.fstat(fd).st_size
        self._size, self._tree = size, tree
        snap = _Snap(size, seg_start, self._offset, tree.copy())
        self._durable, self._durable_size = snap, size
        recovered = {"truncated_bytes": truncated, "records": size - last_size if last else size}
        if truncated:
            log.warning("audit: cut %d bytes of a partial record at the end of the log (never acknowledged)",
                        truncated)
        start = {"type": "log.start", **_APPLIANCE, "version": self.version, "durability": config.durability,
                 "key": self.keyring.signing_key.key_id, "recovered": recovered}
        if previous_run is not None:
            start["previous_run"] = previous_run
        self._append_or_raise(start)
        if size == 0:  # a new log: its first key is a key event too
            key = self.keyring.signing_key.key_id
            self._append_or_raise({"type": "key.generate", **_APPLIANCE, "key": key, "valid_from": 0})
        self.checkpoint_now()

    def _append_or_raise(self, record: dict[str, Any]) -> int:
        try:
            return self.append(record)
        except AuditUnavailable as exc:
            raise AuditError(f"cannot write to the audit log: {exc}") from None

    def _open_checkpoints(self) -> None:
        """Open checkpoints.jsonl for appending; read its last entry; cut a partial last line."""
        path = self._dir / "checkpoints.jsonl"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._ckpt_fd = fd
        end = os.fstat(fd).st_size
        tail = os.pread(fd, min(end, CHECKPOINT_TAIL), end - min(end, CHECKPOINT_TAIL))
        cut = 0
        if tail and not tail.endswith(_NL):
            cut = len(tail) - (tail.rfind(_NL) + 1)
            os.ftruncate(fd, end - cut)
            os.fsync(fd)
            end -= cut
            tail = tail[:len(tail) - cut]
            log.warning("audit: cut a partial checkpoint line (%d bytes) at the end of %s", cut, path)
        self._ckpt_offset = end
        self._recent_roots = {}
        for n, line in enumerate(reversed(tail.split(_NL))):
            if not line:
                continue
            try:
                entry = canonical.loads(line)
                root = checkpoint_root(entry)
            except (ValueError, KeyError, TypeError, note.NoteError) as exc:
                if self._last_ckpt is None:
                    raise AuditError(f"{path}: the last checkpoint is unreadable ({exc})") from None
                break
            if self._last_ckpt is None:
                self._last_ckpt = entry
                self._last_ckpt_size = entry["size"]
            self._recent_roots.setdefault(entry["size"], root)
            if n >= RECENT_CHECKPOINTS:
                break
        self._last_ckpt_mono = time.monotonic()

    def _load_state(self, segments: list[tuple[int, Path]]) -> tuple[int, int, int, merkle.CompactRange] | None:
        """The compact range at the last checkpoint, if state.json agrees with everything."""
        path = self._dir / "state.json"
        try:
            state = canonical.loads(path.read_bytes())
            if state.get("v") != STATE_VERSION:
                return None
            size, seg_start, offset = state["size"], state["segment"], state["offset"]
            tree = merkle.CompactRange(0, size, [base64.b64decode(h) for h in state["hashes"]])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if self._recent_roots.get(size) != tree.root():
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
                    if f.read(1) != _NL:
                        return None
        except OSError:
            return None
        return size, seg_start, offset, tree

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the sync thread; ``loop`` is where :meth:`durable` futures live."""
        if loop is not None:
            self._loop = loop
            if self._fsync_mode:
                self._kick_loop = loop
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="audit-sync", daemon=True)
            self._thread.start()

    # --- appending ---------------------------------------------------------------------------

    def append(self, record: dict[str, Any], *, trusted: bool = False) -> int:
        """Write ``record`` (filling ``seq``, ``time`` if absent, ``run``); return its seq.

        The line is in the segment (the kernel has it) when this returns; :meth:`durable`
        says when it is on disk. Raises :class:`AuditUnavailable` if it can't be written —
        then nothing of it remains and no seq was taken. ``record`` is modified in place.
        """
        with self._lock:
            if self._failure is not None:
                self._recover_from_failure()
            return self._append_locked(record, trusted)

    def _append_locked(self, record: dict[str, Any], trusted: bool = False) -> int:
        if self._closed:
            raise AuditUnavailable("the audit log is closed")
        if self._offset >= self._segment_bytes:
            self._next_segment()
        seq = self._size
        record["seq"] = seq
        if "time" not in record:
            record["time"] = self._clock.now()
        record["run"] = self.run
        data = canonical.dumps(record, trusted=trusted)
        offset = self._offset
        try:
            written = os.pwritev(self._fd, (data, _NL), offset)
        except OSError as exc:
            self._write_failed(offset, exc)
        if written != len(data) + 1:
            self._write_failed(offset, OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (a short write: "
                                                             f"{written} of {len(data) + 1} bytes)"))
        self._offset = offset + written
        self._size = seq + 1
        self._tree.append_leaf(merkle.leaf_hash(data))
        if self._waiting and self._size >= self._wake_at:
            self._wake.set()
        if not self._kicked and self._kick_loop is not None and _running_loop() is self._kick_loop:
            # fsync mode, on the loop: one sync for everything this loop iteration appends
            # (as durable() asks; records nobody waits for are synced as promptly)
            self._kicked = True
            self._kick_loop.call_soon(self._kick)
        return seq

    def _write_failed(self, offset: int, exc: OSError) -> None:
        """Cut what a failed write left, remember the failure, raise AuditUnavailable."""
        try:
            os.ftruncate(self._fd, offset)
        except OSError as trunc:
            self._tail_dirty = True  # cut before anything else is written
            log.error("audit: could not cut a failed write back off %s: %s", self._segment_path(), trunc.strerror)
        message = f"cannot write the audit log ({self._segment_path()}): {exc.strerror or exc}"
        self._note_failure(message)
        raise AuditUnavailable(message, exc.errno) from None

    def _note_failure(self, message: str, lost: tuple[int, int] | None = None) -> None:
        failure = self._failure
        if failure is None:
            self._failure = failure = _Failure(message, self._clock.now())
            self._failures_total += 1
            log.error("audit: %s — statements are refused until it can be written", message)
        else:
            failure.error = message
        if lost is not None:
            failure.lost = lost if failure.lost is None else (min(failure.lost[0], lost[0]), max(failure.lost[1], lost[1]))

    def _recover_from_failure(self) -> None:
        """Before the first record after a failure: record the failure itself (or raise)."""
        if self._broken is not None:  # the sync thread is still rolling back
            raise AuditUnavailable(self._broken)
        if self._tail_dirty:
            try:
                os.ftruncate(self._fd, self._offset)
            except OSError as exc:
                raise AuditUnavailable(f"cannot cut a failed write off {self._segment_path()}: {exc.strerror}",
                                       exc.errno) from None
            self._tail_dirty = False
        failure = self._failure
        assert failure is not None
        record: dict[str, Any] = {"type": "audit.failure", **_APPLIANCE, "outcome": "failure",
                                  "error": failure.error, "refused": self._refused, "since": failure.since}
        if failure.lost is not None:
            record["lost"] = {"from": failure.lost[0], "to": failure.lost[1]}
        self._append_locked(record)
        log.warning("audit: the log is writable again (down since %s; %d statements refused)",
                    failure.since, self._refused)
        self._failure = None
        self._refused = 0

    def note_refused(self, count: int = 1) -> None:
        """The proxy refused ``count`` statements because the log could not take their records."""
        self._refused += count

    def _next_segment(self) -> None:
        path = self._segdir / segment_name(self._size)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            message = f"cannot start a new audit segment {path}: {exc.strerror}"
            self._note_failure(message)
            raise AuditUnavailable(message, exc.errno) from None
        if os.fstat(fd).st_size:
            os.close(fd)
            raise AuditError(f"{path}: a new segment already holds data")
        self._retired.append(self._fd)
        self._fd, self._seg_start, self._offset = fd, self._size, 0
        self._dir_dirty = True

    def _segment_path(self) -> Path:
        return self._segdir / segment_name(self._seg_start)

    # --- durability ---------------------------------------------------------------------------

    def durable(self, seq: int) -> asyncio.Future[None] | None:
        """None if record ``seq`` needs no waiting (``durability = "write"``, or already
        synced); else a future resolved once an fdatasync covers it, or failed with
        :class:`AuditUnavailable`. Call on the event loop's thread."""
        if not self._fsync_mode or seq < self._durable_size:
            return None
        loop = self._loop
        if loop is None:
            import asyncio
            loop = self._loop = asyncio.get_running_loop()
        if self._thread is None:
            raise RuntimeError("AuditLog.start() was not called: nothing would make the record durable")
        fut = loop.create_future()
        waiters = self._waiters
        entry = (seq, self._epoch, fut)
        if waiters and waiters[-1][0] > seq:  # out of order (rare): keep the queue sorted
            i = len(waiters)
            while i and waiters[i - 1][0] > seq:
                i -= 1
            waiters.insert(i, entry)
        else:
            waiters.append(entry)
        if seq < self._durable_size:  # a sync published between the check above and now
            self._resolve_waiters(self._durable_size, self._epoch)
        elif not self._kicked:
            # Ask for the sync once this loop iteration is over: every task that runs in it
            # appends first, so one fdatasync covers them all (group commit without a timer).
            self._kicked = True
            loop.call_soon(self._kick)
        return fut

    def _kick(self) -> None:
        """On the loop, after the tasks of an iteration ran: sync what they are waiting for."""
        self._kicked = False
        self._sync_target = self._size
        if self._waiting:
            self._wake.set()

    def _resolve_waiters(self, size: int, epoch: int) -> None:
        """On the loop: resolve the futures of records below ``size`` (of ``epoch``)."""
        waiters = self._waiters
        later: list[tuple[int, int, asyncio.Future[None]]] = []
        while waiters and waiters[0][0] < size:
            entry = waiters.popleft()
            e, fut = entry[1], entry[2]
            if e > epoch:  # a record written after a rollback, with a reused seq: not this sync's
                later.append(entry)
            elif not fut.done():
                if e == epoch:
                    fut.set_result(None)
                else:
                    fut.set_exception(AuditUnavailable("the audit record was rolled back after a failed sync"))
        if later:
            waiters.extendleft(reversed(later))

    def _fail_waiters(self, epoch: int, message: str, code: int | None) -> None:
        """On the loop: fail every future from ``epoch`` (or before) still waiting."""
        keep: deque[tuple[int, int, asyncio.Future[None]]] = deque()
        for entry in self._waiters:
            if entry[1] <= epoch:
                if not entry[2].done():
                    entry[2].set_exception(AuditUnavailable(message, code))
            else:
                keep.append(entry)
        self._waiters = keep

    def _snapshot(self) -> _Snap:
        with self._lock:
            snap = _Snap(self._size, self._seg_start, self._offset, self._tree.copy(), self._fd,
                         tuple(self._retired), self._dir_dirty)
            self._retired = []
            self._dir_dirty = False
            return snap

    def _sync(self, snap: _Snap) -> bool:
        """Make ``snap`` durable and publish it; False (rolled back) if a sync failed."""
        try:
            for fd in snap.retired:
                os.fsync(fd)
            if snap.dir_dirty:
                fsync_dir(self._segdir)
            if snap.size > self._durable_size or snap.retired:
                self._fdatasync(snap.fd)
        except OSError as exc:
            self._sync_failed(snap, exc)
            return False
        for fd in snap.retired:
            try:
                os.close(fd)
            except OSError:
                pass  # synced already: nothing is lost
        with self._lock:
            if snap.size >= self._durable_size:
                self._durable = snap
                self._durable_size = snap.size
            epoch = self._epoch
        loop = self._loop
        if self._waiters and loop is not None:
            try:
                loop.call_soon_threadsafe(self._resolve_waiters, snap.size, epoch)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass
        return True

    def _sync_failed(self, snap: _Snap, exc: OSError) -> None:
        """An fsync failed: the kernel may have dropped what it held. Roll the log back to
        the last durable point and fail everything beyond it."""
        message = f"cannot make the audit log durable ({self._segment_path()}): {exc.strerror or exc}"
        with self._lock:
            durable = self._durable
            lost = (durable.size, self._size - 1) if self._size > durable.size else None
            epoch = self._epoch
            self._epoch += 1
            self._retired.extend(fd for fd in snap.retired if fd not in self._retired)
            self._note_failure(message, lost)
            self._broken = message
            try:
                self._repair()
            except AuditUnavailable:
                self._repair_at = time.monotonic() + 0.5  # stays broken: the sync thread retries
        log.error("audit: %s; rolled back to seq %d%s", message, durable.size,
                  f" (records {lost[0]}–{lost[1]} lost, their statements refused)" if lost else "")
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._fail_waiters, epoch, message, exc.errno)
            except RuntimeError:
                pass

    def _try_repair(self) -> bool:
        with self._lock:
            try:
                self._repair()
            except AuditUnavailable as exc:
                self._repair_at = time.monotonic() + 0.5
                log.error("audit: %s (retrying)", exc)
                return False
        log.warning("audit: rolled back to seq %d; records can be written again", self._size)
        return True

    def _repair(self) -> None:
        """Under the lock: put the files and the tree back at the last durable point."""
        durable = self._durable
        try:
            fds = {self._fd, *self._retired} - {-1}
            for fd in fds:
                os.close(fd)
            self._fd, self._retired = -1, []
            for start, path in list_segments(self._dir):
                if start > durable.seg_start:
                    path.unlink()
            path = self._segdir / segment_name(durable.seg_start)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._fd = fd
            os.ftruncate(fd, durable.offset)
            os.fsync(fd)
            fsync_dir(self._segdir)
        except OSError as exc:
            self._broken = f"cannot roll the audit log back after a failure: {exc.strerror or exc}"
            raise AuditUnavailable(self._broken, exc.errno) from None
        self._seg_start, self._offset, self._size = durable.seg_start, durable.offset, durable.size
        self._tree = durable.tree.copy()
        self._broken = None

    # --- the sync thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                now = time.monotonic()
                if self._due(now):
                    with self._commit:
                        if self._stopping:
                            break
                        self._round(force=False)
                    continue
                self._waiting = True
                now = time.monotonic()
                if not self._due(now):
                    self._wake.wait(max(self._deadline(now) - now, 0.0))
                self._waiting = False
                self._wake.clear()
        except BaseException as exc:  # never die silently: nothing would become durable any more
            log.critical("audit: the sync thread failed; the log refuses records from now on", exc_info=True)
            message = f"the audit log's sync thread failed: {type(exc).__name__}: {exc}"
            with self._lock:
                self._broken = message
                self._repair_at = float("inf")
                self._note_failure(message)
                epoch = self._epoch
                self._epoch += 1
            loop = self._loop
            if loop is not None:
                try:
                    loop.call_soon_threadsafe(self._fail_waiters, epoch, message, None)
                except RuntimeError:
                    pass
            raise

    def _due(self, now: float) -> bool:
        if self._broken is not None:
            return now >= self._repair_at
        size = self._size
        if self._first_unsigned_mono is None and size > self._last_ckpt_size:
            self._first_unsigned_mono = now
        if self._fsync_mode and self._loop is None:  # no loop to kick us: every append does
            self._wake_at = self._durable_size + 1
            if size > self._durable_size or self._retired:
                return True
        else:  # appends wake us for checkpoints only; in fsync mode _kick asks for the syncs
            self._wake_at = (self._last_ckpt_size + 1 if self._first_unsigned_mono is None
                             else self._last_ckpt_size + self.config.checkpoint_records)
            if self._sync_target > self._durable_size:
                return True
        return self._checkpoint_due(now, size)

    def _checkpoint_due(self, now: float, size: int) -> bool:
        if self._broken is not None or now < self._ckpt_retry_at:
            return False
        unsigned = size - self._last_ckpt_size
        if unsigned > 0:
            if self._ckpt_requested or unsigned >= self.config.checkpoint_records:
                return True
            if self._first_unsigned_mono is not None and now - self._first_unsigned_mono >= self.config.checkpoint_seconds:
                return True
        return now - self._last_ckpt_mono >= self.config.heartbeat_seconds

    def _deadline(self, now: float) -> float:
        if self._broken is not None:
            return self._repair_at
        deadline = self._last_ckpt_mono + self.config.heartbeat_seconds
        if self._first_unsigned_mono is not None:
            deadline = min(deadline, self._first_unsigned_mono + self.config.checkpoint_seconds)
        return max(deadline, self._ckpt_retry_at)

    def _round(self, force: bool) -> dict[str, Any] | None:
        """Under _commit: sync what is written; sign a checkpoint if one is due (or ``force``)."""
        if self._broken is not None and not self._try_repair():
            return None
        snap = self._snapshot()
        if not self._sync(snap):
            return None
        now = time.monotonic()
        if force or self._checkpoint_due(now, snap.size):
            return self._checkpoint(snap)
        return None

    # --- checkpoints ------------------------------------------------------------------------------

    def _checkpoint(self, snap: _Snap) -> dict[str, Any] | None:
        """Sign ``snap`` (durable), append it to checkpoints.jsonl, save state, ship it."""
        unix = int(time.time())
        stamp = checkpoint_time(unix)
        body = note.make_checkpoint(self.config.origin, snap.size, snap.tree.root(), stamp)
        text = note.sign_note(body, self.keyring.signing_key)
        entry = {"note": text, "size": snap.size, "time": stamp}
        line = canonical.dumps(entry) + _NL
        offset = self._ckpt_offset
        try:
            written = os.pwrite(self._ckpt_fd, line, offset)
            if written != len(line):
                raise OSError(errno.ENOSPC, "short write")
            self._fdatasync(self._ckpt_fd)
        except OSError as exc:
            try:
                os.ftruncate(self._ckpt_fd, offset)
            except OSError:
                pass
            self._ckpt_failures += 1
            self._ckpt_retry_at = time.monotonic() + min(0.05 * 2 ** self._ckpt_failures, 5.0)
            log.error("audit: cannot write a checkpoint to %s: %s (will retry)",
                      self._dir / "checkpoints.jsonl", exc.strerror or exc)
            return None
        self._ckpt_offset = offset + len(line)
        self._ckpt_failures = 0
        self._ckpt_retry_at = 0.0
        self._last_ckpt = entry
        self._last_ckpt_size = snap.size
        self._last_ckpt_mono = time.monotonic()
        self._first_unsigned_mono = None
        self._ckpt_requested = False
        self._save_state(snap)
        if self._shipper is not None:
            self._shipper.submit(text, snap.size, unix)
        return entry

    def _save_state(self, snap: _Snap) -> None:
        state = {"v": STATE_VERSION, "size": snap.size, "segment": snap.seg_start, "offset": snap.offset,
                 "hashes": [base64.b64encode(h).decode() for h in snap.tree.hashes]}
        try:
            # No fsync: state.json only saves rehashing, and is checked against the
            # (fsync'd) checkpoint before it is believed.
            write_atomic(self._dir / "state.json", canonical.dumps(state) + _NL, 0o600, sync=False)
        except OSError as exc:
            log.warning("audit: could not save %s: %s (restart will rehash)", self._dir / "state.json", exc.strerror)

    def request_checkpoint(self) -> None:
        """Sign a checkpoint soon (a session ended): at the sync thread's next round."""
        self._ckpt_requested = True
        if self._waiting:
            self._wake.set()

    def checkpoint_now(self) -> dict[str, Any]:
        """Make everything written durable and sign a checkpoint over it, now, in this
        thread; the checkpoints.jsonl entry ``{"note", "size", "time"}``."""
        with self._commit:
            if self._broken is not None and not self._try_repair():
                raise AuditUnavailable(self._broken or "the audit log is being rolled back")
            snap = self._snapshot()
            if not self._sync(snap):
                raise AuditUnavailable(self._failure.error if self._failure else "the audit log could not be synced")
            entry = self._checkpoint(snap)
        if entry is None:
            raise AuditUnavailable(f"could not write a checkpoint to {self._dir / 'checkpoints.jsonl'}")
        return entry

    def append_durable(self, record: dict[str, Any]) -> int:
        """Append and make durable before returning (for commands, not the hot path)."""
        seq = self.append(record)
        with self._commit:
            if seq >= self._durable_size and not self._sync(self._snapshot()):
                raise AuditUnavailable(self._failure.error if self._failure else "the audit log could not be synced")
        return seq

    # --- keys ----------------------------------------------------------------------------------------

    def rotate_key(self, root_key: note.SigningKey, *, user: str = "tollgate", origin: str = "local") -> note.SigningKey:
        """Rotate the signing key: a ``key.rotate`` record at seq S-1, a checkpoint at S
        signed with the old key, then the trust file re-signed (old key valid until S, the
        new one from S) and a checkpoint at S with the new key. Appends wait meanwhile."""
        if root_key.verifier_key() != self.keyring.root_verifier_text:
            raise keys.AuditKeyError(f"the root key given is not the one {self.config.keys_dir / 'root.pub'} names")
        with self._commit, self._lock:
            if self._broken is not None and not self._try_repair():
                raise AuditUnavailable(self._broken or "the audit log is being rolled back")
            if self._failure is not None:
                self._recover_from_failure()
            old = self.keyring.signing_key
            new = keys.new_signing_key(self.keyring)
            at = self._size + 1
            self._append_locked({"type": "key.rotate", "user": user, "outcome": "success", "origin": origin,
                                 "object": "audit-log", "key": new.key_id, "previous": old.key_id,
                                 "valid_from": at})
            snap = self._snapshot()
            if not self._sync(snap):
                raise AuditUnavailable(self._failure.error if self._failure else "sync failed")
            if self._checkpoint(snap) is None:
                raise AuditUnavailable("could not sign the checkpoint closing the old key; the key was not rotated")
            keys.rotate(self.keyring, at, root_key, new)
            log.info("audit: signing key rotated at tree size %d: %s -> %s", at, old.key_id, new.key_id)
            self._checkpoint(snap)  # the new key's first checkpoint, same size
            return new

    # --- status and closing ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        last = self._last_ckpt
        failure = self._failure
        return {
            "dir": str(self._dir), "origin": self.config.origin, "run": self.run, "pid": os.getpid(),
            "durability": self.config.durability, "size": self._size, "durable_size": self._durable_size,
            "segment": segment_name(self._seg_start), "segment_bytes": self._offset,
            "key": self.keyring.signing_key.key_id,
            "checkpoint": {"size": last["size"], "time": last["time"]} if last else None,
            "failure": ({"error": failure.error, "since": failure.since, "refused": self._refused,
                         "lost": list(failure.lost) if failure.lost else None} if failure else None),
            "failures_total": self._failures_total,
            "offbox": self._shipper.status() if self._shipper is not None else [],
        }

    @property
    def size(self) -> int:
        return self._size

    @property
    def durable_size(self) -> int:
        return self._durable_size

    def close(self, reason: str = "closed") -> None:
        """``log.stop``, a last sync and checkpoint, stop the thread, release the lock."""
        if self._closed:
            return
        with self._lock:  # log.stop is the last record: nothing is appended after it
            try:
                self.append({"type": "log.stop", **_APPLIANCE, "reason": reason})
            except AuditUnavailable as exc:
                log.error("audit: could not record the log's stop: %s", exc)
            self._closed = True
        self._stopping = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        try:
            self.checkpoint_now()
        except AuditUnavailable as exc:
            log.error("audit: no final checkpoint: %s", exc)
        if self._shipper is not None:
            self._shipper.close()
        self._close_fds()
        os.close(self._lock_fd)
        self._lock_fd = -1

    def _close_fds(self) -> None:
        for fd in {self._fd, self._ckpt_fd, *self._retired} - {-1}:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fd = self._ckpt_fd = -1
        self._retired = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close("closed")


# --- helpers -----------------------------------------------------------------------------------

def _take_lock(directory: Path) -> int:
    fd = os.open(directory / "LOCK", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            os.close(fd)
            raise
        try:
            pid = os.pread(fd, 32, 0).decode().split()[0]
        except (IndexError, UnicodeDecodeError):
            pid = "?"
        os.close(fd)
        raise AuditError(f"the audit log is in use by pid {pid} ({directory / 'LOCK'})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def lock_holder(directory: Path) -> int | None:
    """The pid that holds the audit directory's lock (a running writer), or None."""
    return keys._locked(directory)


def _rehash(path: Path, offset: int, tree: merkle.CompactRange, size: int, check_size: int,
            check_root: bytes | None) -> tuple[int, int, bytes]:
    """Hash the complete lines of ``path`` from ``offset`` into ``tree``.

    Returns (new size, bytes of a partial last line, the last complete line). When the tree
    passes ``check_size`` its root must be ``check_root`` (the last checkpoint's).
    """
    leaf = merkle.leaf_hash
    add = tree.append_leaf
    rest = b""
    last = b""
    with open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(READ_CHUNK):
            lines = (rest + chunk).split(_NL) if rest else chunk.split(_NL)
            rest = lines.pop()
            for line in lines:
                if size == check_size and check_root is not None and tree.root() != check_root:
                    raise AuditError(f"{path}: the records before seq {size} don't match the last checkpoint")
                add(leaf(line))
                size += 1
            if lines:
                last = lines[-1]
    if size == check_size and check_root is not None and tree.root() != check_root:
        raise AuditError(f"{path}: the records don't match the last checkpoint (size {check_size})")
    return size, len(rest), last


def _truncate(path: Path, length: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, length)
        os.fsync(fd)
    finally:
        os.close(fd)


def last_complete_line(path: Path) -> bytes | None:
    """The last complete (newline-ended) line of a file, read from its end; None if it has
    none (empty, or one partial line)."""
    with open(path, "rb") as f:
        end = os.fstat(f.fileno()).st_size
        back = min(end, 1 << 16)
        while back:
            f.seek(end - back)
            data = f.read(back)
            body = data[:data.rfind(_NL)]  # the complete lines only
            i = body.rfind(_NL)
            if i >= 0 or back == end:
                return body[i + 1:] or None
            back = min(end, back * 4)
    return None


def _last_line(segments: list[tuple[int, Path]]) -> bytes:
    """The last complete line of the log (looking back over empty segments)."""
    for _start, path in reversed(segments):
        line = last_complete_line(path)
        if line is not None:
            return line
    return b""
