"""The audit log's own rates: durable records per second, and verified records per second.

:func:`fdatasync_median` is the disk's part alone: the median time of one ``fdatasync``
after appending a record-sized line, which bounds what a statement waits for its record
with ``durability = "fsync"`` (the bench's header shows it, measured in the lab's audit
directory before and after the cases).

Not a pgbench case: the log is driven directly, in this process, the way the proxy drives
it. Appenders are asyncio tasks that each append a statement-sized record and wait until
it is durable before appending the next, as a session waits before forwarding its
statement (``durability = "fsync"``: group commit, one fdatasync for every record that
arrived meanwhile). Then the log is exported as a bundle and the standalone verifier
checks it from scratch: signatures, every leaf, every checkpoint root, 10.2.2 fields, PANs.
The log lives on the disk the appliance would use (/var/tmp, not a tmpfs).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RECORD = {
    "type": "statement", "user": "lab-agent", "outcome": "success", "origin": "198.18.1.10:51234",
    "object": "payments/payments", "session": "5d2785993f9c-17", "kind": "query", "decision": "allow",
    "rule": "agents-read-and-work-with-masked-data", "classes": ["read"],
    "text": "SELECT abalance FROM pgbench_accounts WHERE aid = 48213;",
}


async def _append_durably(audit_log: Any, appenders: int, records: int) -> float:
    per_task = records // appenders

    async def appender(n: int) -> None:
        for i in range(per_task):
            seq = audit_log.append({**RECORD, "stmt": i})
            waiting = audit_log.durable(seq)
            if waiting is not None:
                await waiting

    started = time.perf_counter()
    await asyncio.gather(*(appender(n) for n in range(appenders)))
    return per_task * appenders / (time.perf_counter() - started)


FDATASYNC_RECORD = b"x" * 400 + b"\n"  # about a statement record's size


def fdatasync_median(directory: Path, count: int = 200) -> dict[str, Any]:
    """The disk's own cost of what the group commit does each round: append a record-sized
    line to a file in ``directory`` and ``fdatasync`` it, ``count`` times; the median and
    the 90th percentile in µs. The file is removed afterwards."""
    fd, name = tempfile.mkstemp(prefix="tollgate-bench-fdatasync-", dir=directory)
    times: list[float] = []
    try:
        for _ in range(count):
            os.write(fd, FDATASYNC_RECORD)
            started = time.perf_counter_ns()
            os.fdatasync(fd)
            times.append((time.perf_counter_ns() - started) / 1000)
    finally:
        os.close(fd)
        os.unlink(name)
    times.sort()
    return {"dir": str(directory), "count": count, "median_us": round(statistics.median(times), 1),
            "p90_us": round(times[int(len(times) * 0.9) - 1], 1)}


def measure(records: int = 200_000, appenders: tuple[int, ...] = (8, 50),
            progress: Callable[[str], None] = print) -> dict[str, Any]:
    from appliance import __version__
    from appliance.audit.export import export
    from appliance.audit.keys import init_audit_dir
    from appliance.audit.store import AuditLog
    from appliance.audit.verifier import verify_bundle
    from appliance.config import load_config

    try:
        import uvloop
        run = uvloop.run
    except ImportError:  # the proxy runs on uvloop when it can: measure the same
        run = asyncio.run
    workdir = Path(tempfile.mkdtemp(prefix="tollgate-bench-audit-", dir="/var/tmp"))
    out: dict[str, Any] = {"records": records, "durable_records_per_s": {}, "dir": str(workdir)}
    try:
        config_path = workdir / "tollgate.toml"
        config_path.write_text(f'[proxy]\n[intercept]\n[audit]\ndir = "{workdir / "audit"}"\n'
                               'origin = "tollgate.bench/audit"\ndurability = "fsync"\n')
        config = load_config(config_path)
        assert config.audit is not None
        init_audit_dir(config.audit)
        for count in appenders:
            async def durable_run(appenders: int) -> float:
                audit_log = await asyncio.to_thread(AuditLog.open, config.audit, version=__version__)
                audit_log.start(asyncio.get_running_loop())
                try:
                    return await _append_durably(audit_log, appenders, records)
                finally:
                    await asyncio.to_thread(audit_log.close, "bench")
            rate = run(durable_run(count))
            out["durable_records_per_s"][str(count)] = round(rate)
            progress(f"audit log: {rate:,.0f} durable records/s ({count} appenders, fsync, group commit)")

        bundle = workdir / "bundle.tar.gz"
        started = time.perf_counter()
        export(config, bundle)
        out["export_s"] = round(time.perf_counter() - started, 2)
        root_key = (config.audit.dir / "keys" / "root.pub").read_text().strip()
        started = time.perf_counter()
        report = verify_bundle(bundle, root_key)
        elapsed = time.perf_counter() - started
        verified = report.records_total
        out["verified_ok"] = bool(report.ok)
        out["verified_records"] = verified
        out["verified_records_per_s"] = round(verified / elapsed) if verified else None
        progress(f"audit log: {verified:,} records verified in {elapsed:.2f} s = "
                 f"{out['verified_records_per_s']:,} records/s ({'ok' if report.ok else 'FAILED'}); "
                 f"bundle {bundle.stat().st_size / 1e6:.1f} MB, export {out['export_s']} s")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return out
