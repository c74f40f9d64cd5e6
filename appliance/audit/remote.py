"""The audit log of a proxy running several workers: one writer, fed by every worker.

With ``[proxy] workers`` above 1 the primary process owns the :class:`AuditLog` (the
directory's lock, the tree, the signing key) and each worker's audit addon writes to a
:class:`RemoteAuditLog`: records travel over the worker's channel to the primary's
:class:`AuditWriter`, which appends them in the order they arrive and answers each record
a statement waits for once the log says it is durable. So there is still one tree, one
origin, one sequence of checkpoints per appliance, and every tool that reads an audit
directory (export, verify, replay, sessions) is unchanged.

Why not one log per worker under the same origin: it would save the hop (measured in
bench/README.md, "Workers") but split one appliance's history into N trees whose
interleaving no checkpoint signs, and every reader would have to merge them. The
primary's serial work per record is small (decode, encode, hash, one batched write and
a shared fsync per round); bench/README.md measures it and what it bounds.

What each side keeps of the single-process semantics:

* a statement is forwarded only once the primary answered that its record is durable
  (``durability = "write"``: written); a failure or a primary that is gone fails the
  wait, so the statement is refused;
* a record that could not be encoded (a lone surrogate) raises here, synchronously, so
  the addon writes it escaped, as it does with a local log;
* a best-effort record the primary could not write is counted there and reported in an
  ``audit.unrecorded`` record once the log takes records again.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
from datetime import UTC, datetime
from typing import Any

from appliance.audit.store import AuditLog
from appliance.audit.store_errors import AuditUnavailable
from appliance.proxy.channel import Channel, encode

log = logging.getLogger("tollgate.audit")

# marshal writes str as UTF-8 with surrogatepass: a lone surrogate shows as ED A0–BF.
# Other bytes (lengths, integers) may match too; then the exact check decides.
_MAYBE_SURROGATE = re.compile(rb"\xed[\xa0-\xbf]")
GONE = "the audit writer (the proxy's primary process) is gone"


class RemoteAuditLog:
    """A worker's audit log: the primary's, over ``channel``. ``run`` names the run the
    records are written under (the primary's)."""

    # The primary's log size as of its last answer (what the SIEM gate compares with).
    size = 0

    def __init__(self, channel: Channel, run: str) -> None:
        self.channel = channel
        self.run = run
        self._waiting: dict[int, asyncio.Future[None]] = {}
        self._ids = itertools.count(1)
        self._closed = False
        channel.on("audit.durable", self._durable)

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Nothing to start: the primary runs the log."""

    def append(self, record: dict[str, Any], *, trusted: bool = False) -> int:
        """Send ``record`` to the writer; -1, as its seq is the writer's to give."""
        self._send(0, record, trusted)
        return -1

    def append_waiting(self, record: dict[str, Any], *, trusted: bool = False) -> asyncio.Future[None]:
        """Send ``record``; a future resolved when the writer says it is durable."""
        rid = next(self._ids)
        self._send(rid, record, trusted)
        future = asyncio.get_running_loop().create_future()
        self._waiting[rid] = future
        return future

    def _send(self, rid: int, record: dict[str, Any], trusted: bool) -> None:
        if self._closed or self.channel.lost:
            raise AuditUnavailable(GONE)
        data = encode("audit.append", rid, trusted, record)
        if _MAYBE_SURROGATE.search(data) is not None:
            # ValueError (as canonical.dumps raises) for a lone surrogate: the addon escapes it.
            json.dumps(record, ensure_ascii=False).encode("utf-8")
        self.channel.send_encoded(data)

    def _durable(self, rid: int, error: str | None, errno_: int | None, size: int = 0) -> None:
        self.size = max(self.size, size)
        future = self._waiting.pop(rid, None)
        if future is None or future.done():
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(AuditUnavailable(error, errno_))

    def lost(self) -> None:
        """The channel is gone: every statement still waiting is refused."""
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(AuditUnavailable(GONE))

    def note_inflight(self, delta: int) -> None:
        """Where syncs run is the writer's business."""

    def note_sessions(self, delta: int) -> None:
        """Likewise."""

    def note_refused(self, count: int = 1) -> None:
        if not self.channel.lost:
            self.channel.send("audit.refused", count)

    def request_checkpoint(self) -> None:
        if not self.channel.lost:
            self.channel.send("audit.checkpoint")

    def close(self, reason: str = "closed") -> None:
        """The worker stops; the primary closes the log (may run in a thread: touches no loop)."""
        self._closed = True


class AuditWriter:
    """The primary's side: appends what the workers send to ``audit_log``. On the loop the
    log was started on."""

    def __init__(self, audit_log: AuditLog) -> None:
        self.log = audit_log
        self._unrecorded: dict[str, int] = {}
        self._unrecorded_error: str | None = None
        self._unrecorded_since: str | None = None

    def attach(self, channel: Channel) -> None:
        channel.on("audit.append", lambda rid, trusted, record: self._append(channel, rid, trusted, record))
        channel.on("audit.refused", self.log.note_refused)
        channel.on("audit.checkpoint", self.log.request_checkpoint)

    def _append(self, channel: Channel, rid: int, trusted: bool, record: dict[str, Any]) -> None:
        if self._unrecorded:
            self._record_unrecorded()
        try:
            waiting = self.log.append_waiting(record, trusted=trusted) if rid else self.log.append(record,
                                                                                                   trusted=trusted)
        except Exception as exc:  # noqa: BLE001 - refused or counted, never lost silently
            if rid:
                self._answer(channel, rid, exc)
            else:
                self._lost(record, exc)
            return
        if not rid:
            return
        if waiting is None:
            self._answer(channel, rid, None)
        else:
            waiting.add_done_callback(lambda f: self._answer(channel, rid, None if f.cancelled() else f.exception(),
                                                             cancelled=f.cancelled()))

    def _answer(self, channel: Channel, rid: int, exc: BaseException | None, *, cancelled: bool = False) -> None:
        if channel.lost:
            return
        size = self.log.size
        if cancelled:
            channel.send("audit.durable", rid, "the audit log stopped", None, size)
        elif exc is None:
            channel.send("audit.durable", rid, None, None, size)
        else:
            channel.send("audit.durable", rid, str(exc) or type(exc).__name__, getattr(exc, "errno", None), size)

    def _lost(self, record: dict[str, Any], exc: Exception) -> None:
        kind = str(record.get("type"))
        log.error("audit: could not record %s from a worker: %s", kind, exc)
        self._unrecorded[kind] = self._unrecorded.get(kind, 0) + 1
        if self._unrecorded_error is None:
            self._unrecorded_error = str(exc)
            self._unrecorded_since = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def _record_unrecorded(self) -> None:
        record = {"type": "audit.unrecorded", "outcome": "failure", "user": "tollgate", "origin": "local",
                  "object": "audit-log", "records": dict(sorted(self._unrecorded.items())),
                  "error": self._unrecorded_error, "since": self._unrecorded_since}
        try:
            self.log.append(record)
        except Exception as exc:  # noqa: BLE001 - still can't write: kept for the next try
            log.debug("audit: the unrecorded records' note waits: %s", exc)
            return
        self._unrecorded.clear()
        self._unrecorded_error = self._unrecorded_since = None
