"""The flow ledger under a flood: N short TCP connections from the agent to the protected
address (each diverted into the proxy, opened and closed at once, no login), then how many
of them the ledger recorded, and what it counted as overflow or lost.

Every connection must be in the ledger, or be counted: ``recorded + overflow + lost >= N``
is the issue's bar, and ``missing`` says by how much a run falls short. The connections
are made by one asyncio process in the agent's namespace, at most ``parallel`` at a time.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

from appliance.lab import Lab, topology

CONNECTIONS = 10_000
PARALLEL = 64
SETTLE_S = 60.0  # the ledger's last records: closes, the sweep's linger and its match grace

# Runs in the agent namespace: `python -c FLOOD HOST PORT N PARALLEL`; prints the count made.
FLOOD = r'''
import asyncio, sys
host, port, n, parallel = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
made = failed = 0
async def one(gate):
    global made, failed
    async with gate:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            failed += 1
            return
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
        made += 1
async def main():
    gate = asyncio.Semaphore(parallel)
    await asyncio.gather(*(one(gate) for _ in range(n)))
asyncio.run(main())
print(made, failed)
'''


def _written(lab: Lab) -> tuple[int, dict[str, Any]]:
    status = lab.flows_status(status_only=True)
    return int(status.get("records", {}).get("flow", 0)), status.get("counters", {})


def measure(lab: Lab, *, connections: int = CONNECTIONS, parallel: int = PARALLEL,
            progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Flood, then wait until the ledger has written a record for every connection (or
    stops writing for a while), and report."""
    before, counters_before = _written(lab)
    progress(f"flow-flood: {connections:,} short connections to {topology.DB_PROTECTED_V4}:5432, {parallel} at a time")
    started = time.monotonic()
    done = lab.exec("agent", [sys.executable, "-c", FLOOD, topology.DB_PROTECTED_V4, "5432", str(connections),
                              str(parallel)], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-500:]}
    made, failed = map(int, done.stdout.split())
    elapsed = time.monotonic() - started
    # The ledger writes a flow when both FINs are seen (the proxy closes at once) and, for
    # one without a session, after the match grace: wait for the count to get there.
    last, last_change = -1, time.monotonic()
    while True:
        written, counters = _written(lab)
        if written - before >= made:
            break
        if written != last:
            last, last_change = written, time.monotonic()
        elif time.monotonic() - last_change > 15.0 or time.monotonic() - started > elapsed + SETTLE_S:
            break
        time.sleep(0.5)
    recorded = written - before
    overflow = counters.get("overflow", 0) - counters_before.get("overflow", 0)
    lost = counters.get("events_lost", 0) - counters_before.get("events_lost", 0)
    result = {"connections": made, "failed_connects": failed, "seconds": round(elapsed, 2),
              "connections_per_s": round(made / elapsed, 1) if elapsed else None, "recorded": recorded,
              "overflow": overflow, "events_lost": lost, "missing": max(0, made - recorded - overflow - lost)}
    progress("flow-flood: " + json.dumps(result))
    return result


def line(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"flow ledger under a flood: FAILED: {result['error']}"
    return (f"flow ledger under a flood: {result['connections']:,} connections in {result['seconds']} s "
            f"({result['connections_per_s']}/s): {result['recorded']:,} recorded, {result['overflow']} overflow, "
            f"{result['events_lost']} events lost, {result['missing']} missing (target: 0 missing)")
