"""Checking blocks of records in worker processes, ahead of the walk.

The walk over a bundle's records is sequential (each leaf extends the tree), but checking
a record (parsing it, its fields, a PAN scan) is not: :class:`BlockChecker` sends blocks
of lines to forked workers running :func:`~appliance.audit.verify_records.check_block`
and hands the walk their verdicts in order. A worker that dies changes nothing: its
blocks are checked in this process.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
from collections.abc import Callable
from typing import Any

from appliance.audit.verify_records import BlockVerdict, check_block

BlockCheck = Callable[[bytes], BlockVerdict]


def usable_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _serve(conn: Any, parent_ends: list[Any], check: BlockCheck) -> None:
    """A worker process: checks the blocks it is sent, sends back (number, verdict)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    for end in parent_ends:  # inherited: closed, so that the parent's going away ends this
        end.close()
    try:
        while (item := conn.recv()) is not None:
            number, data = item
            try:
                verdict = (number, True, check(data))
            except Exception:  # noqa: BLE001 - a bug: the parent checks the block itself, and sees it
                verdict = (number, False, None)
            conn.send(verdict)
    except (EOFError, OSError):  # the parent is gone
        pass


def _send(conn: Any, outbox: queue.SimpleQueue) -> None:
    """Sends a worker what is put in ``outbox`` (so the walk never waits for a busy worker
    to take a block), None last."""
    try:
        while (item := outbox.get()) is not None:
            conn.send(item)
        conn.send(None)
    except OSError:  # the worker is gone (its verdicts: see _collect)
        pass


def _collect(conn: Any, results: queue.SimpleQueue) -> None:
    """Reads a worker's verdicts as they come (so the worker never waits to send one and
    always goes back to reading blocks: sending it one cannot deadlock), None at its end."""
    try:
        while True:
            results.put(conn.recv())
    except (EOFError, OSError):
        results.put(None)


class BlockChecker:
    """Runs ``check`` (:func:`~appliance.audit.verify_records.check_block`) on the blocks
    of the records files: in ``workers`` forked processes, ``depth`` blocks ahead of the
    walk (so memory stays bounded), or — with one worker, where fork is missing, or while
    other threads run (forking them is unsafe) — in this process when the walk reaches the
    block. A block whose worker is gone (killed) is checked here.

    Fork, not spawn: a child needs nothing re-imported, and the zipapp's ``__main__`` (which
    runs the verifier unguarded) is never run again in it. Each worker has a thread that
    sends it blocks and one that takes its verdicts, started once every fork is done.
    """

    def __init__(self, workers: int, check: BlockCheck = check_block) -> None:
        self.depth = 0
        self._check = check
        self._conns: list[Any] = []
        self._procs: list[Any] = []
        self._outboxes: list[queue.SimpleQueue] = []
        self._results: list[queue.SimpleQueue] = []
        self._threads: list[threading.Thread] = []
        self._sent = 0
        if workers <= 1 or threading.active_count() > 1:
            return
        import multiprocessing

        if "fork" not in multiprocessing.get_all_start_methods():
            return
        context = multiprocessing.get_context("fork")
        try:
            for _ in range(workers):
                conn, theirs = context.Pipe()
                self._conns.append(conn)
                proc = context.Process(target=_serve, args=(theirs, self._conns, check), daemon=True)
                try:
                    proc.start()
                finally:
                    theirs.close()
                self._procs.append(proc)
        except OSError:
            self.close()
            return
        for conn in self._conns:
            outbox: queue.SimpleQueue = queue.SimpleQueue()
            results: queue.SimpleQueue = queue.SimpleQueue()
            for target, box in ((_send, outbox), (_collect, results)):
                thread = threading.Thread(target=target, args=(conn, box), daemon=True)
                thread.start()
                self._threads.append(thread)
            self._outboxes.append(outbox)
            self._results.append(results)
        self.depth = 2 * workers

    def submit(self, data: bytes) -> Callable[[], BlockVerdict]:
        """Start checking ``data``; the returned function gives the verdict. Verdicts must
        be asked for in the order blocks were submitted (some may never be)."""
        if not self._conns:
            return lambda: self._check(data)
        number = self._sent
        self._sent += 1
        which = number % len(self._conns)
        self._outboxes[which].put((number, data))
        results = self._results[which]

        def verdict() -> BlockVerdict:
            while (item := results.get()) is not None:
                got, ok, value = item
                if got == number:
                    return value if ok else self._check(data)
                # (the verdict on an earlier block the walk went through line by line)
            results.put(None)  # the worker is gone: check it here
            return self._check(data)
        return verdict

    def close(self) -> None:
        for outbox in self._outboxes:
            outbox.put(None)
        for thread in self._threads:
            thread.join()
        for conn in self._conns:
            conn.close()  # a worker that was never sent None reads the end of its input
        for proc in self._procs:
            proc.join()
        self._conns, self._procs, self._outboxes, self._results, self._threads = [], [], [], [], []
        self.depth = 0
