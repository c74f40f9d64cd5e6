"""The flow ledger beside the proxy: an addon that attaches the programs before the proxy
listens, reads close events and sweeps the flow map, matches intercepted flows with the
sessions it hears of, and hands each record to ``record`` (the composition root gives it
the audit log's writer).

The ring buffer is read by a thread of its own (bcc's poll blocks); the sweep runs in a
worker thread too (a full map is 65,536 entries read one syscall at a time); what they
find is handled on the event loop, where the correlator and the records live.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from appliance.config import Config
from appliance.flows.bpf import FlowProgram, GuardError
from appliance.flows.correlate import Correlator, Matched, Pair, Unmatched
from appliance.flows.records import FlowKey, FlowRecord
from appliance.proxy.control import ControlOps
from appliance.proxy.hooks import Addon, SessionInfo

log = logging.getLogger("tollgate.flows")

Record = Callable[[dict[str, Any]], None]
NS = 1_000_000_000
LIVE_LIMIT = 10_000  # flows one `flows` request returns at most


class FlowAddon(Addon):
    """Loads and attaches bpf/flows.bpf.c and records what it sees (see the module doc)."""

    name = "flows"
    after = ("audit",)  # a session's audit id exists when this hears of it

    def __init__(self, config: Config, record: Record | None = None,
                 session_id: Callable[[SessionInfo], str | None] | None = None):
        self.config = config
        self.mode = config.flows.mode
        self.interfaces = config.flows.interfaces or config.intercept.agent_interfaces
        self.record = record or (lambda fields: None)
        self.session_id = session_id or (lambda session: None)
        self.program: FlowProgram | None = None
        self.state = "off" if self.mode == "off" else "starting"
        self.error: str | None = None
        flows = config.flows
        self.correlator = Correlator(int(flows.match_seconds * NS))
        self._closed_seen: dict[tuple[FlowKey, int], int] = {}  # close events by flow identity → when
        self._reported: dict[tuple[FlowKey, int], int] = {}  # interim reports of long flows
        self._counts_recorded = {"overflow": 0, "events_lost": 0}
        self.records_written = {"flow": 0, "flow.unmatched": 0, "flow.overflow": 0}
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- life cycle -----------------------------------------------------------------------

    async def open(self) -> None:
        """Attach before the proxy listens; with mode "guard", a failure stops the start."""
        if self.mode == "off":
            log.warning("flows: [flows] mode = \"off\": no flow ledger and no bypass guard")
            return
        program = FlowProgram(self.config, self.interfaces, guard=self.mode == "guard")
        try:
            await asyncio.to_thread(self._load, program)
        except GuardError as exc:
            self.state, self.error = "failed", str(exc)
            if self.mode == "guard":
                raise
            log.warning("flows: the ledger is not running ([flows] mode = \"ledger\"): %s", exc)
            return
        self.program = program
        self.attached_now = await asyncio.to_thread(program.attached_here)
        self.state = "guard" if self.mode == "guard" else "ledger"

    @staticmethod
    def _load(program: FlowProgram) -> None:
        try:
            program.load()
            program.attach()
        except BaseException:
            program.close()
            raise

    async def start(self, control: ControlOps) -> None:
        control.register("flows", self.control_flows)
        if self.program is None:
            return
        self._loop = asyncio.get_running_loop()
        self.program.open_events(self._event_from_kernel)
        self._poller = threading.Thread(target=self._poll, name="tollgate-flows-ring", daemon=True)
        self._poller.start()
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def close(self) -> None:
        self._stop.set()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._poller is not None:
            await asyncio.to_thread(self._poller.join)
        if self.program is not None:
            with contextlib.suppress(Exception):
                await self._sweep_once()  # what closed meanwhile, and what the correlator holds
            # Every session has started by now, so a held flow with none has none. A session
            # whose flow is still open (the shutdown closed it) is not flagged: its flow's end
            # can't be seen any more.
            self._handle(self.correlator.tick(time.monotonic_ns() + self.correlator.match_ns, lambda pair: True))
            # The programs stay attached when the proxy stops (guard: still dropping bypasses,
            # as the nftables filter stays); the next start replaces them.
            self.program.bpf.cleanup()

    # ---- sessions -------------------------------------------------------------------------

    def session_start(self, session: SessionInfo) -> None:
        self.correlator.session_started(_pair(session), self.session_id(session), session.user)

    def session_end(self, session: SessionInfo, reason: str) -> None:
        self.correlator.session_ended(_pair(session), time.monotonic_ns())

    def session_refused(self, session: SessionInfo, reason: str) -> None:
        pair = _pair(session)
        self.correlator.session_started(pair, self.session_id(session), session.user)
        self.correlator.session_ended(pair, time.monotonic_ns())

    # ---- the kernel's reports -------------------------------------------------------------

    def _poll(self) -> None:
        assert self.program is not None
        while not self._stop.is_set():
            try:
                self.program.poll_events(200)
            except Exception as exc:  # noqa: BLE001 - a poll error is logged; the sweep still records
                log.error("flows: reading the ring buffer: %s", exc)
                self._stop.wait(1.0)

    def _event_from_kernel(self, flow: FlowRecord) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._flow_closed, flow, "reset" if flow.reset else "closed")

    def _flow_closed(self, flow: FlowRecord, end: str) -> None:
        if flow.identity in self._closed_seen:
            return  # two CPUs saw the close at once, or the sweep found it first
        self._closed_seen[flow.identity] = time.monotonic_ns()
        self._ended(flow, end)

    def _ended(self, flow: FlowRecord, end: str) -> None:
        if flow.verdict == "intercepted":
            matched = self.correlator.flow_closed(flow, end, time.monotonic_ns())
            if matched is not None:
                self._handle([matched])
        else:
            self._write_flow(flow, end, None, None)

    async def _sweep_forever(self) -> None:
        took = 0.0
        while True:
            # A full map takes about a second to read (65,536 flows, in Python): then sweep
            # less often, so the sweep never holds more than a fifth of a CPU (and the GIL).
            await asyncio.sleep(max(self.config.flows.sweep_seconds, 4 * took))
            started = time.monotonic()
            try:
                await self._sweep_once()
            except Exception as exc:  # noqa: BLE001 - logged; the next sweep tries again
                log.error("flows: sweep failed: %s", exc)
            took = time.monotonic() - started

    async def _sweep_once(self) -> None:
        program = self.program
        assert program is not None
        found, counters = await asyncio.to_thread(self._scan, program)
        now = time.monotonic_ns()
        for flow, end in found:
            if end == "closed-late":
                self._closed_seen.pop(flow.identity, None)
                continue
            if end == "interim":
                self.correlator.flow_seen((flow.key.client, flow.key.server))
                if flow.verdict != "intercepted":
                    self._write_flow(flow, end, None, None)
                else:
                    self._interim_intercepted(flow)
                continue
            if end in ("closed", "reset"):
                self._flow_closed(flow, end)
                self._closed_seen.pop(flow.identity, None)
                continue
            self._ended(flow, end)
        self._handle(self.correlator.tick(now, self._live))
        self._record_losses(counters)
        # A 5-tuple reused before its closed flow was swept leaves the old identity here.
        horizon = now - int(4 * self.config.flows.linger_seconds * NS) - int(self.config.flows.sweep_seconds * NS)
        for identity, when in list(self._closed_seen.items()):
            if when < horizon:
                del self._closed_seen[identity]

    def _interim_intercepted(self, flow: FlowRecord) -> None:
        pair = (flow.key.client, flow.key.server)
        session = self.correlator.sessions.get(pair)
        self._write_flow(flow, "interim", session.session_id if session else None, session.user if session else None)

    def _scan(self, program: FlowProgram) -> tuple[list[tuple[FlowRecord, str]], dict[str, Any]]:
        """(worker thread) Flows due: ended ones (removed from the map) and long ones."""
        flows = self.config.flows
        now = time.monotonic_ns()
        linger, idle = int(flows.linger_seconds * NS), int(flows.idle_seconds * NS)
        tcp_idle, report = int(flows.tcp_idle_seconds * NS), int(flows.report_seconds * NS)
        found: list[tuple[FlowRecord, str]] = []
        self._live_pairs: set[Pair] = set()
        for flow in program.flows():
            age = now - flow.last_ns
            if flow.closed:
                if age > linger:
                    program.delete(flow.key)
                    # Its close event was read (the usual case), or was lost: recorded now.
                    end = "closed-late" if flow.identity in self._closed_seen else ("reset" if flow.reset else "closed")
                    found.append((flow, end))
                else:
                    self._live_pairs.add((flow.key.client, flow.key.server))
                continue
            tcp_open = flow.key.proto == 6 and flow.verdict == "intercepted"
            if age > (tcp_idle if tcp_open else idle):
                program.delete(flow.key)
                found.append((flow, "expired" if tcp_open else "idle"))
                self._reported.pop(flow.identity, None)
                continue
            self._live_pairs.add((flow.key.client, flow.key.server))
            last = self._reported.get(flow.identity, flow.first_ns)
            if now - last > report:
                self._reported[flow.identity] = now
                found.append((flow, "interim"))
        # pyroute2 runs an event loop of its own: asked here, in the worker thread, not on ours.
        self.attached_now = program.attached_here()
        return found, program.counters()

    def _live(self, pair: Pair) -> bool:
        return pair in getattr(self, "_live_pairs", set())

    # ---- records ----------------------------------------------------------------------------

    def _handle(self, items: list[Matched | Unmatched]) -> None:
        for item in items:
            if isinstance(item, Matched):
                self._write_flow(item.flow, item.end, item.session_id, item.user)
            else:
                self._write_unmatched(item)

    def _fields(self, flow: FlowRecord, end: str) -> dict[str, Any]:
        ifnames = self.program.ifnames if self.program is not None else {}
        return flow.fields(now_mono_ns=time.monotonic_ns(), now_wall_ns=time.time_ns(), interfaces=ifnames, end=end)

    def _write_flow(self, flow: FlowRecord, end: str, session_id: str | None, user: str | None) -> None:
        fields = self._fields(flow, end)
        record = {"type": "flow", "outcome": "failure" if flow.verdict == "dropped" else "success",
                  "user": user or "unknown", "origin": flow.key.client, "object": f"flow:{flow.key.server}",
                  **fields}
        if session_id is not None:
            record["session"] = session_id
        self._emit(record)

    def _write_unmatched(self, item: Unmatched) -> None:
        client, server = item.pair
        record: dict[str, Any] = {"type": "flow.unmatched", "outcome": "failure", "user": "unknown",
                                  "origin": client, "object": f"flow:{server}", "what": item.what}
        if item.what == "flow-without-session":
            record["reason"] = "an intercepted flow to a protected target has no session in the audit log"
            if item.flow is not None:
                record.update(self._fields(item.flow, "unmatched"))
        else:
            record["reason"] = "a session came through no flow the ledger saw"
            record["session"] = item.session_id
        log.warning("flows: ALERT unmatched %s: %s → %s", item.what, client, server)
        self._emit(record)

    def _record_losses(self, counters: dict[str, Any]) -> None:
        """Overflow and lost events are counted by the kernel and recorded here when they grow."""
        self.last_counters = counters
        grown = {k: counters[k] - self._counts_recorded[k] for k in self._counts_recorded
                 if counters[k] > self._counts_recorded[k]}
        if not grown:
            return
        self._counts_recorded.update({k: counters[k] for k in grown})
        log.warning("flows: the ledger lost track of some flows: %s", grown)
        self._emit({"type": "flow.overflow", "outcome": "failure", "user": "tollgate", "origin": "local",
                    "object": "flow-ledger", **{f"{k}_since_last": v for k, v in grown.items()},
                    "overflow_total": counters["overflow"], "events_lost_total": counters["events_lost"],
                    "max_flows": self.config.flows.max_flows})

    def _emit(self, record: dict[str, Any]) -> None:
        kind = record["type"]
        self.records_written[kind] = self.records_written.get(kind, 0) + 1
        try:
            self.record(record)
        except Exception as exc:  # noqa: BLE001 - the writer reports its own failures
            log.error("flows: could not record %s: %s", kind, exc)

    # ---- the control socket -----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode, "state": self.state, "interfaces": list(self.interfaces),
                               "error": self.error, "records": dict(self.records_written)}
        if self.program is not None:
            out["attached"] = self.attached_now
            out["counters"] = self.program.counters()
            out["max_flows"] = self.config.flows.max_flows
        return out

    def control_flows(self, request: dict[str, Any]) -> dict[str, Any]:
        """``{"op": "flows"}``: the state, counters and live flows (filters: verdict, reason,
        src, dst, dport, protocol; limit)."""
        out = self.status()
        if request.get("status_only") or self.program is None:
            return out
        limit = min(int(request.get("limit", LIVE_LIMIT)), LIVE_LIMIT)
        now_mono, now_wall = time.monotonic_ns(), time.time_ns()
        flows = []
        for flow in self.program.flows():
            fields = flow.fields(now_mono_ns=now_mono, now_wall_ns=now_wall, interfaces=self.program.ifnames,
                                 end="closed" if flow.closed else "live")
            if all(str(fields.get(k)) == str(request[k]) for k in ("verdict", "reason", "src", "dst", "dport",
                                                                  "protocol") if request.get(k) is not None):
                flows.append(fields)
                if len(flows) >= limit:
                    break
        out["flows"] = flows
        return out


def _pair(session: SessionInfo) -> Pair:
    return str(session.client), str(session.destination)
