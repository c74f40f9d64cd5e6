"""Reading an audit directory: records in seq order (exact line bytes), and its checkpoints.

Works on a log that is being written (no lock is taken): only complete lines are read,
so a record being appended at that moment — a partial last line — is simply not there
yet. Lines are handed out as bytes; JSON is parsed only by those who need a field
(:func:`parse`), and the commonest filters look at the bytes first: records are canonical
JSON, so a top-level field is found as ``"name":value`` without parsing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from appliance.audit import merkle
from appliance.audit.store_pruned import load_pruned
from appliance.audit.store_segments import last_complete_line, list_segments

READ_CHUNK = 1 << 23
_NL = b"\n"
_TIME_KEY = b'"time":"'


class ReaderError(Exception):
    """The audit directory is not readable as a log (a segment missing, misnamed, …)."""


class Entry(NamedTuple):
    seq: int
    line: bytes  # the record, without its newline: the Merkle leaf data
    segment: str  # the segment file's name, NNNNNNNNNNNN.jsonl

    @property
    def leaf(self) -> bytes:
        return merkle.leaf_hash(self.line)


def parse(line: bytes) -> dict[str, Any]:
    """A record line as a dict (canonical JSON is JSON: the C parser reads it)."""
    return json.loads(line)


def record_time(line: bytes) -> str | None:
    """The record's top-level ``time`` without parsing it.

    In canonical form keys are sorted and a ``"`` inside a string is escaped, so the
    last ``"time":"`` in the line is the top-level key unless an object value sorting after
    it holds a ``time`` key of its own (none in the record types of the format); a record
    whose time is not found that way is parsed.
    """
    i = line.rfind(_TIME_KEY)
    if i >= 0:
        start = i + len(_TIME_KEY)
        end = line.find(b'"', start)
        if end > start:
            return line[start:end].decode("ascii", "replace")
    value = parse(line).get("time")
    return value if isinstance(value, str) else None


def field_pattern(name: str, value: str) -> bytes:
    """The bytes ``"name":"value"`` as canonical JSON writes them (for a quick ``in``)."""
    return b'"' + name.encode() + b'":' + json.dumps(value, ensure_ascii=False).encode("utf-8")


class AuditReader:
    """The records and checkpoints of one audit directory."""

    def __init__(self, directory: Path | str):
        self.dir = Path(directory)
        if not (self.dir / "segments").is_dir():
            raise ReaderError(f"{self.dir}: not an audit directory (no segments/); run `tollgate audit init`")

    def pruned_size(self) -> int:
        """Records retention took off the online log (the first ``pruned_size`` seqs)."""
        try:
            pruned = load_pruned(self.dir)
        except ValueError as exc:
            raise ReaderError(str(exc)) from None
        return pruned.end if pruned is not None else 0

    def segments(self) -> list[tuple[int, Path]]:
        return list_segments(self.dir)

    def checkpoints(self) -> list[dict[str, Any]]:
        """Every checkpoint made, in order (a partial last line is left out)."""
        try:
            data = (self.dir / "checkpoints.jsonl").read_bytes()
        except FileNotFoundError:
            return []
        lines = data.split(_NL)
        lines.pop()  # the empty string after the last newline, or a partial line
        return [json.loads(line) for line in lines if line]

    def last_checkpoint(self) -> dict[str, Any] | None:
        try:
            line = last_complete_line(self.dir / "checkpoints.jsonl")
        except FileNotFoundError:
            return None
        return json.loads(line) if line else None

    def records(self, start: int = 0, stop: int | None = None) -> Iterator[Entry]:
        """Records ``start`` ≤ seq < ``stop`` (or to the end), in order."""
        segments = self.segments()
        if not segments:
            return
        if segments[0][0] != 0 and segments[0][0] != self.pruned_size():
            raise ReaderError(f"{segments[0][1]}: the first segment must start at seq 0, or where retention "
                              "pruned the log (segments are missing)")
        for i, (first, path) in enumerate(segments):
            if stop is not None and first >= stop:
                return
            nxt = segments[i + 1][0] if i + 1 < len(segments) else None
            if nxt is not None and nxt <= start:
                continue
            seq = yield from self._segment(path, first, start, stop)
            if stop is not None and seq >= stop:
                return
            if nxt is not None and seq != nxt:
                raise ReaderError(f"{path}: holds records {first}–{seq - 1}, but the next segment starts at {nxt}")

    def _segment(self, path: Path, first: int, start: int, stop: int | None) -> Iterator[Entry]:
        name = path.name
        seq = first
        rest = b""
        with open(path, "rb") as f:
            while chunk := f.read(READ_CHUNK):
                data = rest + chunk if rest else chunk
                end = data.rfind(_NL)
                if end < 0:
                    rest = data
                    continue
                rest = data[end + 1:]
                complete = data[:end]
                count = complete.count(_NL) + 1
                if seq + count <= start:  # the whole chunk is before ``start``
                    seq += count
                    continue
                for line in complete.split(_NL):
                    if seq >= start:
                        if stop is not None and seq >= stop:
                            return seq
                        yield Entry(seq, line, name)
                    seq += 1
        return seq  # ``rest``: a record being written right now, not complete yet

    def size(self) -> int:
        """How many complete records the log holds now."""
        segments = self.segments()
        if not segments:
            return 0
        first, path = segments[-1]
        count = 0
        with open(path, "rb") as f:
            while chunk := f.read(READ_CHUNK):
                count += chunk.count(_NL)
        return first + count

    def find(self, seq: int) -> Entry | None:
        for entry in self.records(seq, seq + 1):
            return entry
        return None
