"""Group commit: the sync thread that makes audit records durable, and failing safely.

* :meth:`GroupCommit.durable` returns an asyncio future on the loop given to
  :meth:`GroupCommit.start` that resolves once an ``fdatasync`` covers the record.
* The *sync thread* snapshots the write position under the log's lock, ``fdatasync``\\ s
  outside it, publishes the durable point and resolves every future it covers with one
  ``loop.call_soon_threadsafe``. With ``durability = "fsync"`` and a loop, the first
  :meth:`~GroupCommit.durable` of each loop iteration schedules one ``call_soon`` that
  wakes the thread once the iteration is over: every task the iteration ran has appended
  by then, so one ``fdatasync`` covers them all (group commit without a timer, no wake per
  record). A round's snapshot is taken when it starts, so it covers everything appended
  while the previous ``fdatasync`` ran.
* What the loop appends in fsync mode is *held* (:meth:`~SegmentWriter.hold`) and written
  by that same end-of-iteration callback, every record of the iteration in one ``pwrite``
  (or earlier, by whoever needs the file to be complete: an append off the loop, a
  snapshot). If that write fails, the whole batch is dropped (its seqs are taken again,
  the tree never had it, what reached the file is cut off), every future waiting for one
  of its records fails — no statement of the batch is forwarded — and the ``Outage`` lists
  its seqs as lost; what was written before it stays.
* Records nobody waits for (a result, a session's end: things already done) ask for no
  sync of their own: the next statement's sync covers them, or, if none comes, a sync at
  most ``LAZY_SYNC_SECONDS`` after the first of them. One statement at a time then costs
  one ``fdatasync``, not two (its own and its result's, which it would queue behind).
* When one session is open and every statement the proxy has in flight waits for this
  sync (the audit addon counts both: :attr:`GroupCommit.sessions`, :attr:`~GroupCommit.inflight`),
  nothing else could run while it lasts, so the end-of-iteration callback runs the round
  itself, on the loop's thread, if no round is running: no wake-up of the sync thread, no hand-back to the loop (about
  110 µs of a one-client statement's wait). Same round, same lock, same checks, same
  failure handling; only where it runs differs. A slow sync there sends the next ones to
  the thread for a while (``INLINE_SYNC_MAX_SECONDS``).
* The same thread signs checkpoints when the :class:`~appliance.audit.store_checkpoints.Checkpointer`
  says one is due.
* Sync rounds are serialised by ``commit_lock``; signing by ``sign_lock``. The sync thread
  signs a checkpoint of the position its round made durable after letting go of
  ``commit_lock`` (a statement's sync does not wait for the signature, the checkpoint's
  own fdatasync and state.json), and not at all if a larger one was signed meanwhile.
  Whatever syncs and signs at once (``checkpoint_now``, a key rotation) takes
  ``commit_lock`` then ``sign_lock``, so a checkpoint is always over what was made
  durable, in order, with the key valid at its size.

An ``fdatasync`` that fails may have lost what the kernel held: the segment and the tree
are rolled back to the last durable point, the futures beyond it fail (their statements
were never forwarded) and the :class:`Outage` remembers which seqs were lost, for the
``audit.failure`` record the next append writes first.

Each round, and again just before a checkpoint is signed, the segment being written is
checked (:meth:`~appliance.audit.store_segments.SegmentWriter.check`: one fstat, one stat).
If it changed under the writer — cut, grown, replaced, removed — the log is *damaged*: it
fails closed for good (every append refused, every waiting future failed, no checkpoint
signed again, no rollback over it), and ``on_damage`` records what was found in a new
segment if it can. Only an operator, after looking, starts it again.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from asyncio import (
    _get_running_loop as _running_loop,  # C: None off the loop, no exception
)
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from appliance.audit import merkle
from appliance.audit.keys import fsync_dir
from appliance.audit.store_checkpoints import Checkpointer
from appliance.audit.store_errors import AuditUnavailable
from appliance.audit.store_segments import Damage, SegmentWriter, Snapshot

if TYPE_CHECKING:
    import asyncio

log = logging.getLogger("tollgate.audit")

REPAIR_RETRY_SECONDS = 0.5
# How long a record nobody waits for may stay written but not synced (the kernel has it:
# it survives the proxy being killed, not the machine losing power) when no statement's
# sync comes to cover it first.
LAZY_SYNC_SECONDS = 0.01
# A sync run on the loop's thread that takes longer than this (a slow or stalling disk)
# sends the next ones to the sync thread for INLINE_BACKOFF_SECONDS: while a sync runs
# inline the whole loop waits, so it is only worth it on a disk that answers quickly.
INLINE_SYNC_MAX_SECONDS = 0.05
INLINE_BACKOFF_SECONDS = 1.0


class RecordObserver(Protocol):
    """Told of the log's work (the metrics): each call only counts, under the log's locks."""

    def recorded(self, record: dict[str, Any]) -> None: ...

    def appended(self, seconds: float) -> None: ...

    def synced(self, seconds: float, records: int) -> None: ...


@dataclass(slots=True)
class Failure:
    error: str
    since: str
    lost: tuple[int, int] | None = None  # (first, last) seq rolled back


class Outage:
    """Why the log refuses records, since when, and what was lost meanwhile: what the
    ``audit.failure`` record written once it works again says. Changed under the log's lock."""

    def __init__(self, clock: Callable[[], str]) -> None:
        self._clock = clock
        self.failure: Failure | None = None
        self.refused = 0  # statements the proxy refused since the failure
        self.total = 0  # failures since the log was opened

    def note(self, message: str, lost: tuple[int, int] | None = None) -> None:
        failure = self.failure
        if failure is None:
            self.failure = failure = Failure(message, self._clock())
            self.total += 1
            log.error("audit: %s — statements are refused until it can be written", message)
        else:
            failure.error = message
        if lost is not None:
            before = failure.lost
            failure.lost = lost if before is None else (min(before[0], lost[0]), max(before[1], lost[1]))

    def over(self) -> None:
        self.failure = None
        self.refused = 0


class GroupCommit:
    """Makes what ``end`` holds durable; see the module docstring."""

    def __init__(self, end: SegmentWriter, checkpoints: Checkpointer, outage: Outage, *, fsync_mode: bool,
                 fdatasync: Callable[[int], None]) -> None:
        self.commit_lock = threading.Lock()  # sync rounds, and what signs right after its own sync
        self.sign_lock = threading.Lock()  # signing: after commit_lock, or alone (the sync thread)
        self._end = end
        self._lock = end.lock
        self._checkpoints = checkpoints
        self._outage = outage
        self._fsync_mode = fsync_mode
        self._fdatasync = fdatasync
        # the durable point (published by whoever synced, under the lock)
        self._durable = Snapshot(0, 0, 0, merkle.CompactRange())
        self.durable_size = 0
        self._epoch = 0  # bumped by every rollback: a future of an older epoch was rolled back
        self.broken: str | None = None  # a rollback after a failed sync that is not complete yet
        self.damaged: str | None = None  # the segment changed under the writer: refused for good
        self.unsettled = 0  # rollbacks whose waiting futures the loop has not failed (and counted) yet
        self.on_damage: Callable[[Damage], None] | None = None  # under the lock: record it if possible
        self.observer: RecordObserver | None = None  # told each sync's time and how many records it covered
        self._repair_at = 0.0
        # the thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._waiting = False
        self._wake_at = 1
        self._turn_scheduled = False  # _end_of_turn is scheduled on the loop
        self._sync_wanted = False  # durable() was asked this loop iteration
        self._lazy_since: float | None = None  # loop time of the first record no sync is asked for yet
        self._lazy_timer: asyncio.TimerHandle | None = None
        self._kick_loop: asyncio.AbstractEventLoop | None = None  # fsync mode: appends on it ask for syncs
        self._sync_target = 0  # records up to here have someone waiting: sync them
        self._stopping = False
        self._waiters: deque[tuple[int, int, asyncio.Future[None]]] = deque()
        # Statements the proxy has forwarded (or is forwarding) and not seen answered, as
        # the audit addon counts them; None: nobody counts (no sync runs on the loop).
        self.inflight: int | None = None
        self.sessions = 0  # sessions open, as the audit addon counts them
        self._inline_after = 0.0  # monotonic time before which no sync runs on the loop
        self.inline_rounds = 0  # rounds run on the loop's thread (status, tests)

    def restart_from(self, snap: Snapshot) -> None:
        """Recovery found the log durable up to ``snap``."""
        self._durable, self.durable_size = snap, snap.size

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the sync thread; ``loop`` is where :meth:`durable` futures live."""
        if loop is not None:
            self._loop = loop
            if self._fsync_mode:
                self._kick_loop = loop
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="audit-sync", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the sync thread after its current round (not from the thread itself)."""
        self._stopping = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    # --- on the appending side -----------------------------------------------------------------

    def on_kick_loop(self) -> bool:
        """Is this the loop's thread, in fsync mode? (Asked once per append.)"""
        loop = self._kick_loop
        return loop is not None and _running_loop() is loop

    def holds_appends(self, on_loop: bool) -> bool:
        """Under the lock: should an append now be held (fsync mode, ``on_loop``) rather
        than written at once?"""
        return on_loop and self.broken is None

    def appended(self, size: int, on_loop: bool) -> None:
        """Under the lock, after an append made the log ``size`` records long (``on_loop``:
        :meth:`on_kick_loop`)."""
        if self._waiting and size >= self._wake_at:
            self._wake.set()
        if on_loop:
            loop = self._kick_loop
            assert loop is not None
            if not self._turn_scheduled:  # write what this iteration holds once it is over
                self._turn_scheduled = True
                loop.call_soon(self._end_of_turn)
            if self._lazy_since is None:
                # A record nobody may wait for: the next durable()'s sync covers it; if
                # none comes, the timer asks for one.
                self._lazy_since = now = loop.time()
                if self._lazy_timer is None:
                    self._lazy_timer = loop.call_at(now + LAZY_SYNC_SECONDS, self._lazy_kick)

    def flush(self) -> AuditUnavailable | None:
        """Under the lock: write the held records; if that fails, the error (the batch is
        dropped, its futures fail, its seqs are noted as lost — see the module docstring)."""
        end = self._end
        count = len(end.held)
        if not count:
            return None
        first = end.size - count
        try:
            end.flush()
        except OSError as exc:
            cut = end.cut_failed_write()
            if cut is not None:
                log.error("audit: could not cut a failed write back off %s: %s", end.path, cut.strerror)
            message = f"cannot write the audit log ({end.path}): {exc.strerror or exc}"
            self._outage.note(message, (first, first + count - 1))
            log.error("audit: %s; records %d–%d dropped, their statements refused", message, first,
                      first + count - 1)
            self._refuse_from(first, message, exc.errno)
            return AuditUnavailable(message, exc.errno)
        return None

    def _refuse_from(self, first: int, message: str, code: int | None) -> None:
        """Under the lock, after a batch from seq ``first`` was dropped: fail the futures
        waiting for its records, at once on the loop, else soon — and until then no record
        is taken (``unsettled``), so none can reuse those seqs first."""
        loop = self._loop
        if loop is None or not self._waiters:
            return
        if _running_loop() is loop:
            self._fail_from(first, message, code, settle=False)
            return
        self.unsettled += 1
        try:
            loop.call_soon_threadsafe(self._fail_from, first, message, code, True)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            self.unsettled -= 1

    def _fail_from(self, first: int, message: str, code: int | None, settle: bool) -> None:
        """On the loop: fail (and count as refused) the futures of seqs from ``first`` on."""
        message = f"Tollgate could not record this statement in the audit log: {message}"
        keep: deque[tuple[int, int, asyncio.Future[None]]] = deque()
        refused = 0
        for entry in self._waiters:
            if entry[0] >= first and entry[1] == self._epoch:
                if not entry[2].done():
                    entry[2].set_exception(AuditUnavailable(message, code))
                    refused += 1
            else:
                keep.append(entry)
        self._waiters = keep
        with self._lock:
            self._outage.refused += refused
            if settle:
                self.unsettled -= 1

    def wake(self) -> None:
        """Have the thread look at the cadence again (a checkpoint was requested)."""
        if self._waiting:
            self._wake.set()

    def durable(self, seq: int) -> asyncio.Future[None] | None:
        """None if record ``seq`` needs no waiting (``durability = "write"``, or already
        synced); else a future resolved once an fdatasync covers it, or failed with
        :class:`AuditUnavailable`. Call on the event loop's thread."""
        if not self._fsync_mode or seq < self.durable_size:
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
        if seq < self.durable_size:  # a sync published between the check above and now
            self._resolve_waiters(self.durable_size, self._epoch)
        else:
            # Ask for the sync once this loop iteration is over: every task that runs in it
            # appends first, so one fdatasync covers them all (group commit without a timer).
            self._sync_wanted = True
            if not self._turn_scheduled:
                self._turn_scheduled = True
                loop.call_soon(self._end_of_turn)
        return fut

    def _end_of_turn(self) -> None:
        """On the loop, after the tasks of an iteration ran: write what they appended (one
        pwrite), and ask for the sync they wait for."""
        self._turn_scheduled = False
        if self._stopping:  # closed (what it held, written by close) or abandoned (lost, as in a crash)
            return
        if self._end.held:
            with self._lock:
                self.flush()  # if it fails, the batch's futures have failed; the rest may still want a sync
        if self._sync_wanted:
            self._sync_wanted = False
            if not self._sync_on_loop():
                self._kick()

    def _sync_on_loop(self) -> bool:
        """On the loop, at the end of an iteration that asked for a sync: run the round here
        if every statement in flight waits for it and no round is running; True if it ran
        (synced, or failed and rolled back, its futures failing as on the thread)."""
        inflight = self.inflight
        if inflight is None or len(self._waiters) < inflight or self.sessions > 1 or self.broken is not None:
            # Something else can run meanwhile: the sync thread does it. With more than one
            # session, a client that was just answered sends its next statement during the
            # sync, and the loop must be free to take it: in the lab, syncing on the loop
            # at c8 cost about half the TPS.
            return False
        started = time.monotonic()
        if started < self._inline_after or not self.commit_lock.acquire(blocking=False):
            return False  # a slow disk lately, or a round (or a checkpoint) is running
        try:
            self._lazy_since = None  # this round covers every record written so far
            snap = self._checked_snapshot()
            if snap is not None:
                self.sync(snap, on_loop=True)
            self.inline_rounds += 1
        finally:
            self.commit_lock.release()
        if time.monotonic() - started > INLINE_SYNC_MAX_SECONDS:
            self._inline_after = started + INLINE_BACKOFF_SECONDS
        return True

    def _kick(self) -> None:
        """On the loop: sync everything appended so far (what an iteration waits for, and
        every record before it)."""
        self._lazy_since = None
        self._sync_target = self._end.size
        if self._waiting:
            self._wake.set()

    def _lazy_kick(self) -> None:
        """On the loop: records nobody waited for have been unsynced for LAZY_SYNC_SECONDS
        (no statement's sync came to cover them): sync them; or look again later."""
        self._lazy_timer = None
        since = self._lazy_since
        if since is None:
            return
        loop = self._kick_loop
        due = since + LAZY_SYNC_SECONDS
        if loop is not None and loop.time() < due:
            self._lazy_timer = loop.call_at(due, self._lazy_kick)
        else:
            self._kick()

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
        message = f"Tollgate could not record this statement in the audit log: {message}"
        refused = 0
        for entry in self._waiters:
            if entry[1] <= epoch:
                if not entry[2].done():
                    entry[2].set_exception(AuditUnavailable(message, code))
                    refused += 1
            else:
                keep.append(entry)
        self._waiters = keep
        with self._lock:
            self._outage.refused += refused
            self.unsettled -= 1

    def _bump_epoch(self) -> tuple[int, bool]:
        """Under the lock, at a rollback or the damage: the epoch whose futures fail, and
        whether some are waiting — then no record is taken (``unsettled``) until the loop
        has failed and counted them (:meth:`_refuse_waiting`), so the ``audit.failure`` the
        next append writes says how many statements were refused."""
        epoch = self._epoch
        self._epoch += 1
        counted = self._loop is not None and bool(self._waiters)
        if counted:
            self.unsettled += 1
        return epoch, counted

    def _refuse_waiting(self, epoch: int, message: str, code: int | None, counted: bool) -> None:
        """After :meth:`_bump_epoch` (any thread): fail the futures of ``epoch`` on the loop."""
        if not counted:
            return
        try:
            self._loop.call_soon_threadsafe(self._fail_waiters, epoch, message, code)  # type: ignore[union-attr]
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            with self._lock:
                self.unsettled -= 1

    def _tell_loop(self, callback: Callable[..., None], *args: object) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
                loop.call_soon_threadsafe(callback, *args)

    # --- syncing -----------------------------------------------------------------------------

    def sync(self, snap: Snapshot, *, on_loop: bool = False) -> bool:
        """Make ``snap`` durable and publish it; False (rolled back) if a sync failed.
        Under ``commit_lock``; ``on_loop``: called on the loop's thread, which resolves the
        futures it covers at once."""
        observer = self.observer
        started = time.perf_counter() if observer is not None else 0.0
        try:
            for fd in snap.retired:
                os.fsync(fd)
            if snap.dir_dirty:
                fsync_dir(self._end.segdir)
            if snap.size > self.durable_size or snap.retired:
                self._fdatasync(snap.fd)
            else:
                observer = None  # nothing to sync: not a commit
        except OSError as exc:
            self._sync_failed(snap, exc)
            return False
        if observer is not None:
            observer.synced(time.perf_counter() - started, snap.size - self.durable_size)
        for fd in snap.retired:
            with contextlib.suppress(OSError):  # synced already: nothing is lost
                os.close(fd)
        with self._lock:
            if snap.size >= self.durable_size:
                self._durable = snap
                self.durable_size = snap.size
            epoch = self._epoch
        if self._waiters and self._loop is not None:
            if on_loop:
                self._resolve_waiters(snap.size, epoch)
            else:
                self._tell_loop(self._resolve_waiters, snap.size, epoch)
        return True

    def sync_snapshot(self) -> Snapshot:
        """Under ``commit_lock``: make everything written so far durable; the position synced.
        AuditUnavailable if the sync failed (and the log was rolled back)."""
        snap = self._checked_snapshot()
        if snap is None:
            raise AuditUnavailable(self.damaged or "the audit log is damaged", errno.EIO)
        if not self.sync(snap):
            failure = self._outage.failure
            raise AuditUnavailable(failure.error if failure else "the audit log could not be synced")
        if not self.intact():
            raise AuditUnavailable(self.damaged or "the audit log is damaged", errno.EIO)
        return snap

    # --- the segment changing under the writer ---------------------------------------------------

    def _checked_snapshot(self) -> Snapshot | None:
        """The position now (what is held written first: if that fails, that batch is
        dropped and the position is what was written before it), if the segment is intact;
        None once it is damaged."""
        with self._lock:
            if self.damaged is None:
                self.flush()
                damage = self._end.check()
                if damage is None:
                    return self._end.snapshot()
                self._damage(damage)
        return None

    def intact(self) -> bool:
        """Check the segment again (before signing a checkpoint); False once damaged."""
        with self._lock:
            if self.damaged is None:
                damage = self._end.check()
                if damage is None:
                    return True
                self._damage(damage)
        return False

    def _damage(self, damage: Damage) -> None:
        """Under the lock: fail closed for good, fail the waiting, record it if possible."""
        message = damage.message
        end = self._end
        lost = (self.durable_size, end.size - 1) if end.size > self.durable_size else None
        self.damaged = self.broken = message
        self._repair_at = float("inf")
        self._outage.note(message, lost)
        epoch, counted = self._bump_epoch()
        log.critical("audit: %s — the log refuses every record from now on and signs no checkpoint; "
                     "look at the segment, then start the proxy again", message)
        if self.on_damage is not None:
            try:
                self.on_damage(damage)
            except Exception:  # recording it is best effort: the log is refused either way
                log.exception("audit: could not record the damage")
        self._refuse_waiting(epoch, message, errno.EIO, counted)

    def _sync_failed(self, snap: Snapshot, exc: OSError) -> None:
        """An fsync failed: the kernel may have dropped what it held. Roll the log back to
        the last durable point and fail everything beyond it."""
        end = self._end
        message = f"cannot make the audit log durable ({end.path}): {exc.strerror or exc}"
        with self._lock:
            durable = self._durable
            lost = (durable.size, end.size - 1) if end.size > durable.size else None
            epoch, counted = self._bump_epoch()
            end.retired.extend(fd for fd in snap.retired if fd not in end.retired)
            self._outage.note(message, lost)
            self.broken = message
            try:
                self._repair()
            except AuditUnavailable:
                self._repair_at = time.monotonic() + REPAIR_RETRY_SECONDS  # stays broken: the sync thread retries
        log.error("audit: %s; rolled back to seq %d%s", message, durable.size,
                  f" (records {lost[0]}–{lost[1]} lost, their statements refused)" if lost else "")
        self._refuse_waiting(epoch, message, exc.errno, counted)

    def repair_if_broken(self) -> None:
        """Under ``commit_lock``: finish a rollback still pending; AuditUnavailable if it can't be."""
        if self.damaged is not None:
            raise AuditUnavailable(self.damaged, errno.EIO)
        if self.broken is not None and not self._try_repair():
            raise AuditUnavailable(self.broken or "the audit log is being rolled back")

    def _try_repair(self) -> bool:
        with self._lock:
            try:
                self._repair()
            except AuditUnavailable as exc:
                self._repair_at = time.monotonic() + REPAIR_RETRY_SECONDS
                log.error("audit: %s (retrying)", exc)
                return False
        log.warning("audit: rolled back to seq %d; records can be written again", self._end.size)
        return True

    def _repair(self) -> None:
        """Under the lock: put the files and the tree back at the last durable point."""
        try:
            self._end.roll_back(self._durable)
        except OSError as exc:
            self.broken = f"cannot roll the audit log back after a failure: {exc.strerror or exc}"
            raise AuditUnavailable(self.broken, exc.errno) from None
        self.broken = None

    # --- the sync thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                now = time.monotonic()
                if self._due(now):
                    with self.commit_lock:
                        if self._stopping:
                            break
                        snap = self._round()
                    if snap is not None:  # signed after the lock is let go: syncs don't wait for it
                        self._sign_if_due(snap)
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
                self.broken = message
                self._repair_at = float("inf")
                self._outage.note(message)
                epoch, counted = self._bump_epoch()
            self._refuse_waiting(epoch, message, None, counted)
            raise

    def _due(self, now: float) -> bool:
        if self.broken is not None:
            return now >= self._repair_at
        size = self._end.size
        checkpoints = self._checkpoints
        checkpoints.note_size(now, size)
        if self._fsync_mode and self._loop is None:  # no loop to kick us: every append does
            self._wake_at = self.durable_size + 1
            if size > self.durable_size or self._end.retired:
                return True
        else:  # appends wake us for checkpoints only; in fsync mode _kick asks for the syncs
            self._wake_at = checkpoints.wake_size()
            if self._sync_target > self.durable_size:
                return True
        return checkpoints.due(now, size)

    def _deadline(self, now: float) -> float:
        if self.damaged is not None:
            return now + 3600.0  # nothing to do any more but stop
        if self.broken is not None:
            return self._repair_at
        return self._checkpoints.deadline()

    def _round(self) -> Snapshot | None:
        """Under commit_lock: sync what is written; the position synced, if it was."""
        if self.damaged is not None or (self.broken is not None and not self._try_repair()):
            return None
        snap = self._checked_snapshot()
        if snap is None or not self.sync(snap):
            return None
        return snap

    def _sign_if_due(self, snap: Snapshot) -> None:
        """Sign a checkpoint of ``snap`` (durable) if one is due, under ``sign_lock`` only:
        a statement's sync may run meanwhile. What it was made durable stays so (a rollback
        goes back to the durable point, never before it); a checkpoint signed meanwhile of
        a larger size (a key rotation's, checkpoint_now's) makes this one moot, and it is
        not signed: checkpoints go in order, each with the key valid at its size."""
        with self.sign_lock:
            checkpoints = self._checkpoints
            if snap.size >= checkpoints.signed_size and checkpoints.due(time.monotonic(), snap.size) \
                    and self.intact():
                checkpoints.sign(snap)
