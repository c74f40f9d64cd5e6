"""What a session knows of the requests in flight: the pending FIFO, prepared statements
and portals.

The server answers requests strictly in order, so a FIFO of what the client sent lets every
server message be attributed to the request that caused it — pipelining, errors skipping
to Sync, PortalSuspended and COPY included. Statements and portals are registered when
their Parse and Bind are sent, not when the server confirms them: the server acts on
messages in order, so a later Bind in the same pipeline already refers to them; requests
the server skips after an error are rolled back.

``statements`` is the session's one prepared-statement namespace, as PostgreSQL keeps it:
protocol Parse and Close, and SQL PREPARE, DEALLOCATE [ALL] and DISCARD ALL
(:mod:`appliance.proxy.prepared`) all change it. Effects are applied when a request is sent
and undone for the statements the server reports it did not run. Only creations are undone:
a name that may or may not exist is dropped, so its next use is refused, never guessed.
"""

from __future__ import annotations

import enum
from collections import deque

from appliance.pgwire import messages as m
from appliance.proxy.hooks import Forward, Reject, Result, Statement, StatementKind
from appliance.proxy.prepared import NamespaceOp


class Req(enum.IntEnum):
    """Kinds of client request still awaiting the server's response."""

    QUERY = 1
    PARSE = 2
    BIND = 3
    DESCRIBE_STATEMENT = 4
    DESCRIBE_PORTAL = 5
    EXECUTE = 6
    CLOSE = 7
    SYNC = 8
    FUNCTION_CALL = 9


# Module-level names for the hot path: an enum attribute lookup costs several times more.
QUERY, PARSE, BIND = Req.QUERY, Req.PARSE, Req.BIND
DESCRIBE_STATEMENT, DESCRIBE_PORTAL, EXECUTE = Req.DESCRIBE_STATEMENT, Req.DESCRIBE_PORTAL, Req.EXECUTE
CLOSE, SYNC, FUNCTION_CALL = Req.CLOSE, Req.SYNC, Req.FUNCTION_CALL
# Requests the server answers with ReadyForQuery.
ENDED_BY_READY = frozenset({QUERY, SYNC, FUNCTION_CALL})


class Portal:
    """A bound portal: its statement and the result formats the client asked for."""

    __slots__ = ("bind", "epoch", "name", "result_formats", "row_description", "statement")

    def __init__(self, name: str, statement: Statement | None, result_formats: tuple[int, ...], epoch: int):
        self.name, self.statement, self.result_formats = name, statement, result_formats
        self.row_description: m.RowDescription | None = None
        # The Bind body, kept only for statements an addon wants to see run (holds show
        # approvers the parameters; audit records them).
        self.bind: bytes | None = None
        # How many ReadyForQuery-ending requests the client had sent before this Bind:
        # the portal outlives the transaction-ends the server reports before that.
        self.epoch = epoch


class Pending:
    """One request in flight. ``reject`` marks a substituted (blocked) request; ``message``
    holds the client's bytes of a request waiting on a hold, which resumes from here."""

    __slots__ = ("completed", "created", "forward", "kind", "message", "name", "portal", "reject", "statement")

    def __init__(self, kind: Req, statement: Statement | None = None, portal: Portal | None = None,
                 name: str = "", reject: Reject | None = None):
        self.kind, self.statement, self.portal, self.name, self.reject = kind, statement, portal, name, reject
        self.forward: Forward | None = None  # what the forward hooks saw (Query, Execute, FunctionCall)
        self.message: bytes | None = None
        # Prepared statements its SQL PREPAREs made, with each one's statement index, and
        # how many of its statements the server completed: those after are undone.
        self.created: list[tuple[int, str, Statement]] | None = None
        self.completed = 0


class UnknownStatement(Exception):
    """A request runs a prepared statement the namespace doesn't hold."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name

    def reject(self) -> Reject:
        return Reject("26000", f"prepared statement \"{self.name}\" does not exist",
                      hint="Tollgate runs only prepared statements whose text it knows; if the name was "
                           "prepared in a statement that failed, prepare it again.")


class RequestState:
    """The pending FIFO, prepared statements and portals of one session."""

    __slots__ = ("ends_done", "ends_sent", "pending", "portals", "statements")

    def __init__(self) -> None:
        self.pending: deque[Pending] = deque()
        self.statements: dict[str, Statement] = {}
        self.portals: dict[str, Portal] = {}
        self.ends_sent = 0  # Sync/Query/FunctionCall sent: each ends with ReadyForQuery
        self.ends_done = 0  # ReadyForQuery received

    def ready_for_query(self, status: bytes) -> None:
        """The server finished the oldest ReadyForQuery-ending request."""
        pending = self.pending
        while pending:
            if pending.popleft().kind in ENDED_BY_READY:
                break
        self.ends_done += 1
        if status == b"I" and self.portals:
            # Portals never outlive their transaction; those bound after this Sync live on.
            done = self.ends_done
            for name in [n for n, p in self.portals.items() if p.epoch < done]:
                del self.portals[name]

    def forget_created(self, request: Pending) -> None:
        """Undo what a request registered when sent, because the server never ran it."""
        if request.kind is PARSE and self.statements.get(request.name) is request.statement:
            del self.statements[request.name]
        elif request.kind is BIND and request.portal is not None \
                and self.portals.get(request.portal.name) is request.portal:
            del self.portals[request.portal.name]
        elif request.created:
            self.undo_created(request, 0)

    # ---- the prepared-statement namespace, SQL side ---------------------------------------------

    def resolve(self, ops: tuple[NamespaceOp, ...]) -> tuple[Statement, ...]:
        """The prepared statements the EXECUTEs among ``ops`` run, each as the namespace
        will be when it runs (a PREPARE earlier in the same request counts). Raises
        :class:`UnknownStatement` for a name Tollgate can't tell the text of."""
        overlay: dict[str, Statement | None] = {}
        cleared = False
        runs: list[Statement] = []
        for op in ops:
            kind = op.kind
            if kind == "prepare":
                overlay[op.name] = Statement(StatementKind.PARSE, op.text, op.name, epoch=-1)
            elif kind == "deallocate":
                overlay[op.name] = None
            elif kind == "deallocate_all":
                overlay.clear()
                cleared = True
            else:  # execute
                known = self.statements.get(op.name) if not cleared else None
                target = overlay.get(op.name, known)  # a DEALLOCATE here left None
                if target is None:
                    raise UnknownStatement(op.name)
                runs.append(target)
        return tuple(runs)

    def apply(self, ops: tuple[NamespaceOp, ...], request: Pending) -> None:
        """Apply a request's effects as it is sent (a later request in the same pipeline
        already sees them); the PREPAREs are noted on ``request`` to undo if it fails."""
        statements = self.statements
        for op in ops:
            kind = op.kind
            if kind == "prepare":
                if op.name in statements:
                    # The server refuses to prepare a name twice — unless the name was dropped
                    # where Tollgate can't see (a function's DEALLOCATE): forgotten, not guessed.
                    del statements[op.name]
                    continue
                # Never decided yet (epoch -1): decided as itself when first run.
                statement = Statement(StatementKind.PARSE, op.text, op.name, epoch=-1)
                statements[op.name] = statement
                if request.created is None:
                    request.created = []
                request.created.append((op.index, op.name, statement))
            elif kind == "deallocate":
                statements.pop(op.name, None)
            elif kind == "deallocate_all":
                unnamed = statements.get("")  # SQL can't reach the unnamed statement
                statements.clear()
                if unnamed is not None:
                    statements[""] = unnamed

    def undo_created(self, request: Pending, completed: int) -> None:
        """The server stopped ``request`` after ``completed`` statements: the PREPAREs of
        the statements after never happened."""
        for index, name, statement in request.created or ():
            if index >= completed and self.statements.get(name) is statement:
                del self.statements[name]

    @staticmethod
    def result_for(request: Pending | None) -> Result:
        """A new result set answering ``request``."""
        if request is None:
            return Result(None)
        if request.kind is EXECUTE and request.portal is not None:
            portal = request.portal
            description = portal.row_description
            statement = portal.statement
            if description is None and statement is not None:
                description = statement.row_description
            return Result(statement, description, portal.result_formats, forward=request.forward)
        return Result(request.statement, forward=request.forward)
