"""The request pipeline: client messages framed, decided, committed and sent upstream.

Each message is framed in place (``appliance.pgwire.framing``) and forwarded as a range of
the bytes received; only requests that make the server act are looked at closely:

1. **decide** — a Query, Parse or FunctionCall is put to the ``statement`` hooks, an
   Execute of a prepared statement to the ``execute`` hooks when an addon asked to see it
   run (or policy changed since it was prepared, or it works on other prepared
   statements). A statement is decided as what it runs: SQL ``EXECUTE name`` is resolved in
   the session's one prepared-statement namespace (protocol and SQL alike, see
   ``appliance.proxy.prepared``) and a name Tollgate can't tell the text of is refused,
   and so is a Bind of one. A Reject swaps the request for a
   stand-in the server is sure to fail, so transaction and pipeline state match a real
   error. A Hold parks the request — its bytes kept in its :class:`Pending` entry — and
   pauses this client only; the request resumes from that entry once decided.
2. **commit** — a request whose verdict is final passes the ``forward`` hooks (the audit
   record). What they must wait for (the record made durable) holds the whole batch of
   messages back until done; if it fails, every request of the batch is swapped for its
   stand-in and refused.

   One exception: a batch that runs one statement policy proves read-only
   (:attr:`~appliance.model.decision.Decision.read_only`: it can change nothing in the
   database) — a simple Query alone, or an extended-protocol Execute with only the unnamed
   Parse, Binds, Describes and one Sync around it — sent while nothing else is in flight
   and outside a transaction block, goes upstream at once while its record syncs; its answer is withheld by the response
   relay until the record is durable, and replaced by the refusal if it can't be made so.
   The client stays paused meanwhile, so later requests queue behind it as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any, NoReturn

from appliance.pgwire import (
    DEFAULT_MAX_MESSAGE_SIZE,
    FRONTEND_SESSION_BOUNDS,
    ProtocolError,
    decode_frontend,
    frame_end,
)
from appliance.pgwire import messages as m
from appliance.pgwire.fields import bind_fields, execute_portal, kind_and_name, parse_fields, query_text
from appliance.pgwire.framing import resolved_bounds, unpack_length
from appliance.proxy import dispatch
from appliance.proxy.errors import SessionError
from appliance.proxy.hooks import Forward, Hold, Reject, Statement, StatementKind, Verdict
from appliance.proxy.prepared import UnreadableSql, sql_effects
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
    Pending,
    Portal,
    RequestState,
    UnknownStatement,
)
from appliance.proxy.results import error_bytes

if TYPE_CHECKING:
    from appliance.proxy.session import Session

# A statement the server is sure to reject at parse time, sent in place of a rejected one,
# so that transaction and pipeline state on the server match what the client is told.
BLOCKED_SQL = b"TOLLGATE BLOCKED STATEMENT"
BLOCKED_QUERY = m.Query(BLOCKED_SQL.decode()).encode()
BLOCKED_FUNCTION_CALL = m.FunctionCall(0, (), (), 0).encode()  # no function has OID 0
# No portal has this name (a client can't have bound it: we never forward such a Bind):
# the server fails the stand-in Execute, with the transaction effects of a real error.
BLOCKED_PORTAL = "\x01tollgate blocked portal"
BLOCKED_EXECUTE = m.Execute(BLOCKED_PORTAL, 0).encode()
# Likewise no prepared statement has this name: a Bind of one Tollgate doesn't know is sent
# as a Bind of it, and fails as PostgreSQL fails a Bind of a name that doesn't exist.
BLOCKED_STATEMENT = "\x01tollgate unknown statement"
RESERVED_NAMES = (BLOCKED_PORTAL, BLOCKED_STATEMENT)

Waiting = list[tuple[int, Pending, bytes, Any]]  # (piece index, request, stand-in, awaitable)


class RequestPipeline:
    """Client → server for a ready session."""

    def __init__(self, session: Session, requests: RequestState):
        self.session, self.requests = session, requests
        self.hooks = session.hooks
        self.buffer = bytearray()  # client bytes not yet processed (partial, or behind a hold or batch)
        # Bytes the buffer needs before its head message is complete: a large message
        # arriving in many reads is framed once, not re-copied per read.
        self.need = 0
        self.held: Pending | None = None  # the request waiting on a Hold
        self.hold_info: tuple[Hold, float] | None = None  # its Hold and when it began (epoch seconds)
        self.decided: tuple[Pending, Verdict] | None = None  # a finished hold, not yet admitted
        self.batch: tuple[list[bytes], Waiting] | None = None  # sent once its forward hooks' waits finish
        self.overlapped = False  # the batch went upstream already; its answer is withheld
        self.cancel_hold: Callable[[], None] | None = None
        self.paused = False
        self.limits = resolved_bounds("frontend-session", session.max_client_message)
        self.budget = session.budget
        self.reserved = 0  # bytes of the shared budget this session holds for its buffer

    @property
    def blocked(self) -> bool:
        return self.held is not None or self.decided is not None or self.batch is not None

    def feed(self, data: bytes) -> None:
        if not self.buffer and self.held is None and self.batch is None and self.decided is None:
            rest = self._relay(data)
            if rest < len(data):
                self._keep(memoryview(data)[rest:])
            return
        self.buffer += data
        if self.blocked:
            self._check_buffer()
        elif len(self.buffer) >= self.need:  # else the head message is still incomplete
            self._drain()

    def resume(self) -> None:
        """Frame what waited in the buffer while the session could not relay it."""
        self.need = 0
        if self.buffer and not self.blocked:
            self._drain()

    def _check_buffer(self) -> None:
        limit = self.session.max_client_message
        if len(self.buffer) > limit + 5:
            raise SessionError(
                "54000", f"the client sent more than {limit} bytes Tollgate must hold before it can relay them",
                hint="Tollgate's max_client_message limits what one connection may have buffered.")
        self._reserve(len(self.buffer))

    def _reserve(self, holding: int) -> None:
        """Hold ``holding`` bytes of the shared budget (the buffer, or the message it is
        becoming); refused at once, before the bytes arrive, if the budget is spent."""
        more = holding - self.reserved
        if more <= 0:
            return
        if not self.budget.take(more, holding):
            raise SessionError(
                "53200", f"out of memory: Tollgate cannot buffer a client message of {holding} bytes now: "
                         f"incomplete messages of all sessions already hold {self.budget.used} of "
                         f"{self.budget.limit} bytes",
                hint="Retry later, or send smaller statements; max_buffered_total sets the limit.")
        self.reserved = holding

    def _release(self) -> None:
        if self.reserved:
            self.budget.give(self.reserved)
            self.reserved = 0

    def _drain(self) -> None:
        data = bytes(self.buffer)
        # A new, empty buffer: one grown to a large message's size is not kept around.
        self.buffer = bytearray()
        self.need = 0
        self._release()
        rest = self._relay(data)
        if rest < len(data):
            self._keep(memoryview(data)[rest:])

    def _keep(self, rest: memoryview) -> None:
        """Keep an unprocessed tail; note how much the head message needs to be complete,
        and reserve it in the shared budget now, from its header."""
        self.buffer += rest
        self.need = 1 + unpack_length(rest, 1)[0] if len(rest) >= 5 else 5
        self._check_buffer()
        # Before the session is ready the header is not judged yet: what is reserved is
        # bounded by the per-connection cap until it is.
        self._reserve(min(self.need, self.session.max_client_message + 5))

    # ---- framing and the per-message work ------------------------------------------------------

    def _relay(self, data: bytes) -> int:
        """Frame and forward client messages; returns where processing stopped."""
        session, requests, hooks = self.session, self.requests, self.hooks
        pending = requests.pending
        n = len(data)
        pos = flush_from = 0
        pieces: list[bytes | memoryview] = []
        view = memoryview(data)
        max_len = session.max_client_message
        forwarding = bool(hooks.forward)
        waiting: Waiting = []  # requests whose forward hooks must finish first
        limits = self.limits
        max_pending = session.max_pending_requests
        while n - pos >= 5 and self.held is None and session.ready:
            if len(pending) >= max_pending:
                raise_too_many_pending(max_pending)
            tag = data[pos]
            bound = limits.get(tag)
            (length,) = unpack_length(data, pos + 1)
            if bound is None or not bound[0] <= length <= bound[1]:
                refuse_length(data, pos, max_len)  # raises, naming the problem
            end = pos + 1 + length
            if end > n:
                break
            replacement: bytes | memoryview | None = None
            if tag == 0x51:  # Q
                statement = Statement(StatementKind.QUERY, query_text(data, pos + 5, end))
                # A simple Query drops the unnamed prepared statement (PostgreSQL's
                # exec_simple_query does, whatever the query).
                requests.statements.pop("", None)
                verdict = self._namespace(statement, True) or self._decide(statement)
                if type(verdict) is Hold:
                    self._hold(Pending(QUERY, statement), view[pos:end], verdict)
                    pos = end
                    break
                replacement = self._admit(Pending(QUERY, statement), verdict, view[pos:end], len(pieces), waiting)
            elif tag == 0x50:  # P
                name, query, param_types = parse_fields(data, pos + 5, end)
                if name in RESERVED_NAMES:
                    raise ProtocolError("that statement name is reserved")
                statement = Statement(StatementKind.PARSE, query, name, param_types)
                # What it does to the namespace happens when it runs: resolved at each Execute.
                verdict = self._namespace(statement, False) or self._decide(statement)
                if type(verdict) is Hold:
                    self._hold(Pending(PARSE, statement, None, name), view[pos:end], verdict)
                    pos = end
                    break
                replacement = self._admit(Pending(PARSE, statement, None, name), verdict, view[pos:end],
                                          len(pieces), waiting)
            elif tag == 0x42:  # B
                portal_name, stmt_name, formats = bind_fields(data, pos + 5, end)
                if portal_name in RESERVED_NAMES:
                    raise ProtocolError("that portal name is reserved")
                bound = requests.statements.get(stmt_name)
                if bound is None:
                    # Not in the namespace: never run unchecked. The server fails the stand-in
                    # as it fails a Bind of a missing name, skipping on to Sync.
                    requests.portals.pop(portal_name, None)
                    pending.append(Pending(BIND, None, None, stmt_name, UnknownStatement(stmt_name).reject()))
                    replacement = renamed_bind(data, pos + 5, end)
                else:
                    portal = Portal(portal_name, bound, formats, requests.ends_sent)
                    if forwarding or bound.deferred is not None or bound.epoch != hooks.epoch or bound.effects:
                        portal.bind = bytes(view[pos + 5:end])
                    pending.append(Pending(BIND, None, portal))
                    requests.portals[portal_name] = portal
            elif tag == 0x45:  # E
                portal_name = execute_portal(data, pos + 5, end)
                portal = requests.portals.get(portal_name)
                bound = portal.statement if portal is not None else None
                verdict = None
                # (No statement: a SQL cursor, decided when declared, or a portal the server
                # doesn't have — every Bind Tollgate let through named a statement it knows.)
                if bound is not None and (bound.deferred is not None or bound.epoch != hooks.epoch
                                          or bound.verdict is not None or bound.effects):
                    verdict = self._decide_execute(portal, bound)  # type: ignore[arg-type]
                    if type(verdict) is Hold:
                        self._hold(Pending(EXECUTE, None, portal, portal_name), view[pos:end], verdict)
                        pos = end
                        break
                replacement = self._admit(Pending(EXECUTE, None, portal, portal_name), verdict, view[pos:end],
                                          len(pieces), waiting)
            elif tag == 0x53:  # S
                pending.append(Pending(SYNC))
                requests.ends_sent += 1
            elif tag == 0x44:  # D
                kind, name = kind_and_name(data, pos + 5, end, "Describe")
                pending.append(Pending(DESCRIBE_STATEMENT if kind == 0x53 else DESCRIBE_PORTAL, None, None, name))
            elif tag == 0x43:  # C
                kind, name = kind_and_name(data, pos + 5, end, "Close")
                pending.append(Pending(CLOSE))
                (requests.statements if kind == 0x53 else requests.portals).pop(name, None)
            elif tag == 0x64:  # d: CopyData
                if hooks.copy_data:
                    replacement = dispatch.rewrite(hooks.copy_data, session.info, view[pos:end], None, True)
            elif tag == 0x66:  # f CopyFail (H Flush, c CopyDone: their length is all there is)
                decode_frontend(b"f", view[pos + 5:end])
            elif tag == 0x58:  # X Terminate: the server closing next is expected
                session.close_reason = "client terminated the session"
            elif tag == 0x46:  # F: FunctionCall
                call = decode_frontend(b"F", view[pos + 5:end])
                statement = Statement(StatementKind.FUNCTION_CALL, f"<function call oid {call.function_oid}>",
                                      function_oid=call.function_oid)
                verdict = self._decide(statement)
                if type(verdict) is Hold:
                    self._hold(Pending(FUNCTION_CALL, statement), view[pos:end], verdict)
                    pos = end
                    break
                replacement = self._admit(Pending(FUNCTION_CALL, statement), verdict, view[pos:end], len(pieces),
                                          waiting)
            if replacement is not None:
                pieces.append(view[flush_from:pos])
                pieces.append(replacement)
                flush_from = end
            pos = end
        held_at = pos - len(self.held.message) if self.held is not None and self.held.message else pos
        if waiting:
            pieces.append(view[flush_from:held_at])
            self._wait_for_batch([bytes(p) for p in pieces], waiting)
        elif pieces:
            pieces.append(view[flush_from:held_at])
            session.io.send_server(b"".join(pieces))
        elif held_at > flush_from:
            session.io.send_server(data if flush_from == 0 and held_at == n else view[flush_from:held_at])
        return pos

    def _admit(self, request: Pending, verdict: Verdict, message: memoryview, piece: int,
               waiting: Waiting) -> bytes | memoryview | None:
        """Queue a decided request; returns what to send in its place (None: itself)."""
        requests = self.requests
        kind = request.kind
        request.reject = verdict  # type: ignore[assignment]  # a Hold never gets here
        if kind is PARSE:
            requests.pending.append(request)
            name = request.name
            # A refused Parse is kept too, with its Reject: a Bind of it goes on to fail at
            # the server like any Bind of a statement that failed to parse. A name already
            # prepared is forgotten: the server refuses to prepare it twice and keeps the
            # old one — unless it was dropped where Tollgate can't see (a function's
            # DEALLOCATE), so which one it holds is not guessed.
            if name and name in requests.statements:
                del requests.statements[name]
            else:
                requests.statements[name] = request.statement  # type: ignore[assignment]
            if verdict is None:
                return None
            if self.hooks.forward:  # only to be recorded: a refused Parse has nothing to wait for
                self._forward("parse", request)
            return m.Parse(request.name, BLOCKED_SQL.decode(), ()).encode()
        if kind is EXECUTE:
            blocked = BLOCKED_EXECUTE
            runs = request.portal.statement if request.portal is not None else None
        else:
            requests.ends_sent += 1
            blocked = BLOCKED_QUERY if kind is QUERY else BLOCKED_FUNCTION_CALL
            runs = request.statement
        if verdict is None and runs is not None and runs.effects:
            requests.apply(runs.effects, request)
        requests.pending.append(request)
        replacement = None if verdict is None else blocked
        if self.hooks.forward:
            return self._commit(request, blocked, message, replacement, piece, waiting)
        return replacement

    def _commit(self, request: Pending, blocked: bytes, message: memoryview, replacement: bytes | None,
                piece: int, waiting: Waiting) -> bytes | memoryview | None:
        """Put a request whose verdict is final to the forward hooks; returns what to send
        in its place. One that must wait goes as a piece of its own, so that it can still
        be swapped for ``blocked`` if what it waits for fails."""
        kind = request.kind
        wait = self._forward("query" if kind is QUERY else "execute" if kind is EXECUTE else "function_call", request)
        if request.reject is not None:
            return blocked if replacement is None else replacement
        if wait is not None:
            # Its piece lands after the one flushing everything before it: index piece + 1.
            waiting.append((piece + 1, request, blocked, wait))
            return message
        return replacement

    def _forward(self, kind: str, request: Pending) -> Any:
        portal = request.portal
        statement = portal.statement if portal is not None else request.statement
        forward = Forward(kind, statement, request.reject, portal.name if portal is not None else "",
                          portal.bind if portal is not None else None, perf_counter_ns())
        request.forward = forward
        wait = dispatch.forward(self.hooks.forward, self.session.info, forward)
        request.reject = forward.reject
        return wait

    # ---- decisions ------------------------------------------------------------------------------

    def _namespace(self, statement: Statement, now: bool) -> Reject | None:
        """Read what ``statement`` does to the prepared-statement namespace; with ``now``
        (a Query: it runs as it is sent), resolve the statements its EXECUTEs run. A
        refusal when that can't be told."""
        try:
            effects = sql_effects(statement.text)
        except UnreadableSql as exc:
            return Reject("42601", "Tollgate cannot tell which prepared statements this request prepares, runs "
                          f"or drops, so it did not run: {exc}")
        if effects:
            statement.effects = effects
            if now:
                try:
                    statement.executes = self.requests.resolve(effects)
                except UnknownStatement as exc:
                    return exc.reject()
        return None

    def _decide(self, statement: Statement) -> Verdict:
        hooks = self.hooks.statement
        verdict = dispatch.decide(hooks, self.session.info, statement) if hooks else None
        if verdict is not None:
            statement.verdict = verdict
        statement.epoch = self.hooks.epoch
        return verdict

    def _decide_execute(self, portal: Portal, statement: Statement) -> Verdict:
        """A prepared statement about to run: decided again if policy changed since it was
        prepared, and put to the ``execute`` hooks if an addon deferred it to run time. One
        that works on other prepared statements is resolved and decided again each time:
        what its EXECUTE runs is what the namespace holds now."""
        if statement.effects:
            try:
                statement.executes = self.requests.resolve(statement.effects)
            except UnknownStatement as exc:
                return exc.reject()
            statement.epoch = -1
            statement.deferred = None
        if statement.epoch != self.hooks.epoch:
            statement.verdict = None
            self._decide(statement)
        verdict = statement.verdict
        if type(verdict) is Reject:
            return verdict  # prepared under rules that no longer allow it
        if statement.deferred is None and verdict is None:
            return None
        # Deferred to run time (a hold is asked for with the parameters it runs with).
        return dispatch.decide_execute(self.hooks.execute, self.session.info, statement, portal.bind)

    # ---- holds and batches: this client waits, nobody else ------------------------------------

    def _pause(self) -> None:
        if not self.paused:
            self.paused = True
            self.session.io.pause_client()

    def _hold(self, request: Pending, message: memoryview, hold: Hold) -> None:
        request.message = bytes(message)
        self.held = request
        self.hold_info = (hold, time.time())
        self._pause()
        if hold.notice is not None:
            # Told before the wait: psql prints a notice as soon as it arrives.
            notice = hold.notice
            self.session.responses.notice(m.NoticeResponse.build("NOTICE", "00000", notice.message, notice.detail,
                                                                 notice.hint).encode())
        self.cancel_hold = self.session.io.wait(hold.decision, self._hold_done)

    def _hold_done(self, result: Any, error: BaseException | None) -> None:
        if self.held is None or not self.session.ready:
            return
        if error is not None:
            result = Reject("XX000", f"the approval could not be completed: {error}")
        elif result is not None and not isinstance(result, Reject):
            result = Reject("XX000", f"the approval returned {result!r}, which is not a verdict")
        self.cancel_hold = None
        self.resolve_hold(result)

    def resolve_hold(self, verdict: Reject | None) -> None:
        """The held request is decided (or withdrawn): it goes on from its pending entry."""
        if self.cancel_hold is not None:
            cancel, self.cancel_hold = self.cancel_hold, None
            cancel()
        held, self.held = self.held, None
        self.hold_info = None
        if held is not None:
            self.decided = (held, verdict)
        self.session.run(self._carry_on)

    def _wait_for_batch(self, pieces: list[bytes], waiting: Waiting) -> None:
        """Hold a batch back until its forward hooks' awaitables are done (or, a read-only
        one, send it and withhold its answer till then)."""
        self.batch = (pieces, waiting)
        self._pause()
        if self._may_overlap(pieces, waiting):
            self.overlapped = True
            self.session.responses.withhold()
            self.session.io.send_server(b"".join(pieces))
        # Never cancelled: the awaitables may be shared with other sessions (group commit).
        self.session.io.wait(dispatch.all_of([w for _, _, _, w in waiting]), self._batch_done)

    def _batch_done(self, result: Any, error: BaseException | None) -> None:
        if self.batch is None or not self.session.ready:
            return
        pieces, waiting = self.batch
        self.batch = None
        if self.overlapped:
            self.overlapped = False
            self._overlap_done(waiting, error)
            self.session.run(self._carry_on)
            return
        if error is not None:
            reject = Reject(getattr(error, "sqlstate", None) or "58030",
                            f"Tollgate could not complete what must happen before this statement runs, so it "
                            f"did not run: {error}", hint=getattr(error, "hint", None))
            dispatch.log.error("session %s: refusing %d request(s): %s", self.session.info.id, len(waiting), error)
            for index, request, blocked, _ in waiting:
                if request.reject is None:
                    request.reject = reject
                    if request.forward is not None:
                        request.forward.reject = reject
                    pieces[index] = blocked
        self.session.io.send_server(b"".join(pieces))
        self.session.run(self._carry_on)

    def _may_overlap(self, pieces: list[bytes], waiting: Waiting) -> bool:
        """Whether the batch runs one read-only statement that can run while its record
        syncs: a simple Query with nothing else in the batch, or an Execute with nothing
        in flight but the unnamed Parse, Binds and Describes and one Sync ending it; no
        transaction block open. A refusal then leaves the server and the client agreeing:
        nothing ran that matters (the unnamed statement is replaced by the next Parse)."""
        if len(waiting) != 1:
            return False
        index, request, _, _ = waiting[0]
        if request.reject is not None or self.session.info.transaction_status != b"I":
            return False
        pending = self.requests.pending
        if request.kind is QUERY:
            statement = request.statement
            if len(pending) != 1 or any(piece for i, piece in enumerate(pieces) if i != index):
                return False
        elif request.kind is EXECUTE and request.portal is not None:
            statement = request.portal.statement
            if pending[-1].kind is not SYNC or not all(_harmless(other) or other is request for other in pending) \
                    or sum(other.kind is SYNC for other in pending) != 1:
                return False
        else:
            return False
        if statement is None or statement.effects or statement.executes:
            return False
        decision = statement.decision
        return decision is not None and decision.read_only

    def _overlap_done(self, waiting: Waiting, error: BaseException | None) -> None:
        """The record of a statement already sent is durable (its answer goes out) or
        failed (its answer is dropped, the client told why)."""
        relay = self.session.responses
        if error is None:
            relay.release()
            return
        _, request, _, _ = waiting[0]
        reject = Reject(getattr(error, "sqlstate", None) or "58030",
                        f"Tollgate could not record this statement, so its results were withheld: {error}",
                        hint=getattr(error, "hint", None))
        dispatch.log.error("session %s: refusing a read-only statement's results: %s", self.session.info.id, error)
        request.reject = reject
        if request.forward is not None:
            request.forward.reject = reject
        relay.refuse(error_bytes("ERROR", reject.sqlstate, reject.message, reject.detail, reject.hint))

    def _carry_on(self) -> None:
        """After a hold or a batch: the decided request first, then what queued behind it."""
        if self.batch is not None or self.held is not None:
            return
        if self.decided is not None:
            request, verdict = self.decided
            self.decided = None
            self._admit_decided(request, verdict)
            if self.batch is not None:
                return
        if self.buffer:
            self._drain()
        if not self.blocked and self.paused and self.session.ready:
            self.paused = False
            self.session.io.resume_client()

    def _admit_decided(self, request: Pending, verdict: Verdict) -> None:
        message, request.message = memoryview(request.message or b""), None
        statement = request.statement
        if statement is not None and request.kind is not EXECUTE:
            statement.verdict, statement.epoch = verdict, self.hooks.epoch
        waiting: Waiting = []
        replacement = self._admit(request, verdict, message, 0, waiting)
        piece = message if replacement is None else replacement
        if waiting:
            self._wait_for_batch([b"", bytes(piece)], waiting)
        else:
            self.session.io.send_server(piece)

    def close(self) -> None:
        if self.cancel_hold is not None:
            cancel, self.cancel_hold = self.cancel_hold, None
            cancel()
        # Freed now, not when the session's reference cycles are collected.
        self.buffer = bytearray()
        self._release()


def _harmless(request: Pending) -> bool:
    """A request that changes nothing a refusal would have to undo: the unnamed Parse, a
    Bind or a Describe the server will run as sent, or a Sync."""
    kind = request.kind
    if request.reject is not None:
        return False
    return (kind is SYNC or kind is BIND or kind is DESCRIBE_PORTAL or kind is DESCRIBE_STATEMENT
            or (kind is PARSE and not request.name))


def renamed_bind(data: bytes, start: int, end: int) -> bytes:
    """The Bind body ``data[start:end]`` as a Bind of :data:`BLOCKED_STATEMENT`, the rest of
    it unchanged (one the server would find malformed stays malformed)."""
    portal_end = data.index(b"\0", start, end)
    statement_end = data.index(b"\0", portal_end + 1, end)
    body = data[start:portal_end + 1] + BLOCKED_STATEMENT.encode() + data[statement_end:end]
    return b"B" + (len(body) + 4).to_bytes(4, "big") + body


def raise_too_many_pending(limit: int) -> NoReturn:
    """More requests in flight than ``max_pending_requests`` (54000, the session ends:
    pausing instead could wait forever for a Sync that sits behind what is not read)."""
    raise SessionError(
        "54000", f"the client has {limit} requests in flight that the server has not answered",
        hint="Send Sync (or wait for results) more often; Tollgate's max_pending_requests sets the limit.")


def refuse_length(data: bytes, pos: int, max_len: int) -> None:
    """Raise for the header at ``data[pos]`` that failed the relay's bounds check: a
    protocol violation (08P01) if PostgreSQL would refuse it too, else a message larger
    than Tollgate's ``max_client_message`` (54000) — refused on its header alone."""
    frame_end(data, pos, FRONTEND_SESSION_BOUNDS, DEFAULT_MAX_MESSAGE_SIZE, "frontend")  # raises, naming it
    (length,) = unpack_length(data, pos + 1)
    raise SessionError(
        "54000", f"client message of {length} bytes exceeds Tollgate's limit of {max_len} bytes",
        hint="Send smaller statements; large data goes through COPY, whose rows are separate messages "
             "(max_client_message sets the limit).")
