"""What a session knows of the requests in flight: the pending FIFO, prepared statements
and portals.

The server answers requests strictly in order, so a FIFO of what the client sent lets every
server message be attributed to the request that caused it — pipelining, errors skipping
to Sync, PortalSuspended and COPY included. Statements and portals are registered when
their Parse and Bind are sent, not when the server confirms them: the server acts on
messages in order, so a later Bind in the same pipeline already refers to them; requests
the server skips after an error are rolled back.
"""

from __future__ import annotations

import enum
from collections import deque

from appliance.pgwire import messages as m
from appliance.proxy.hooks import Forward, Reject, Result, Statement


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

    __slots__ = ("forward", "kind", "message", "name", "portal", "reject", "statement")

    def __init__(self, kind: Req, statement: Statement | None = None, portal: Portal | None = None,
                 name: str = "", reject: Reject | None = None):
        self.kind, self.statement, self.portal, self.name, self.reject = kind, statement, portal, name, reject
        self.forward: Forward | None = None  # what the forward hooks saw (Query, Execute, FunctionCall)
        self.message: bytes | None = None


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
