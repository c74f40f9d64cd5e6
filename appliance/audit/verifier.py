"""``tollgate-verify``: check an audit export bundle against a pinned root key.

What it checks is listed in docs/audit-format.md ("What tollgate-verify checks"). It needs
only Python, ``cryptography`` and the modules beside it (``make verifier`` packs them into
one zipapp), streams the records (a bundle may hold millions) and names every failure by
file, line, seq, checkpoint size or manifest entry. Records are checked a block of lines
at a time, in worker processes when there are several CPUs; a block with anything wrong
in it is gone over line by line, which is what names the failures.

Usage::

    tollgate-verify BUNDLE --root-key KEY|@FILE [--offbox DIR_OR_FILE]... [--as-of TIME] [--json FILE]
                    [--quiet] [--progress] [--workers N]

Exit status: 0 when everything holds, 1 when anything fails, 2 on a usage error (no root
key pinned, unreadable arguments).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import operator
import os
import queue
import re
import signal
import sys
import threading
import time as _time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import repeat
from pathlib import Path
from typing import Any

from appliance.audit import canonical
from appliance.audit.bundle_layout import CHECKPOINTS, MANIFEST, PROOFS, ROOT_PUB, TRUST, Manifest, parse_manifest
from appliance.audit.bundle_reader import Bundle, BundleError, open_bundle
from appliance.audit.merkle import EMPTY_ROOT, HASH_SIZE, CompactRange, decomposition
from appliance.audit.note import (
    Checkpoint,
    NoteError,
    VerifierKey,
    open_note,
    parse_checkpoint,
    parse_time,
    parse_verifier_key,
    split_note,
)
from appliance.audit.trust import Trust, TrustError, parse_trust
from appliance.masking.pan import (
    CONTEXT,
    PREFILTER,
    find_pans,
    int_is_pan,
    is_pan_digits,
    may_hold_pan,
)

__all__ = ["FIELDS", "Failure", "Report", "main", "verify_bundle"]

# PCI DSS 10.2.2: what every record must say.
FIELDS = ("user", "type", "time", "outcome", "origin", "object")
OUTCOMES = frozenset(("success", "failure"))
RECORD_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z", re.ASCII)
_record_time = RECORD_TIME.fullmatch
OFFBOX_MARK = re.compile(r"tollgate-checkpoint ([A-Za-z0-9+/]+={0,2})")
MAX_FAILURES_PER_KIND = 500
# Records bytes from which checking them in worker processes pays for starting them, and
# the most workers started: the walk (in this process) keeps up with about that many.
_PARALLEL_BYTES = 8 << 20
_MAX_WORKERS = 8
_STEM = re.compile(r"records/([0-9]{12})\.(jsonl|leaves)")
_sha256 = hashlib.sha256


# --- the report ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    kind: str  # bundle, trust, manifest, file, checkpoint, proof, record, fields, pan, offbox, tail-cut
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


@dataclass
class Report:
    bundle: str
    origin: str | None = None
    log_size: int | None = None
    manifest_key: str | None = None
    checkpoints_total: int = 0
    checkpoints_valid: int = 0
    records_total: int = 0
    records_valid: int = 0
    files_total: int = 0
    files_valid: int = 0
    proofs_total: int = 0
    proofs_valid: int = 0
    left_out: int = 0
    offbox_total: int = 0
    offbox_valid: int = 0
    offbox_not_checkable: int = 0
    offbox_ignored: int = 0
    failures: list[Failure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    suppressed: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures and not self.suppressed

    @property
    def failure_count(self) -> int:
        return len(self.failures) + sum(self.suppressed.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "bundle": self.bundle,
            "ok": self.ok,
            "origin": self.origin,
            "log_size": self.log_size,
            "manifest_key": self.manifest_key,
            "checkpoints": {"valid": self.checkpoints_valid, "total": self.checkpoints_total},
            "records": {"valid": self.records_valid, "total": self.records_total, "left_out": self.left_out},
            "files": {"valid": self.files_valid, "total": self.files_total},
            "proofs": {"valid": self.proofs_valid, "total": self.proofs_total},
            "offbox": {"valid": self.offbox_valid, "total": self.offbox_total,
                       "not_checkable": self.offbox_not_checkable, "ignored": self.offbox_ignored},
            "failures": [{"kind": f.kind, "where": f.where, "message": f.message} for f in self.failures],
            "failures_not_listed": dict(self.suppressed),
            "notes": list(self.notes),
            "seconds": round(self.seconds, 3),
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, ensure_ascii=False) + "\n"

    def summary(self) -> str:
        lines = [f"Results for bundle {self.bundle}:"]
        lines.append(f" {self.checkpoints_valid}/{self.checkpoints_total} checkpoints valid")
        lines.append(f" {self.records_valid}/{self.records_total} records valid"
                     + (f" ({self.left_out} left out of the bundle, covered by proofs)" if self.left_out else ""))
        lines.append(f" {self.files_valid}/{self.files_total} files valid")
        lines.append(f" {self.proofs_valid}/{self.proofs_total} proofs valid")
        if self.offbox_total:
            extra = []
            if self.offbox_not_checkable:
                extra.append(f"{self.offbox_not_checkable} not checkable")
            if self.offbox_ignored:
                extra.append(f"{self.offbox_ignored} of other origins ignored")
            lines.append(f" {self.offbox_valid}/{self.offbox_total} off-box checkpoints consistent"
                         + (f" ({', '.join(extra)})" if extra else ""))
        if self.log_size is not None:
            lines.append(f" log size {self.log_size}, origin {self.origin}, manifest signed by {self.manifest_key or '-'}")
        for note in self.notes:
            lines.append(f" note: {note}")
        for f in self.failures:
            lines.append(f"FAILED {f.kind}: {f}")
        for kind, n in self.suppressed.items():
            lines.append(f"FAILED {kind}: … and {n} more not listed")
        if self.ok:
            lines.append("Bundle verified: everything holds.")
        else:
            lines.append(f"Bundle FAILED verification: {self.failure_count} problem(s).")
        return "\n".join(lines) + "\n"


# --- helpers ---------------------------------------------------------------------------------


def _mask(digits_and_separators: bytes) -> str:
    """A card number with every digit but the last four starred (separators kept)."""
    raw = digits_and_separators.decode("ascii", "replace")
    total = sum(c.isdigit() for c in raw)
    out = []
    seen = 0
    for c in raw:
        if c.isdigit():
            seen += 1
            out.append(c if seen > total - 4 else "*")
        else:
            out.append(c)
    return "".join(out)


_LONG_DIGITS = re.compile(r"[0-9](?:[ -]?[0-9]){5,}")


def _redact(message: str) -> str:
    """A message quoting record content with every run of 6+ digits starred: what a
    record holds may be a card number the detector cannot see whole in an excerpt."""
    return _LONG_DIGITS.sub(lambda m: re.sub(r"[0-9]", "*", m.group()), message)


def _format_path(trail: tuple[Any, ...]) -> str:
    out = "$"
    for part in trail:
        if type(part) is int:
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part):
            out += f".{part}"
        else:
            out += f"[{json.dumps(part, ensure_ascii=True)}]"
    return out


def _hex_param(s: str) -> bytes | None:
    """The bytes of a ``\\x…`` hex string (how binary parameters are shown), else None."""
    if len(s) > 2 and s[0] == "\\" and s[1] == "x" and len(s) % 2 == 0 and _HEX.fullmatch(s, 2):
        return bytes.fromhex(s[2:])
    return None


_HEX = re.compile(r"[0-9a-fA-F]+")


_MIN = 13  # the fewest digits a card number has
_MIN_INT = 10 ** (_MIN - 1)


def _scan_str(s: str, trail: tuple[Any, ...], suffix: str, found: list[tuple[str, str]]) -> None:
    data = s.encode("utf-8", "surrogatepass")
    if PREFILTER.search(data) is not None:
        for a, b in find_pans(data):
            found.append((_format_path(trail) + suffix, _mask(data[a:b])))
    if s[:2] == "\\x":
        raw = _hex_param(s)
        if raw is not None and may_hold_pan(raw):
            for a, b in find_pans(raw):
                found.append((_format_path(trail) + suffix + " (hex)", _mask(raw[a:b])))


def _scan(obj: Any, trail: tuple[Any, ...], found: list[tuple[str, str]]) -> None:
    t = type(obj)
    if t is str:
        if len(obj) >= _MIN:
            _scan_str(obj, trail, "", found)
    elif t is dict:
        for key, value in obj.items():
            if len(key) >= _MIN:
                _scan_str(key, trail + (key,), " (key)", found)
            vt = type(value)
            if (vt is str and len(value) < _MIN) or value is None or vt is bool:
                continue
            _scan(value, trail + (key,), found)
    elif t is list:
        for i, value in enumerate(obj):
            vt = type(value)
            if (vt is str and len(value) < _MIN) or value is None or vt is bool:
                continue
            _scan(value, trail + (i,), found)
    elif t is int and (obj >= _MIN_INT or obj <= -_MIN_INT) and int_is_pan(obj):
        found.append((_format_path(trail), _mask(str(abs(obj)).encode())))


def find_clear_pans(obj: Any) -> list[tuple[str, str]]:
    """(JSON path, masked PAN) for each card number in a string, key or integer of ``obj``
    (``\\x…`` hex strings are decoded first, as binary parameters are shown that way)."""
    found: list[tuple[str, str]] = []
    _scan(obj, (), found)
    return found


_ESCAPE = re.compile(rb'\\(?:u[0-9a-fA-F]{4}|.)', re.DOTALL)
# Shorter hex strings cannot hold 13 digits.
_HEX_STRING = re.compile(rb'"\\\\x([0-9a-fA-F]{13,})"')
_HEX_MARK = b'"\\\\x'
# Digits, spaces and dashes to "0", the rest to "x": every card number, and every digit
# the detector looks at to decide one, lies in a run of 13 or more zeros of this.
_RUN_TABLE = bytes(0x30 if 0x30 <= i <= 0x39 or i in b" -" else 0x78 for i in range(256))
_THIRTEEN = b"0" * 13


def _line_may_hold_pan(line: bytes) -> bool:
    """False when no string, key or integer of this *canonical* line holds a card number.

    In a canonical line a string's text appears verbatim between quotes except for escapes,
    and escapes stand only for quote, backslash and control characters, which the detector
    treats like the quotes: as plain boundaries. With every escape replaced by one such
    character, a PAN in any string (or integer) is a PAN in the line. Hex-encoded binary
    parameters (``"\\\\x…"``) are looked at on their own.

    The detector is run only where a card number can be: on each run of 13 or more digits,
    spaces and dashes, with the CONTEXT bytes either side (detection is local: that is all
    it looks at, see appliance.masking.pan). A run of plain digits is a card number only
    as a whole (a candidate has no digit on either side), so ``is_pan_digits`` settles it.
    """
    if not may_hold_pan(line):  # linear, in C: no 13 digits in a row, raw or hex-encoded
        return False
    if b"\\" in line:
        for m in _HEX_STRING.finditer(line):
            if may_hold_pan(m.group(1)):
                return True
        line = _ESCAPE.sub(b"\x01", line)
    runs = line.translate(_RUN_TABLE)
    at = runs.find(_THIRTEEN)
    while at >= 0:
        start = runs.rfind(b"x", 0, at) + 1
        end = runs.find(b"x", at)
        if end < 0:
            end = len(line)
        digits = line[start:end].strip(b" -")
        if digits.isdigit():
            if is_pan_digits(digits):
                return True
        elif find_pans(line, max(0, start - CONTEXT), min(len(line), end + CONTEXT)):
            return True
        at = runs.find(_THIRTEEN, end)
    return False


def _flagged_lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(index, line) of the lines of ``data`` (canonical lines, each ending in a newline)
    that ``_line_may_hold_pan`` may say yes to, found by searching the whole block in C.

    A line is passed over when its only runs of 13 or more digits, spaces and dashes are
    plain digits that are not a card number (``is_pan_digits``), as ``_line_may_hold_pan``
    would find — unless a run follows a "u": the hex digits of a ``\\u00XX`` escape may
    start it, and that escape is a boundary once replaced. Hex strings as there.
    """
    starts = set()
    runs = data.translate(_RUN_TABLE)
    at = runs.find(_THIRTEEN)
    while at >= 0:
        start = runs.rfind(b"x", 0, at) + 1
        end = runs.find(b"x", at)  # every line ends in a newline, an "x"
        digits = data[start:end].strip(b" -")
        if not digits.isdigit() or is_pan_digits(digits) or data[start - 1:start] == b"u":
            starts.add(data.rfind(b"\n", 0, start) + 1)
        at = runs.find(_THIRTEEN, end)
    if _HEX_MARK in data:
        for m in _HEX_STRING.finditer(data):
            if may_hold_pan(m.group(1)):
                starts.add(data.rfind(b"\n", 0, m.start()) + 1)
    index = counted = 0
    for start in sorted(starts):
        index += data.count(b"\n", counted, start)
        counted = start
        yield index, data[start:data.find(b"\n", start)]


# --- the per-record checks -------------------------------------------------------------------


_FIELD_VALUES = operator.itemgetter("seq", *FIELDS)


def _fields_ok(obj: Any) -> bool:
    """Is ``obj`` a record with an integer seq and every 10.2.2 field well formed?"""
    try:
        seq, user, kind, when, outcome, origin, what = _FIELD_VALUES(obj)
    except (KeyError, TypeError):
        return False
    return (type(seq) is int and seq >= 0 and type(user) is str and type(kind) is str and type(when) is str
            and type(origin) is str and type(what) is str and user != "" and kind != "" and origin != ""
            and what != "" and (outcome == "success" or outcome == "failure") and _record_time(when) is not None)


def _field_problems(obj: dict[str, Any]) -> list[str]:
    """What is wrong with the 10.2.2 fields of ``obj`` (messages quote no digit runs)."""
    problems = []
    missing = [f for f in FIELDS if type(obj.get(f)) is not str or not obj.get(f)]
    if missing:
        problems.append(f"PCI DSS 10.2.2 field(s) missing or empty: {', '.join(missing)}")
    outcome = obj.get("outcome")
    if "outcome" not in missing and outcome not in OUTCOMES:
        problems.append(_redact(f"outcome {str(outcome)[:40]!r} is not success or failure"))
    when = obj.get("time")
    if "time" not in missing and RECORD_TIME.fullmatch(when) is None:
        problems.append(_redact(f"time {when[:40]!r} is not YYYY-MM-DDTHH:MM:SS.ffffffZ"))
    return problems


def _record_problems(line: bytes) -> tuple[dict[str, Any] | None, list[tuple[str, bool, str]]]:
    """Parse and check one record line: canonical JSON, 10.2.2 fields, no clear PAN.

    The record (None unless it is a JSON object) and what is wrong with it, each as
    (kind, whether the report names the record's seq, message).
    """
    problems: list[tuple[str, bool, str]] = []
    try:
        obj = canonical.loads_canonical(line)
        canonical_form = True
    except canonical.CanonicalError as exc:
        problems.append(("record", False, _redact(f"not canonical JSON: {exc}")))
        try:
            obj = canonical.loads(line)
        except canonical.CanonicalError:
            return None, problems
        canonical_form = False
    if type(obj) is not dict:
        problems.append(("record", False, "not a JSON object"))
        return None, problems
    if not _fields_ok(obj):
        seq = obj.get("seq")
        if type(seq) is not int or seq < 0:
            problems.append(("fields", False, "no integer seq"))
        problems.extend(("fields", True, message) for message in _field_problems(obj))
    if not canonical_form or _line_may_hold_pan(line):
        for path, masked in find_clear_pans(obj):
            problems.append(("pan", True, f"clear PAN at {path} ({masked})"))
    return obj, problems


def _check_block(data: bytes) -> tuple[bytes, Sequence[int]] | None:
    """A block of whole record lines: if no line has a problem (``_record_problems``), their
    leaf hashes (concatenated) and seqs (a range when consecutive); else None, and the walk
    takes the block line by line, naming what is wrong. Runs in worker processes.
    """
    objs = canonical.loads_canonical_lines(data)
    if objs is None or not all(map(_fields_ok, objs)):
        return None
    for index, line in _flagged_lines(data):
        if _line_may_hold_pan(line) and find_clear_pans(objs[index]):
            return None
    lines = data.split(b"\n")
    lines.pop()
    hashes = b"".join([_sha256(b"\x00" + line).digest() for line in lines])
    seqs = [obj["seq"] for obj in objs]
    span = range(seqs[0], seqs[0] + len(seqs)) if seqs else range(0)
    return hashes, (span if seqs == list(span) else seqs)


_BLOCK = 1 << 17  # bytes of a records file read (and checked, maybe by a worker) at a time


class _Lines:
    """The lines of one bundle member, streamed in blocks of whole lines; hashes the member's
    bytes as it goes (``sha256``/``size`` are final once it was read to the end).

    ``next_block`` hands out blocks ``(bytes, whole, check)``: whole blocks end in a
    newline (the member's last block may be a partial line); ``check`` is None or gives
    ``checker``'s verdict on the block, worked out ahead (maybe in other processes). Each
    block is then either ``skip``ped (its lines were dealt with; ``lineno`` is the number
    of its first line) or ``unpack``ed: ``next``/``peek`` hand out single lines ``(number,
    bytes, complete)``, from the block last unpacked, then block by block.
    """

    def __init__(self, bundle: Bundle, name: str, checker: _Checker | None = None) -> None:
        self.name = name
        self.sha256: str | None = None
        self.size = 0
        self.error: str | None = None
        self.lineno = 1  # of the first line of the block handed out next
        self._blocks = self._read(bundle, name)
        self._checker = checker
        self._ahead: deque[tuple[bytes, bool, Callable[[], Any] | None]] = deque()
        self._lines: deque[tuple[int, bytes, bool]] = deque()

    def _read(self, bundle: Bundle, name: str) -> Iterator[tuple[bytes, bool]]:
        sha = _sha256()
        pending: list[bytes] = []
        with bundle.open(name) as f:
            while True:
                try:
                    chunk = f.read(_BLOCK)
                except BundleError as exc:
                    self.error = str(exc)
                    break
                if not chunk:
                    break
                sha.update(chunk)
                self.size += len(chunk)
                cut = chunk.rfind(b"\n") + 1
                if not cut:
                    pending.append(chunk)
                    continue
                block = b"".join((*pending, chunk[:cut])) if pending else chunk[:cut]
                pending = [chunk[cut:]] if cut < len(chunk) else []
                yield block, True
        self.sha256 = sha.hexdigest()
        if pending:
            yield b"".join(pending), False

    def next_block(self) -> tuple[bytes, bool, Callable[[], Any] | None] | None:
        ahead = self._ahead
        checker = self._checker
        while len(ahead) <= (checker.depth if checker is not None else 0):
            item = next(self._blocks, None)
            if item is None:
                break
            data, whole = item
            ahead.append((data, whole, checker.submit(data) if checker is not None and whole else None))
        return ahead.popleft() if ahead else None

    def skip(self, lines: int) -> None:
        """The block handed out last held this many lines, all dealt with."""
        self.lineno += lines

    def unpack(self, block: tuple[bytes, bool, Any], skip: int = 0) -> None:
        """Hand out the lines of ``block`` (the one handed out last) from its ``skip``-th on."""
        data, whole, _check = block
        lineno = self.lineno
        if not whole:
            self._lines.append((lineno, data, False))
            self.lineno += 1
            return
        lines = data.split(b"\n")
        lines.pop()
        self._lines.extend(zip(range(lineno + skip, lineno + len(lines)), lines[skip:], repeat(True)))
        self.lineno += len(lines)

    @property
    def pending(self) -> bool:
        """Are lines of an unpacked block still to be handed out?"""
        return bool(self._lines)

    def next(self) -> tuple[int, bytes, bool] | None:
        if not self._lines:
            block = self.next_block()
            if block is None:
                return None
            self.unpack(block)
        return self._lines.popleft()

    def peek(self) -> tuple[int, bytes, bool] | None:
        if not self._lines:
            block = self.next_block()
            if block is None:
                return None
            self.unpack(block)
        return self._lines[0]


class _Leaves:
    """The 32-byte entries of a .leaves member, streamed; hashes the member's bytes."""

    def __init__(self, bundle: Bundle | None, name: str) -> None:
        self.name = name
        self.count = 0
        self.sha256: str | None = None
        self.size = 0
        self.partial = 0
        self.error: str | None = None
        self._f = bundle.open(name) if bundle is not None else None
        self._sha = _sha256()
        self._buf = b""
        self._at = 0

    def _fill(self, want: int) -> int:
        """Read on until ``want`` bytes are buffered (or the member ends); how many are."""
        while len(self._buf) - self._at < want and self._f is not None:
            try:
                chunk = self._f.read(max(want, HASH_SIZE * 32768))
            except BundleError as exc:
                self.error = str(exc)
                chunk = b""
            if not chunk:
                self._f.close()
                self._f = None
                self.sha256 = self._sha.hexdigest()
                break
            self._sha.update(chunk)
            self.size += len(chunk)
            self._buf = self._buf[self._at:] + chunk
            self._at = 0
        return len(self._buf) - self._at

    def next(self) -> bytes | None:
        if self._fill(HASH_SIZE) < HASH_SIZE:
            return None
        at = self._at
        self._at = at + HASH_SIZE
        self.count += 1
        return self._buf[at:at + HASH_SIZE]

    def peek(self, n: int) -> bytes:
        """The next ``n`` entries (fewer if the member ends first), not consumed."""
        have = min(self._fill(n * HASH_SIZE), n * HASH_SIZE)
        return self._buf[self._at:self._at + have - have % HASH_SIZE]

    def skip(self, n: int) -> None:
        """Consume ``n`` entries (``peek`` has shown they are there)."""
        self._at += n * HASH_SIZE
        self.count += n

    def remaining(self) -> int:
        """Count (and consume) the entries left; finishes hashing (``partial``: the bytes
        of an incomplete last entry)."""
        n = 0
        while self.next() is not None:
            n += 1
        self.partial = len(self._buf) - self._at
        return n


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _serve(conn: Any, parent_ends: list[Any]) -> None:
    """A worker process: checks the blocks it is sent, sends back (number, verdict)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    for end in parent_ends:  # inherited: closed, so that the parent's going away ends this
        end.close()
    try:
        while (item := conn.recv()) is not None:
            number, data = item
            try:
                verdict = (number, True, _check_block(data))
            except Exception:  # noqa: BLE001 - a bug: the parent checks the block itself, and sees it
                verdict = (number, False, None)
            conn.send(verdict)
    except (EOFError, OSError):  # the parent is gone
        pass


def _send(conn: Any, outbox: queue.SimpleQueue) -> None:
    """Sends a worker what is put in ``outbox`` (so the walk never waits for a busy worker
    to take a block), None last."""
    try:
        while (item := outbox.get()) is not None:
            conn.send(item)
        conn.send(None)
    except OSError:  # the worker is gone (its verdicts: see _collect)
        pass


def _collect(conn: Any, results: queue.SimpleQueue) -> None:
    """Reads a worker's verdicts as they come (so the worker never waits to send one and
    always goes back to reading blocks: sending it one cannot deadlock), None at its end."""
    try:
        while True:
            results.put(conn.recv())
    except (EOFError, OSError):
        results.put(None)


class _Checker:
    """Runs ``_check_block`` on the blocks of the records files: in ``workers`` forked
    processes, ``depth`` blocks ahead of the walk (so memory stays bounded), or — with one
    worker, where fork is missing, or while other threads run (forking them is unsafe) —
    in this process when the walk reaches the block. A block whose worker is gone (killed)
    is checked here.

    Fork, not spawn: a child needs nothing re-imported, and the zipapp's ``__main__`` (which
    runs the verifier unguarded) is never run again in it. Each worker has a thread that
    sends it blocks and one that takes its verdicts, started once every fork is done.
    """

    def __init__(self, workers: int) -> None:
        self.depth = 0
        self._conns: list[Any] = []
        self._procs: list[Any] = []
        self._outboxes: list[queue.SimpleQueue] = []
        self._results: list[queue.SimpleQueue] = []
        self._threads: list[threading.Thread] = []
        self._sent = 0
        if workers <= 1 or threading.active_count() > 1:
            return
        import multiprocessing

        if "fork" not in multiprocessing.get_all_start_methods():
            return
        context = multiprocessing.get_context("fork")
        try:
            for _ in range(workers):
                conn, theirs = context.Pipe()
                self._conns.append(conn)
                proc = context.Process(target=_serve, args=(theirs, self._conns), daemon=True)
                try:
                    proc.start()
                finally:
                    theirs.close()
                self._procs.append(proc)
        except OSError:
            self.close()
            return
        for conn in self._conns:
            outbox: queue.SimpleQueue = queue.SimpleQueue()
            results: queue.SimpleQueue = queue.SimpleQueue()
            for target, box in ((_send, outbox), (_collect, results)):
                thread = threading.Thread(target=target, args=(conn, box), daemon=True)
                thread.start()
                self._threads.append(thread)
            self._outboxes.append(outbox)
            self._results.append(results)
        self.depth = 2 * workers

    def submit(self, data: bytes) -> Callable[[], Any]:
        """Start checking ``data``; the returned function gives the verdict. Verdicts must
        be asked for in the order blocks were submitted (some may never be)."""
        if not self._conns:
            return lambda: _check_block(data)
        number = self._sent
        self._sent += 1
        which = number % len(self._conns)
        self._outboxes[which].put((number, data))
        results = self._results[which]

        def verdict() -> Any:
            while (item := results.get()) is not None:
                got, ok, value = item
                if got == number:
                    return value if ok else _check_block(data)
                # (the verdict on an earlier block the walk went through line by line)
            results.put(None)  # the worker is gone: check it here
            return _check_block(data)
        return verdict

    def close(self) -> None:
        for outbox in self._outboxes:
            outbox.put(None)
        for thread in self._threads:
            thread.join()
        for conn in self._conns:
            conn.close()  # a worker that was never sent None reads the end of its input
        for proc in self._procs:
            proc.join()
        self._conns, self._procs, self._outboxes, self._results, self._threads = [], [], [], [], []
        self.depth = 0


@dataclass
class _Checkpoint:
    size: int
    root: bytes
    time: str | None
    where: str
    valid: bool


@dataclass
class _Gap:
    start: int
    end: int
    nodes: list[tuple[int, bytes]]  # (level, hash)
    where: str


@dataclass
class _Offbox:
    where: str
    cp: Checkpoint


# --- the verifier ----------------------------------------------------------------------------


class _Verifier:
    def __init__(self, path: Path, root: VerifierKey, offbox: Sequence[Path],
                 progress: Callable[[int, int], None] | None, as_of: str | None, workers: int | None) -> None:
        self.path = path
        self.workers = workers
        self.root = root
        self.offbox_sources = list(offbox)
        self.progress = progress
        self.as_of = as_of
        self.report = Report(str(path))
        self.hashed: dict[str, tuple[str, int]] = {}
        self.trust: Trust | None = None
        self.manifest: Manifest | None = None
        self.origin: str | None = None
        self.log_size = 0
        self.checkpoints: list[_Checkpoint] = []
        self.gaps: list[_Gap] = []
        self.offbox_wanted: dict[int, list[_Offbox]] = {}
        self.fail_counts: dict[str, int] = {}

    def fail(self, kind: str, where: str, message: str) -> None:
        n = self.fail_counts.get(kind, 0) + 1
        self.fail_counts[kind] = n
        if n > MAX_FAILURES_PER_KIND:
            self.report.suppressed[kind] = self.report.suppressed.get(kind, 0) + 1
        else:
            self.report.failures.append(Failure(kind, where, message))

    # -- the steps --

    def run(self) -> Report:
        started = _time.monotonic()
        try:
            bundle = open_bundle(self.path)
        except BundleError as exc:
            self.fail("bundle", str(self.path), str(exc))
            return self.report
        with bundle:
            self.bundle = bundle
            for problem in bundle.problems:
                self.fail("bundle", "archive", problem)
            try:
                self.read_trust()
                self.read_manifest()
                self.read_keys()
                self.read_checkpoints()
                self.read_proofs()
                self.read_offbox()
                self.walk()
                self.check_files()
                self.check_filter()
            except (BundleError, OSError, EOFError) as exc:  # a damaged archive mid-read
                self.fail("bundle", str(self.path), f"verification stopped: {exc}")
        self.report.seconds = _time.monotonic() - started
        return self.report

    def _read_small(self, name: str) -> bytes | None:
        if name not in self.bundle:
            return None
        try:
            data = self.bundle.read(name)
        except BundleError as exc:
            self.fail("file", name, str(exc))
            return None
        self.hashed[name] = (_sha256(data).hexdigest(), len(data))
        return data

    def read_trust(self) -> None:
        data = self._read_small(TRUST)
        if data is None:
            self.fail("trust", TRUST, "missing: no signing key can be trusted")
            return
        try:
            self.trust = parse_trust(data.decode("utf-8", "strict"), self.root)
        except (NoteError, UnicodeDecodeError) as exc:
            self.fail("trust", TRUST, str(exc))
            return
        self.origin = self.report.origin = self.trust.origin

    def read_manifest(self) -> None:
        data = self._read_small(MANIFEST)
        if data is None:
            self.fail("manifest", MANIFEST, "missing: the bundle's file list is unsigned")
            return
        try:
            note = data.decode("utf-8")
            text, _sigs = split_note(note)
        except (NoteError, UnicodeDecodeError) as exc:
            self.fail("manifest", MANIFEST, f"malformed: {exc}")
            return
        try:
            manifest = parse_manifest(text)
        except NoteError as exc:
            self.fail("manifest", MANIFEST, str(exc))
            return
        self.manifest = manifest
        if self.origin is None:
            self.origin = self.report.origin = manifest.origin
        elif manifest.origin != self.origin:
            self.fail("manifest", MANIFEST, f"origin {manifest.origin!r} differs from the trust file's {self.origin!r}")
        if self.trust is None:
            self.fail("manifest", MANIFEST, "signature not checked: no trusted keys (see trust.note)")
            return
        try:
            _text, keys = open_note(note, self.trust.verifier_keys())
        except NoteError as exc:
            self.fail("manifest", MANIFEST, f"signature: {exc}")
            return
        problems = []
        for key in keys:
            try:
                self.trust.check(key.name, key.key_hash, manifest.log_size)
            except TrustError as exc:
                problems.append(exc.reason)
                continue
            self.report.manifest_key = key.label
            break
        else:
            self.fail("manifest", MANIFEST, f"signature: {'; '.join(problems)}")

    def read_keys(self) -> None:
        data = self._read_small(ROOT_PUB)
        if data is not None and data.decode("utf-8", "replace").strip() != str(self.root):
            self.report.notes.append(f"{ROOT_PUB} differs from the pinned root key (the pinned key is what counts)")
        for name in self.bundle.names:
            if name.startswith("keys/") and name != ROOT_PUB:
                raw = self._read_small(name)
                assert raw is not None
                try:
                    key = parse_verifier_key(raw.decode("utf-8"))
                except (NoteError, UnicodeDecodeError) as exc:
                    self.report.notes.append(f"{name}: not a verifier key ({exc})")
                    continue
                if name != f"keys/{key.key_id}.pub":
                    self.report.notes.append(f"{name}: holds key {key.label}, not the key its name says")
                if self.trust is not None and self.trust.entry(key.name, key.key_hash) is None:
                    self.report.notes.append(f"{name}: key {key.label} is not in the trust file")

    def read_checkpoints(self) -> None:
        if CHECKPOINTS not in self.bundle:
            self.fail("checkpoint", CHECKPOINTS, "missing: nothing ties the records to a signed tree head")
            return
        lines = _Lines(self.bundle, CHECKPOINTS)
        keys = self.trust.verifier_keys() if self.trust is not None else []
        last = -1
        roots: dict[int, _Checkpoint] = {}
        while (item := lines.next()) is not None:
            lineno, line, complete = item
            where = f"{CHECKPOINTS} line {lineno}"
            self.report.checkpoints_total += 1
            if not complete:
                self.fail("checkpoint", where, "partial last line (no newline): the file is truncated")
                continue
            try:
                obj = canonical.loads_canonical(line)
                if not isinstance(obj, dict) or set(obj) != {"note", "size", "time"} or not isinstance(obj["note"], str):
                    raise canonical.CanonicalError('want {"note": …, "size": …, "time": …}')
                text, _sigs = split_note(obj["note"])
                cp = parse_checkpoint(text)
            except (canonical.CanonicalError, NoteError) as exc:
                self.fail("checkpoint", where, f"malformed: {exc}")
                continue
            where = f"checkpoint size {cp.size} ({CHECKPOINTS} line {lineno})"
            valid = True
            if obj["size"] != cp.size or obj["time"] != cp.time:
                self.fail("checkpoint", where, f"size/time fields ({obj['size']}, {obj['time']}) differ from the note's")
                valid = False
            if self.origin is not None and cp.origin != self.origin:
                self.fail("checkpoint", where, f"origin {cp.origin!r} is not the log's {self.origin!r}")
                valid = False
            if self.trust is None:
                self.fail("checkpoint", where, "signature not checked: no trusted keys")
                valid = False
            else:
                valid = self._check_signature("checkpoint", where, obj["note"], keys, cp.size) and valid
            if cp.size < last:
                self.fail("checkpoint", where, f"tree size decreases (after a checkpoint of size {last})")
                valid = False
            last = max(last, cp.size)
            entry = _Checkpoint(cp.size, cp.root, cp.time, where, valid)
            other = roots.setdefault(cp.size, entry)
            if other.root != cp.root:
                self.fail("checkpoint", where, f"root differs from the other checkpoint of size {cp.size} ({other.where}): the log forked")
                entry.valid = False
            self.checkpoints.append(entry)
        self.hashed[CHECKPOINTS] = (lines.sha256 or "", lines.size)
        if lines.error:
            self.fail("file", CHECKPOINTS, lines.error)
        if not self.checkpoints:
            self.fail("checkpoint", CHECKPOINTS, "no checkpoints: nothing ties the records to a signed tree head")
        self.log_size = max(last, 0)
        if self.manifest is not None and self.manifest.log_size != self.log_size:
            self.fail("manifest", MANIFEST, f"log-size {self.manifest.log_size} is not the last checkpoint's size {self.log_size}")
            self.log_size = max(self.log_size, self.manifest.log_size)
        self.report.log_size = self.log_size

    def _check_signature(self, kind: str, where: str, note: str, keys: list[VerifierKey], size: int) -> bool:
        assert self.trust is not None
        try:
            _text, good = open_note(note, keys)
        except NoteError as exc:
            msg = str(exc)
            if msg.startswith("no known key: signed by "):
                msg = msg[len("no known key: signed by "):] + " (not in the trust file)"
            self.fail(kind, where, msg)
            return False
        reasons = []
        for key in good:
            try:
                self.trust.check(key.name, key.key_hash, size)
                return True
            except TrustError as exc:
                reasons.append(exc.reason)
        self.fail(kind, where, "; ".join(reasons))
        return False

    def read_proofs(self) -> None:
        if PROOFS not in self.bundle:
            self.fail("proof", PROOFS, "missing")
            return
        lines = _Lines(self.bundle, PROOFS)
        cut_sizes = sorted({c.size for c in self.checkpoints})
        prev_end = 0
        while (item := lines.next()) is not None:
            lineno, line, complete = item
            where = f"{PROOFS} line {lineno}"
            self.report.proofs_total += 1
            if not complete:
                self.fail("proof", where, "partial last line (no newline): the file is truncated")
                continue
            try:
                obj = canonical.loads_canonical(line)
                if not isinstance(obj, dict) or set(obj) != {"start", "end", "hashes"}:
                    raise canonical.CanonicalError('want {"start": …, "end": …, "hashes": […]}')
                start, end, hashes = obj["start"], obj["end"], obj["hashes"]
                if type(start) is not int or type(end) is not int or not isinstance(hashes, list):
                    raise canonical.CanonicalError("start and end must be integers, hashes a list")
                where = f"{PROOFS} line {lineno} (seq {start}–{end - 1})"
                if not 0 <= start < end <= self.log_size:
                    raise canonical.CanonicalError(f"range [{start}, {end}) is not within the log [0, {self.log_size})")
                shape = decomposition(start, end)
                if len(hashes) != len(shape):
                    raise canonical.CanonicalError(f"{len(hashes)} hashes, the range needs {len(shape)}")
                nodes = []
                for (_s, level), h in zip(shape, hashes):
                    raw = base64.b64decode(h, validate=True) if isinstance(h, str) else b""
                    if len(raw) != HASH_SIZE:
                        raise canonical.CanonicalError("a hash is not base64 of 32 bytes")
                    nodes.append((level, raw))
            except (canonical.CanonicalError, ValueError) as exc:
                self.fail("proof", where, f"malformed: {exc}")
                continue
            if start < prev_end:
                self.fail("proof", where, f"overlaps or precedes the previous proof (which ends at {prev_end})")
                continue
            inside = [s for s in cut_sizes if start < s < end]
            if inside:
                self.fail("proof", where, f"spans checkpoint size {inside[0]}: that checkpoint cannot be checked")
            prev_end = end
            self.gaps.append(_Gap(start, end, nodes, where))
            self.report.left_out += end - start
            if not inside:
                self.report.proofs_valid += 1
        self.hashed[PROOFS] = (lines.sha256 or "", lines.size)
        if lines.error:
            self.fail("file", PROOFS, lines.error)

    def read_offbox(self) -> None:
        items: list[tuple[str, str]] = []
        for src in self.offbox_sources:
            if src.is_dir():
                for f in sorted(src.glob("*.note")):
                    try:
                        items.append((str(f), f.read_text("utf-8")))
                    except (OSError, UnicodeDecodeError) as exc:
                        self.fail("offbox", str(f), f"unreadable: {exc}")
            else:
                try:
                    text = src.read_text("utf-8", "replace")
                except OSError as exc:
                    self.fail("offbox", str(src), f"unreadable: {exc}")
                    continue
                for lineno, line in enumerate(text.splitlines(), 1):
                    for m in OFFBOX_MARK.finditer(line):
                        try:
                            note = base64.b64decode(m.group(1), validate=True).decode("utf-8")
                        except (ValueError, UnicodeDecodeError):
                            items.append((f"{src} line {lineno}", "\x00"))  # reported as malformed below
                            continue
                        items.append((f"{src} line {lineno}", note))
        keys = self.trust.verifier_keys() if self.trust is not None else []
        cp_roots = {c.size: c for c in self.checkpoints}
        last_time = max((parse_time(c.time) for c in self.checkpoints if c.time), default=None)
        limit = self._tail_limit(last_time)
        for where, note in items:
            self.report.offbox_total += 1
            try:
                text, _sigs = split_note(note)
                cp = parse_checkpoint(text)
            except NoteError as exc:
                self.fail("offbox", where, f"not a checkpoint: {exc}")
                continue
            if self.origin is not None and cp.origin != self.origin:
                self.report.offbox_total -= 1
                self.report.offbox_ignored += 1
                continue
            where = f"off-box checkpoint size {cp.size} ({where})"
            if self.trust is None or not self._check_signature("offbox", where, note, keys, cp.size):
                continue
            if cp.size > self.log_size:
                t = parse_time(cp.time) if cp.time else None
                if t is not None and limit is not None and t < limit:
                    self.fail("tail-cut", where,
                              f"tail cut: off-box checkpoint size {cp.size} at {cp.time} is beyond the bundle's log "
                              f"(size {self.log_size})")
                else:
                    self.report.offbox_valid += 1
                    self.report.notes.append(f"{where}: later than the bundle (size {cp.size} > {self.log_size})")
            elif cp.size in cp_roots:
                if cp_roots[cp.size].root == cp.root:
                    self.report.offbox_valid += 1
                else:
                    self.fail("offbox", where, f"root differs from the bundle's checkpoint of that size "
                                               f"({cp_roots[cp.size].where}): the log was rewritten")
            else:
                self.offbox_wanted.setdefault(cp.size, []).append(_Offbox(where, cp))

    def _tail_limit(self, last_cp_time: datetime | None) -> datetime | None:
        """Off-box checkpoints beyond the log made before this time show its tail was cut.

        The bundle's log-size is the log's size when it was exported, so the bound is the
        manifest's ``created`` (an export filter's ``to`` does not bound it), never earlier
        than the bundle's last checkpoint (sizes never shrink; this holds even if
        ``created`` was back-dated), or the auditor's ``--as-of``.
        """
        candidates = []
        if last_cp_time is not None:
            candidates.append(last_cp_time)
        if self.manifest is not None:
            candidates.append(parse_time(self.manifest.created))
        if self.as_of is not None:
            candidates.append(parse_time(self.as_of))
        return max(candidates) if candidates else None

    # -- the walk over positions 0 … log-size --

    def walk(self) -> None:
        log_size = self.log_size
        # Events: checkpoint sizes and off-box sizes, checked when the walk's range ends there.
        events: dict[int, list[Any]] = {}
        for c in self.checkpoints:
            events.setdefault(c.size, []).append(c)
        for size, lst in self.offbox_wanted.items():
            events.setdefault(size, []).extend(lst)
        self.events = events
        self.event_sizes = sorted(events)
        self.event_i = 0
        self.cr: CompactRange | None = CompactRange()
        self.broken_at: int | None = None
        self.unchecked: list[Any] = []
        self.p = 0
        self.gap_i = 0
        self.stems = self._record_files()
        self.progress_next = 0 if self.progress is not None else 1 << 62
        self._events_at(0)
        self._skip_gaps()
        self.checker = _Checker(self._workers_wanted())
        try:
            for i, stem in enumerate(self.stems):
                start = int(stem)
                end = int(self.stems[i + 1]) if i + 1 < len(self.stems) else max(log_size, start)
                end = min(end, log_size) if start < log_size else start
                self._missing_until(min(start, log_size), None, "no records file holds it and no proof covers it")
                self._walk_file(stem, start, end)
        finally:
            self.checker.close()
        self._missing_until(log_size, None, "no records file holds it and no proof covers it")
        # Whatever events were never reached.
        while self.event_i < len(self.event_sizes):
            size = self.event_sizes[self.event_i]
            self.event_i += 1
            self.unchecked.extend(self.events[size])
        self._report_unchecked()

    def _workers_wanted(self) -> int:
        """Worker processes for checking records: one per usable CPU (up to _MAX_WORKERS)
        when there are enough records to be worth starting them; ``workers`` if given."""
        if self.workers is not None:
            return self.workers
        size = sum(self.bundle.size(f"records/{stem}.jsonl") for stem in self.stems)
        return min(_usable_cpus(), _MAX_WORKERS) if size >= _PARALLEL_BYTES else 1

    def _record_files(self) -> list[str]:
        stems: set[str] = set()
        for name in self.bundle.names:
            if name.startswith("records/"):
                m = _STEM.fullmatch(name)
                if m is None:
                    self.fail("file", name, "not a records file name (records/NNNNNNNNNNNN.jsonl or .leaves)")
                    continue
                stems.add(m.group(1))
        out = []
        for stem in sorted(stems):
            if f"records/{stem}.jsonl" not in self.bundle:
                self.fail("file", f"records/{stem}.leaves", f"has no records/{stem}.jsonl beside it")
                self._hash_member(f"records/{stem}.leaves")
                continue
            out.append(stem)
        return out

    def _hash_member(self, name: str) -> None:
        sha = _sha256()
        size = 0
        try:
            for chunk in self.bundle.chunks(name):
                sha.update(chunk)
                size += len(chunk)
        except BundleError as exc:
            self.fail("file", name, str(exc))
        self.hashed[name] = (sha.hexdigest(), size)

    def _events_at(self, p: int) -> None:
        sizes = self.event_sizes
        while self.event_i < len(sizes) and sizes[self.event_i] <= p:
            size = sizes[self.event_i]
            self.event_i += 1
            items = self.events[size]
            if size < p or self.cr is None:
                self.unchecked.extend(items)
                continue
            root = self.cr.root() if size else EMPTY_ROOT
            for item in items:
                if isinstance(item, _Checkpoint):
                    if item.root == root:
                        if item.valid:
                            self.report.checkpoints_valid += 1
                    else:
                        self.fail("checkpoint", item.where, "root does not match the records and proofs "
                                  f"(computed {base64.b64encode(root).decode()})")
                else:
                    if item.cp.root == root:
                        self.report.offbox_valid += 1
                    else:
                        self.fail("offbox", item.where, "root differs from the root the bundle's records give "
                                  "at that size: the log was rewritten")
        if self.progress is not None and p >= self.progress_next:
            self.progress(p, self.log_size)
            self.progress_next = p + 100_000

    def _report_unchecked(self) -> None:
        cps = [i for i in self.unchecked if isinstance(i, _Checkpoint)]
        offs = [i for i in self.unchecked if isinstance(i, _Offbox)]
        self.report.offbox_not_checkable += len(offs)
        for o in offs:
            self.report.notes.append(f"{o.where}: not checkable (its size falls inside a proof gap)")
        if not cps:
            return
        if self.broken_at is not None:
            why = f"the walk has no leaf hash for seq {self.broken_at} (no record, .leaves entry or proof)"
        else:
            why = "its size falls inside a proof gap"
        if len(cps) <= 5:
            for c in cps:
                self.fail("checkpoint", c.where, f"cannot be checked: {why}")
        else:
            self.fail("checkpoint", f"{len(cps)} checkpoints, sizes {cps[0].size}–{cps[-1].size}", f"cannot be checked: {why}")

    def _skip_gaps(self) -> None:
        gaps = self.gaps
        while self.gap_i < len(gaps) and gaps[self.gap_i].start == self.p:
            gap = gaps[self.gap_i]
            self.gap_i += 1
            if self.cr is not None:
                for level, h in gap.nodes:
                    self.cr.append_node(level, h)
            self.p = gap.end
            self._events_at(self.p)

    def _next_stop(self, limit: int) -> int:
        """The first position ≥ p where records stop being expected: a gap start or ``limit``."""
        gaps = self.gaps
        if self.gap_i < len(gaps) and gaps[self.gap_i].start < limit:
            return gaps[self.gap_i].start
        return limit

    def _consume(self, h: bytes | None) -> None:
        """Position p's leaf hash (None: unknown, the walk can't go on) — slow path."""
        if h is None:
            if self.cr is not None:
                self.cr = None
                self.broken_at = self.p
        elif self.cr is not None:
            self.cr.append_leaf(h)
        self.p += 1
        if self.event_i < len(self.event_sizes) and self.event_sizes[self.event_i] <= self.p:
            self._events_at(self.p)
        self._skip_gaps()

    def _missing_until(self, limit: int, leaves: _Leaves | None, why: str, file: str | None = None) -> None:
        """Positions from p up to ``limit`` that records should hold but don't."""
        while self.p < limit:
            stop = self._next_stop(limit)
            if stop > self.p:
                first = self.p
                where = file or "records"
                span = f"seq {first}" if stop - first == 1 else f"seq {first}–{stop - 1}"
                self.fail("record", where, f"{span} missing: {why}")
                self.report.records_total += stop - first
                while self.p < stop:
                    self._consume(leaves.next() if leaves is not None else None)
            else:
                before = self.p
                self._skip_gaps()
                if self.p == before:  # cannot happen with sorted, disjoint gaps; never loop
                    break

    def _walk_file(self, stem: str, start: int, end: int) -> None:
        jname, lname = f"records/{stem}.jsonl", f"records/{stem}.leaves"
        lines = _Lines(self.bundle, jname, self.checker)
        if lname in self.bundle:
            leaves = _Leaves(self.bundle, lname)
        else:
            self.fail("file", lname, f"missing: the records of {jname} cannot be matched to leaf hashes")
            leaves = _Leaves(None, lname)
        report = self.report
        fail = self.fail
        check = self._check_record
        sha = _sha256
        zero = b"\x00"
        events = self.event_sizes
        last_line = 0
        while True:
            if not lines.pending:
                # Block by block while every record of a block checks out and sits where
                # the walk expects it; line by line (below) from the first that doesn't.
                block = lines.next_block()
                if block is None:
                    break
                taken, whole = self._take_block(block, leaves, end)
                if taken:
                    last_line = lines.lineno + taken - 1
                if whole:
                    lines.skip(taken)
                    continue
                lines.unpack(block, taken)
            item = lines.next()
            assert item is not None
            lineno, line, complete = item
            where = f"{jname} line {lineno}"
            if complete:
                last_line = lineno
            else:
                fail("record", where, f"partial last line ({len(line)} bytes, no newline): the file was truncated")
                report.records_total += 1
                continue
            p = self.p
            obj, ok = check(line, where)
            seq = obj.get("seq") if type(obj) is dict else None
            if type(seq) is not int:
                seq = None
            if seq is not None:
                where = f"{where} seq {seq}"
            if p >= end:
                fail("record", where, f"unexpected record: {jname} should end before seq {end}"
                     " (inserted, or the proofs claim it was left out)")
                report.records_total += 1
                continue
            if seq is None:
                report.records_total += 1
                nxt = lines.peek()
                if nxt is not None and nxt[2] and _quick_seq(nxt[1]) == p:
                    fail("record", where, f"unexpected line before seq {p} (inserted)")
                    continue
                # Unreadable: assume it sits where the next record should.
                self._consume(leaves.next())
                continue
            if seq == p:
                expected = leaves.next()
                h = sha(zero + line).digest()
                if expected is None:
                    fail("record", where, f"no entry for it in {lname}")
                    ok = False
                    expected = h
                elif expected != h:
                    fail("record", where, f"record altered: its leaf hash differs from {lname} entry {leaves.count}")
                    ok = False
                report.records_total += 1
                if ok:
                    report.records_valid += 1
                # The hot path of _consume, inlined.
                cr = self.cr
                if cr is not None:
                    cr.append_leaf(expected)
                self.p = p + 1
                if self.event_i < len(events) and events[self.event_i] <= p + 1:
                    self._events_at(p + 1)
                if self.gap_i < len(self.gaps) and self.gaps[self.gap_i].start == p + 1:
                    self._skip_gaps()
                if p >= self.progress_next and self.progress is not None:
                    self.progress(p, self.log_size)
                    self.progress_next = p + 100_000
                continue
            stop = self._next_stop(end)
            if seq < p or seq >= stop and not self._is_expected(seq, end):
                fail("record", where, f"unexpected record: expected seq {p} here (inserted, duplicated or out of order)")
                report.records_total += 1
                continue
            # seq > p and seq is a position this file should hold.
            nxt = lines.peek()
            if seq == p + 1 and nxt is not None and nxt[2]:
                other_obj = _quick_seq(nxt[1])
                if other_obj == p:
                    lines.next()
                    fail("record", f"{jname} lines {lineno} and {nxt[0]}",
                         f"seq {seq} and seq {p} are out of order (records swapped)")
                    check(nxt[1], f"{jname} line {nxt[0]} seq {p}")
                    for ln, data in ((nxt[0], nxt[1]), (lineno, line)):
                        expected = leaves.next()
                        h = sha(zero + data).digest()
                        if expected is not None and expected != h:
                            fail("record", f"{jname} line {ln} seq {self.p}",
                                 f"record altered: its leaf hash differs from {lname} entry {leaves.count}")
                        report.records_total += 1
                        self._consume(expected if expected is not None else h)
                    continue
            # Positions p … seq-1 are missing (deleted): account for them, then take this line.
            self._missing_until(seq, leaves, f"not in {jname} (deleted?) and not covered by a proof", jname)
            if self.p != seq:
                fail("record", where, f"unexpected record: expected seq {self.p} here")
                report.records_total += 1
                continue
            expected = leaves.next()
            h = sha(zero + line).digest()
            if expected is not None and expected != h:
                fail("record", where, f"record altered: its leaf hash differs from {lname} entry {leaves.count}")
                ok = False
            report.records_total += 1
            if ok:
                report.records_valid += 1
            self._consume(expected if expected is not None else h)
        self.hashed[jname] = (lines.sha256 or "", lines.size)
        if lines.error:
            fail("file", jname, lines.error)
        if self.p < end:
            self._missing_until(end, leaves, f"{jname} ends after line {last_line} (truncated?) and no proof covers it", jname)
        extra = leaves.remaining()
        if leaves.error:
            fail("file", lname, leaves.error)
        if leaves.partial:
            fail("file", lname, f"ends with a partial entry of {leaves.partial} bytes (truncated)")
        if extra:
            fail("file", lname, f"has {extra} more entries than {jname} has records")
        if leaves.sha256 is not None:
            self.hashed[lname] = (leaves.sha256, leaves.size)

    def _take_block(self, block: tuple[bytes, bool, Callable[[], Any] | None], leaves: _Leaves,
                    end: int) -> tuple[int, bool]:
        """Take the leading lines of ``block`` that need no look at one by one: records that
        passed every check (``_check_block``), at the positions the walk is at, before the
        next gap and ``end``, whose leaf hashes are the .leaves entries there. Does exactly
        what the line-by-line walk does with each, for all at once. Returns how many lines
        were taken and whether that is all of them.
        """
        check = block[2]
        verdict = check() if check is not None else None
        if verdict is None:
            return 0, False
        hashes, seqs = verdict
        n = len(seqs)
        taken = 0
        while taken < n and seqs[taken] == self.p:
            p = self.p
            m = min(n - taken, self._next_stop(end) - p)  # up to the next gap or the file's end
            if m <= 0:
                break
            if type(seqs) is not range:
                run = 1
                while run < m and seqs[taken + run] == p + run:
                    run += 1
                m = run
            expected = leaves.peek(m)
            if expected != hashes[taken * HASH_SIZE:(taken + m) * HASH_SIZE]:
                break
            leaves.skip(m)
            self._append_leaves(expected)
            taken += m
        return taken, taken == n

    def _append_leaves(self, hashes: bytes) -> None:
        """Positions p, p+1, … hold valid records with these leaf hashes (none is a gap's
        start but maybe the one after the last): ``_consume`` for each, in bulk."""
        m = len(hashes) // HASH_SIZE
        report = self.report
        report.records_total += m
        report.records_valid += m
        base = p = self.p
        stop = p + m
        events = self.event_sizes
        while p < stop:
            upto = stop
            if self.event_i < len(events) and events[self.event_i] < stop:
                upto = events[self.event_i]  # the root is wanted there
            if self.cr is not None:
                self.cr.append_leaves([hashes[i:i + HASH_SIZE]
                                       for i in range((p - base) * HASH_SIZE, (upto - base) * HASH_SIZE, HASH_SIZE)])
            p = self.p = upto
            if self.event_i < len(events) and events[self.event_i] <= p:
                self._events_at(p)
        if self.gap_i < len(self.gaps) and self.gaps[self.gap_i].start == p:
            self._skip_gaps()
        if self.progress is not None and p >= self.progress_next:
            self.progress(p, self.log_size)
            self.progress_next = p + 100_000

    def _is_expected(self, seq: int, end: int) -> bool:
        """Is ``seq`` a record position of the current file (not in a gap, before ``end``)?"""
        if seq >= end:
            return False
        for gap in self.gaps[self.gap_i:]:
            if gap.start > seq:
                return True
            if gap.start <= seq < gap.end:
                return False
        return True

    def _check_record(self, line: bytes, where: str) -> tuple[Any, bool]:
        """Parse and check one record line (see ``_record_problems``), reporting what's wrong."""
        obj, problems = _record_problems(line)
        if problems:
            seq = obj.get("seq") if obj is not None else None
            named = where + (f" seq {seq}" if type(seq) is int else "")
            for kind, names_seq, message in problems:
                self.fail(kind, named if names_seq else where, message)
        return obj, not problems

    # -- after the walk --

    def check_files(self) -> None:
        for name in self.bundle.names:
            if name not in self.hashed:
                self._hash_member(name)
        report = self.report
        present = set(self.bundle.names)
        listed: dict[str, tuple[str, int]] = {}
        if self.manifest is not None:
            listed = {f.path: (f.sha256, f.size) for f in self.manifest.files}
        by_hash = {sha: path for path, (sha, _size) in listed.items()}
        names = sorted((present | set(listed)) - {MANIFEST})
        report.files_total = len(names) + 1
        if MANIFEST in present and report.manifest_key is not None and self.manifest is not None:
            report.files_valid += 1
        if self.manifest is None:
            report.files_total = len(names) + 1
            return
        for name in names:
            if name not in present:
                self.fail("file", name, "listed in the manifest but missing from the bundle")
                continue
            if name not in listed:
                self.fail("file", name, "not listed in the manifest (an extra file)")
                continue
            sha, size = self.hashed[name]
            want_sha, want_size = listed[name]
            if (sha, size) == (want_sha, want_size):
                report.files_valid += 1
                continue
            hint = ""
            if sha in by_hash and by_hash[sha] != name:
                hint = f"; its content is what the manifest lists for {by_hash[sha]} (files swapped?)"
            self.fail("file", name, f"altered: sha256 {sha[:16]}… {size} bytes, the manifest says "
                                    f"{want_sha[:16]}… {want_size} bytes{hint}")

    def check_filter(self) -> None:
        """Gaps a bundle's export filter cannot explain (a full export leaves nothing out)."""
        if self.manifest is None or not self.gaps:
            return
        merged: list[list[int]] = []
        for g in self.gaps:
            if merged and merged[-1][1] == g.start:
                merged[-1][1] = g.end
            else:
                merged.append([g.start, g.end])
        if not self.manifest.filtered:
            for a, b in merged:
                self.fail("proof", _span(a, b), "left out of a bundle whose manifest claims a full export "
                                                        "(from, to and session all '-')")
        elif self.manifest.session is None:
            # Records may carry times slightly out of seq order (a caller may stamp a record
            # before the writer serializes it), so a time range can leave holes: say so.
            for a, b in merged:
                if a != 0 and b != self.log_size:
                    self.report.notes.append(f"{_span(a, b)} left out between exported records of a time-range "
                                             "export (records out of time order, or removed)")


def _span(a: int, b: int) -> str:
    return f"seq {a}" if b - a == 1 else f"seq {a}–{b - 1}"


def _quick_seq(line: bytes) -> int | None:
    try:
        obj = canonical.loads(line)
    except canonical.CanonicalError:
        return None
    seq = obj.get("seq") if isinstance(obj, dict) else None
    return seq if type(seq) is int else None


def verify_bundle(path: str | Path, root_key: str, offbox: Sequence[str | Path] = (),
                  progress: Callable[[int, int], None] | None = None, as_of: str | None = None,
                  workers: int | None = None) -> Report:
    """Verify the bundle at ``path`` (.tar.gz or directory) against the pinned root verifier key.

    NoteError if ``root_key`` is not a verifier key; everything about the bundle itself is
    reported in the returned Report (``ok``, counts, ``failures``). ``workers``: processes
    checking records (default: one per CPU for bundles with enough records, 1 = none).
    """
    root = parse_verifier_key(root_key)
    if as_of is not None:
        parse_time(as_of)
    return _Verifier(Path(path), root, [Path(p) for p in offbox], progress, as_of, workers).run()


# --- the command -------------------------------------------------------------------------------


def _bundle_root_pub(path: str) -> str | None:
    try:
        with open_bundle(path) as b:
            if ROOT_PUB in b:
                return b.read(ROOT_PUB).decode("utf-8", "replace").strip()
    except (BundleError, OSError):
        return None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tollgate-verify",
        description="Verify a Tollgate audit export bundle: signatures, Merkle proofs, records, off-box checkpoints.",
    )
    parser.add_argument("bundle", help="the bundle: a .tar.gz, or a directory it was unpacked into")
    parser.add_argument("--root-key", metavar="KEY|@FILE",
                        help="the root verifier key you received out of band, or @FILE (or a FILE path) holding it")
    parser.add_argument("--offbox", action="append", default=[], metavar="DIR_OR_FILE",
                        help="off-box checkpoint copies: a directory of *.note files, or a syslog file "
                             "with 'tollgate-checkpoint <base64>' lines (repeatable)")
    parser.add_argument("--as-of", metavar="TIME",
                        help="when the export was requested (YYYY-MM-DDTHH:MM:SSZ): off-box checkpoints "
                             "beyond the bundle made before it show a cut tail")
    parser.add_argument("--json", metavar="FILE", help="also write a JSON report to FILE ('-' for stdout)")
    parser.add_argument("--quiet", action="store_true", help="print only failures")
    parser.add_argument("--progress", action="store_true", help="report progress on stderr")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="processes checking records (default: one per CPU when the bundle is large; 1: none)")
    args = parser.parse_args(argv)

    if not args.root_key:
        print("tollgate-verify: no root key pinned. Pass --root-key KEY (or --root-key @FILE) with the root\n"
              "verifier key you received out of band when the appliance was set up — not one taken\n"
              "from the bundle, which anyone who altered the bundle could have replaced.", file=sys.stderr)
        shown = _bundle_root_pub(args.bundle)
        if shown:
            print(f"For reference, the bundle's keys/root.pub says: {shown}\n"
                  "(compare it with your own copy before using it)", file=sys.stderr)
        return 2
    key_text = args.root_key
    key_file = key_text[1:] if key_text.startswith("@") else None
    if key_file is None and "+" not in key_text and Path(key_text).is_file():
        key_file = key_text  # a path given without the @ (a verifier key always holds '+')
    if key_file is not None:
        try:
            key_text = Path(key_file).read_text("utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            print(f"tollgate-verify: cannot read the root key file: {exc}", file=sys.stderr)
            return 2
    try:
        parse_verifier_key(key_text)
    except NoteError as exc:
        print(f"tollgate-verify: --root-key is not a verifier key (name+hash+key): {exc}", file=sys.stderr)
        return 2
    if args.as_of is not None:
        try:
            parse_time(args.as_of)
        except ValueError as exc:
            print(f"tollgate-verify: --as-of: {exc}", file=sys.stderr)
            return 2
    for src in args.offbox:
        if not Path(src).exists():
            print(f"tollgate-verify: --offbox {src}: no such file or directory", file=sys.stderr)
            return 2
    if not Path(args.bundle).exists():
        print(f"tollgate-verify: {args.bundle}: no such file or directory", file=sys.stderr)
        return 2
    if args.workers is not None and args.workers < 1:
        print("tollgate-verify: --workers must be at least 1", file=sys.stderr)
        return 2

    progress = None
    if args.progress:
        def progress(done: int, total: int) -> None:
            print(f"tollgate-verify: {done}/{total} positions", file=sys.stderr, flush=True)

    report = verify_bundle(args.bundle, key_text, args.offbox, progress=progress, as_of=args.as_of,
                           workers=args.workers)
    if args.json:
        if args.json == "-":
            sys.stdout.write(report.to_json())
        else:
            Path(args.json).write_text(report.to_json(), "utf-8")
    if not args.quiet:
        sys.stdout.write(report.summary())
    elif not report.ok:
        for f in report.failures:
            print(f"FAILED {f.kind}: {f}")
        for kind, n in report.suppressed.items():
            print(f"FAILED {kind}: … and {n} more not listed")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
