"""Matching intercepted flows with sessions: the clock is passed in, so no waiting."""

from __future__ import annotations

from appliance.flows.correlate import Correlator, Matched, Unmatched
from appliance.flows.records import FlowKey, FlowRecord

S = 1_000_000_000
SERVER = "198.18.2.10:5432"


def flow(sport: int, end_ns: int = 10 * S) -> FlowRecord:
    key = FlowKey(4, 6, "198.18.1.10", sport, "198.18.2.10", 5432)
    return FlowRecord(key, 1 * S, end_ns, (5, 5), (500, 500), 2, (0x13, 0x13), "intercepted", "", True, False)


def never_live(pair: tuple[str, str]) -> bool:
    return False


def test_a_flow_that_closes_after_its_session_is_matched_at_once() -> None:
    c = Correlator(5 * S)
    c.session_started(("198.18.1.10:40000", SERVER), "run-1", "app")
    c.session_ended(("198.18.1.10:40000", SERVER), 9 * S)
    matched = c.flow_closed(flow(40000), "closed", 10 * S)
    assert matched == Matched(flow(40000), "run-1", "app", "closed")
    assert c.tick(100 * S, never_live) == []  # nothing left over
    assert not c.sessions and not c.pending


def test_a_flow_without_a_session_is_unmatched_after_the_grace() -> None:
    c = Correlator(5 * S)
    assert c.flow_closed(flow(40001), "reset", 10 * S) is None
    assert c.tick(14 * S, never_live) == []  # still within the grace
    out = c.tick(15 * S, never_live)
    assert out == [Matched(flow(40001), None, None, "reset"),
                   Unmatched("flow-without-session", ("198.18.1.10:40001", SERVER), flow=flow(40001))]


def test_a_flow_whose_session_is_heard_of_late_is_matched() -> None:
    c = Correlator(5 * S)
    c.flow_closed(flow(40002), "closed", 10 * S)
    c.session_started(("198.18.1.10:40002", SERVER), "run-2", "app")
    assert c.tick(11 * S, never_live) == [Matched(flow(40002), "run-2", "app", "closed")]


def test_a_session_without_a_flow_is_unmatched() -> None:
    c = Correlator(5 * S)
    pair = ("198.18.1.10:40003", SERVER)
    c.session_started(pair, "run-3", "app")
    c.session_ended(pair, 10 * S)
    assert c.tick(14 * S, never_live) == []
    assert c.tick(15 * S, never_live) == [Unmatched("session-without-flow", pair, session_id="run-3")]
    assert not c.sessions


def test_a_session_whose_flow_is_still_in_the_map_waits_for_it() -> None:
    c = Correlator(5 * S)
    pair = ("198.18.1.10:40004", SERVER)
    c.session_started(pair, "run-4", "app")
    c.session_ended(pair, 10 * S)
    assert c.tick(20 * S, lambda p: p == pair) == []  # lingering: it reports when it ends
    assert c.flow_closed(flow(40004), "closed", 21 * S) == Matched(flow(40004), "run-4", "app", "closed")
    assert c.tick(100 * S, never_live) == []


def test_an_interim_report_does_not_end_the_match() -> None:
    c = Correlator(5 * S)
    pair = ("198.18.1.10:40005", SERVER)
    c.session_started(pair, "run-5", "app")
    assert c.flow_closed(flow(40005), "interim", 10 * S) == Matched(flow(40005), "run-5", "app", "interim")
    c.session_ended(pair, 20 * S)
    assert c.tick(30 * S, never_live) == []  # seen live: waits for the flow's end
    assert c.flow_closed(flow(40005), "closed", 31 * S) is not None
    assert c.tick(100 * S, never_live) == [] and not c.sessions
