"""The audit log writer: records, recovery after a crash, group commit, checkpoints, keys, failures.

Real files, real fsync, real Ed25519. The only fault injected by hand is a failing
fdatasync (no disk here fails on demand); a full disk is a real, small tmpfs.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from appliance.audit import merkle, note, store_commit
from appliance.audit.keys import AuditKeyError, KeyRing, load_root_key
from appliance.audit.reader import AuditReader
from appliance.audit.store import AuditLog
from appliance.audit.store_checkpoints import checkpoint_root
from appliance.audit.store_errors import AuditError, AuditUnavailable
from appliance.audit.trust import parse_trust
from appliance.config import AuditConfig
from tests.audit.conftest import fill
from tests.audit.records import ORIGIN, make_config, statement

REPO = Path(__file__).resolve().parents[2]


def lines(config: AuditConfig) -> list[dict[str, Any]]:
    return [json.loads(e.line) for e in AuditReader(config.dir).records()]


def check_tree(config: AuditConfig) -> int:
    """Every checkpoint's root equals the root of the records' leaves at its size; return
    how many checkpoints were checked. Also: seq fields are 0..n-1 and every file ends in \\n."""
    reader = AuditReader(config.dir)
    leaves = []
    for entry in reader.records():
        assert json.loads(entry.line)["seq"] == entry.seq
        leaves.append(merkle.leaf_hash(entry.line))
    for _start, path in reader.segments():
        data = path.read_bytes()
        assert not data or data.endswith(b"\n"), f"{path} ends in a partial line"
    checkpoints = reader.checkpoints()
    ring = KeyRing.load(config)
    for cp in checkpoints:
        _text, keys = note.open_note(cp["note"], ring.trust.verifier_keys())
        ring.trust.check(keys[0].name, keys[0].key_hash, cp["size"])  # signed by a key valid at that size
        assert cp["size"] <= len(leaves)
        assert checkpoint_root(cp) == merkle.root_of(leaves[:cp["size"]]), f"checkpoint {cp['size']}"
    return len(checkpoints)


class CollectingSink:
    """An off-box sink that keeps what it is given, and says when something came."""

    name = "collect"

    def __init__(self) -> None:
        self.notes: list[tuple[str, int, int]] = []
        self.event = threading.Event()

    def deliver(self, text: str, size: int, unix_time: int) -> None:
        self.notes.append((text, size, unix_time))
        self.event.set()

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.notes):
            left = deadline - time.monotonic()
            assert left > 0, f"timed out; got checkpoints {[n[1] for n in self.notes]}"
            self.event.wait(left)
            self.event.clear()


# --- round trip and recovery ----------------------------------------------------------------------

def test_round_trip(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    log = AuditLog.open(config, version="1.2.3", run="aaaaaaaaaaaa")
    seqs = [log.append(statement(i)) for i in range(100)]
    assert seqs == list(range(2, 102))  # 0: log.start, 1: key.generate (a new log's first key)
    log.close("test over")
    records = lines(config)
    assert [r["type"] for r in records[:2]] == ["log.start", "key.generate"]
    start = records[0]
    assert start["version"] == "1.2.3" and start["durability"] == "fsync" and start["run"] == "aaaaaaaaaaaa"
    assert start["recovered"] == {"truncated_bytes": 0, "records": 0} and "previous_run" not in start
    assert start["key"] == KeyRing.load(config).signing_key.key_id
    assert records[-1]["type"] == "log.stop" and records[-1]["reason"] == "test over"
    assert all(r["time"].endswith("Z") and len(r["time"]) == 27 for r in records)
    assert records[50]["text"] == "SELECT * FROM cards WHERE id = 48"

    again = AuditLog.open(config, version="1.2.4", run="bbbbbbbbbbbb")
    assert again.size == 104
    again.close()
    records = lines(config)
    assert records[103]["type"] == "log.start" and records[103]["previous_run"] == "aaaaaaaaaaaa"
    assert records[103]["recovered"] == {"truncated_bytes": 0, "records": 0}  # closed cleanly: all signed
    assert check_tree(config) >= 3


def test_partial_trailing_line_is_cut_and_reported(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    log = AuditLog.open(config, version="t")
    for i in range(10):
        log.append(statement(i))
    log.checkpoint_now()
    for i in range(10, 15):  # written, never checkpointed
        log.append(statement(i))
    log.abandon()  # what SIGKILL leaves: no log.stop, no final checkpoint
    segment = config.dir / "segments" / "000000000000.jsonl"
    partial = b'{"kind":"query","object":"payments/cards","seq":17,"text":"SELECT 1'  # a killed write
    with open(segment, "ab") as f:
        f.write(partial)
    log = AuditLog.open(config, version="t")
    assert log.size == 18
    log.close()
    records = lines(config)
    assert [r["seq"] for r in records] == list(range(len(records)))
    start = records[17]
    assert start["type"] == "log.start"
    assert start["recovered"] == {"truncated_bytes": len(partial), "records": 5}
    assert [r["stmt"] for r in records[2:17]] == list(range(15))
    check_tree(config)


WRITER = """
import sys
from pathlib import Path
from appliance.config import AuditConfig
from tests.audit.records import ORIGIN, make_config, statement
from appliance.audit.store import AuditLog
config = AuditConfig(Path(sys.argv[1]), origin=sys.argv[2], checkpoint_records=50, checkpoint_seconds=3600.0,
                     heartbeat_seconds=3600.0)
log = AuditLog.open(config, version="child")
log.start()
i = 0
while True:
    seq = log.append({"type": "statement", "user": "u", "outcome": "success", "origin": "1.2.3.4:5",
                      "object": "t/db", "session": "kill", "stmt": i, "text": "x" * (i % 300), "kind": "query"})
    if i == 400:
        log.checkpoint_now()
        print(seq, flush=True)  # acknowledged: durable and signed
    elif i == 3000:
        print("more", flush=True)  # and on it goes, until killed
    i += 1
"""


def test_kill_9_while_writing(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(config.dir), ORIGIN], cwd=REPO,
                             stdout=subprocess.PIPE, text=True)
    try:
        acknowledged = int(child.stdout.readline())  # type: ignore[union-attr]
        assert child.stdout.readline() == "more\n"  # type: ignore[union-attr]  # killed mid-stream
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    log = AuditLog.open(config, version="t")
    size = log.size
    log.close()
    records = lines(config)
    assert size > 3000 > acknowledged
    start = records[size - 1]
    assert start["type"] == "log.start" and start["previous_run"] == records[0]["run"]
    assert [r["stmt"] for r in records[2:size - 1]] == list(range(size - 3))  # nothing lost, nothing doubled
    assert check_tree(config) >= 2


def test_recovery_without_state_rehashes_to_the_same_tree(tmp_path: Path) -> None:
    config = make_config(tmp_path, segment_bytes=4096)
    log = AuditLog.open(config, version="t")
    for i in range(300):
        log.append(statement(i))
    log.close()
    segments = AuditReader(config.dir).segments()
    assert len(segments) > 5 and [s for s, _ in segments] == sorted(s for s, _ in segments)
    for start, path in segments:  # each segment is named by the seq of its first line
        first = json.loads(path.read_bytes().split(b"\n", 1)[0])
        assert first["seq"] == start
    (config.dir / "state.json").write_text('{"v":1,"size":3,"segment":0,"offset":10,"hashes":[]}')  # wrong
    log = AuditLog.open(config, version="t")
    log.close()
    (config.dir / "state.json").unlink()
    log = AuditLog.open(config, version="t")
    assert log.size == 306
    log.close()
    assert check_tree(config) >= 4


def test_state_one_checkpoint_behind_is_used_and_consistent(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    log = AuditLog.open(config, version="t")
    for i in range(30):
        log.append(statement(i))
    log.checkpoint_now()
    older = (config.dir / "state.json").read_bytes()
    for i in range(30, 60):
        log.append(statement(i))
    log.checkpoint_now()  # then killed before state.json was replaced
    log.abandon()  # what SIGKILL leaves: no log.stop, no final checkpoint
    (config.dir / "state.json").write_bytes(older)
    log = AuditLog.open(config, version="t")
    assert log.size == 63  # 62 records, and its log.start
    log.close()
    assert lines(config)[62]["recovered"] == {"truncated_bytes": 0, "records": 0}
    check_tree(config)


def test_a_log_shorter_than_its_checkpoints_is_refused(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    log = AuditLog.open(config, version="t")
    for i in range(20):
        log.append(statement(i))
    log.close()
    segment = config.dir / "segments" / "000000000000.jsonl"
    data = segment.read_bytes()
    segment.write_bytes(data[:data.rindex(b"\n", 0, len(data) - 1) + 1])  # the last record removed
    with pytest.raises(AuditError, match="last checkpoint covers 23"):
        AuditLog.open(config, version="t")


def test_one_writer_at_a_time(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    log = AuditLog.open(config, version="t")
    try:
        with pytest.raises(AuditError, match=f"in use by pid {os.getpid()}"):
            AuditLog.open(config, version="t")
    finally:
        log.close()
    AuditLog.open(config, version="t").close()  # released on close


def test_missing_keys_are_named(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    (config.keys_dir / "current").unlink()
    with pytest.raises(AuditKeyError, match=r"keys/current.*tollgate audit init"):
        AuditLog.open(config, version="t")
    with pytest.raises(AuditError, match="tollgate audit init"):
        AuditLog.open(replace(config, dir=tmp_path / "nowhere"), version="t")


# --- durability and checkpoints -------------------------------------------------------------------------

def test_durable_futures_resolve_after_a_sync(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    log = AuditLog.open(config, version="t")

    async def main() -> list[int]:
        log.start(asyncio.get_running_loop())

        async def agent(n: int) -> list[int]:
            done = []
            for i in range(50):
                seq = log.append(statement(i, session=f"s-{n}"))
                fut = log.durable(seq)
                assert fut is not None  # not synced yet: the sync thread can't have run in between
                await fut
                assert log.durable_size > seq
                assert log.durable(seq) is None  # now it is
                done.append(seq)
            return done

        results = await asyncio.gather(*(agent(n) for n in range(8)))
        return sorted(s for r in results for s in r)

    try:
        seqs = asyncio.run(main())
    finally:
        log.close()
    assert seqs == list(range(2, 402))
    check_tree(config)


def _result(i: int) -> dict[str, Any]:
    return {"type": "result", "user": "agent@example.com", "outcome": "success", "origin": "10.0.0.7:40000",
            "object": "payments/cards", "session": "s-1", "stmt": i, "rows": 1, "masked": 0}


def test_a_record_nobody_waits_for_is_synced_by_the_next_statements_sync(tmp_path: Path, monkeypatch) -> None:
    """One statement at a time costs one fdatasync: the previous result's record rides on it."""
    monkeypatch.setattr(store_commit, "LAZY_SYNC_SECONDS", 3600.0)  # only a statement asks for a sync
    config = make_config(tmp_path)
    syncs: list[int] = []

    def fdatasync(fd: int) -> None:
        syncs.append(fd)
        os.fdatasync(fd)

    log = AuditLog.open(config, version="t", fdatasync=fdatasync)

    async def main() -> tuple[int, int]:
        log.start(asyncio.get_running_loop())
        syncs.clear()  # what open() synced and signed
        result = log.append(_result(1))
        await asyncio.sleep(0)  # another turn of the loop: nothing asked for a sync of it
        assert syncs == []
        stmt = log.append(statement(2))
        waiting = log.durable(stmt)
        assert waiting is not None
        await waiting
        return result, stmt

    try:
        result, stmt = asyncio.run(main())
        assert len(syncs) == 1 and log.durable_size > stmt > result
    finally:
        log.close()


def test_what_one_loop_iteration_appends_is_written_with_one_write(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(store_commit, "LAZY_SYNC_SECONDS", 3600.0)
    config = make_config(tmp_path)
    log = AuditLog.open(config, version="t")
    segment = config.dir / "segments" / "000000000000.jsonl"
    writes: list[int] = []
    real_pwrite = os.pwrite

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        writes.append(len(data))
        return real_pwrite(fd, data, offset)

    async def main() -> tuple[int, int, int]:
        log.start(asyncio.get_running_loop())
        before = segment.stat().st_size
        monkeypatch.setattr(os, "pwrite", pwrite)
        seqs = [log.append(statement(i, session=f"s-{i}")) for i in range(8)]
        held = segment.stat().st_size  # not written yet: the iteration is not over
        await asyncio.sleep(0)  # the loop turns once: the end-of-iteration write ran
        written = segment.stat().st_size
        for seq in seqs:
            assert log.durable(seq) is not None  # written, not synced: nobody asked yet
        return before, held, written

    try:
        before, held, written = asyncio.run(main())
        assert held == before and written > before
        assert len(writes) == 1 and writes[0] == written - before
    finally:
        monkeypatch.undo()
        log.close()
    assert [r["stmt"] for r in lines(config) if r["type"] == "statement"] == list(range(8))
    check_tree(config)


def test_held_records_that_fill_a_segment_are_written_in_order_across_segments(tmp_path: Path) -> None:
    config = make_config(tmp_path, segment_bytes=4096)
    log = AuditLog.open(config, version="t")

    async def main() -> None:
        log.start(asyncio.get_running_loop())
        for turn in range(3):  # 40 records a turn, several segments' worth in all
            seqs = [log.append(statement(i, session=f"t-{turn}")) for i in range(40)]
            waiting = log.durable(seqs[-1])
            assert waiting is not None
            await waiting

    try:
        asyncio.run(main())
    finally:
        log.close()
    segments = AuditReader(config.dir).segments()
    assert len(segments) > 5
    stmts = [(r["session"], r["stmt"]) for r in lines(config) if r["type"] == "statement"]
    assert stmts == [(f"t-{turn}", i) for turn in range(3) for i in range(40)]
    check_tree(config)


def test_a_record_nobody_waits_for_is_synced_soon_without_a_statement(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(store_commit, "LAZY_SYNC_SECONDS", 0.0)
    config = make_config(tmp_path)
    synced = threading.Event()

    def fdatasync(fd: int) -> None:
        os.fdatasync(fd)
        synced.set()

    log = AuditLog.open(config, version="t", fdatasync=fdatasync)

    async def main() -> int:
        log.start(asyncio.get_running_loop())
        synced.clear()
        seq = log.append(_result(1))
        assert await asyncio.to_thread(synced.wait, 60)  # the timer asked for it: nobody else did
        waiting = log.durable(seq)  # a future only if the sync is not published yet
        if waiting is not None:
            await waiting
        return seq

    try:
        seq = asyncio.run(main())
        assert log.durable_size > seq
    finally:
        log.close()


def test_write_durability_needs_no_waiting(tmp_path: Path) -> None:
    config = make_config(tmp_path, durability="write")
    log = AuditLog.open(config, version="t")
    try:
        seq = log.append(statement(1))
        assert log.durable(seq) is None
    finally:
        log.close()


def test_checkpoint_every_n_records(tmp_path: Path) -> None:
    config = make_config(tmp_path, checkpoint_records=10)
    sink = CollectingSink()
    log = AuditLog.open(config, version="t", sinks=[sink])
    try:
        sink.wait_for(lambda notes: len(notes) == 1)  # signed at open, shipped on the sinks' thread
        assert sink.notes[0][1] == 2
        log.start()
        for i in range(9):
            log.append(statement(i))
        assert log.checkpoint_now()["size"] == 11  # (by hand: the count starts again)
        for i in range(10):
            log.append(statement(i))
        sink.wait_for(lambda notes: notes[-1][1] == 21)  # ten new records: signed
        for i in range(10):
            log.append(statement(i))
        sink.wait_for(lambda notes: notes[-1][1] == 31)
    finally:
        log.close()
    sizes = [n[1] for n in sink.notes]
    assert sizes == [2, 11, 21, 31, 32]  # and none in between (the last: log.stop, at close)
    assert check_tree(config) == len(sizes)


@pytest.mark.parametrize("durability", ["fsync", "write"])
def test_checkpoint_seconds_after_the_first_unsigned_record(tmp_path: Path, durability: str) -> None:
    config = make_config(tmp_path, checkpoint_seconds=0.2, durability=durability)
    sink = CollectingSink()
    log = AuditLog.open(config, version="t", sinks=[sink])
    try:
        sink.wait_for(lambda notes: len(notes) == 1)  # signed at open
        log.start()
        seq = log.append(statement(1))
        # Nothing else signs: a million records to go, an hour to the heartbeat.
        sink.wait_for(lambda notes: bool(notes) and notes[-1][1] > seq)
    finally:
        log.close()
    assert [n[1] for n in sink.notes[:2]] == [seq, seq + 1]


def test_heartbeat_when_idle_and_checkpoint_on_request(tmp_path: Path) -> None:
    config = make_config(tmp_path, heartbeat_seconds=0.1)
    sink = CollectingSink()
    log = AuditLog.open(config, version="t", sinks=[sink])
    try:
        log.start()
        sink.wait_for(lambda notes: len(notes) >= 3)
        assert {n[1] for n in sink.notes} == {2}  # same size, re-signed
        times = [n[2] for n in sink.notes]
        assert times == sorted(times)  # each a new signature over the same tree, never older
    finally:
        log.close()

    config = replace(config, heartbeat_seconds=3600.0)
    sink = CollectingSink()
    log = AuditLog.open(config, version="t", sinks=[sink])
    try:
        log.start()
        seq = log.append(statement(1))
        log.request_checkpoint()  # a session ended
        sink.wait_for(lambda notes: bool(notes) and notes[-1][1] > seq)
    finally:
        log.close()


# --- keys ---------------------------------------------------------------------------------------------

def test_rotation_is_recorded_and_signed_on_both_sides(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    log = AuditLog.open(config, version="t")
    old = log.keyring.signing_key
    for i in range(5):
        log.append(statement(i))
    new = log.rotate_key(load_root_key(config), user="alice", origin="cli:0")
    for i in range(5):
        log.append(statement(i))
    log.close()
    records = lines(config)
    [rotate] = [r for r in records if r["type"] == "key.rotate"]
    at = rotate["seq"] + 1
    assert rotate["key"] == new.key_id and rotate["previous"] == old.key_id and rotate["valid_from"] == at
    assert rotate["user"] == "alice" and rotate["origin"] == "cli:0"
    ring = KeyRing.load(config)
    assert ring.signing_key.key_id == new.key_id
    assert [(e.key.key_id, e.valid_from, e.valid_until) for e in ring.trust.entries] == \
        [(old.key_id, 0, at), (new.key_id, at, None)]
    assert (config.keys_dir / "current").read_text().strip() == new.key_id
    by_key = {}
    for cp in AuditReader(config.dir).checkpoints():
        _, [key] = note.open_note(cp["note"], ring.trust.verifier_keys())
        by_key.setdefault(key.key_id, []).append(cp["size"])
    assert max(by_key[old.key_id]) == at and min(by_key[new.key_id]) == at
    assert check_tree(config) >= 4


def test_rotation_needs_the_root_key(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    root = config.keys_dir / "root.key"
    offline = tmp_path / "offline-root.pem"
    root.rename(offline)
    with pytest.raises(AuditKeyError, match="give --root-key FILE"):
        load_root_key(config)
    log = AuditLog.open(config, version="t")
    try:
        other = note.SigningKey.generate(f"{ORIGIN}/root")
        with pytest.raises(AuditKeyError, match="not the one"):
            log.rotate_key(other)
        log.rotate_key(load_root_key(config, offline))
    finally:
        log.close()
    trust = parse_trust((config.dir / "trust.note").read_text(), load_root_key(config, offline).verifier)
    assert len(trust.entries) == 2


# --- failures -----------------------------------------------------------------------------------------

def _append_until_refused(log: AuditLog) -> None:
    for i in range(1, 10_000):  # the segment's last page fills up
        log.append(statement(i))


def test_disk_full_refuses_then_resumes_with_a_failure_record(tiny_fs: Path) -> None:
    config = make_config(tiny_fs)
    log = AuditLog.open(config, version="t")
    try:
        log.append(statement(0))
        fill(tiny_fs / "filler")
        with pytest.raises(AuditUnavailable, match="No space left on device") as raised:
            _append_until_refused(log)
        assert raised.value.errno == errno.ENOSPC
        size = log.size
        for _ in range(3):  # still full: keeps refusing, nothing half-written
            with pytest.raises(AuditUnavailable):
                log.append(statement(-1))
            log.note_refused()
        assert log.size == size
        segment = config.dir / "segments" / "000000000000.jsonl"
        assert segment.read_bytes().endswith(b"\n")
        assert AuditReader(config.dir).size() == size
        assert log.status()["failure"]["refused"] == 3

        (tiny_fs / "filler").unlink()  # space returns: service resumes by itself
        seq = log.append(statement(99))
        assert seq == size + 1
    finally:
        log.close()
    records = lines(config)
    failure = records[size]
    assert failure["type"] == "audit.failure" and failure["refused"] == 3
    assert "No space left" in failure["error"] and failure["since"] <= failure["time"]
    assert "lost" not in failure
    assert records[size + 1]["stmt"] == 99
    check_tree(config)


def test_failed_fsync_rolls_back_and_fails_the_waiting(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    failing = threading.Event()
    real = os.fdatasync

    def fdatasync(fd: int) -> None:  # the disk reports an I/O error, once
        if failing.is_set():
            failing.clear()
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    log = AuditLog.open(config, version="t", fdatasync=fdatasync)

    async def main() -> tuple[int, list[Any]]:
        log.start(asyncio.get_running_loop())
        seq = log.append(statement(0))
        await log.durable(seq)  # type: ignore[misc]
        durable = log.durable_size
        failing.set()
        # Appended in one turn of the loop: the sync they ask for starts after it, one batch.
        seqs = [log.append(statement(i)) for i in range(1, 6)]
        outcomes = await asyncio.gather(*(log.durable(s) for s in seqs), return_exceptions=True)  # type: ignore[misc]
        return durable, outcomes

    try:
        durable, outcomes = asyncio.run(main())
        assert all(isinstance(o, AuditUnavailable) and "Input/output error" in str(o) for o in outcomes)
        assert log.size == durable  # rolled back: the file and the tree
        seq = log.append(statement(42))
        assert seq == durable + 1
    finally:
        log.close()
    records = lines(config)
    failure = records[durable]
    assert failure["type"] == "audit.failure" and failure["refused"] == 5
    assert failure["lost"] == {"from": durable, "to": durable + 4}
    assert records[durable + 1]["stmt"] == 42
    assert not any(r.get("stmt") in (1, 2, 3, 4, 5) for r in records)
    check_tree(config)


def test_offbox_directory_gets_every_checkpoint(tmp_path: Path) -> None:
    offbox = tmp_path / "other-storage"
    offbox.mkdir()
    config = make_config(tmp_path, offbox_dir=offbox)
    log = AuditLog.open(config, version="t")
    log.append(statement(1))
    log.checkpoint_now()
    log.close()
    names = sorted(p.name for p in offbox.iterdir())
    made = AuditReader(config.dir).checkpoints()
    assert len(names) == len(made) and all(n.startswith("checkpoint-") and n.endswith(".note") for n in names)
    assert {p.read_text() for p in offbox.iterdir()} == {cp["note"] for cp in made}


def test_a_batch_dropped_by_a_write_off_the_loop_fails_its_futures_before_any_record_is_taken(tiny_fs: Path):
    """The loop holds five statements' records; a thread appends before the loop's turn is
    over, so it writes them — and the disk is full. The five futures fail, and no record is
    taken until the loop has failed and counted them: the audit.failure says five."""
    config = make_config(tiny_fs)
    log = AuditLog.open(config, version="t")
    errors: list[BaseException] = []

    def off_the_loop() -> None:
        try:
            log.append(statement(-1, session="cli"))
        except AuditUnavailable as exc:
            errors.append(exc)

    async def main() -> tuple[int, list[Any], bool]:
        log.start(asyncio.get_running_loop())
        first = log.append(statement(0))
        await log.durable(first)  # type: ignore[misc]
        fill(tiny_fs / "filler")
        pad = "x" * 2000
        waiting = [log.append_waiting(statement(i, text=pad)) for i in range(1, 6)]
        thread = threading.Thread(target=off_the_loop)
        thread.start()
        thread.join()  # the loop's turn is not over: the thread wrote (and dropped) the batch
        with pytest.raises(AuditUnavailable):
            log.append(statement(99))  # not until the loop has failed the five
        outcomes = await asyncio.gather(*waiting, return_exceptions=True)  # type: ignore[arg-type]
        return first + 1, outcomes, bool(errors)

    try:
        size, outcomes, thread_refused = asyncio.run(main())
        assert thread_refused
        assert all(isinstance(o, AuditUnavailable) and o.sqlstate == "53100" for o in outcomes)
        assert log.size == size  # the batch's seqs are free again
        (tiny_fs / "filler").unlink()
        log.append(statement(100))
    finally:
        log.close()
    records = lines(config)
    failure = records[size]
    assert failure["type"] == "audit.failure" and failure["refused"] == 5
    assert failure["lost"]["from"] == size and records[size + 1]["stmt"] == 100
    check_tree(config)


# --- the sync run on the loop's thread ------------------------------------------------------------

def _thread_recording_fdatasync(threads: list[int], fail: threading.Event | None = None) -> Any:
    def fdatasync(fd: int) -> None:
        threads.append(threading.get_ident())
        if fail is not None and fail.is_set():
            fail.clear()
            raise OSError(errno.EIO, "Input/output error")
        os.fdatasync(fd)
    return fdatasync


def test_a_sync_every_statement_in_flight_waits_for_runs_on_the_loop(tmp_path: Path) -> None:
    """One statement in flight, waiting for its record: the loop syncs it itself."""
    config = make_config(tmp_path)
    threads: list[int] = []
    log = AuditLog.open(config, version="t", fdatasync=_thread_recording_fdatasync(threads))

    async def main() -> tuple[int, int]:
        log.start(asyncio.get_running_loop())
        threads.clear()
        log.note_inflight(1)
        seq = log.append(statement(1))
        log.append(_result(0))  # nobody waits for it: the same sync covers it
        waiting = log.durable(seq)
        assert waiting is not None
        await waiting
        return seq, threading.get_ident()

    try:
        seq, loop_thread = asyncio.run(main())
        assert threads == [loop_thread]
        assert log._commit.inline_rounds == 1
        assert log.durable_size == seq + 2
    finally:
        log.close()
    check_tree(config)


def test_a_sync_while_other_statements_are_in_flight_runs_on_the_sync_thread(tmp_path: Path) -> None:
    """Two statements in flight, one waiting: the other's answer may come meanwhile, so the
    loop must not wait for the disk; nor with another session open (its client may send);
    and nobody counting in flight means the thread too."""
    config = make_config(tmp_path)
    threads: list[int] = []
    log = AuditLog.open(config, version="t", fdatasync=_thread_recording_fdatasync(threads))

    async def main() -> int:
        log.start(asyncio.get_running_loop())
        threads.clear()
        seq = log.append(statement(1))
        await log.durable(seq)  # type: ignore[misc]  # nobody counts in flight yet
        log.note_inflight(2)
        seq = log.append(statement(2))
        await log.durable(seq)  # type: ignore[misc]
        log.note_inflight(-1)
        log.note_sessions(2)  # one statement in flight, and it waits; but another session is open
        seq = log.append(statement(3))
        await log.durable(seq)  # type: ignore[misc]
        return threading.get_ident()

    try:
        loop_thread = asyncio.run(main())
        assert len(threads) == 3 and loop_thread not in threads
        assert log._commit.inline_rounds == 0
    finally:
        log.close()
    check_tree(config)


def test_a_failed_sync_on_the_loop_rolls_back_and_fails_the_waiting(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    threads: list[int] = []
    failing = threading.Event()
    log = AuditLog.open(config, version="t", fdatasync=_thread_recording_fdatasync(threads, failing))

    async def main() -> tuple[int, list[Any], int]:
        log.start(asyncio.get_running_loop())
        log.note_inflight(1)
        seq = log.append(statement(0))
        await log.durable(seq)  # type: ignore[misc]  # on the loop too: the sync thread holds no lock now
        log.note_inflight(4)
        durable = log.durable_size
        failing.set()
        threads.clear()
        seqs = [log.append(statement(i)) for i in range(1, 6)]  # all five in flight wait
        outcomes = await asyncio.gather(*(log.durable(s) for s in seqs), return_exceptions=True)  # type: ignore[misc]
        return durable, outcomes, threading.get_ident()

    try:
        durable, outcomes, loop_thread = asyncio.run(main())
        assert threads == [loop_thread]  # the failing sync ran on the loop
        assert all(isinstance(o, AuditUnavailable) and "Input/output error" in str(o) for o in outcomes)
        assert log.size == durable  # rolled back: the file and the tree
        assert log.append(statement(42)) == durable + 1
    finally:
        log.close()
    records = lines(config)
    failure = records[durable]
    assert failure["type"] == "audit.failure" and failure["refused"] == 5
    assert failure["lost"] == {"from": durable, "to": durable + 4}
    assert not any(r.get("stmt") in (1, 2, 3, 4, 5) for r in records)
    check_tree(config)


def test_a_slow_sync_on_the_loop_sends_the_next_ones_to_the_thread(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(store_commit, "INLINE_SYNC_MAX_SECONDS", -1.0)  # every sync is "slow"
    monkeypatch.setattr(store_commit, "INLINE_BACKOFF_SECONDS", 3600.0)
    config = make_config(tmp_path)
    threads: list[int] = []
    log = AuditLog.open(config, version="t", fdatasync=_thread_recording_fdatasync(threads))

    async def main() -> int:
        log.start(asyncio.get_running_loop())
        threads.clear()
        log.note_inflight(1)
        for i in range(3):
            await log.durable(log.append(statement(i)))  # type: ignore[misc]
        return threading.get_ident()

    try:
        loop_thread = asyncio.run(main())
        assert threads[0] == loop_thread and len(threads) == 3 and loop_thread not in threads[1:]
    finally:
        log.close()
    check_tree(config)


def test_a_statements_sync_does_not_wait_for_a_checkpoint_being_signed(tmp_path: Path, monkeypatch) -> None:
    """The sync thread signs after letting go of the commit lock: while a signature is held
    up, a statement's record is still made durable (here, by a round on the loop)."""
    config = make_config(tmp_path, checkpoint_records=2)
    log = AuditLog.open(config, version="t")
    checkpoints = log._checkpoints
    real_sign = checkpoints.sign
    signing, release = threading.Event(), threading.Event()

    def stalled_sign(snap: Any) -> Any:
        if threading.current_thread().name == "audit-sync":
            signing.set()
            release.wait(60)
        return real_sign(snap)

    monkeypatch.setattr(checkpoints, "sign", stalled_sign)

    async def main() -> tuple[int, int]:
        log.start(asyncio.get_running_loop())
        first = log.append(statement(1))
        log.append(statement(2))
        await log.durable(first)  # type: ignore[misc]  # a round on the thread: a checkpoint is due
        assert await asyncio.to_thread(signing.wait, 60)  # ... and its signature is held up
        log.note_inflight(1)
        seq = log.append(statement(3))
        waiting = log.durable(seq)
        assert waiting is not None
        await asyncio.wait_for(waiting, 60)  # durable while the signature still waits (it hung before)
        assert not release.is_set()
        release.set()
        return seq, log.durable_size

    try:
        seq, durable = asyncio.run(main())
        assert durable > seq
    finally:
        release.set()
        log.close()
    assert check_tree(config) >= 2
