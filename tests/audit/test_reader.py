"""Reading an audit directory: records in order across segments, a live log's partial line, checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.audit import merkle
from appliance.audit.reader import (
    AuditReader,
    ReaderError,
    field_pattern,
    parse,
    record_time,
)
from appliance.audit.store import AuditLog
from tests.audit.records import make_config, statement


@pytest.fixture
def written(tmp_path: Path) -> tuple[Path, int]:
    config = make_config(tmp_path, segment_bytes=4096)
    log = AuditLog.open(config, version="t")
    for i in range(200):
        log.append(statement(i, session=f"s-{i % 3}", text=f'SELECT "time":"x" -- {i}\n'))
        if i % 50 == 0:
            log.checkpoint_now()
    log.close()
    return config.dir, 203


def test_records_in_order_across_segments(written: tuple[Path, int]) -> None:
    directory, size = written
    reader = AuditReader(directory)
    assert len(reader.segments()) > 5
    entries = list(reader.records())
    assert [e.seq for e in entries] == list(range(size))
    for e in entries:
        record = parse(e.line)
        assert record["seq"] == e.seq
        assert int(e.segment[:12]) <= e.seq
        assert e.leaf == merkle.leaf_hash(e.line)
    assert reader.size() == size
    assert [e.seq for e in reader.records(57, 61)] == [57, 58, 59, 60]
    assert reader.find(100).line == entries[100].line  # type: ignore[union-attr]
    assert reader.find(size) is None
    assert [e.seq for e in reader.records(size - 2)] == [size - 2, size - 1]


def test_a_partial_last_line_is_not_a_record_yet(written: tuple[Path, int]) -> None:
    directory, size = written
    reader = AuditReader(directory)
    _, last = reader.segments()[-1]
    with open(last, "ab") as f:
        f.write(b'{"kind":"query","seq":')  # a writer in the middle of its write
    assert [e.seq for e in reader.records()][-1] == size - 1
    assert reader.size() == size


def test_a_missing_segment_is_an_error(written: tuple[Path, int]) -> None:
    directory, _ = written
    reader = AuditReader(directory)
    reader.segments()[2][1].unlink()
    with pytest.raises(ReaderError, match="but the next segment starts at"):
        list(reader.records())
    with pytest.raises(ReaderError, match="not an audit directory"):
        AuditReader(directory / "segments")


def test_checkpoints(written: tuple[Path, int]) -> None:
    directory, size = written
    reader = AuditReader(directory)
    checkpoints = reader.checkpoints()
    assert checkpoints[-1]["size"] == size and reader.last_checkpoint() == checkpoints[-1]
    assert [c["size"] for c in checkpoints] == sorted(c["size"] for c in checkpoints)
    with open(directory / "checkpoints.jsonl", "ab") as f:
        f.write(b'{"note":"half')
    assert reader.checkpoints() == checkpoints and reader.last_checkpoint() == checkpoints[-1]


def test_fast_field_access_agrees_with_parsing(written: tuple[Path, int]) -> None:
    directory, _ = written
    for entry in AuditReader(directory).records():
        record = json.loads(entry.line)
        assert record_time(entry.line) == record["time"]  # even with "time":"x" inside the SQL text
        if "session" in record:
            assert field_pattern("session", record["session"]) in entry.line
    assert field_pattern("session", 'a"b') == b'"session":"a\\"b"'
