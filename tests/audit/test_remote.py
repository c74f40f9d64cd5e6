"""Workers' audit records through the primary's writer (appliance/audit/remote.py).

A real AuditLog in a temporary directory, its AuditWriter and RemoteAuditLogs on the two
ends of real socketpairs, all on one event loop: what a worker waits for is durable in
the one log when it resolves; what can't be encoded fails in the worker at once; a
writer that fails, or goes away, fails the waits (the statements are refused).
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from appliance.audit.reader import AuditReader
from appliance.audit.remote import AuditWriter, RemoteAuditLog
from appliance.audit.store import AuditLog
from appliance.audit.store_errors import AuditUnavailable
from appliance.proxy.channel import Channel
from tests.audit.records import make_config, statement
from tests.audit.test_store import check_tree


async def _pair(writer: AuditWriter, run: str) -> tuple[RemoteAuditLog, Channel, Channel]:
    a, b = socket.socketpair()
    primary_end = await Channel.connect(a, "worker")
    worker_end = await Channel.connect(b, "primary")
    writer.attach(primary_end)
    remote = RemoteAuditLog(worker_end, run)
    worker_end.on_lost = remote.lost
    return remote, primary_end, worker_end


def _records(config: Any) -> list[dict[str, Any]]:
    import json
    return [json.loads(e.line) for e in AuditReader(config.dir).records()]


def test_two_workers_records_land_in_one_tree_each_durable_when_it_resolves(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    log = AuditLog.open(config, version="t", run="aaaaaaaaaaaa")

    async def main() -> None:
        log.start(asyncio.get_running_loop())
        writer = AuditWriter(log)
        remotes = [(await _pair(writer, f"aaaaaaaaaaaaw{n}"))[0] for n in (1, 2)]

        async def worker(n: int, remote: RemoteAuditLog) -> None:
            for i in range(40):
                remote.append({**statement(i, session=f"w{n}"), "type": "result"})
                await remote.append_waiting(statement(i, session=f"w{n}"), trusted=True)
                # Resolved: this worker's records so far are durable in the primary's log.
                assert log.durable_size >= 2 * (i + 1)

        await asyncio.gather(*(worker(n, r) for n, r in enumerate(remotes, 1)))
        assert all(r.run.startswith("aaaaaaaaaaaa") for r in remotes)

    try:
        asyncio.run(main())
    finally:
        log.close()
    records = _records(config)
    for n in (1, 2):
        mine = [r for r in records if r.get("session") == f"w{n}"]
        assert [(r["type"], r["stmt"]) for r in mine] == [(t, i) for i in range(40) for t in ("result", "statement")]
    assert {r["run"] for r in records} == {"aaaaaaaaaaaa"}  # one writer, one run, one tree
    assert check_tree(config) >= 2


def test_a_record_the_writer_says_is_durable_is_on_disk(tmp_path: Path) -> None:
    """The ack comes after the primary's fdatasync covered the record, never before."""
    config = make_config(tmp_path)
    synced: list[int] = []
    log = AuditLog.open(config, version="t", fdatasync=lambda fd: (os.fdatasync(fd), synced.append(fd))[0])

    async def main() -> None:
        log.start(asyncio.get_running_loop())
        remote, _, _ = await _pair(AuditWriter(log), "r")
        before = len(synced)
        await remote.append_waiting(statement(1), trusted=True)
        assert len(synced) > before
        assert log.durable_size == log.size

    try:
        asyncio.run(main())
    finally:
        log.close()


def test_a_lone_surrogate_fails_in_the_worker_at_once_as_with_a_local_log(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    log = AuditLog.open(config, version="t")

    async def main() -> None:
        log.start(asyncio.get_running_loop())
        remote, _, _ = await _pair(AuditWriter(log), "r")
        with pytest.raises(ValueError, match="surrogate"):
            remote.append_waiting(statement(1, text="SELECT '\udcff'"), trusted=True)
        with pytest.raises(ValueError, match="surrogate"):
            log.append(statement(1, text="SELECT '\udcff'"), trusted=True)  # what the addon escapes on
        # Bytes that merely look like one (an integer's encoding) go through.
        await remote.append_waiting(statement(1, rows=0xEDA0), trusted=True)

    try:
        asyncio.run(main())
    finally:
        log.close()


def test_a_failing_writer_fails_the_wait_and_counts_what_nobody_waited_for(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    log = AuditLog.open(config, version="t")

    async def main() -> None:
        log.start(asyncio.get_running_loop())
        writer = AuditWriter(log)
        remote, _, _ = await _pair(writer, "r")
        # A value outside the log's model reaches the writer (the worker vouched for it):
        # the writer can't append it, so what waits for it fails and the rest is counted.
        with pytest.raises(AuditUnavailable, match="outside"):
            await remote.append_waiting(statement(1, rows=2**60))
        remote.append(statement(2, rows=2**60, type="result"))
        await remote.append_waiting(statement(3), trusted=True)

    try:
        asyncio.run(main())
    finally:
        log.close()
    unrecorded = [r for r in _records(config) if r["type"] == "audit.unrecorded"]
    assert len(unrecorded) == 1 and unrecorded[0]["records"] == {"result": 1}


def test_when_the_primary_is_gone_every_wait_fails_and_nothing_more_is_accepted(tmp_path: Path) -> None:
    async def main() -> None:
        a, b = socket.socketpair()
        primary_end = await Channel.connect(a, "worker")  # a primary that never answers
        worker_end = await Channel.connect(b, "primary")
        remote = RemoteAuditLog(worker_end, "r")
        gone = asyncio.Event()
        worker_end.on_lost = lambda: (remote.lost(), gone.set())
        waiting = remote.append_waiting(statement(1), trusted=True)
        primary_end.close()
        await gone.wait()
        with pytest.raises(AuditUnavailable, match="gone"):
            await waiting
        with pytest.raises(AuditUnavailable, match="gone"):
            remote.append_waiting(statement(2), trusted=True)

    asyncio.run(main())


def test_the_remote_log_has_every_method_the_addon_calls():
    """The addon is written against AuditLog; a worker's must answer the same calls."""
    import re

    from appliance.audit import addon
    called = set(re.findall(r"self\.log\.([a-z_]+)", Path(addon.__file__).read_text()))
    assert called and not [name for name in called if not hasattr(RemoteAuditLog, name)]
