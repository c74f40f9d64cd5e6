"""The writer notices its segment changing under it (issue 13, item 3).

A running AuditLog (real files, real fsync, the sync thread on a real loop) whose live
segment is cut, replaced or grown by someone else: the next round notices, the log fails
closed for good (the waiting statements fail, appends are refused as for a write failure,
58030), ``audit.failure`` says what was found in a new segment, and no checkpoint is ever
signed over records that are not on disk. Synchronised on the log's own futures, no sleeps.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest

from appliance.audit.addon import _unrecorded
from appliance.audit.reader import AuditReader
from appliance.audit.store import AuditLog
from appliance.audit.store_errors import AuditUnavailable
from tests.audit.records import make_config, statement


def _live_segment(directory: Path) -> Path:
    return AuditReader(directory).segments()[-1][1]


def _damage_then_append(log: AuditLog, damage: Any) -> tuple[int, int, list[Any]]:
    """Append 20 durable statements, sign, ``damage(segment)``, append 3 more and wait for
    them: (records before the damage, the checkpoint's size, the 3 outcomes)."""

    async def main() -> tuple[int, int, list[Any]]:
        log.start(asyncio.get_running_loop())
        for i in range(20):
            seq = log.append(statement(i))
            fut = log.durable(seq)
            if fut is not None:
                await fut
        signed = log.checkpoint_now()["size"]
        before = log.size
        damage(_live_segment(log.config.dir))
        seqs = [log.append(statement(100 + i)) for i in range(3)]
        outcomes = await asyncio.gather(*(log.durable(s) for s in seqs), return_exceptions=True)  # type: ignore[misc]
        return before, signed, outcomes

    return asyncio.run(main())


def _failure_record(directory: Path) -> tuple[str, dict[str, Any]]:
    segments = AuditReader(directory).segments()
    start, path = segments[-1]
    lines = path.read_bytes().splitlines()
    assert len(lines) == 1, f"{path} should hold the failure record alone"
    record = json.loads(lines[0])
    assert record["seq"] == start
    return path.name, record


def _assert_refused(log: AuditLog, what: str) -> None:
    with pytest.raises(AuditUnavailable, match=what) as raised:
        log.append(statement(999))
    assert _unrecorded(raised.value).sqlstate == "58030"  # as for a write failure (not "disk full")
    with pytest.raises(AuditUnavailable, match=what):
        log.checkpoint_now()


def test_truncating_the_live_segment_fails_closed_and_is_recorded(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    log = AuditLog.open(config, version="t")
    cut_to: list[int] = []

    def truncate(path: Path) -> None:
        data = path.read_bytes()
        keep = data[:data.rstrip(b"\n").rfind(b"\n") + 1]
        keep = keep[:keep.rstrip(b"\n").rfind(b"\n") + 1]  # the last two records gone
        cut_to.append(len(keep))
        os.truncate(path, len(keep))

    try:
        before, signed, outcomes = _damage_then_append(log, truncate)
        assert signed == before
        assert all(isinstance(o, AuditUnavailable) and "was cut to" in str(o) for o in outcomes), outcomes
        _assert_refused(log, "was cut to")
        assert log.status()["failure"]["error"].endswith(f"records 0–{before + 2})")
    finally:
        log.close()
    reader = AuditReader(config.dir)
    assert reader.last_checkpoint()["size"] == signed  # nothing signed after the damage, close included
    name, record = _failure_record(config.dir)
    assert name == f"{before + 3:012d}.jsonl"
    assert record["type"] == "audit.failure" and record["outcome"] == "failure"
    damage = record["damage"]
    assert damage["segment"] == "000000000000.jsonl" and damage["records_written"] == before + 3
    assert damage["bytes_found"] < damage["bytes_written"]
    assert damage["inode"] == damage["path_inode"]
    assert record["lost"] == {"from": before, "to": before + 2}
    assert "was cut to" in record["error"]


def test_replacing_the_live_segment_fails_closed(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    log = AuditLog.open(config, version="t")

    def replace(path: Path) -> None:
        forged = path.with_suffix(".forged")
        forged.write_bytes(path.read_bytes())  # same bytes, another file
        os.replace(forged, path)

    try:
        _before, signed, outcomes = _damage_then_append(log, replace)
        assert all(isinstance(o, AuditUnavailable) and "was replaced" in str(o) for o in outcomes), outcomes
        _assert_refused(log, "was replaced")
    finally:
        log.close()
    assert AuditReader(config.dir).last_checkpoint()["size"] == signed
    _name, record = _failure_record(config.dir)
    assert record["damage"]["inode"] != record["damage"]["path_inode"]


def test_a_segment_grown_by_someone_else_is_caught_before_signing(tmp_path: Path) -> None:
    config = make_config(tmp_path, durability="write")  # no rounds but the checkpoint's own
    log = AuditLog.open(config, version="t")
    try:
        log.append(statement(1))
        signed = log.checkpoint_now()["size"]
        with open(_live_segment(config.dir), "ab") as f:
            f.write(b'{"forged":true}\n')
        log.append(statement(2))
        with pytest.raises(AuditUnavailable, match="was grown to") as raised:
            log.checkpoint_now()
        assert raised.value.errno == errno.EIO
        _assert_refused(log, "was grown to")
    finally:
        log.close()
    assert AuditReader(config.dir).last_checkpoint()["size"] == signed


def test_a_segment_cut_after_it_filled_but_before_its_sync_is_caught(tmp_path: Path) -> None:
    # Small segments: the appends of one loop turn fill one and start the next; the full
    # one (retired, not synced yet) is cut before the round that would sync it.
    config = make_config(tmp_path, segment_bytes=4096)
    log = AuditLog.open(config, version="t")

    async def main() -> list[Any]:
        log.start(asyncio.get_running_loop())
        first = AuditReader(config.dir).segments()[-1][1]
        seqs = []
        while len(AuditReader(config.dir).segments()) == 1:
            seqs.append(log.append(statement(len(seqs))))
        data = first.read_bytes()
        os.truncate(first, data.rstrip(b"\n").rfind(b"\n") + 1)  # the full segment's last record gone
        return await asyncio.gather(*(log.durable(s) for s in seqs), return_exceptions=True)  # type: ignore[misc]

    try:
        outcomes = asyncio.run(main())
        assert all(isinstance(o, AuditUnavailable) and "000000000000.jsonl was cut to" in str(o)
                   for o in outcomes), outcomes
        _assert_refused(log, "000000000000.jsonl was cut to")
    finally:
        log.close()
    _name, record = _failure_record(config.dir)
    assert record["damage"]["segment"] == "000000000000.jsonl"
