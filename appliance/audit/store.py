"""The audit log: :class:`AuditLog`, the single writer of an audit directory.

One process writes an audit directory at a time (an exclusive ``flock`` on ``dir/LOCK``):
the proxy while it runs, else a CLI command. The formats are in docs/audit-format.md.

:meth:`AuditLog.append` is synchronous and cheap (encode, one ``pwritev``, one leaf hash, a
compact-range update). The proxy calls it on its event-loop thread; it is thread-safe (one
lock), so a CLI may call it from anywhere. :meth:`AuditLog.durable` says when a record is on
disk. With ``durability = "fsync"``, what the event loop appends is held and written once
per loop iteration, all of it with one ``pwrite``, before the sync it asks for (see
store_commit); anywhere else, and with ``"write"``, a record is written before ``append``
returns. The log is built from parts, each in its own module:

* :mod:`~appliance.audit.store_segments` — the segment files and the end of the log;
* :mod:`~appliance.audit.store_recovery` — finding that end again after a stop or a crash;
* :mod:`~appliance.audit.store_commit` — the sync thread (group commit) and rollbacks;
* :mod:`~appliance.audit.store_checkpoints` — signed checkpoints, their cadence, state.json.

Failure
-------

A write that fails (ENOSPC, EIO, a short write) is cut back off the segment, the record's
seq and tree leaf are not taken, and ``append`` raises :class:`AuditUnavailable`. A write
of held records that fails drops the whole batch alike and fails the futures of its
statements (none is forwarded); an ``fdatasync`` that fails rolls the log back to the last
durable point (see store_commit).
Either way the failure is remembered, and the first append that succeeds afterwards is
preceded by an ``audit.failure`` record: the error, since when, how many statements the
proxy refused meanwhile (:meth:`AuditLog.note_refused`) and which seqs were rolled back.
Nothing needs to be restarted: appends work again as soon as the disk takes them.

A segment that changes under the writer (cut, grown, replaced or removed — checked each
sync round and before every checkpoint) is different: the log is *damaged* and refuses
every record until it is opened again, and signs no checkpoint over what is no longer on
disk. What was found is recorded as ``audit.failure`` (with ``damage``) in a new segment
named by the next seq, if that can be written (:meth:`AuditLog._record_damage`).
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Self

from appliance.audit import canonical, keys, note
from appliance.audit.keys import KeyRing, fsync_dir, make_dir
from appliance.audit.store_checkpoints import Checkpointer
from appliance.audit.store_commit import GroupCommit, Outage, RecordObserver
from appliance.audit.store_errors import AuditError, AuditUnavailable
from appliance.audit.store_recovery import recover
from appliance.audit.store_segments import Damage, SegmentWriter, segment_name, take_lock
from appliance.config import AuditConfig

if TYPE_CHECKING:
    import asyncio

log = logging.getLogger("tollgate.audit")

# What the log's own records (log.start, log.stop, key events, failures) say of themselves.
_APPLIANCE = {"user": "tollgate", "outcome": "success", "origin": "local", "object": "audit-log"}
WITNESS_WAIT_ON_CLOSE = 3.0  # seconds close() waits for the witnesses to cosign the last checkpoint


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


class AuditLog:
    """The one writer of an audit directory. Make it with :meth:`open`.

    ``fdatasync`` is what makes a segment or checkpoints.jsonl durable (``os.fdatasync``);
    tests pass one that fails to see a failing disk handled.
    """

    def __init__(self, config: AuditConfig, keyring: KeyRing, lock_fd: int, *, version: str, run: str,
                 fdatasync: Callable[[int], None] = os.fdatasync) -> None:
        self.config = config
        self.keyring = keyring
        self.version = version
        self.run = run
        self._lock_fd = lock_fd
        self._dir = config.dir
        self._segment_bytes = config.segment_bytes
        self._clock = _Clock()
        self._closed = False
        self._end = SegmentWriter(config.dir, config.segment_bytes)
        self._lock = self._end.lock
        self._outage = Outage(self._clock.now)
        self._checkpoints = Checkpointer(config, keyring, fdatasync)
        self._commit = GroupCommit(self._end, self._checkpoints, self._outage,
                                   fsync_mode=config.durability == "fsync", fdatasync=fdatasync)
        self._commit.on_damage = self._record_damage
        # Told of every record appended and of each append's time (the metrics); None: nobody.
        self.observer: RecordObserver | None = None

    # --- opening -----------------------------------------------------------------------------

    @classmethod
    def open(cls, config: AuditConfig, *, version: str, run: str | None = None,
             sinks: Iterable[Any] | None = None, fdatasync: Callable[[int], None] = os.fdatasync) -> AuditLog:
        """Lock the directory, load the keys, recover, append ``log.start``, sign a checkpoint.

        ``sinks``: off-box checkpoint sinks (default: from ``offbox_dir``/``offbox_syslog``).
        The sync thread is not running yet: call :meth:`start`.
        """
        directory = config.dir
        if not (directory / "trust.note").exists():
            raise AuditError(f"{directory}: no audit directory here (no trust.note); run `tollgate audit init`")
        lock_fd = take_lock(directory)
        try:
            keyring = KeyRing.load(config)
            self = cls(config, keyring, lock_fd, version=version, run=run or secrets.token_hex(6), fdatasync=fdatasync)
            if sinks is None:
                from appliance.audit.offbox import sinks_for
                sinks = sinks_for(config)
            sinks = list(sinks)
            if sinks:
                from appliance.audit.offbox import Shipper
                self._checkpoints.shipper = Shipper(sinks)
            if config.witnesses:
                from appliance.audit.witnessing import Witnessing
                self._checkpoints.witnessing = Witnessing(config)
                self._checkpoints.witnessing.on_change = self.append
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
        make_dir(self._end.segdir)
        checkpoints = self._checkpoints
        checkpoints.open()  # a cut checkpoint line is no record: not in truncated_bytes
        found = recover(self._dir, checkpoints.last, checkpoints.recent_roots)
        self._commit.restart_from(self._end.open_at(found.seg_start, found.size, found.tree))
        start = {"type": "log.start", **_APPLIANCE, "version": self.version, "durability": self.config.durability,
                 "key": self.keyring.signing_key.key_id,
                 "recovered": {"truncated_bytes": found.truncated, "records": found.unsigned}}
        if found.previous_run is not None:
            start["previous_run"] = found.previous_run
        self._append_or_raise(start)
        if found.size == 0:  # a new log: its first key is a key event too
            key = self.keyring.signing_key.key_id
            self._append_or_raise({"type": "key.generate", **_APPLIANCE, "key": key, "valid_from": 0})
        self.checkpoint_now()

    def _append_or_raise(self, record: dict[str, Any]) -> int:
        try:
            return self.append(record)
        except AuditUnavailable as exc:
            raise AuditError(f"cannot write to the audit log: {exc}") from None

    def observe(self, observer: RecordObserver) -> None:
        """Tell ``observer`` of every record from now on, and of the appends' and syncs' times."""
        self.observer = observer
        self._commit.observer = observer

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the sync thread; ``loop`` is where :meth:`durable` futures live."""
        self._commit.start(loop)

    # --- appending ---------------------------------------------------------------------------

    def append(self, record: dict[str, Any], *, trusted: bool = False) -> int:
        """Write ``record`` (filling ``seq``, ``time`` if absent, ``run``); return its seq.

        The line is in the segment (the kernel has it) when this returns — or, on the event
        loop with ``durability = "fsync"``, once this loop iteration is over; :meth:`durable`
        says when it is on disk. Raises :class:`AuditUnavailable` if it can't be written —
        then nothing of it remains and no seq was taken. ``record`` is modified in place.
        """
        observer = self.observer
        if observer is None:
            with self._lock:
                if self._outage.failure is not None:
                    self._recover_from_failure()
                return self._append_locked(record, trusted)
        started = time.perf_counter()
        with self._lock:
            if self._outage.failure is not None:
                self._recover_from_failure()
            seq = self._append_locked(record, trusted)
            observer.appended(time.perf_counter() - started)
            return seq

    def append_waiting(self, record: dict[str, Any], *, trusted: bool = False) -> asyncio.Future[None] | None:
        """:meth:`append`, and :meth:`durable` for it, under one hold of the lock: a sync
        that fails and rolls the log back can't come between them, so the future is always
        failed with the record it waits for (a seq taken again after a rollback never
        resolves it). For a statement that must not run before its record is durable; on
        the event loop's thread."""
        with self._lock:
            if self._outage.failure is not None:
                self._recover_from_failure()
            return self._commit.durable(self._append_locked(record, trusted))

    def _append_locked(self, record: dict[str, Any], trusted: bool = False) -> int:
        if self._closed:
            raise AuditUnavailable("the audit log is closed")
        end = self._end
        commit = self._commit
        on_loop = commit.on_kick_loop()
        hold = commit.holds_appends(on_loop)
        if not hold and end.held:
            self._flush_locked()  # in order: what the loop holds goes first
        if end.offset + end.held_bytes >= self._segment_bytes:
            self._flush_locked()
            self._next_segment()
        seq = end.size
        record["seq"] = seq
        if "time" not in record:
            record["time"] = self._clock.now()
        record["run"] = self.run
        data = canonical.dumps(record, trusted=trusted)
        if hold:
            end.hold(data)
        else:
            try:
                end.append(data)
            except OSError as exc:
                self._write_failed(exc)
        if self.observer is not None:  # counted once it is written (or held for this turn's write)
            self.observer.recorded(record)
        commit.appended(seq + 1, on_loop)
        return seq

    def _flush_locked(self) -> None:
        """Under the lock: write what is held; AuditUnavailable (the log rolls back to its
        durable point, refusing every record of the batch) if it can't be."""
        failed = self._commit.flush()
        if failed is not None:
            raise failed

    def _write_failed(self, exc: OSError) -> None:
        """Cut what a failed write left, remember the failure, raise AuditUnavailable."""
        end = self._end
        cut_failed = end.cut_failed_write()
        if cut_failed is not None:  # cut before anything else is written
            log.error("audit: could not cut a failed write back off %s: %s", end.path, cut_failed.strerror)
        message = f"cannot write the audit log ({end.path}): {exc.strerror or exc}"
        self._outage.note(message)
        raise AuditUnavailable(message, exc.errno) from None

    def _next_segment(self) -> None:
        try:
            self._end.next_segment()
        except OSError as exc:
            message = f"cannot start a new audit segment {exc.filename}: {exc.strerror}"
            self._outage.note(message)
            raise AuditUnavailable(message, exc.errno) from None

    def _recover_from_failure(self) -> None:
        """Before the first record after a failure: record the failure itself (or raise)."""
        if self._commit.broken is not None:  # the sync thread is still rolling back
            raise AuditUnavailable(self._commit.broken)
        if self._commit.unsettled:  # the statements that waited are being refused (and counted)
            raise AuditUnavailable("the audit log is refusing the statements that waited for it")
        end = self._end
        if end.tail_dirty:
            exc = end.cut_failed_write()
            if exc is not None:
                raise AuditUnavailable(f"cannot cut a failed write off {end.path}: {exc.strerror}", exc.errno)
        outage = self._outage
        failure = outage.failure
        assert failure is not None
        record: dict[str, Any] = {"type": "audit.failure", **_APPLIANCE, "outcome": "failure",
                                  "error": failure.error, "refused": outage.refused, "since": failure.since}
        if failure.lost is not None:
            record["lost"] = {"from": failure.lost[0], "to": failure.lost[1]}
        self._append_locked(record)
        # In the file before the outage is over: an account lost in a failed write of held
        # records would take its counts with it.
        self._flush_locked()
        log.warning("audit: the log is writable again (down since %s; %d statements refused)",
                    failure.since, outage.refused)
        outage.over()

    def _record_damage(self, damage: Damage) -> None:
        """Under the lock, once the segment changed under the writer: ``audit.failure`` with
        what was found, alone in a new segment named by the next seq, fsync'd. Never signed
        (no checkpoint is signed after the damage). Logged if it can't be written."""
        end = self._end
        end.discard_held()  # never written: the log is refused from here on
        seq = end.size
        failure = self._outage.failure
        record: dict[str, Any] = {"type": "audit.failure", **_APPLIANCE, "outcome": "failure",
                                  "error": damage.message, "damage": damage.found, "refused": self._outage.refused,
                                  "since": failure.since if failure else self._clock.now(), "seq": seq,
                                  "time": self._clock.now(), "run": self.run}
        if failure is not None and failure.lost is not None:
            record["lost"] = {"from": failure.lost[0], "to": failure.lost[1]}
        try:
            end.next_segment()
            end.append(canonical.dumps(record))
            os.fsync(end.fd)
            fsync_dir(end.segdir)
        except (OSError, AuditError) as exc:
            log.error("audit: could not record the damage in a new segment (%s): %s", segment_name(seq), exc)
            return
        log.error("audit: the damage is recorded as seq %d in %s", seq, end.path)

    def note_inflight(self, delta: int) -> None:
        """The proxy forwarded (+1) or saw answered (−1) statements: on the loop's thread.
        Once someone counts, a sync that every statement in flight waits for runs on the
        loop's thread when at most one session is open (store_commit); a miscount only
        changes where a sync runs."""
        commit = self._commit
        commit.inflight = max(0, (commit.inflight or 0) + delta)

    def note_sessions(self, delta: int) -> None:
        """A session started (+1) or ended (−1): on the loop's thread (see note_inflight)."""
        commit = self._commit
        commit.sessions = max(0, commit.sessions + delta)

    def note_refused(self, count: int = 1) -> None:
        """The proxy refused ``count`` statements because the log could not take their records."""
        self._outage.refused += count

    # --- durability and checkpoints --------------------------------------------------------------

    def durable(self, seq: int) -> asyncio.Future[None] | None:
        """None if record ``seq`` needs no waiting (``durability = "write"``, or already
        synced); else a future resolved once an fdatasync covers it, or failed with
        :class:`AuditUnavailable`. Call on the event loop's thread. What must not proceed
        before its record is durable uses :meth:`append_waiting` instead: between an
        append and this call a failed sync may roll the seq back."""
        return self._commit.durable(seq)

    def request_checkpoint(self) -> None:
        """Sign a checkpoint soon (a session ended): at the sync thread's next round."""
        self._checkpoints.request()
        self._commit.wake()

    def checkpoint_now(self, witness_timeout: float = 0.0) -> dict[str, Any]:
        """Make everything written durable and sign a checkpoint over it, now, in this
        thread; the checkpoints.jsonl entry ``{"note", "size", "time"}``. With witnesses,
        wait up to ``witness_timeout`` seconds for a quorum of them to cosign it (``close``
        does; the entry's ``witnessed`` says whether they did). Never on the event loop's
        thread with a timeout: the control socket's ops run there."""
        with self._commit.commit_lock, self._commit.sign_lock:
            self._commit.repair_if_broken()
            entry = self._checkpoints.sign(self._commit.sync_snapshot())
        if entry is None:
            raise AuditUnavailable(f"could not write a checkpoint to {self._dir / 'checkpoints.jsonl'}")
        witnessing = self._checkpoints.witnessing
        if witnessing is not None and witness_timeout > 0:
            entry = {**entry, "witnessed": witnessing.wait_for_quorum(entry["note"], witness_timeout)}
        return entry

    def flush_witnesses(self, timeout: float | None = None) -> bool:
        """Wait until each witness was tried with the latest checkpoint (True without witnesses)."""
        witnessing = self._checkpoints.witnessing
        return witnessing.flush(timeout) if witnessing is not None else True

    def append_durable(self, record: dict[str, Any]) -> int:
        """Append and make durable before returning (for commands, not the hot path)."""
        seq = self.append(record)
        with self._commit.commit_lock:
            if seq >= self._commit.durable_size:
                self._commit.sync_snapshot()
        return seq

    # --- keys ----------------------------------------------------------------------------------------

    def rotate_key(self, root_key: note.SigningKey, *, user: str = "tollgate",
                   origin: str = "local") -> note.SigningKey:
        """Rotate the signing key: a ``key.rotate`` record at seq S-1, a checkpoint at S
        signed with the old key, then the trust file re-signed (old key valid until S, the
        new one from S) and a checkpoint at S with the new key. Appends wait meanwhile."""
        if root_key.verifier_key() != self.keyring.root_verifier_text:
            raise keys.AuditKeyError(f"the root key given is not the one {self.config.keys_dir / 'root.pub'} names")
        with self._commit.commit_lock, self._commit.sign_lock, self._lock:
            self._commit.repair_if_broken()
            if self._outage.failure is not None:
                self._recover_from_failure()
            old = self.keyring.signing_key
            new = keys.new_signing_key(self.keyring)
            at = self._end.size + 1
            self._append_locked({"type": "key.rotate", "user": user, "outcome": "success", "origin": origin,
                                 "object": "audit-log", "key": new.key_id, "previous": old.key_id,
                                 "valid_from": at})
            snap = self._commit.sync_snapshot()
            if self._checkpoints.sign(snap) is None:
                raise AuditUnavailable("could not sign the checkpoint closing the old key; the key was not rotated")
            keys.rotate(self.keyring, at, root_key, new)
            log.info("audit: signing key rotated at tree size %d: %s -> %s", at, old.key_id, new.key_id)
            self._checkpoints.sign(snap)  # the new key's first checkpoint, same size
            return new

    # --- status and closing ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        last = self._checkpoints.last
        outage = self._outage
        failure = outage.failure
        shipper = self._checkpoints.shipper
        return {
            "dir": str(self._dir), "origin": self.config.origin, "run": self.run, "pid": os.getpid(),
            "durability": self.config.durability, "size": self._end.size, "durable_size": self._commit.durable_size,
            "segment": segment_name(self._end.seg_start), "segment_bytes": self._end.offset,
            "key": self.keyring.signing_key.key_id,
            "checkpoint": {"size": last["size"], "time": last["time"]} if last else None,
            "failure": ({"error": failure.error, "since": failure.since, "refused": outage.refused,
                         "lost": list(failure.lost) if failure.lost else None} if failure else None),
            "failures_total": outage.total,
            "offbox": shipper.status() if shipper is not None else [],
            "witnesses": self._checkpoints.witnessing.status() if self._checkpoints.witnessing is not None else [],
            "witness_quorum": self.config.witness_quorum,
        }

    @property
    def size(self) -> int:
        return self._end.size

    @property
    def durable_size(self) -> int:
        return self._commit.durable_size

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
        self._commit.stop()
        try:
            # The last checkpoint is the one a witness should hold: give them a moment.
            self.checkpoint_now(witness_timeout=WITNESS_WAIT_ON_CLOSE)
        except AuditUnavailable as exc:
            log.error("audit: no final checkpoint: %s", exc)
        if self._checkpoints.shipper is not None:
            self._checkpoints.shipper.close()
        if self._checkpoints.witnessing is not None:
            self._checkpoints.witnessing.close()
        self._close_fds()
        self._release_lock()

    def abandon(self) -> None:
        """Let go of the log as a killed process would: no ``log.stop``, no last sync or
        checkpoint; the sync thread stopped, the files and the lock released. What is
        written stays for the next :meth:`open` to recover (crash drills and tests)."""
        if self._closed:
            return
        self._closed = True
        self._commit.stop()
        if self._checkpoints.shipper is not None:
            self._checkpoints.shipper.close()
        if self._checkpoints.witnessing is not None:
            self._checkpoints.witnessing.close()
        self._close_fds()
        self._release_lock()

    def _close_fds(self) -> None:
        self._end.close_fds()
        self._checkpoints.close_file()

    def _release_lock(self) -> None:
        os.close(self._lock_fd)
        self._lock_fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close("closed")
