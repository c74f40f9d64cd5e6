"""Several proxy processes on one port: the primary's :class:`Supervisor` and a worker's
:class:`WorkerLink`.

With ``[proxy] workers = N`` above 1, ``tollgate run`` is a primary process that starts N
workers (``tollgate run --worker …``, each a whole proxy on its own event loop) and keeps
what must be one per appliance: the audit log's writer, the control socket, the intercept
ruleset, the signals. Each worker listens on the proxy port with ``SO_REUSEPORT``: the
kernel hashes each new connection onto one of the sockets, so no process hands
connections to another, and a diverted connection's original destination is read in the
worker that accepted it.

What crosses processes goes over each worker's :class:`~appliance.proxy.channel.Channel`:
audit records and their durability (appliance/audit/remote.py), control requests (the
primary asks every worker and merges, e.g. ``sessions``), and cancel requests — a
CancelRequest arrives on a new connection, which may land on any worker, so a key no
session of the receiving worker holds is looked up in the others through the primary;
the one holding it answers where the real CancelRequest goes (or withdraws its hold),
and the receiving worker sends it and keeps its agent's cancel connection open until the
database has acted, exactly as for a session of its own.
What is in the shared state databases needs no channel: each worker reads revocations,
approvals and grants from them as a single process does, and reloads the policy on its
own (the primary passes SIGHUP on).

A worker that exits is started again; a worker whose primary is gone stops (its audit
writer is gone: nothing may run unrecorded).
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any

from appliance.config import Endpoint
from appliance.proxy.channel import Channel
from appliance.proxy.control import Reply, Request
from appliance.proxy.hooks import Addon, SessionInfo

log = logging.getLogger("tollgate.workers")

READY_TIMEOUT = 60.0  # seconds a worker may take to open its addons and listen
STOP_TIMEOUT = 30.0  # seconds a worker may take to end its sessions on SIGTERM
ASK_TIMEOUT = 10.0  # seconds a worker may take to answer a control request
RESTART_DELAY = 1.0  # seconds between a worker's exit and its replacement, at least
SERVICE_MANAGER_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


class WorkerError(Exception):
    """A worker could not be started."""


class _Worker:
    __slots__ = ("channel", "index", "proc", "ready", "started")

    def __init__(self, index: int, proc: subprocess.Popen[bytes], channel: Channel) -> None:
        self.index = index
        self.proc = proc
        self.channel = channel
        self.ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.started = time.monotonic()


class Supervisor:
    """The primary's side: starts ``count`` workers, restarts them, asks and signals them.

    ``argv(index, fd)``: a worker's command line, its channel on inherited descriptor
    ``fd``. ``attach(channel, index)``: what else the primary serves on a worker's channel
    (the audit writer), before the worker can send anything."""

    def __init__(self, count: int, argv: Callable[[int, int], list[str]],
                 attach: Callable[[Channel, int], None] | None = None) -> None:
        self.count = count
        self._argv = argv
        self._attach = attach
        self.workers: dict[int, _Worker] = {}
        self._asks: dict[int, asyncio.Future[Reply]] = {}
        self._finds: dict[int, asyncio.Future[Any]] = {}
        self._ask_ids = itertools.count(1)
        self._stopping = False
        self._tasks: set[asyncio.Future[Any]] = set()
        self.restarts = 0

    async def start(self) -> None:
        """Start every worker and wait until each listens; WorkerError if one can't."""
        for index in range(1, self.count + 1):
            await self._spawn(index)
        for worker in list(self.workers.values()):
            await self._wait_ready(worker)

    async def _spawn(self, index: int) -> _Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Only the primary speaks to systemd (READY, WATCHDOG): it is the service's main process.
            env = {k: v for k, v in os.environ.items() if k not in SERVICE_MANAGER_ENV}
            proc = subprocess.Popen(self._argv(index, theirs.fileno()), pass_fds=(theirs.fileno(),),
                                    stdin=subprocess.DEVNULL, env=env)
        finally:
            theirs.close()
        channel = await Channel.connect(ours, f"worker {index}")
        worker = _Worker(index, proc, channel)
        self.workers[index] = worker
        if self._attach is not None:
            self._attach(channel, index)
        channel.on("ready", lambda pid: worker.ready.done() or worker.ready.set_result(pid))
        channel.on("cancel", lambda rid, pid, secret: self._spawn_task(self._cancel(index, rid, pid, secret)))
        channel.on("cancel.found", self._found)
        channel.on("ctl.reply", self._replied)
        channel.on_lost = lambda: self._spawn_task(self._lost(worker))
        return worker

    async def _wait_ready(self, worker: _Worker) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(worker.ready), READY_TIMEOUT)
        except TimeoutError:
            raise WorkerError(f"worker {worker.index} (pid {worker.proc.pid}) was not ready within "
                              f"{READY_TIMEOUT:.0f}s") from None
        except WorkerError:
            raise
        log.info("worker %d ready (pid %d)", worker.index, worker.proc.pid)

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _lost(self, worker: _Worker) -> None:
        """The worker's end of the channel closed: it exited (or is about to)."""
        code = await asyncio.to_thread(_reap, worker.proc)
        if not worker.ready.done():
            worker.ready.set_exception(WorkerError(f"worker {worker.index} exited ({_status(code)}) before it was "
                                                   "ready; its log says why"))
            worker.ready.exception()  # retrieved here too: start() may be gone
        if self._stopping or self.workers.get(worker.index) is not worker:
            return
        log.error("worker %d (pid %d) exited: %s; starting it again", worker.index, worker.proc.pid, _status(code))
        delay = max(0.0, RESTART_DELAY - (time.monotonic() - worker.started))
        await asyncio.sleep(delay)  # a worker failing at start must not spin the CPU
        if self._stopping:
            return
        self.restarts += 1
        replacement = await self._spawn(worker.index)
        try:
            await self._wait_ready(replacement)
        except WorkerError as exc:
            log.error("%s", exc)

    async def _cancel(self, sender: int, rid: int, process_id: int, secret_key: bytes) -> None:
        """A cancel key worker ``sender`` has no session for: ask the others; answer with
        the first one's target (or None)."""
        loop = asyncio.get_running_loop()
        asks = []
        for worker in self.workers.values():
            if worker.index != sender and not worker.channel.lost:
                fid = next(self._ask_ids)
                future: asyncio.Future[Any] = loop.create_future()
                self._finds[fid] = future
                worker.channel.send("cancel.find", fid, process_id, secret_key)
                asks.append((fid, future))
        target = None
        for fid, future in asks:
            try:
                found = await asyncio.wait_for(future, ASK_TIMEOUT)
            except TimeoutError:
                found = None
            finally:
                self._finds.pop(fid, None)
            target = target or found
        worker = self.workers.get(sender)
        if worker is not None and not worker.channel.lost:
            worker.channel.send("cancel.result", rid, target)

    def _found(self, fid: int, target: Any) -> None:
        future = self._finds.get(fid)
        if future is not None and not future.done():
            future.set_result(target)

    # -- control requests --

    async def ask(self, request: Request) -> list[tuple[int, Reply]]:
        """Ask every ready worker; their replies by worker number (a worker that failed
        to answer gets an ``ok: false`` reply saying so)."""
        loop = asyncio.get_running_loop()
        asks = []
        for worker in sorted(self.workers.values(), key=lambda w: w.index):
            if worker.channel.lost or not worker.ready.done():
                continue
            rid = next(self._ask_ids)
            future: asyncio.Future[Reply] = loop.create_future()
            self._asks[rid] = future
            worker.channel.send("ctl", rid, json.dumps(request))
            asks.append((worker.index, rid, future))
        replies = []
        for index, rid, future in asks:
            try:
                replies.append((index, await asyncio.wait_for(future, ASK_TIMEOUT)))
            except TimeoutError:
                replies.append((index, {"ok": False, "error": f"worker {index} did not answer"}))
            finally:
                self._asks.pop(rid, None)
        return replies

    def _replied(self, rid: int, reply: str) -> None:
        future = self._asks.get(rid)
        if future is not None and not future.done():
            future.set_result(json.loads(reply))

    async def sessions(self, request: Request) -> Reply:
        """Every worker's live sessions, each with its worker's number."""
        sessions = []
        for index, reply in await self.ask(request):
            if not reply.get("ok"):
                raise RuntimeError(reply.get("error") or f"worker {index} failed")
            sessions += [{**s, "worker": index} for s in reply.get("sessions", [])]
        return {"sessions": sessions}

    async def forward(self, request: Request) -> Reply:
        """An op the primary doesn't answer itself: the first worker's reply, and each
        worker's under ``workers`` (they may differ, e.g. a policy one failed to reload)."""
        replies = await self.ask(request)
        if not replies:
            raise RuntimeError("no worker is running")
        first = replies[0][1]
        if not first.get("ok"):
            raise RuntimeError(first.get("error") or "the worker failed")
        return {**{k: v for k, v in first.items() if k != "ok"},
                "workers": [{"worker": index, **reply} for index, reply in replies]}

    def status(self) -> dict[str, Any]:
        return {"workers": [{"worker": w.index, "pid": w.proc.pid, "ready": w.ready.done()}
                            for w in sorted(self.workers.values(), key=lambda w: w.index)],
                "restarts": self.restarts}

    # -- signals and stopping --

    def signal(self, signum: int) -> None:
        for worker in self.workers.values():
            if worker.proc.poll() is None:
                worker.proc.send_signal(signum)

    async def stop(self) -> None:
        """SIGTERM to every worker (each ends its sessions), and wait until all are gone."""
        self._stopping = True
        self.signal(signal.SIGTERM)
        for worker in list(self.workers.values()):
            try:
                await asyncio.to_thread(worker.proc.wait, STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.error("worker %d (pid %d) did not stop within %.0fs; killing it", worker.index,
                          worker.proc.pid, STOP_TIMEOUT)
                worker.proc.kill()
                await asyncio.to_thread(worker.proc.wait)
            worker.channel.close()
        for task in list(self._tasks):
            task.cancel()


def _reap(proc: subprocess.Popen[bytes]) -> int:
    try:
        return proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:  # closed its channel but lingers: it can't serve without one
        proc.kill()
        return proc.wait()


def _status(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"


class WorkerLink:
    """A worker's side of its channel: control requests, cancels, and its readiness."""

    def __init__(self, channel: Channel, server: Any) -> None:
        self.channel = channel
        self.server = server
        channel.on("ctl", self._control)
        channel.on("cancel.find", lambda fid, pid, secret: channel.send(
            "cancel.found", fid, server.cancel_from_elsewhere(pid, secret)))
        channel.on("cancel.result", self._cancel_result)
        server.cancels.elsewhere = self._cancel_elsewhere
        self._answers: dict[int, Callable[[Any], None]] = {}
        self._ids = itertools.count(1)
        cancels = server.cancels
        server.control.register("cancels", lambda request: {
            "unmatched": cancels.unmatched, "passed_on": cancels.passed_on, "from_elsewhere": cancels.from_elsewhere})

    def _cancel_elsewhere(self, process_id: int, secret_key: bytes, answer: Callable[[Any], None]) -> None:
        if self.channel.lost:
            answer(None)
            return
        rid = next(self._ids)
        self._answers[rid] = answer
        self.channel.send("cancel", rid, process_id, secret_key)

    def _cancel_result(self, rid: int, target: tuple[str, int, int, bytes] | None) -> None:
        answer = self._answers.pop(rid, None)
        if answer is None:
            return
        if target is None:
            answer(None)
            return
        address, port, pid, secret = target
        answer((Endpoint(ipaddress.ip_address(address), port), pid, secret))

    def lost(self) -> None:
        """The primary is gone: no answer will come."""
        answers, self._answers = self._answers, {}
        for answer in answers.values():
            answer(None)

    def _control(self, rid: int, request: str) -> None:
        async def answer() -> None:
            reply = await self.server.control.answer_async(request.encode())
            if not self.channel.lost:
                self.channel.send("ctl.reply", rid, json.dumps(reply))

        task = asyncio.ensure_future(answer())
        self.server.background.add(task)  # kept referenced until done
        task.add_done_callback(self.server.background.discard)

    def ready(self) -> None:
        self.channel.send("ready", os.getpid())


def name_worker_in_logs(index: str) -> None:
    """Every worker logs to the same place as its primary: say which one wrote a line."""
    for handler in logging.getLogger().handlers:
        formatter = handler.formatter
        fmt = getattr(formatter, "_fmt", None)
        if formatter is not None and fmt and "%(name)s:" in fmt:
            handler.setFormatter(logging.Formatter(fmt.replace("%(name)s:", f"%(name)s[worker {index}]:"),
                                                   getattr(formatter, "datefmt", None)))


class SessionRelay(Addon):
    """A worker's stand-in for the flow ledger, which the primary runs (one eBPF program
    per appliance): tells it of each session's start and end over the channel, with the
    pair the ledger matches flows by, the session's audit id and its user."""

    name = "flows"
    after = ("audit",)  # a session's audit id exists when this hears of it

    def __init__(self, session_id: Callable[[SessionInfo], str | None]) -> None:
        self.session_id = session_id
        self.channel: Channel | None = None

    def _send(self, event: str, session: SessionInfo) -> None:
        if self.channel is not None and not self.channel.lost:
            self.channel.send("session", event, str(session.client), str(session.destination),
                              self.session_id(session), session.user)

    def session_start(self, session: SessionInfo) -> None:
        self._send("start", session)

    def session_end(self, session: SessionInfo, reason: str) -> None:
        self._send("end", session)

    def session_refused(self, session: SessionInfo, reason: str) -> None:
        self._send("refused", session)
