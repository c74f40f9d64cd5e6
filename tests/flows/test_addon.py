"""The flow addon's sweep and records, with a stand-in for the kernel's map (no bcc, no
root): what it records, what it removes, and that losses are recorded, never silent."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from appliance.config import parse_config
from appliance.flows.addon import FlowAddon
from appliance.flows.records import FlowKey, FlowRecord

S = 1_000_000_000
CONFIG = ("[intercept]\nagent_subnets = ['198.18.1.0/24']\n[flows]\nmode = 'ledger'\nidle_seconds = 30\n"
          "linger_seconds = 5\nreport_seconds = 300\nmatch_seconds = 5\n")


class FakeProgram:
    """The parts of FlowProgram the addon uses, over a dict."""

    def __init__(self) -> None:
        self.map: dict[FlowKey, FlowRecord] = {}
        self.ifnames = {2: "eth0"}
        self.counts = {"overflow": 0, "events_lost": 0, "passed": 0, "intercepted": 0, "recorded": 0,
                       "untracked": 0, "dropped": {}, "dropped_total": 0}

    def flows(self) -> list[FlowRecord]:
        return list(self.map.values())

    def delete(self, key: FlowKey) -> None:
        self.map.pop(key, None)

    def counters(self) -> dict[str, Any]:
        return dict(self.counts)

    def attached_here(self) -> list[str]:
        return ["eth0/ingress", "eth0/egress"]


def flow(sport: int, *, proto: int = 6, verdict: str = "intercepted", age_s: float = 0, closed: bool = False,
         reason: str = "", duration_s: float = 0) -> FlowRecord:
    now = time.monotonic_ns()
    last = now - int(age_s * S)
    key = FlowKey(4, proto, "198.18.1.10", sport, "198.18.2.10", 5432)
    return FlowRecord(key, last - int(duration_s * S), last, (3, 2), (300, 200), 2, (0x13, 0x13), verdict, reason,
                      closed, False)


def addon_with(*flows: FlowRecord) -> tuple[FlowAddon, FakeProgram, list[dict[str, Any]]]:
    records: list[dict[str, Any]] = []
    addon = FlowAddon(parse_config(CONFIG, Path("x.toml")), records.append)
    program = FakeProgram()
    for f in flows:
        program.map[f.key] = f
    addon.program = program  # type: ignore[assignment]
    return addon, program, records


def test_a_closed_flow_lingers_then_goes_and_is_recorded_once() -> None:
    addon, program, records = addon_with(flow(40000, closed=True, age_s=1), flow(40001, closed=True, age_s=6))
    addon._flow_closed(program.map[flow(40000).key], "closed")  # its ring buffer event
    addon._flow_closed(program.map[flow(40001).key], "closed")
    asyncio.run(addon._sweep_once())
    assert {k.sport for k in program.map} == {40000}  # the other one lingered long enough
    assert not records  # both wait for their sessions (match_seconds)
    asyncio.run(addon._sweep_once())
    assert len(addon.correlator.pending) == 2


def test_a_close_event_that_was_lost_is_recorded_by_the_sweep() -> None:
    addon, program, records = addon_with(flow(40002, closed=True, age_s=6, verdict="passed", reason=""))
    asyncio.run(addon._sweep_once())
    assert not program.map
    assert [(r["type"], r["end"], r["sport"]) for r in records] == [("flow", "closed", 40002)]


def test_idle_flows_without_a_close_end_and_long_ones_are_reported() -> None:
    addon, program, records = addon_with(
        flow(40003, proto=17, verdict="dropped", reason="udp", age_s=31),
        flow(40004, proto=17, verdict="passed", age_s=1),
        flow(40005, age_s=0, duration_s=400))
    asyncio.run(addon._sweep_once())
    by_sport = {r["sport"]: r for r in records}
    assert by_sport[40003]["end"] == "idle" and by_sport[40003]["outcome"] == "failure"
    assert by_sport[40003]["reason"] == "udp"
    assert by_sport[40005]["end"] == "interim" and 40004 not in by_sport
    assert {k.sport for k in program.map} == {40004, 40005}
    records.clear()
    asyncio.run(addon._sweep_once())
    assert records == []  # an interim report every report_seconds, not every sweep


def test_overflow_and_lost_events_are_recorded_when_they_grow() -> None:
    addon, program, records = addon_with()
    asyncio.run(addon._sweep_once())
    assert records == []
    program.counts["overflow"] = 7
    asyncio.run(addon._sweep_once())
    asyncio.run(addon._sweep_once())  # not again while it stays the same
    [record] = records
    assert record["type"] == "flow.overflow" and record["overflow_since_last"] == 7
    assert record["overflow_total"] == 7 and record["max_flows"] == 65536


def test_an_intercepted_flow_without_a_session_is_unmatched_after_the_grace() -> None:
    addon, _program, records = addon_with()
    addon.correlator.match_ns = 0  # no grace: due at the next sweep
    addon._flow_closed(flow(40006, closed=True), "reset")
    asyncio.run(addon._sweep_once())
    assert [r["type"] for r in records] == ["flow", "flow.unmatched"]
    assert records[1]["what"] == "flow-without-session" and records[1]["origin"] == "198.18.1.10:40006"
    assert "session" not in records[0]
