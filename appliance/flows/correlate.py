"""Matching intercepted flows with the proxy's sessions (pure; the clock is passed in).

Every flow the divert takes should become a session in the audit log, and every session
should have come through such a flow. A flow and its session meet on the agent's end and
the original destination (``client``, ``server``). The kernel reports a flow when it
closes, after its session ended; a session ends first. Whichever is seen first waits up
to ``match_ns`` for the other; what is still alone then is unmatched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from appliance.flows.records import FlowRecord

Pair = tuple[str, str]  # (client, server) as Endpoint.__str__ writes them


@dataclass(slots=True)
class _Session:
    session_id: str | None
    user: str | None
    ended_ns: int | None = None
    has_flow: bool = False  # seen live
    flow_closed: bool = False  # its flow's end is recorded


@dataclass(slots=True)
class Unmatched:
    """A flow without a session (``flow``) or a session without a flow."""

    what: str  # "flow-without-session" | "session-without-flow"
    pair: Pair
    session_id: str | None = None
    flow: FlowRecord | None = None


@dataclass(slots=True)
class Matched:
    """An intercepted flow as recorded: with its session, or None (then also Unmatched)."""

    flow: FlowRecord
    session_id: str | None
    user: str | None
    end: str


@dataclass
class Correlator:
    match_ns: int
    sessions: dict[Pair, _Session] = field(default_factory=dict)
    # Intercepted flows closed with no session yet: pair → (flow, end, deadline).
    pending: dict[Pair, tuple[FlowRecord, str, int]] = field(default_factory=dict)

    def session_started(self, pair: Pair, session_id: str | None, user: str | None) -> None:
        self.sessions[pair] = _Session(session_id, user)

    def session_ended(self, pair: Pair, now_ns: int) -> None:
        session = self.sessions.get(pair)
        if session is not None and session.ended_ns is None:
            session.ended_ns = now_ns

    def flow_seen(self, pair: Pair) -> None:
        """A live intercepted flow (an interim report): its session has a flow."""
        session = self.sessions.get(pair)
        if session is not None:
            session.has_flow = True

    def flow_closed(self, flow: FlowRecord, end: str, now_ns: int) -> Matched | None:
        """An intercepted flow ended: matched now, or held until its session shows up."""
        pair = (flow.key.client, flow.key.server)
        session = self.sessions.get(pair)
        if session is not None:
            session.has_flow = True
            session.flow_closed = session.flow_closed or end != "interim"
            return Matched(flow, session.session_id, session.user, end)
        self.pending[pair] = (flow, end, now_ns + self.match_ns)
        return None

    def tick(self, now_ns: int, live: Callable[[Pair], bool]) -> list[Matched | Unmatched]:
        """What is due: held flows whose session came (matched) or never did (unmatched),
        sessions that ended with no flow; ``live(pair)``: the kernel map still holds it."""
        out: list[Any] = []
        for pair, (flow, end, deadline) in list(self.pending.items()):
            session = self.sessions.get(pair)
            if session is not None:
                session.has_flow = session.flow_closed = True
                out.append(Matched(flow, session.session_id, session.user, end))
                del self.pending[pair]
            elif now_ns >= deadline:
                out.append(Matched(flow, None, None, end))
                out.append(Unmatched("flow-without-session", pair, flow=flow))
                del self.pending[pair]
        for pair, session in list(self.sessions.items()):
            if session.ended_ns is None or now_ns < session.ended_ns + self.match_ns:
                continue
            if not session.flow_closed:
                if session.has_flow or live(pair):  # its flow is still in the kernel's map: it reports when it ends
                    session.ended_ns = now_ns
                    continue
                out.append(Unmatched("session-without-flow", pair, session_id=session.session_id))
            del self.sessions[pair]
        return out
