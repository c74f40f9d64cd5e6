"""The primary's share of every statement with ``[proxy] workers``: its audit writer alone.

A worker process (``multiprocessing``) sends what a select-only statement makes — the
statement's record, waited for, and its result's — from ``--concurrency`` sessions over
a real socketpair, through :class:`~appliance.audit.remote.RemoteAuditLog`, to an
:class:`~appliance.audit.remote.AuditWriter` appending to a real
:class:`~appliance.audit.store.AuditLog` (``durability = "fsync"``) in a temporary
directory. Printed: the CPU time of the writer's event-loop thread per record and per
statement — the serial part of the scaling model (bench/README.md, "Workers") without
the rest of a proxy — and the statements per second the run reached. No lab, no root:
``python -m bench.audit_writer``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from appliance.audit.keys import init_audit_dir
from appliance.audit.remote import AuditWriter, RemoteAuditLog
from appliance.audit.store import AuditLog
from appliance.config import AuditConfig
from appliance.proxy.channel import Channel

RECORD = {"type": "statement", "user": "agent@example.com", "outcome": "success", "origin": "10.0.0.7:40000",
          "object": "payments/pgbench_accounts", "kind": "query", "decision": "allow", "rule": "reads",
          "classes": ["read"], "text": "SELECT abalance FROM pgbench_accounts WHERE aid = 4711;"}


def _worker(fd: int, statements: int, concurrency: int) -> None:
    async def main() -> None:
        channel = await Channel.connect(socket.socket(fileno=fd), "the primary")
        remote = RemoteAuditLog(channel, "bench")

        async def session(k: int) -> None:
            for i in range(statements // concurrency):
                await remote.append_waiting({**RECORD, "session": f"s-{k}", "stmt": i}, trusted=True)
                remote.append({**RECORD, "type": "result", "session": f"s-{k}", "stmt": i, "rows": 1}, trusted=True)

        await asyncio.gather(*(session(k) for k in range(concurrency)))
        channel.close()

    asyncio.run(main())


def measure(statements: int, concurrency: int, directory: Path) -> dict[str, Any]:
    config = AuditConfig(directory / "audit", origin="bench.audit-writer")
    init_audit_dir(config)
    audit_log = AuditLog.open(config, version="bench")
    ours, theirs = socket.socketpair()
    worker = multiprocessing.Process(target=_worker, args=(theirs.fileno(), statements, concurrency))
    worker.start()
    theirs.close()

    async def serve() -> tuple[float, float]:
        audit_log.start(asyncio.get_running_loop())
        channel = await Channel.connect(ours, "the worker")
        AuditWriter(audit_log).attach(channel)
        done = asyncio.Event()
        channel.on_lost = done.set
        wall0, cpu0 = time.perf_counter(), time.thread_time()
        await done.wait()
        return time.perf_counter() - wall0, time.thread_time() - cpu0

    try:
        wall, cpu = asyncio.run(serve())
    finally:
        worker.join()
        audit_log.close()
    done = statements // concurrency * concurrency
    return {"statements": done, "records": 2 * done, "concurrency": concurrency,
            "loop_cpu_us_per_record": cpu * 1e6 / (2 * done), "loop_cpu_us_per_statement": cpu * 1e6 / done,
            "statements_per_s": done / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--statements", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32, help="sessions in the worker")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="tollgate-bench-writer-"))
    try:
        result = measure(args.statements, args.concurrency, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
        return
    print(f"audit writer alone, {result['statements']:,} statements from {result['concurrency']} sessions: "
          f"event loop {result['loop_cpu_us_per_record']:.1f} µs CPU per record, "
          f"{result['loop_cpu_us_per_statement']:.1f} µs per statement (statement + result); "
          f"{result['statements_per_s']:,.0f} statements/s")


if __name__ == "__main__":
    main()
