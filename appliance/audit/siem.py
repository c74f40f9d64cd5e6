"""``tollgate audit forward``: every audit record streamed to a SIEM, at least once.

A process of its own (its own unit), reading the log as any reader does (complete lines,
no lock): the proxy never waits for a SIEM. Sinks, from ``[siem]``:

* ``syslog_tls = "HOST:PORT"`` — RFC 5424 messages over TLS with RFC 5425 octet-counting
  framing: ``<PRI>1 TIME HOST tollgate - TYPE [tollgate@32473 seq="N" origin="…"] BOM`` and
  the record's own canonical JSON line (already PAN-scrubbed: the log never holds a
  clear card number). Facility authpriv; severity warning for a record whose outcome is
  ``failure``, else info.
* ``jsonl = "/path"`` — the record lines appended to a file (fsync'd per batch).

**Position.** Each sink's next record is kept in ``DIR/siem/position.json`` (written
atomically) once the batch before it is *acknowledged*: for the file, fsync'd; for TLS,
sent and acknowledged by the receiver's TCP (the socket's send queue, ``SIOCOUTQ``, is
empty). A sink that fails (receiver down, connection reset, no acknowledgement within
``ACK_SECONDS``) is retried with back-off from its acknowledged position, so an outage
backs up in the log itself and resumes without loss; records sent but not acknowledged
may arrive twice (each carries its ``seq`` to deduplicate on). What no TCP-level scheme
can cover: a receiver killed with acknowledged data still unread in its socket buffer.

**Backlog** (records in the log past the slowest sink's position) over ``max_backlog``:

* ``on_full = "drop"``: the forwarder skips the oldest waiting records down to half
  ``max_backlog``, records an ``admin`` record ``siem.drop`` (the seqs skipped, through the
  proxy's control socket) and logs an error. Statements go on; the SIEM has a gap the log
  names.
* ``on_full = "block"``: the proxy refuses statements (SQLSTATE 53400, recorded as
  refused) while the backlog is over the limit — :class:`SiemGate`, which reads the
  position file at most once a second. A dead forwarder blocks too: its position stops.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import ssl
import struct
import termios
import threading
import time
from pathlib import Path
from typing import Any

from appliance.audit.keys import make_dir, write_atomic
from appliance.audit.reader import AuditReader, ReaderError
from appliance.config import Config, ConfigError
from appliance.config.model import SiemConfig
from appliance.proxy.hooks import Reject

log = logging.getLogger("tollgate.audit.siem")

POSITION_FILE = "position.json"
BATCH = 500
ACK_SECONDS = 10.0
IDLE_SECONDS = 0.2
BACKOFF_MAX = 30.0
LOG_AUTHPRIV, LOG_WARNING, LOG_INFO = 10, 4, 6
SD_ID = "tollgate@32473"  # an enterprise-number-style SD-ID (RFC 5424 §7.2.2 form)
BACKLOG_SQLSTATE = "53400"  # configuration_limit_exceeded
TCP_ESTABLISHED, TCP_CLOSE_WAIT = 1, 8  # tcp_info.tcpi_state (linux/tcp_states.h)


def position_path(config: Config) -> Path:
    assert config.audit is not None
    return config.audit.dir / "siem" / POSITION_FILE


def load_positions(path: Path) -> dict[str, int]:
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    return {k: int(v) for k, v in data.items()}


# --- the message ----------------------------------------------------------------------------

def _sd_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _printable(value: str, limit: int) -> str:
    out = "".join(c if 33 <= ord(c) <= 126 else "_" for c in value)[:limit]
    return out or "-"


def rfc5424(line: bytes, hostname: str) -> bytes:
    """One record as an RFC 5424 message (without the framing)."""
    record = json.loads(line)
    severity = LOG_WARNING if record.get("outcome") == "failure" else LOG_INFO
    stamp = record.get("time") or "-"
    msgid = _printable(str(record.get("type", "-")), 32)
    sd = f'[{SD_ID} seq="{record.get("seq")}" origin="{_sd_escape(str(record.get("origin", "-")))}"]'
    header = f"<{LOG_AUTHPRIV * 8 + severity}>1 {stamp} {_printable(hostname, 255)} tollgate - {msgid} {sd} "
    return header.encode() + b"\xef\xbb\xbf" + line


def frame(message: bytes) -> bytes:
    """RFC 5425 / 6587 octet counting."""
    return str(len(message)).encode() + b" " + message


# --- sinks ---------------------------------------------------------------------------------

class SinkError(Exception):
    pass


class JsonlSink:
    name = "jsonl"

    def __init__(self, path: Path) -> None:
        self.path = path

    def send(self, lines: list[bytes]) -> None:
        try:
            with open(self.path, "ab") as f:
                f.write(b"".join(line + b"\n" for line in lines))
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise SinkError(f"{self.path}: {exc.strerror}") from None

    def close(self) -> None:
        pass


class SyslogTlsSink:
    name = "syslog"

    def __init__(self, address: str, ca_file: Path | None, ack_seconds: float = ACK_SECONDS) -> None:
        host, _, port = address.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        self.ack_seconds = ack_seconds
        self.hostname = socket.gethostname()
        self.sock: ssl.SSLSocket | None = None

    def _connect(self) -> ssl.SSLSocket:
        raw = socket.create_connection((self.host, self.port), timeout=self.ack_seconds)
        try:
            return self.context.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise

    def send(self, lines: list[bytes]) -> None:
        try:
            if self.sock is None:
                self.sock = self._connect()
            self.sock.sendall(b"".join(frame(rfc5424(line, self.hostname)) for line in lines))
            self._wait_acknowledged(self.sock)
        except (OSError, ssl.SSLError, ValueError) as exc:
            self.close()
            raise SinkError(f"{self.host}:{self.port}: {exc}") from None

    def _wait_acknowledged(self, sock: ssl.SSLSocket) -> None:
        """Until the receiver's TCP has acknowledged every byte sent (the send queue is empty)."""
        deadline = time.monotonic() + self.ack_seconds
        buf = bytearray(4)
        delay = 0.0005
        while True:
            fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, buf)
            if struct.unpack("i", buf)[0] == 0:
                # An empty queue means acknowledged only on a live connection: a reset one
                # has its queue thrown away.
                state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error or state not in (TCP_ESTABLISHED, TCP_CLOSE_WAIT):
                    raise OSError(f"the connection was lost (TCP state {state}, error {error})")
                return
            if time.monotonic() > deadline:
                raise OSError(f"not acknowledged within {self.ack_seconds:g} s")
            time.sleep(delay)  # polling the kernel's queue: there is no event for "acknowledged"
            delay = min(delay * 2, 0.05)

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None


# --- the forwarder -------------------------------------------------------------------------

class Forwarder:
    """Sends what each sink hasn't acknowledged yet; :meth:`step` once, :meth:`run` on."""

    def __init__(self, config: Config, sinks: list[Any] | None = None, *, backoff_max: float = BACKOFF_MAX) -> None:
        if config.audit is None or config.siem is None:
            raise ConfigError(f"{config.path}: forwarding needs [audit] and [siem]")
        self.config = config
        self.siem: SiemConfig = config.siem
        self.reader = AuditReader(config.audit.dir)
        if sinks is None:
            sinks = []
            if self.siem.syslog_tls:
                sinks.append(SyslogTlsSink(self.siem.syslog_tls, self.siem.ca_file))
            if self.siem.jsonl:
                sinks.append(JsonlSink(self.siem.jsonl))
        self.sinks = sinks
        self.path = position_path(config)
        make_dir(self.path.parent)
        saved = load_positions(self.path)
        # A new sink starts at the records still online.
        self.positions = {s.name: saved.get(s.name, self.reader.pruned_size()) for s in sinks}
        self.failing: dict[str, float] = {}  # sink -> monotonic time of the next try
        self.backoff: dict[str, float] = {}
        self.dropped: list[tuple[int, int]] = []
        self.backoff_max = backoff_max

    def _save(self) -> None:
        write_atomic(self.path, json.dumps(self.positions, sort_keys=True).encode() + b"\n")

    def step(self, *, retry: bool = False) -> int:
        """One round: each sink gets up to BATCH waiting records (a failing sink only once
        its back-off is over, or with ``retry``). Returns records acknowledged."""
        size = self.reader.size()
        self._check_backlog(size)
        done = 0
        now = time.monotonic()
        for sink in self.sinks:
            start = self.positions[sink.name]
            if start >= size or (not retry and self.failing.get(sink.name, 0.0) > now):
                continue
            entries = list(self.reader.records(start, min(size, start + BATCH)))
            if not entries:
                continue
            if entries[0].seq != start:
                # Retention took records off the online log before they were forwarded: they
                # are in the sealed bundles only. Said, recorded, and skipped.
                log.error("siem: %s: records %d-%d left the online log before they were forwarded", sink.name,
                          start, entries[0].seq - 1)
                self.dropped.append((start, entries[0].seq - 1))
                self._record_drop(sink.name, start, entries[0].seq - 1, "pruned by retention before forwarded")
                start = self.positions[sink.name] = entries[0].seq
                self._save()
            lines = [e.line for e in entries]
            try:
                sink.send(lines)
            except SinkError as exc:
                delay = min(self.backoff.get(sink.name, 0.125) * 2, self.backoff_max)
                self.backoff[sink.name] = delay
                self.failing[sink.name] = now + delay
                log.error("siem: %s: %s (%d records waiting; retrying from %d in %.1f s)", sink.name, exc,
                          size - start, start, delay)
                continue
            self.backoff.pop(sink.name, None)
            self.failing.pop(sink.name, None)
            self.positions[sink.name] = start + len(lines)
            self._save()
            done += len(lines)
        return done

    def _check_backlog(self, size: int) -> None:
        if self.siem.on_full != "drop":
            return  # "block": the proxy's SiemGate refuses statements instead
        for sink in self.sinks:
            start = self.positions[sink.name]
            if size - start > self.siem.max_backlog:
                # Down to half the limit: the drop's own record (and the next few) must not
                # make it drop again at once.
                skip_to = size - self.siem.max_backlog // 2
                self.positions[sink.name] = skip_to
                self._save()
                self.dropped.append((start, skip_to - 1))
                log.error("siem: %s: backlog full (%d records > max_backlog %d): dropped records %d-%d from "
                          "the export", sink.name, size - start, self.siem.max_backlog, start, skip_to - 1)
                self._record_drop(sink.name, start, skip_to - 1,
                                  f"backlog over max_backlog {self.siem.max_backlog} (on_full = drop)")

    def _record_drop(self, sink: str, first: int, last: int, reason: str) -> None:
        from appliance.audit.export import ExportError, LogAccess
        from appliance.audit.store_errors import AuditError
        record = {"action": "siem.drop", "user": "tollgate", "origin": "local", "object": f"siem:{sink}",
                  "outcome": "failure", "first_seq": first, "last_seq": last, "reason": reason}
        try:
            access = LogAccess(self.config, version="forward")
            try:
                access.append_admin(record)
            finally:
                access.close("siem drop recorded")
        except (AuditError, ExportError, ConfigError, OSError) as exc:
            log.error("siem: could not record the drop in the audit log: %s", exc)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                if self.step() == 0:
                    stop.wait(IDLE_SECONDS)
            except ReaderError as exc:
                log.error("siem: cannot read the audit log: %s", exc)
                stop.wait(BACKOFF_MAX)
        for sink in self.sinks:
            sink.close()


# --- the proxy's side ----------------------------------------------------------------------

class SiemGate:
    """``on_full = "block"``: a Reject for statements while the SIEM backlog is too long."""

    def __init__(self, config: Config, check_seconds: float = 1.0) -> None:
        assert config.siem is not None
        self.path = position_path(config)
        self.sinks = [n for n, on in (("syslog", config.siem.syslog_tls), ("jsonl", config.siem.jsonl)) if on]
        self.max_backlog = config.siem.max_backlog
        self.check_seconds = check_seconds
        self._next = 0.0
        self._position = 0

    def refusal(self, size: int) -> Reject | None:
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.check_seconds
            try:
                positions = load_positions(self.path)
            except (OSError, ValueError):
                positions = {}
            self._position = min((positions.get(n, 0) for n in self.sinks), default=0)
        backlog = size - self._position
        if backlog <= self.max_backlog:
            return None
        return Reject(BACKLOG_SQLSTATE, f"Tollgate refuses statements: the SIEM export is {backlog} audit records "
                                        f"behind (over max_backlog {self.max_backlog}, on_full = \"block\")",
                      hint="the SIEM receiver or `tollgate audit forward` is down")
