"""The walk over a bundle's positions 0 … log-size: every record checked and hashed in order.

Each position's leaf hash comes from a record (checked: canonical JSON, 10.2.2 fields, no
clear PAN, its leaf hash the ``.leaves`` entry there) or from a proof gap's tree nodes, and
extends one compact range: at every checkpoint size (and off-box checkpoint size) the root
is compared with the signed one. Whatever is out of place — records inserted, deleted,
swapped, altered, truncated, files missing — is named by file, line and seq; so is every
record at or beyond the last validly signed checkpoint's size (``covered``), which nothing
signed vouches for (a record forged onto the end of a bundle).

Blocks of records that pass every check (worked out ahead by a
:class:`~appliance.audit.verify_workers.BlockChecker`) and sit where the walk expects them
are taken whole; the walk goes line by line from the first that doesn't, and what it does
with each line is exactly what the block path does for all of them at once.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable
from typing import Any

from appliance.audit.bundle_reader import Bundle
from appliance.audit.merkle import EMPTY_ROOT, HASH_SIZE, CompactRange
from appliance.audit.verify_members import BLOCK_BYTES, Block, LeafEntries, MemberLines, hash_member
from appliance.audit.verify_records import check_block, quick_seq, record_problems
from appliance.audit.verify_report import Report
from appliance.audit.verify_signed import CheckedCheckpoint, OffboxCheckpoint, SignedParts
from appliance.audit.verify_workers import BlockCheck, BlockChecker, usable_cpus

# Records bytes from which checking them in worker processes pays for starting them, and
# the most workers started: the walk (in this process) keeps up with about that many.
PARALLEL_BYTES = 8 << 20
MAX_WORKERS = 8
_STEM = re.compile(r"records/([0-9]{12})\.(jsonl|leaves)")
_sha256 = hashlib.sha256
PROGRESS_EVERY = 100_000  # positions between progress reports

# What the walk checks when it reaches a size: a checkpoint's root, or an off-box one's.
Event = CheckedCheckpoint | OffboxCheckpoint


class RecordWalk:
    """Walks the records of one bundle against what :class:`SignedParts` read from it.

    ``workers``: processes checking blocks (None: decided by the records' size);
    ``block_bytes`` and ``block_check``: the blocks the fast path takes and how it checks
    them (tests use tiny blocks, or a check that refuses every block, to compare the fast
    path with the line-by-line walk).
    """

    def __init__(self, bundle: Bundle, report: Report, signed: SignedParts, hashed: dict[str, tuple[str, int]],
                 progress: Callable[[int, int], None] | None, workers: int | None,
                 block_bytes: int = BLOCK_BYTES, block_check: BlockCheck = check_block) -> None:
        self.bundle = bundle
        self.report = report
        self.fail = report.fail
        self.hashed = hashed
        self.progress = progress
        self.workers = workers
        self.block_bytes = block_bytes
        self.block_check = block_check
        self.log_size = signed.log_size
        self.covered = signed.signed_size
        self.covered_by = "witnessed" if signed.requirements else "signed"
        self.gaps = signed.gaps
        # Events: checkpoint sizes and off-box sizes, checked when the walk's range ends there.
        events: dict[int, list[Event]] = {}
        for c in signed.checkpoints:
            events.setdefault(c.size, []).append(c)
        for size, lst in signed.offbox_wanted.items():
            events.setdefault(size, []).extend(lst)
        self.events = events
        self.event_sizes = sorted(events)
        self.event_i = 0
        self.cr: CompactRange | None = CompactRange()  # None once a position's hash is unknown
        self.broken_at: int | None = None
        self.matched = 0  # the largest checkpoint size whose root matched, before any mismatch
        self.mismatch: tuple[int, int] | None = None  # (last matching size, first mismatching size)
        self.unchecked: list[Event] = []
        self.p = 0  # the position the walk is at
        self.gap_i = 0
        self.stems: list[str] = []
        self.progress_next = 0 if progress is not None else 1 << 62
        self.checker: BlockChecker | None = None

    def run(self) -> None:
        """Walk every position, record files in order, and report what does not hold."""
        log_size = self.log_size
        self.stems = self._record_files()
        self._events_at(0)
        self._skip_gaps()
        checker = self.checker = BlockChecker(self._workers_wanted(), self.block_check)
        try:
            for i, stem in enumerate(self.stems):
                start = int(stem)
                end = int(self.stems[i + 1]) if i + 1 < len(self.stems) else max(log_size, start)
                end = min(end, log_size) if start < log_size else start
                self._missing_until(min(start, log_size), None, "no records file holds it and no proof covers it")
                self._walk_file(stem, start, end)
        finally:
            checker.close()
        self._missing_until(log_size, None, "no records file holds it and no proof covers it")
        # Whatever events were never reached.
        while self.event_i < len(self.event_sizes):
            size = self.event_sizes[self.event_i]
            self.event_i += 1
            self.unchecked.extend(self.events[size])
        self._report_unchecked()

    def _workers_wanted(self) -> int:
        """Worker processes for checking records: one per usable CPU (up to MAX_WORKERS)
        when there are enough records to be worth starting them; ``workers`` if given."""
        if self.workers is not None:
            return self.workers
        size = sum(self.bundle.size(f"records/{stem}.jsonl") for stem in self.stems)
        return min(usable_cpus(), MAX_WORKERS) if size >= PARALLEL_BYTES else 1

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
                hash_member(self.bundle, f"records/{stem}.leaves", self.hashed, self.report)
                continue
            out.append(stem)
        return out


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
                if isinstance(item, CheckedCheckpoint):
                    if item.root == root:
                        if item.valid:
                            self.report.checkpoints_valid += 1
                            if self.mismatch is None:
                                self.matched = size
                    else:
                        self.fail("checkpoint", item.where, "root does not match the records and proofs "
                                  f"(computed {base64.b64encode(root).decode()}){self._window(size)}")
                else:
                    if item.cp.root == root:
                        self.report.offbox_valid += 1
                    else:
                        self.fail("offbox", item.where, "root differs from the root the bundle's records give "
                                  "at that size: the log was rewritten")
        if self.progress is not None and p >= self.progress_next:
            self.progress(p, self.log_size)
            self.progress_next = p + PROGRESS_EVERY

    def _window(self, size: int) -> str:
        """Where a root mismatch at ``size`` narrows the damage to: after the last checkpoint
        whose root matched, up to this one. (Records whose leaf hash differs from their
        ``.leaves`` entry are named one by one; this is what is left when the entries were
        rewritten to match: only the signed roots show it.)"""
        if self.mismatch is None:
            self.mismatch = (self.matched, size)
            first = (f"; the checkpoint of size {self.matched} matches" if self.matched
                     else "")
            return (f": a record among seq {self.matched}–{size - 1} is not what was signed "
                    f"(altered, inserted or removed, its .leaves entry rewritten to match){first}")
        a, b = self.mismatch
        return f": follows from the mismatch among seq {a}–{b - 1}"

    def _report_unchecked(self) -> None:
        cps = [i for i in self.unchecked if isinstance(i, CheckedCheckpoint)]
        offs = [i for i in self.unchecked if isinstance(i, OffboxCheckpoint)]
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
            self.fail("checkpoint", f"{len(cps)} checkpoints, sizes {cps[0].size}–{cps[-1].size}",
                      f"cannot be checked: {why}")

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

    def _missing_until(self, limit: int, leaves: LeafEntries | None, why: str, file: str | None = None) -> None:
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
        lines = MemberLines(self.bundle, jname, self.checker, self.block_bytes)
        if lname in self.bundle:
            leaves = LeafEntries(self.bundle, lname)
        else:
            self.fail("file", lname, f"missing: the records of {jname} cannot be matched to leaf hashes")
            leaves = LeafEntries(None, lname)
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
                if seq is not None and seq >= self.covered:
                    self._beyond(f"{jname} line {lineno}", seq)
                else:
                    fail("record", where, f"unexpected record: {jname} should end before seq {end}"
                         " (inserted, or the proofs claim it was left out)")
                report.records_total += 1
                continue
            if seq is None:
                report.records_total += 1
                nxt = lines.peek()
                if nxt is not None and nxt[2] and quick_seq(nxt[1]) == p:
                    fail("record", where, f"unexpected line before seq {p} (inserted)")
                    continue
                # Unreadable: assume it sits where the next record should.
                self._consume(leaves.next())
                continue
            if seq == p:
                expected = leaves.next()
                h = sha(zero + line).digest()
                if p >= self.covered:
                    self._beyond(f"{jname} line {lineno}", p)
                    ok = False
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
                    self.progress_next = p + PROGRESS_EVERY
                continue
            stop = self._next_stop(end)
            if seq < p or (seq >= stop and not self._is_expected(seq, end)):
                fail("record", where,
                     f"unexpected record: expected seq {p} here (inserted, duplicated or out of order)")
                report.records_total += 1
                continue
            # seq > p and seq is a position this file should hold.
            nxt = lines.peek()
            if seq == p + 1 and nxt is not None and nxt[2]:
                other_obj = quick_seq(nxt[1])
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
            if seq >= self.covered:
                self._beyond(f"{jname} line {lineno}", seq)
                ok = False
            report.records_total += 1
            if ok:
                report.records_valid += 1
            self._consume(expected if expected is not None else h)
        self.hashed[jname] = (lines.sha256 or "", lines.size)
        if lines.error:
            fail("file", jname, lines.error)
        if self.p < end:
            self._missing_until(end, leaves, f"{jname} ends after line {last_line} (truncated?) and no proof covers it",
                                jname)
        extra = leaves.remaining()
        if leaves.error:
            fail("file", lname, leaves.error)
        if leaves.partial:
            fail("file", lname, f"ends with a partial entry of {leaves.partial} bytes (truncated)")
        if extra:
            fail("file", lname, f"has {extra} more entries than {jname} has records")
        if leaves.sha256 is not None:
            self.hashed[lname] = (leaves.sha256, leaves.size)

    def _take_block(self, block: Block, leaves: LeafEntries,
                    end: int) -> tuple[int, bool]:
        """Take the leading lines of ``block`` that need no look at one by one: records that
        passed every check (``check_block``), at the positions the walk is at, before the
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
            # up to the next gap, the file's end or the last signed checkpoint (records
            # beyond it are named one by one)
            m = min(n - taken, self._next_stop(min(end, self.covered)) - p)
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
            self.progress_next = p + PROGRESS_EVERY

    def _beyond(self, where: str, seq: int) -> None:
        self.fail("record", where, f"seq {seq} is beyond the last {self.covered_by} checkpoint (size {self.covered}): "
                                   f"no {self.covered_by} tree head covers it")

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
        """Parse and check one record line (see ``record_problems``), reporting what's wrong."""
        obj, problems = record_problems(line)
        if problems:
            seq = obj.get("seq") if obj is not None else None
            named = where + (f" seq {seq}" if type(seq) is int else "")
            for kind, names_seq, message in problems:
                self.fail(kind, named if names_seq else where, message)
        return obj, not problems
