"""The audit addon: turns what a session does into records in the audit log.

Records follow docs/audit-format.md. The one that matters most is ``statement``: it is
appended at the ``forward`` hook — the moment a request's verdict is final — and the
request goes upstream only once the record is durable (the hook hands the session the
log's durability future; with ``durability = "write"`` the append alone suffices). A
record that can't be written refuses its statement: nothing unrecorded reaches the
database. Records of things already done (results, session ends) are best effort: a
failure is counted and reported by the log as soon as it can write again.

No record is lost to its encoding. Text the client or the server sent that isn't UTF-8 (a
column name in a LATIN9 session, an application_name in SJIS) arrives with its bytes kept
as lone surrogates, which a JSON record can't hold: such a record — statement, result,
session, any — is written with each of those bytes as ``\\xNN`` (and each backslash of
that string doubled), and the JSON Pointers of the strings so written listed in its
``escaped`` field (docs/audit-format.md). A best-effort record that still can't be written
is itself recorded: at once as ``audit.unrecorded`` if the log can take that, else counted
and written as one ``audit.unrecorded`` with the next record the log takes.

Everything put in a record is scrubbed of card numbers first: SQL text, parameters,
sampled result values (already masked on their way to the agent), error messages — and
then every string of the record once more, with the side channels' wider search (column
names, tags, application_name, db_user, reasons …), so nothing an agent sends can put a
card number in the log or make it unverifiable.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from appliance.audit.control import register_control_ops
from appliance.audit.store_errors import AuditUnavailable
from appliance.pan.sidechannel import clean_text, scrub_side
from appliance.pgwire import decode_backend
from appliance.pgwire.params import bind_params
from appliance.proxy.hooks import Addon, Forward, Reject, Result, SessionInfo, row_spans

if TYPE_CHECKING:
    from appliance.audit.store import AuditLog
    from appliance.proxy.control import ControlOps

log = logging.getLogger("tollgate.audit")


class Approver(Protocol):
    subject: str


class ApprovalVote(Protocol):
    approver_subject: str
    verdict: Any
    reason: str
    grant_minutes: int | None


class ApprovalRequest(Protocol):
    """What the audit records of an approval request (``appliance.holds.store.ApprovalRequest``,
    handed over by the composition root, which wires the broker's events here)."""

    id: str
    requester: Approver
    target: str
    database: str
    sql: str
    classification: tuple[dict[str, Any], ...]
    rule: str
    approver_groups: tuple[str, ...]
    min_approvals: int
    session_id: str | None
    client: str
    status: str
    status_reason: str | None
    votes: tuple[ApprovalVote, ...]

MAX_TEXT = 65536  # characters of SQL text kept; longer text is cut and its digest kept
DISK_FULL_ERRNOS = {28, 122}  # ENOSPC, EDQUOT


class _SessionAudit:
    """What the addon keeps per session."""

    __slots__ = ("approval", "base", "id", "live", "open", "started_ns", "statements")

    def __init__(self, session_id: str, base: dict[str, Any]) -> None:
        self.id = session_id
        self.statements = 0
        self.started_ns = time.perf_counter_ns()
        self.approval: str | None = None  # the approval the next forwarded statement ran under
        self.base = base  # the 10.2.2 fields every record of this session carries
        self.open: set[int] = set()  # numbers of its statements forwarded and not answered yet
        self.live = False  # started, not ended: counted in the log's sessions


class AuditAddon(Addon):
    """Records sessions, statements, results and approvals in an :class:`AuditLog`."""

    name = "audit"
    after = ("enforcement", "masking")  # it records what they decided and masked

    def __init__(self, audit_log: AuditLog | None, scrub: Callable[[str], str], *, result_rows: int = 20,
                 result_bytes: int = 8192, opener: Callable[[], AuditLog] | None = None,
                 gate: Any = None):
        """Record in ``audit_log``, or in the log ``opener`` opens when the proxy starts.
        ``gate``: a :class:`~appliance.audit.siem.SiemGate` refusing statements while the
        SIEM export is too far behind (``[siem] on_full = "block"``)."""
        self.gate = gate
        self.log: AuditLog = audit_log  # type: ignore[assignment]  # set by open() when None
        self.opener = opener
        self.scrub = scrub
        self.result_rows = result_rows
        self.result_bytes = result_bytes
        self._by_proxy_id: dict[str, _SessionAudit] = {}  # for approvals, which name sessions by SessionInfo.key
        self._decided: set[tuple[str, str]] = set()
        # Best-effort records that could not be written, by type, until audit.unrecorded says so.
        self._unrecorded: dict[str, int] = {}
        self._unrecorded_error: str | None = None
        self._unrecorded_since: str | None = None

    # ---- life cycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Open (and recover) the log before the first session can start; raises if it can't."""
        if self.opener is not None:
            self.log = await asyncio.to_thread(self.opener)
            self.log.start(asyncio.get_running_loop())

    async def start(self, control: ControlOps) -> None:
        register_control_ops(control, self.log)

    async def close(self) -> None:
        if self.opener is not None:
            await asyncio.to_thread(self.log.close, "the proxy stopped")

    # ---- sessions ---------------------------------------------------------------------------

    def _state(self, session: SessionInfo) -> _SessionAudit:
        state = session.addon_state.get(self.name)
        if state is None:
            target = session.target.name if session.target is not None else "?"
            base = {"user": _user(session), "origin": str(session.client),
                    "object": f"{target}/{session.database or '?'}"}
            # The session's one id (SessionInfo.key): the live listing and approvals show it too.
            state = session.addon_state[self.name] = _SessionAudit(session.key, base)
            self._by_proxy_id[session.key] = state
        return state

    def session_start(self, session: SessionInfo) -> None:
        state = self._state(session)
        if not state.live:
            state.live = True
            self.log.note_sessions(1)
        identity = self._identity_fields(session)
        self._append({"type": "auth.success", "outcome": "success", "session": state.id, **state.base,
                      **identity, "target": _target(session)})
        self._append({"type": "session.start", "outcome": "success", "session": state.id, **state.base, **identity,
                      "target": _target(session), "database": session.database, "db_user": session.user,
                      "application_name": session.application_name, "client_tls": session.client_tls,
                      "upstream_tls": session.upstream_tls, "backend_pid": session.backend_pid,
                      "client_encoding": _encoding_name(session)})

    def session_end(self, session: SessionInfo, reason: str) -> None:
        state = self._state(session)
        self._by_proxy_id.pop(session.key, None)
        if state.open:
            self.log.note_inflight(-len(state.open))
            state.open.clear()
        if state.live:
            state.live = False
            self.log.note_sessions(-1)
        self._append({"type": "session.end", "outcome": "success", "session": state.id, **state.base,
                      "reason": self.scrub(reason), "statements": state.statements, "masked": session.masked_values,
                      "duration_us": (time.perf_counter_ns() - state.started_ns) // 1000})
        self.log.request_checkpoint()

    def session_refused(self, session: SessionInfo, reason: str) -> None:
        state = self._state(session)
        self._by_proxy_id.pop(session.key, None)
        if state.live:
            state.live = False
            self.log.note_sessions(-1)
        if session.auth_error is not None:
            self._append({"type": "auth.failure", "outcome": "failure", "session": state.id, **state.base,
                          "reason": self.scrub(session.auth_error), "target": _target(session)})
            return
        if session.identity is not None:
            self._append({"type": "auth.success", "outcome": "success", "session": state.id, **state.base,
                          **self._identity_fields(session), "target": _target(session)})
        self._append({"type": "session.refused", "outcome": "failure", "session": state.id, **state.base,
                      "reason": self.scrub(reason), "target": _target(session)})

    @staticmethod
    def _identity_fields(session: SessionInfo) -> dict[str, Any]:
        identity = session.identity
        serial = session.certificate_serial
        return {"groups": list(getattr(identity, "groups", ())), "identity_source": session.identity_source,
                "cert_serial": f"{serial:x}" if serial is not None else None}

    # ---- statements ---------------------------------------------------------------------------

    def forward(self, session: SessionInfo, request: Forward) -> Any:
        state = self._state(session)
        state.statements += 1
        request.number = state.statements
        record = {"type": "statement", "session": state.id, "stmt": state.statements, "kind": request.kind,
                  **state.base, **self._statement_fields(session, request)}
        if state.approval is not None:
            record["approval"], state.approval = state.approval, None
        reject = request.reject
        refused_here = None
        if reject is None and self.gate is not None:
            reject = refused_here = self.gate.refusal(self.log.size)
        if reject is not None:
            record["outcome"] = "failure"
            record["sqlstate"] = reject.sqlstate
            record["message"] = self.scrub(reject.message)
        else:
            record["outcome"] = "success"
        try:
            if reject is not None:
                self._write(record)
                return refused_here
            waiting = self._write(record, wait=True)
        except Exception as exc:  # noqa: BLE001 - the log can't take it: the statement must not run
            if reject is not None:
                return refused_here  # refused anyway; the log counts what it missed
            self.log.note_refused()
            return _unrecorded(exc)
        # In flight until its result: with one session, the log syncs on the loop's thread
        # when all that is in flight waits for its sync (nothing else could run meanwhile).
        state.open.add(state.statements)
        self.log.note_inflight(1)
        return waiting

    def _statement_fields(self, session: SessionInfo, request: Forward) -> dict[str, Any]:
        statement = request.statement
        fields: dict[str, Any] = {}
        if statement is None:
            fields["text"] = f"<unknown prepared statement for portal {request.portal!r}>"
            return fields
        text = _in_session_encoding(session, statement.text)
        if len(text) > MAX_TEXT:
            fields["text_sha256"] = hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()
            fields["text_length"] = len(text)
            text = text[:MAX_TEXT] + "…"
        fields["text"] = self.scrub(text)  # bytes that weren't UTF-8 are written escaped (_write)
        if statement.name:
            fields["statement_name"] = statement.name
        if statement.executes:
            # SQL EXECUTE: the text says only a name; what ran is the prepared statement's.
            fields["executes"] = [
                {"name": runs.name, "text": self.scrub(_shown(_in_session_encoding(session, runs.text)))}
                for runs in statement.executes]
        if request.portal:
            fields["portal"] = request.portal
        if request.bind is not None:
            fields["params"] = bind_params(request.bind, statement.param_types, self.scrub, null=None,
                                           encoding=session.client_encoding)
        decision = statement.decision
        if decision is not None:
            fields["decision"] = decision.action.value
            fields["rule"] = decision.rule
            fields["classes"] = sorted(c.value for c in decision.classes)
        else:
            fields["decision"] = "unchecked"  # no policy configured
        return fields

    # ---- results --------------------------------------------------------------------------------

    def result_complete(self, session: SessionInfo, result: Result, tag: str | None, error: bool) -> None:
        try:
            self._result(session, result, tag, error)
        except Exception:  # the statement has run; a broken record must not break the session
            log.exception("audit: could not record a result")

    def _result(self, session: SessionInfo, result: Result, tag: str | None, error: bool) -> None:
        forward = result.forward
        if forward is None:
            return  # not a forwarded request
        state = self._state(session)
        if forward.number in state.open:
            state.open.discard(forward.number)
            self.log.note_inflight(-1)
        if forward.reject is not None:
            return  # refused: its statement record says so
        record: dict[str, Any] = {"type": "result", "session": state.id, "stmt": forward.number, **state.base,
                                  "outcome": "failure" if error else "success", "rows": result.rows,
                                  "masked": result.masked,
                                  "duration_us": (time.perf_counter_ns() - forward.started_ns) // 1000}
        if tag is not None:
            record["tag"] = tag
        if result.sqlstate is not None:
            record["sqlstate"] = result.sqlstate
        if result.skipped:
            record["skipped"] = True
        if result.sample is not None:
            record["sample"] = self._sample(session, result)
        self._append(record)

    def _sample(self, session: SessionInfo, result: Result) -> dict[str, Any]:
        rows = result.sample or []
        truncated = result.sample_truncated
        description = result.row_description
        columns = [_in_session_encoding(session, f.name) for f in description.fields] \
            if description is not None else []
        return {"columns": columns, "rows": rows, "truncated": truncated or result.rows > len(rows)}

    # ---- approvals and other appliance events ---------------------------------------------------

    def approval_event(self, event: str, request: ApprovalRequest) -> None:
        """HoldBroker listener: a request was opened, or decided."""
        state = self._by_proxy_id.get(request.session_id or "")
        base = dict(state.base) if state is not None else {"user": request.requester.subject,
                                                          "origin": request.client or "local",
                                                          "object": f"{request.target}/{request.database}"}
        session_id = state.id if state is not None else None
        if event == "request":
            if state is not None:
                state.approval = request.id
            self._append(_clean({
                "type": "approval.request", "outcome": "success", **base, "session": session_id,
                "approval": request.id, "requester": request.requester.subject, "target": request.target,
                "sql": self.scrub(request.sql),
                "classes": sorted({cls for entry in request.classification for cls in entry.get("classes", ())}),
                "rule": request.rule, "approvers": list(request.approver_groups),
                "min_approvals": request.min_approvals}))
            return
        key = (request.id, request.status)
        if key in self._decided:
            return
        self._decided.add(key)
        if len(self._decided) > 10_000:
            self._decided.clear()
        decision = {"approved": "approve", "denied": "deny", "expired": "timeout",
                    "withdrawn": "withdrawn"}.get(request.status, request.status)
        votes = [{"approver": v.approver_subject, "verdict": str(v.verdict), "reason": self.scrub(v.reason),
                  **({"grant_minutes": v.grant_minutes} if v.grant_minutes else {})} for v in request.votes]
        deciding = request.votes[-1] if request.votes else None
        self._append(_clean({
            "type": "approval.decision", "outcome": "success" if decision == "approve" else "failure", **base,
            "session": session_id, "approval": request.id, "decision": decision,
            "approver": deciding.approver_subject if deciding is not None else "tollgate",
            "reason": self.scrub(request.status_reason or (deciding.reason if deciding else "")),
            "votes": votes}))

    def policy_reloaded(self, path: str, digest: str | None, generation: int, error: str | None) -> None:
        self._append(_clean({"type": "policy.reload", "outcome": "failure" if error else "success",
                             "user": "tollgate", "origin": "local", "object": f"policy:{path}", "file": path,
                             "sha256": digest, "generation": generation, "error": error}))

    # ---- records of other features (the flow ledger) ----------------------------------------------

    def session_id(self, session: SessionInfo) -> str | None:
        """The id this log gives ``session``'s records, if it has recorded any."""
        state = session.addon_state.get(self.name)
        return state.id if state is not None else None

    def record(self, record: dict[str, Any]) -> None:
        """Append a record another feature made (it has user, type, outcome, origin and
        object), signed like every other: best effort, as for what already happened."""
        self._append(record)

    # ---- writing ----------------------------------------------------------------------------------

    def _write(self, record: dict[str, Any], *, wait: bool = False) -> Any:
        """Append ``record`` scrubbed; a string holding bytes that aren't UTF-8 is written
        escaped (scrubbed before, on its bytes, and after, as written). Returns its seq, or
        with ``wait`` what to wait for before its statement runs (``AuditLog.append_waiting``).
        Raises what the log raises."""
        append = self.log.append_waiting if wait else self.log.append
        scrubbed = _scrubbed(record, clean=True)
        try:
            return append(scrubbed, trusted=True)
        except ValueError:  # canonical.dumps: a lone surrogate (or a value outside the model)
            escaped = _escaped(scrubbed)
            if escaped is None:
                raise
            return append(_scrubbed(escaped), trusted=True)

    def _append(self, record: dict[str, Any]) -> None:
        """Append a record of something already done (best effort: it can't be undone)."""
        if self._unrecorded:
            self._record_unrecorded()
        try:
            self._write(record)
        except Exception as exc:  # noqa: BLE001 - already happened: it can't be undone, only reported
            log.error("audit: could not record %s: %s", record.get("type"), exc)
            self._note_unrecorded(record, exc)

    def _note_unrecorded(self, record: dict[str, Any], exc: Exception) -> None:
        """A record was lost: say so in the log now if it takes that, else at its next record."""
        kind = str(record.get("type"))
        self._unrecorded[kind] = self._unrecorded.get(kind, 0) + 1
        if self._unrecorded_error is None:
            self._unrecorded_error = _escape_text(str(exc))[0]
            self._unrecorded_since = _now_utc()
        if not isinstance(exc, AuditUnavailable):  # the log works: this record alone could not be made
            self._record_unrecorded()

    def _record_unrecorded(self) -> None:
        record = {"type": "audit.unrecorded", "outcome": "failure", "user": "tollgate", "origin": "local",
                  "object": "audit-log", "records": dict(sorted(self._unrecorded.items())),
                  "error": self._unrecorded_error, "since": self._unrecorded_since}
        try:
            self.log.append(_scrubbed(record), trusted=True)
        except Exception as exc:  # noqa: BLE001 - still can't write: kept for the next try
            log.debug("audit: the unrecorded records' note waits: %s", exc)
            return
        self._unrecorded.clear()
        self._unrecorded_error = self._unrecorded_since = None


class SamplingAuditAddon(AuditAddon):
    """The audit addon that also keeps the first rows of each result (masked) for replay."""

    def data_row(self, session: SessionInfo, result: Result, message: memoryview) -> bytes | None:
        sample = result.sample
        if sample is None:
            sample = result.sample = []
        elif len(sample) >= self.result_rows or result.sample_truncated:
            return None
        budget = self.result_bytes - sum(_row_size(r) for r in sample)
        try:
            row = _decode_row(message, result.result_formats, budget, self.scrub, _value_decoder(session))
        except Exception:
            log.exception("audit: could not sample a result row")
            row = None
        if row is None:  # over the byte budget (or unreadable): the sample stops here
            result.sample_truncated = True
        else:
            sample.append(row)
        return None

    def data_rows(self, session: SessionInfo, result: Result, rows: memoryview) -> bytes | None:
        # Past the first rows of a result (nearly all of a large one) there is nothing to do.
        sample = result.sample
        if sample is not None and (len(sample) >= self.result_rows or result.sample_truncated):
            return None
        for start, end in row_spans(rows):
            self.data_row(session, result, rows[start:end])
            if result.sample is not None and (len(result.sample) >= self.result_rows or result.sample_truncated):
                break
        return None


def _shown(text: str) -> str:
    """A statement's text as records keep it: cut past MAX_TEXT, undecodable bytes as U+FFFD."""
    if len(text) > MAX_TEXT:
        text = text[:MAX_TEXT] + "…"
    if not text.isascii():
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return text


def _row_size(row: list[str | None]) -> int:
    return sum(len(v) for v in row if v is not None)


def _decode_row(message: memoryview, formats: tuple[int, ...], budget: int, scrub: Callable[[str], str],
                decode: Callable[[bytes], str] = lambda value: value.decode("utf-8", "surrogateescape"),
                ) -> list[str | None] | None:
    """A DataRow's values as strings (text ones through ``decode``, binary ones as ``\\x``
    hex), None when over budget."""
    row = decode_backend(b"D", bytes(message[5:]))
    values: list[str | None] = []
    used = 0
    for i, value in enumerate(row.values):
        if value is None:
            values.append(None)
            continue
        length = len(value)
        fmt = formats[0] if len(formats) == 1 else (formats[i] if i < len(formats) else 0)
        # Text that doesn't convert keeps its bytes (as lone surrogates): written escaped.
        text = "\\x" + value[:64].hex() + ("…" if length > 64 else "") if fmt == 1 else decode(value)
        used += len(text)
        if used > budget:
            return None
        values.append(scrub(text))
    return values


def _unrecorded(exc: BaseException) -> Reject:
    full = getattr(exc, "errno", None) in DISK_FULL_ERRNOS or "No space left" in str(exc)
    return Reject("53100" if full else "58030",
                  f"Tollgate could not record this statement in the audit log, so it was not run: {exc}",
                  hint="Nothing reaches the database unrecorded. The appliance operator must make the audit "
                       "directory writable again; statements run again as soon as it is.")


# Fields that are digests the appliance computed, never agent text: left as they are.
_DIGESTS = frozenset({"text_sha256", "sha256"})


def _scrubbed(record: dict[str, Any], *, clean: bool = False) -> dict[str, Any]:
    """The record with every string in it — column names, tags, messages, application_name,
    db_user, reasons, sample values, nested ones too — searched once more with the side
    channels' wider search (:func:`appliance.pan.sidechannel.mask_side`): whatever an agent
    makes the server or the appliance say, the log never holds a card number, and stays
    verifiable. ``clean``: and without its None values (:func:`_clean`), in the same pass."""
    parts: list[str] = []
    absent = False
    for key, value in record.items():
        kind = type(value)
        if kind is str:
            if key not in _DIGESTS:
                parts.append(value)
        elif value is None:
            absent = True
        elif not (kind is int or kind is bool):
            _strings(value, parts)
    if absent and clean:
        record = _clean(record)
    # Almost every record: all its strings at once, NUL-separated (a NUL ends every shape,
    # so the whole is clean only if each string is).
    if clean_text("\0".join(parts)):
        return record
    return {k: v if k in _DIGESTS else _scrub_value(v) for k, v in record.items()}


def _strings(value: Any, out: list[str]) -> None:
    """Every string in ``value`` (nested ones too; not dict keys, which the proxy names)."""
    kind = type(value)
    if kind is str:
        out.append(value)
    elif kind is list or kind is tuple:
        for item in value:
            if type(item) is str:
                out.append(item)
            elif item is not None:
                _strings(item, out)
    elif kind is dict:
        for item in value.values():
            _strings(item, out)


def _scrub_value(value: Any) -> Any:
    kind = type(value)
    if kind is str:
        return value if clean_text(value) else scrub_side(value)
    if kind is dict:
        return {k: _scrub_value(v) for k, v in value.items()}
    if kind is list or kind is tuple:
        return [_scrub_value(v) for v in value]
    return value


def _escape_text(text: str) -> tuple[str, bool]:
    """``text`` with each byte that wasn't UTF-8 (a lone surrogate U+DC80–U+DCFF, as
    surrogateescape decodes it) as ``\\xNN`` and each backslash doubled, if it has such a
    byte; and whether it had one. Any other lone surrogate (none comes off the wire) is
    written as the bytes of its UTF-8 form, escaped alike."""
    try:
        text.encode("utf-8")
        return text, False
    except UnicodeEncodeError:
        return _SURROGATE.sub(_escape_surrogate, text.replace("\\", "\\\\")), True


_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape_surrogate(match: re.Match[str]) -> str:
    code = ord(match.group())
    raw = bytes((code - 0xDC00,)) if 0xDC80 <= code <= 0xDCFF else match.group().encode("utf-8", "surrogatepass")
    return "".join(f"\\x{b:02x}" for b in raw)


def _escaped(record: dict[str, Any]) -> dict[str, Any] | None:
    """``record`` with every string that isn't valid UTF-8 escaped (:func:`_escape_text`)
    and their JSON Pointers (RFC 6901) in ``escaped``; None if no string needed it."""
    pointers: list[str] = []

    def walk(value: Any, pointer: str) -> Any:
        kind = type(value)
        if kind is str:
            text, changed = _escape_text(value)
            if changed:
                pointers.append(pointer)
            return text
        if kind is dict:
            return {_escape_text(k)[0]: walk(v, f"{pointer}/{_pointer_token(k)}") for k, v in value.items()}
        if kind is list or kind is tuple:
            return [walk(v, f"{pointer}/{i}") for i, v in enumerate(value)]
        return value

    escaped = walk(record, "")
    if not pointers:
        return None
    escaped["escaped"] = pointers
    return escaped


def _pointer_token(key: str) -> str:
    return _escape_text(key)[0].replace("~", "~0").replace("/", "~1")


def _now_utc() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _clean(record: dict[str, Any]) -> dict[str, Any]:
    """Absent values are left out, never null (the spec), except inside ``params``."""
    return {k: v for k, v in record.items() if v is not None}


def _encoding_name(session: SessionInfo) -> str:
    """The client encoding the session's text is in (the server's name for it)."""
    encoding = session.client_encoding
    return encoding.name if encoding is not None else session.parameters.get("client_encoding", "?")


def _in_session_encoding(session: SessionInfo, text: str) -> str:
    """Wire text (UTF-8, other bytes kept as surrogates) converted from the session's client
    encoding; as it was where it doesn't convert (its bytes are then written escaped)."""
    encoding = session.client_encoding
    if encoding is None or encoding.is_utf8:
        return text
    try:
        return encoding.decode(text.encode("utf-8", "surrogateescape"))
    except UnicodeError:
        return text


def _value_decoder(session: SessionInfo) -> Callable[[bytes], str]:
    """How a result's text values become record text: converted from the session's client
    encoding, keeping as lone surrogates the bytes that don't convert."""
    encoding = session.client_encoding
    if encoding is None or encoding.is_utf8:
        return lambda value: value.decode("utf-8", "surrogateescape")

    def decode(value: bytes) -> str:
        try:
            return encoding.decode(value)
        except UnicodeError:
            return value.decode("utf-8", "surrogateescape")
    return decode


def _user(session: SessionInfo) -> str:
    identity = session.identity
    if identity is not None:
        return identity.subject
    return f"unidentified@{session.client.address}"


def _target(session: SessionInfo) -> str | None:
    return session.target.name if session.target is not None else None
