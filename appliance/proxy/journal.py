"""Log records to journald with structured fields, when the process runs under systemd.

A record's ``extra`` fields that name a session, an identity or a decision become journal
fields (``TOLLGATE_SESSION``, ``TOLLGATE_IDENTITY``, ``TOLLGATE_DECISION``, …), so an
operator can ask ``journalctl -u tollgate-proxy TOLLGATE_DECISION=block`` or follow one
session, instead of grepping message text.

journald's native protocol is one datagram per entry to ``/run/systemd/journal/socket``:
``KEY=value`` lines, and for a value with a newline ``KEY\\n`` + its length as a 64-bit
little-endian integer + the bytes + ``\\n``. That is a dozen lines here, so no binding to
libsystemd is needed. The handler is used only when stderr *is* the journal
(``JOURNAL_STREAM`` names stderr's device and inode, as systemd documents); anywhere else
logging stays plain text on stderr. An entry the socket refuses (journald restarting, an
entry too large) goes to stderr as text instead: a log line is never lost silently.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys
from collections.abc import Mapping

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_IDENTIFIER = "tollgate"

# Record attribute (logging's extra=) → journal field.
FIELDS = {
    "session_id": "TOLLGATE_SESSION",
    "identity": "TOLLGATE_IDENTITY",
    "decision": "TOLLGATE_DECISION",
    "rule": "TOLLGATE_RULE",
    "target": "TOLLGATE_TARGET",
    "client": "TOLLGATE_CLIENT",
}

# logging level → syslog priority (journal PRIORITY).
_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
_u64 = struct.Struct("<Q")


def priority(levelno: int) -> int:
    for level, prio in _PRIORITY:
        if levelno >= level:
            return prio
    return 7


def encode_field(name: str, value: str) -> bytes:
    data = value.encode("utf-8", "replace")
    if b"\n" in data:
        return name.encode() + b"\n" + _u64.pack(len(data)) + data + b"\n"
    return name.encode() + b"=" + data + b"\n"


def encode_entry(record: logging.LogRecord, message: str) -> bytes:
    fields = {
        "MESSAGE": message,
        "PRIORITY": str(priority(record.levelno)),
        "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER,
        "LOGGER": record.name,
    }
    for name, value in (("CODE_FILE", record.pathname), ("CODE_LINE", record.lineno), ("CODE_FUNC", record.funcName)):
        if value is not None:  # a record made by hand may lack them
            fields[name] = str(value)
    for attribute, field in FIELDS.items():
        value = getattr(record, attribute, None)
        if value is not None:
            fields[field] = str(value)
    return b"".join(encode_field(name, value) for name, value in fields.items())


class JournalHandler(logging.Handler):
    """Sends each record to journald as one native-protocol datagram."""

    def __init__(self, path: str = JOURNAL_SOCKET, fallback: logging.Handler | None = None) -> None:
        super().__init__()
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.fallback = fallback or logging.StreamHandler(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            self.sock.sendto(encode_entry(record, message), self.path)
        except OSError:
            self.fallback.handle(record)
        except Exception:  # noqa: BLE001 - logging's contract: a handler reports, never raises
            self.handleError(record)

    def setFormatter(self, fmt: logging.Formatter | None) -> None:
        super().setFormatter(fmt)
        self.fallback.setFormatter(fmt)

    def close(self) -> None:
        self.sock.close()
        super().close()


def stderr_is_journal(environ: Mapping[str, str] | None = None, stream: object = None) -> bool:
    """Whether stderr is connected to journald (``JOURNAL_STREAM=dev:ino`` matches it)."""
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())  # type: ignore[attr-defined]
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


def handler_for_stderr(path: str = JOURNAL_SOCKET) -> logging.Handler:
    """The journal handler under systemd (stderr is the journal and its socket exists),
    else a plain stderr handler."""
    if stderr_is_journal() and os.path.exists(path):
        return JournalHandler(path)
    return logging.StreamHandler(sys.stderr)
