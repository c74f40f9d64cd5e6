"""Checkpoints copied off the box as they are made, so that a cut log can be shown later.

A log can't prove its own tail wasn't cut: whoever can truncate the segments can truncate
``checkpoints.jsonl`` too. A copy of each signed checkpoint somewhere the appliance can't
take back — another file system, a SIEM behind syslog — can: ``tollgate-verify --offbox``
flags a checkpoint that lies beyond a bundle's end although its time is inside the range.

Two sinks:

* :class:`DirectorySink` writes ``checkpoint-<size>-<unix time>.note`` (the note text) to
  a directory on other storage: temp file, fsync, rename, fsync of the directory. The
  directory must exist (it is a mount of other storage: creating it would quietly write to
  the local disk when the mount is missing).
* :class:`SyslogSink` sends ``tollgate-checkpoint <base64(note text)>`` to
  ``unix:/dev/log`` (or any unix socket) or ``udp:HOST:PORT`` as facility **authpriv**,
  severity info. Why authpriv rather than a local0–7 facility: the checkpoints are
  security audit data (PCI DSS 10.3.3 asks for them on a central log server), and
  authpriv is the facility every syslog daemon and SIEM forwarder routes to the protected
  security log by default — local0–7 mean whatever each site configured, often nothing,
  so checkpoints sent there are silently dropped on a stock system. The message uses the
  RFC 3164 form ``<PRI>Mmm dd hh:mm:ss [HOST ]tollgate[PID]: …`` that rsyslog, syslog-ng
  and journald all accept on /dev/log and over UDP; the note's base64 keeps it one line
  and well under 1 KiB.

Sinks run on their own thread (:class:`Shipper`): a dead NFS mount or an unreachable
collector never holds the log up. A failing sink is logged as an error (again every
minute while it keeps failing), and its undelivered checkpoints are retried, oldest first,
each time a new one comes (the idle heartbeat makes that at least every
``heartbeat_seconds``); at most :data:`MAX_PENDING` wait per sink.
"""

from __future__ import annotations

import base64
import errno
import logging
import os
import queue
import socket
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Protocol

from appliance.audit.keys import write_atomic
from appliance.config import AuditConfig

log = logging.getLogger("tollgate.audit.offbox")

LOG_AUTHPRIV = 10
LOG_INFO = 6
MAX_PENDING = 10_000
REPEAT_ERROR_SECONDS = 60.0
TAG = "tollgate"
MESSAGE_PREFIX = "tollgate-checkpoint "
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class Sink(Protocol):
    name: str

    def deliver(self, note: str, size: int, unix_time: int) -> None: ...


class DirectorySink:
    """Each checkpoint as a file ``checkpoint-<size>-<unix time>.note`` in ``path``."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.name = f"dir:{self.path}"

    def deliver(self, note: str, size: int, unix_time: int) -> None:
        if not self.path.is_dir():
            raise OSError(errno.ENOENT, f"{self.path} is not a directory (is the other storage mounted?)")
        data = note.encode("utf-8")
        target = self.path / f"checkpoint-{size}-{unix_time}.note"
        n = 1
        while target.exists():  # two checkpoints of one size in one second (a key rotation)
            if target.read_bytes() == data:
                return
            n += 1
            target = self.path / f"checkpoint-{size}-{unix_time}.{n}.note"
        write_atomic(target, data, 0o644)


def syslog_message(note: str, *, hostname: str | None, facility: int = LOG_AUTHPRIV,
                   when: float | None = None) -> bytes:
    """One RFC 3164 line carrying ``tollgate-checkpoint <base64(note)>``."""
    t = time.localtime(when if when is not None else time.time())  # RFC 3164: local time, "Jan  5"
    stamp = f"{_MONTHS[t.tm_mon - 1]} {t.tm_mday:2d} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
    host = f"{hostname} " if hostname else ""
    body = MESSAGE_PREFIX + base64.b64encode(note.encode("utf-8")).decode("ascii")
    return f"<{facility * 8 + LOG_INFO}>{stamp} {host}{TAG}[{os.getpid()}]: {body}".encode("ascii")


def parse_syslog_message(data: bytes) -> str | None:
    """The note text carried by a message :func:`syslog_message` made, or None."""
    text = data.decode("utf-8", "replace").rstrip("\n\x00")
    i = text.find(MESSAGE_PREFIX)
    if i < 0:
        return None
    try:
        return base64.b64decode(text[i + len(MESSAGE_PREFIX):].split()[0], validate=True).decode("utf-8")
    except (ValueError, IndexError):
        return None


class SyslogSink:
    """``unix:/PATH`` (datagram, else stream) or ``udp:HOST:PORT`` (``udp:[v6]:PORT``)."""

    def __init__(self, address: str, *, facility: int = LOG_AUTHPRIV, timeout: float = 5.0):
        self.address = address
        self.name = f"syslog:{address}"
        self.facility = facility
        self.timeout = timeout
        if address.startswith("unix:"):
            self._unix: str | None = address[len("unix:"):]
            if not self._unix.startswith("/"):
                raise ValueError(f"{address!r}: a unix socket path must be absolute")
            self._udp: tuple[str, int] | None = None
        elif address.startswith("udp:"):
            host, _, port = address[len("udp:"):].rpartition(":")
            host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{address!r}: want udp:HOST:PORT")
            self._unix, self._udp = None, (host, int(port))
        else:
            raise ValueError(f"{address!r}: want unix:/PATH or udp:HOST:PORT")

    def deliver(self, note: str, size: int, unix_time: int) -> None:
        if self._unix is not None:
            message = syslog_message(note, hostname=None, facility=self.facility)  # the daemon adds it
            self._send_unix(self._unix, message)
        else:
            assert self._udp is not None
            message = syslog_message(note, hostname=socket.gethostname(), facility=self.facility)
            host, port = self._udp
            family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(self.timeout)
                sock.sendto(message, addr)

    def _send_unix(self, path: str, message: bytes) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(self.timeout)
            try:
                sock.connect(path)
            except OSError as exc:
                if exc.errno != errno.EPROTOTYPE:
                    raise
            else:
                sock.send(message)
                return
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:  # a stream /dev/log
            sock.settimeout(self.timeout)
            sock.connect(path)
            sock.sendall(message + b"\n")


def sinks_for(config: AuditConfig) -> list[Any]:
    sinks: list[Any] = []
    if config.offbox_dir is not None:
        sinks.append(DirectorySink(config.offbox_dir))
    if config.offbox_syslog:
        sinks.append(SyslogSink(config.offbox_syslog))
    return sinks


class _SinkState:
    __slots__ = ("delivered", "failing_since", "last_error", "last_logged", "pending", "sink")

    def __init__(self, sink: Any):
        self.sink = sink
        self.pending: deque[tuple[str, int, int]] = deque(maxlen=MAX_PENDING)
        self.delivered = 0
        self.last_error: str | None = None
        self.failing_since: float | None = None
        self.last_logged = 0.0


class Shipper:
    """Delivers checkpoints to the sinks on a thread of its own; never blocks the caller."""

    def __init__(self, sinks: list[Any]):
        self._states = [_SinkState(s) for s in sinks]
        self._queue: queue.SimpleQueue[tuple[str, int, int] | None] = queue.SimpleQueue()
        self._progress = threading.Condition()
        self._submitted = 0
        self._tried = 0
        self._thread = threading.Thread(target=self._run, name="audit-offbox", daemon=True)
        self._thread.start()

    def submit(self, note: str, size: int, unix_time: int) -> None:
        with self._progress:
            self._submitted += 1
        self._queue.put((note, size, unix_time))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted was tried (delivered or kept for retry)."""
        with self._progress:
            target = self._submitted
            return self._progress.wait_for(lambda: self._tried >= target, timeout)

    def close(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("audit: off-box sinks still busy after %.0f s; giving up on them", timeout)

    def status(self) -> list[dict[str, Any]]:
        return [{"sink": s.sink.name, "delivered": s.delivered, "pending": len(s.pending),
                 "error": s.last_error} for s in self._states]

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            taken = 1
            for state in self._states:
                state.pending.append(item)
            stop = False
            while True:  # take whatever else is queued before delivering
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                taken += 1
                for state in self._states:
                    state.pending.append(more)
            self._deliver_all()
            with self._progress:
                self._tried += taken
                self._progress.notify_all()
            if stop:
                return

    def _deliver_all(self) -> None:
        for state in self._states:
            self._deliver(state)

    def _deliver(self, state: _SinkState) -> None:
        while state.pending:
            note, size, unix_time = state.pending[0]
            try:
                state.sink.deliver(note, size, unix_time)
            except Exception as exc:  # noqa: BLE001 - any failure: keep it, say so loudly, retry next time
                state.last_error = f"{type(exc).__name__}: {exc}"
                now = time.monotonic()
                if state.failing_since is None:
                    state.failing_since = now
                if state.failing_since == now or now - state.last_logged >= REPEAT_ERROR_SECONDS:
                    state.last_logged = now
                    log.error("audit: cannot copy checkpoint %d off the box to %s: %s (%d waiting; will retry)",
                              size, state.sink.name, state.last_error, len(state.pending))
                return
            state.pending.popleft()
            state.delivered += 1
            if state.failing_since is not None:
                log.warning("audit: %s takes checkpoints again", state.sink.name)
                state.failing_since = None
                state.last_error = None
