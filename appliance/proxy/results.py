"""The response relay: server messages attributed to their requests, shown to the hooks, and
passed to the client.

Messages are framed in place (``appliance.pgwire.framing``) and forwarded as ranges of the
bytes received, with only the ones a hook rewrote spliced in. The few that move protocol
state (ReadyForQuery, CommandComplete, errors, descriptions, completions) update the
session's :class:`RequestState`; rare messages are decoded in full so nothing malformed
reaches the client. A DataRow, CopyData or FunctionCallResponse too large to hold is
streamed: its header goes out at once and the body follows in windows the
``stream_chunk`` hooks may rewrite in place, keeping a tail back while a card number may
continue in the next window.

While a read-only statement runs ahead of its audit record's sync (the pipeline decides
that), what would go to the client is *withheld* instead — after the hooks, so only masked
bytes are kept — in server order, up to :data:`WITHHELD_HIGH_WATER` bytes before reading
from the server pauses; :meth:`ResponseRelay.release` sends it in one write once the
record is durable. :meth:`ResponseRelay.refuse` drops it if the sync failed, drops the
rest of the statement's answer too, and ends it for the client with the error and the
server's ReadyForQuery. A FATAL from the server meanwhile goes to the client at once, and
what was withheld is dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING

from appliance.pgwire import BACKEND_BOUNDS, ProtocolError, decode_backend, frame_end
from appliance.pgwire import messages as m
from appliance.pgwire.fields import check_row_description, cstring
from appliance.pgwire.framing import resolved_bounds, unpack_length
from appliance.proxy import dispatch
from appliance.proxy.errors import SessionError
from appliance.proxy.hooks import Result
from appliance.proxy.requests import (
    BIND,
    CLOSE,
    DESCRIBE_PORTAL,
    DESCRIBE_STATEMENT,
    EXECUTE,
    FUNCTION_CALL,
    PARSE,
    QUERY,
    SYNC,
    RequestState,
)

if TYPE_CHECKING:
    from appliance.proxy.session import Session


def run_end_py(data: bytes, end: int, n: int, tag: int, low: int, high: int) -> tuple[int, int]:
    """From a whole message of ``tag`` ending at ``end``, extend over the messages that
    follow while each is whole within data[:n], has ``tag`` and a length in [low, high]:
    (the end of the last taken, how many were taken). The first that is not such is left
    to feed's loop, which applies the same bounds and names the problem."""
    count = 0
    while n - end >= 5 and data[end] == tag:
        (length,) = unpack_length(data, end + 1)
        if not low <= length <= high or end + 1 + length > n:
            break
        end += 1 + length
        count += 1
    return end, count


try:  # the same loop in C (appliance/pgwire/_runs.c): a large result is mostly this loop
    from appliance.pgwire._runs import run_end
except ImportError:  # pragma: no cover - depends on the build
    run_end = run_end_py

_STREAMABLE = frozenset(b"DdV")
# Bytes withheld for a statement whose record is not durable yet before reading from the
# server pauses, as for a slow client.
WITHHELD_HIGH_WATER = 256 * 1024
# Backend messages too rare to matter for speed: decoded in full to validate them. DataRow
# is not among them: it is the hot message, checked by the addons that parse rows.
_DECODED = frozenset(b"ENAtGHWV")
# Valid once logged in: what a session relays (authentication and cancel keys are over).
_SESSION_BOUNDS = {tag: bounds for tag, bounds in BACKEND_BOUNDS.items() if tag not in b"RKv"}


@lru_cache(maxsize=4)
def _session_limits(max_size: int) -> dict[int, tuple[int, int]]:
    return {tag: bound for tag, bound in resolved_bounds("backend", max_size).items() if tag in _SESSION_BOUNDS}


def error_bytes(severity: str, sqlstate: str, message: str, detail: str | None = None,
                hint: str | None = None) -> bytes:
    return m.ErrorResponse.build(severity, sqlstate, message, detail=detail, hint=hint).encode()


class ResponseRelay:
    """Server → client for a ready session."""

    def __init__(self, session: Session, requests: RequestState):
        self.session, self.requests = session, requests
        self.hooks, self.info = session.hooks, session.info
        self.buffer = bytearray()  # server bytes not yet processed (a partial message)
        self.need = 0
        self.result: Result | None = None
        self.descriptions: dict[bytes, m.RowDescription] = {}  # decoded RowDescriptions by their bytes
        self.renamed: dict[bytes, bytes] = {}  # column_names hooks' replacements by the server's bytes
        self.stream_left = 0  # bytes of a streamed message still to pass through
        self.stream_tag = b""
        self.stream_total = 0
        self.stream_done = 0  # body bytes of the streamed message received so far
        self.stream_carry = b""  # streamed bytes a hook kept back for the next window
        self.in_stream = False  # part of a message is on its way to the client
        self.limits = _session_limits(session.max_server_message)
        # Output held until a statement's record is durable (None: none is), whether its
        # ReadyForQuery has come, and the refusal to end it with if the record failed.
        self.withheld: bytearray | None = None
        self.withheld_ready = False
        self.refusing: bytes | None = None  # the ErrorResponse to end it with, once refused
        self.server_paused = False
        self.notices: list[bytes] = []  # NoticeResponses to send once a streamed message is through

    def notice(self, data: bytes) -> None:
        """Send a message of our own (a NoticeResponse) to the client between two of the
        server's: at once, or after the message being streamed, never inside it."""
        if self.in_stream:
            self.notices.append(data)
        elif self.withheld is not None:
            self._withhold(data)
        else:
            self.session.io.send_client(data)

    def feed(self, data: bytes) -> None:
        if self.buffer:
            self.buffer += data
            if len(self.buffer) < self.need:
                return
            data = bytes(self.buffer)
            self.buffer.clear()
            self.need = 0
        n = len(data)
        pos = 0
        view = memoryview(data)
        pieces: list[bytes | memoryview] = []
        flush_from = 0
        if self.stream_left:
            pos = min(n, self.stream_left)
            self.stream_left -= pos
            if self.hooks.stream_chunk:
                pieces.append(self._stream_window(view[:pos]))
                flush_from = pos
            self.in_stream = self.stream_left > 0
        handlers = _HANDLERS
        max_len = self.session.max_server_message
        limits = self.limits
        runs = self.hooks.data_rows
        row_low, row_high = limits[0x44]
        copy_runs = self.hooks.copy_rows
        copy_low, copy_high = limits[0x64]
        try:
            while n - pos >= 5:
                tag = data[pos]
                bound = limits.get(tag)
                (length,) = unpack_length(data, pos + 1)
                if bound is None or not bound[0] <= length <= bound[1]:
                    frame_end(data, pos, _SESSION_BOUNDS, max_len, "backend")  # raises, naming the problem
                end = pos + 1 + length
                if end > n:
                    if end - pos - 1 > self.session.stream_threshold and tag in _STREAMABLE:
                        flush_from = self._start_stream(view, pos, end - pos - 1, pieces, flush_from)
                        pos = n
                    else:
                        self.need = end - pos
                    break
                replacement = None
                if tag == 0x44:  # D: DataRow
                    if runs:
                        # The DataRows that follow, complete and within the same bounds,
                        # go to the hooks as one run; the first that isn't (another
                        # message, a partial or a bad one) is left to this loop.
                        end, more = run_end(data, end, n, 0x44, row_low, row_high)
                        result = self.current_result()
                        result.rows += 1 + more
                        replacement = dispatch.rewrite(runs, self.info, view[pos:end], result)
                    elif self.hooks.data_row:
                        result = self.current_result()
                        result.rows += 1
                        replacement = dispatch.rewrite(self.hooks.data_row, self.info, view[pos:end], result)
                    else:  # nobody looks at rows: the run only needs framing
                        end, _more = run_end(data, end, n, 0x44, row_low, row_high)
                elif tag == 0x64 and copy_runs:  # d: CopyData from the server, a run as for DataRows
                    end, _more = run_end(data, end, n, 0x64, copy_low, copy_high)
                    replacement = dispatch.rewrite(copy_runs, self.info, view[pos:end], self.current_result())
                else:
                    if tag in _DECODED:
                        # Rare messages: fully checked, so nothing malformed reaches the client.
                        decode_backend(bytes((tag,)), view[pos + 5:end])
                    handler = handlers.get(tag)  # the others (_PASSTHROUGH) carry no state we track
                    if handler is not None:
                        replacement = handler(self, view, pos, end)
                    if tag == 0x5A and self.withheld is not None:  # Z: the withheld statement's end
                        self.withheld_ready = True
                        if self.refusing is not None:
                            pos = end
                            break
                    elif tag == 0x45 and self.withheld is not None and _is_fatal(view, pos, end):
                        # The server ends the session: the agent gets its FATAL, and nothing
                        # of what was withheld (this read's record may never be durable).
                        self.withheld = self.refusing = None
                        pieces.clear()
                        flush_from = pos
                if replacement is not None:
                    pieces.append(view[flush_from:pos])
                    pieces.append(replacement)
                    flush_from = end
                pos = end
        except ProtocolError as exc:
            # What the server sent before the bad message is the client's, as it would be
            # from the server directly; then the session ends.
            failure: ProtocolError | None = exc
        else:
            failure = None
            if pos < n:
                self.buffer += view[pos:]
                self.need = max(self.need, 5)
        # Send what was relayed up to pos: the received bytes with replacements spliced in.
        send = self.session.io.send_client if self.withheld is None else self._withhold
        if pieces:
            pieces.append(view[flush_from:pos])
            send(b"".join(pieces))
        elif pos > flush_from:
            send(data if flush_from == 0 and pos == n else view[flush_from:pos])
        if failure is not None:
            raise failure
        if self.notices and not self.in_stream:
            notices, self.notices = self.notices, []
            for notice in notices:
                self.notice(notice)
        if self.refusing is not None and self.withheld_ready:
            self._end_refusal()

    # ---- withheld output: a statement running ahead of its record's sync -------------------

    def withhold(self) -> None:
        """From now on, keep what would go to the client until :meth:`release` or :meth:`refuse`."""
        self.withheld = bytearray()
        self.withheld_ready = False
        self.refusing = None

    def _withhold(self, data: bytes | memoryview) -> None:
        withheld = self.withheld
        if withheld is None or self.refusing is not None:
            return  # refused: the statement's answer is dropped
        withheld += data
        if len(withheld) > WITHHELD_HIGH_WATER and not self.server_paused:
            self.server_paused = True
            self.session.io.pause_server()

    def release(self) -> None:
        """The record is durable: what was withheld goes out, in one write."""
        withheld, self.withheld = self.withheld, None
        if withheld:
            self.session.io.send_client(bytes(withheld))
        self._resume_server()
        if self.buffer and len(self.buffer) >= self.need:
            self.feed(b"")

    def refuse(self, error: bytes) -> None:
        """The record could not be made durable: the client gets ``error`` and
        ReadyForQuery instead of the statement's answer, dropped whole (the part still to
        come from the server too)."""
        if self.withheld is None:
            return
        self.withheld = bytearray()
        self.refusing = error
        self._resume_server()  # the rest is read only to be dropped
        if self.withheld_ready:
            self._end_refusal()

    def _end_refusal(self) -> None:
        error = self.refusing or b""
        self.withheld, self.refusing, self.withheld_ready = None, None, False
        self.session.io.send_client(error + m.ReadyForQuery(self.info.transaction_status).encode())
        if self.buffer and len(self.buffer) >= self.need:
            self.feed(b"")

    def _resume_server(self) -> None:
        if self.server_paused:
            self.server_paused = False
            self.session.io.resume_server()

    # ---- streaming ------------------------------------------------------------------------------

    def _start_stream(self, view: memoryview, pos: int, length: int, pieces: list, flush_from: int) -> int:
        """Begin passing a large message through in pieces (it is never held whole); the
        rest of ``view`` is its first piece. Returns the new flush_from."""
        self.stream_tag, self.stream_total = bytes(view[pos:pos + 1]), length - 4
        body = view[pos + 5:]
        if self.stream_tag == b"D":
            self.current_result().rows += 1
        self.stream_left = self.stream_total - len(body)
        self.stream_done = 0
        if self.hooks.stream_chunk:
            window = self._stream_window(body)  # a hook failing here: nothing of it was sent yet
            pieces.append(view[flush_from:pos + 5])
            pieces.append(window)
            flush_from = len(view)
        self.in_stream = True
        return flush_from

    def _stream_window(self, new: memoryview) -> bytes | memoryview:
        """Run the stream_chunk hooks over the bytes kept back so far plus ``new``; returns
        what may go to the client now. The message's header is already on its way, so a
        replacement must keep the window's length."""
        carry = self.stream_carry
        window: memoryview = memoryview(carry + new) if carry else new
        offset = self.stream_done - len(carry)
        final = self.stream_left == 0
        keep = 0
        result = self.current_result() if self.stream_tag == b"D" else self.result
        for hook in self.hooks.stream_chunk:
            try:
                edit = hook(self.info, result, self.stream_tag, window, offset, self.stream_total)
            except Exception as exc:
                raise dispatch.failed(hook, exc) from exc
            if edit is None:
                continue
            if edit.data is not None:
                if len(edit.data) != len(window):
                    raise SessionError("XX000", "a streamed value was rewritten to another length")
                window = memoryview(edit.data)
            keep = max(keep, edit.keep)
        if final and keep:
            raise SessionError("XX000", "a stream hook kept bytes back at the end of a message")
        if keep > self.session.stream_threshold:
            raise SessionError("XX000", "a stream hook kept back more than stream_threshold bytes")
        self.stream_done += len(new)
        if keep:
            self.stream_carry = bytes(window[len(window) - keep:])
            return window[:len(window) - keep]
        self.stream_carry = b""
        return window

    # ---- results ----------------------------------------------------------------------------------

    def current_result(self) -> Result:
        if self.result is None:
            pending = self.requests.pending
            self.result = self.requests.result_for(pending[0] if pending else None)
        return self.result

    def _complete(self, tag: str | None, error: bool, sqlstate: str | None = None) -> None:
        result = self.current_result()
        result.sqlstate = sqlstate
        dispatch.notify(self.hooks.result_complete, self.info, result, tag, error)

    # Handlers for server messages that move protocol state. Each returns replacement bytes
    # for the message, or None to forward it unchanged.

    def _on_ready_for_query(self, view: memoryview, pos: int, end: int) -> None:
        status = bytes(view[pos + 5:pos + 6])
        if status not in (b"I", b"E", b"T"):
            raise ProtocolError("ReadyForQuery must carry one status byte I, E or T")
        self.info.transaction_status = status
        self.requests.ready_for_query(status)
        self.result = None

    def _on_command_complete(self, view: memoryview, pos: int, end: int) -> None:
        if end - pos < 6 or view.obj.find(b"\0", pos + 5, end) != end - 1:  # type: ignore[union-attr]
            raise ProtocolError("CommandComplete must hold exactly one NUL-terminated tag")
        pending = self.requests.pending
        head = pending[0] if pending else None
        if self.hooks.result_complete:
            tag, _ = cstring(view.obj, pos + 5, end)  # type: ignore[arg-type]
            self._complete(tag, False)
        self.result = None
        if head is not None:
            if head.kind is EXECUTE:
                pending.popleft()
            elif head.created:
                head.completed += 1  # one more statement of this Query ran: its PREPARE stands

    def _on_portal_suspended(self, view: memoryview, pos: int, end: int) -> None:
        if self.hooks.result_complete:
            self._complete(None, False)
        self.result = None
        pending = self.requests.pending
        if pending and pending[0].kind is EXECUTE:
            pending.popleft()

    def _on_error(self, view: memoryview, pos: int, end: int) -> bytes | None:
        pending = self.requests.pending
        head = pending[0] if pending else None
        replacement: bytes | None = None
        fatal = view[pos + 5:end].tobytes().find(b"SFATAL\0") >= 0
        if head is not None and head.reject is not None and not fatal:
            # The server rejected our stand-in for a blocked request: tell the client why.
            # (Not a FATAL: that one is about the connection, and is the client's last word.)
            r = head.reject
            replacement = error_bytes("ERROR", r.sqlstate, r.message, r.detail, r.hint)
        elif self.hooks.notice:
            replacement = dispatch.rewrite(self.hooks.notice, self.info, view[pos:end], True)
        if self.hooks.result_complete and head is not None and head.kind in (QUERY, EXECUTE, FUNCTION_CALL):
            code = head.reject.sqlstate if head.reject is not None else _error_code(view, pos, end)
            self._complete(None, True, code)
        self.result = None
        if head is not None and head.created:
            # The statement that failed, and any after it, prepared nothing.
            self.requests.undo_created(head, head.completed)
        if head is not None and head.kind not in (QUERY, FUNCTION_CALL, SYNC):
            # Extended protocol: the server now skips everything up to the next Sync, so
            # statements and portals those requests would have made never exist.
            if head.kind is EXECUTE and pending and pending[0] is head:
                pending.popleft()  # this one has had its say above
            while pending and pending[0].kind is not SYNC:
                skipped = pending.popleft()
                self.requests.forget_created(skipped)
                if skipped.forward is not None and self.hooks.result_complete:
                    result = Result(skipped.forward.statement, forward=skipped.forward, skipped=True)
                    dispatch.notify(self.hooks.result_complete, self.info, result, None, True)
        if fatal:
            # Whatever the request: the server's FATAL is the client's last word, not ours.
            self.session.close_reason = "the database ended the session (FATAL)"
        return replacement

    def _on_notice(self, view: memoryview, pos: int, end: int) -> bytes | None:
        if self.hooks.notice:
            return dispatch.rewrite(self.hooks.notice, self.info, view[pos:end], False)
        return None

    def _on_notification(self, view: memoryview, pos: int, end: int) -> bytes | None:
        if self.hooks.notification:
            return dispatch.rewrite(self.hooks.notification, self.info, view[pos:end])
        return None

    def _on_row_description(self, view: memoryview, pos: int, end: int) -> bytes | None:
        requests = self.requests
        pending = requests.pending
        head = pending[0] if pending else None
        check_row_description(view.obj, pos + 5, end)  # type: ignore[arg-type]
        replacement = None
        description = None
        hooks = self.hooks
        if hooks.column_names or hooks.row_description or hooks.data_row:
            # A session sees the same few descriptions over and over: decode each once, and
            # hand addons the same object, so what they derive from it can be kept too.
            # Bytes already decoded are bytes the column_names hooks passed or produced:
            # they are not shown them again; their replacements are kept too.
            key = view[pos + 5:end].tobytes()
            descriptions = self.descriptions
            description = descriptions.get(key)
            if description is None:
                if hooks.column_names:
                    replacement = self.renamed.get(key)
                    if replacement is None:
                        replacement = dispatch.rewrite(hooks.column_names, self.info, view[pos:end])
                        if replacement is not None:
                            check_row_description(replacement, 5, len(replacement))
                            if len(self.renamed) >= 64:
                                self.renamed.clear()
                            self.renamed[key] = replacement
                    if replacement is not None:
                        key = replacement[5:]
                        description = descriptions.get(key)
                if description is None:
                    description = decode_backend(b"T", key)
                    if len(descriptions) >= 64:
                        descriptions.clear()
                    descriptions[key] = description  # type: ignore[assignment]
        if head is not None and head.kind is DESCRIBE_STATEMENT:
            pending.popleft()
            statement = requests.statements.get(head.name)
            if statement is not None:
                statement.row_description = description  # type: ignore[assignment]
        elif head is not None and head.kind is DESCRIBE_PORTAL:
            pending.popleft()
            portal = requests.portals.get(head.name)
            if portal is not None:
                portal.row_description = description  # type: ignore[assignment]
        else:
            self.result = Result(head.statement if head else None, description,  # type: ignore[arg-type]
                                 forward=head.forward if head else None)
            dispatch.notify(self.hooks.row_description, self.info, self.result)
        return replacement

    def _on_no_data(self, view: memoryview, pos: int, end: int) -> None:
        self._answered(DESCRIBE_STATEMENT, DESCRIBE_PORTAL)

    def _on_parse_complete(self, view: memoryview, pos: int, end: int) -> None:
        self._answered(PARSE)

    def _on_bind_complete(self, view: memoryview, pos: int, end: int) -> None:
        self._answered(BIND)

    def _on_close_complete(self, view: memoryview, pos: int, end: int) -> None:
        self._answered(CLOSE)

    def _answered(self, *kinds: object) -> None:
        pending = self.requests.pending
        if pending and pending[0].kind in kinds:
            pending.popleft()

    def _on_copy_data(self, view: memoryview, pos: int, end: int) -> bytes | None:
        if self.hooks.copy_data:
            return dispatch.rewrite(self.hooks.copy_data, self.info, view[pos:end], self.current_result(), False)
        return None

    def _on_copy_out(self, view: memoryview, pos: int, end: int) -> None:
        response = decode_backend(b"H", view[pos + 5:end])
        result = self.current_result()
        result.copy_format, result.copy_column_formats = response.format, response.column_formats  # type: ignore[attr-defined]

    def _on_function_result(self, view: memoryview, pos: int, end: int) -> bytes | None:
        if self.hooks.function_result:
            return dispatch.rewrite(self.hooks.function_result, self.info, view[pos:end])
        return None

    def _on_parameter_status(self, view: memoryview, pos: int, end: int) -> bytes | None:
        replacement = None
        if self.hooks.parameter_status:
            replacement = dispatch.rewrite(self.hooks.parameter_status, self.info, view[pos:end])
            if replacement is not None:
                view, pos, end = memoryview(replacement), 0, len(replacement)
        status = decode_backend(b"S", view[pos + 5:end])
        self.info.parameters[status.name] = status.value  # type: ignore[attr-defined]
        return replacement


_HANDLERS: dict[int, Callable[[ResponseRelay, memoryview, int, int], bytes | None]] = {
    ord("Z"): ResponseRelay._on_ready_for_query,
    ord("C"): ResponseRelay._on_command_complete,
    ord("s"): ResponseRelay._on_portal_suspended,
    ord("I"): ResponseRelay._on_portal_suspended,  # EmptyQueryResponse ends its request the same way
    ord("E"): ResponseRelay._on_error,
    ord("N"): ResponseRelay._on_notice,
    ord("A"): ResponseRelay._on_notification,
    ord("T"): ResponseRelay._on_row_description,
    ord("n"): ResponseRelay._on_no_data,
    ord("1"): ResponseRelay._on_parse_complete,
    ord("2"): ResponseRelay._on_bind_complete,
    ord("3"): ResponseRelay._on_close_complete,
    ord("d"): ResponseRelay._on_copy_data,
    ord("H"): ResponseRelay._on_copy_out,
    ord("V"): ResponseRelay._on_function_result,
    ord("S"): ResponseRelay._on_parameter_status,
}


def _is_fatal(view: memoryview, pos: int, end: int) -> bool:
    return view[pos + 5:end].tobytes().find(b"SFATAL\0") >= 0


def _error_code(view: memoryview, pos: int, end: int) -> str | None:
    """The SQLSTATE of an ErrorResponse at view[pos:end] (a rare message: decoded in full)."""
    return decode_backend(b"E", bytes(view[pos + 5:end])).sqlstate  # type: ignore[attr-defined]
