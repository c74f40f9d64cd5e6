"""Everything in a bundle the records are held to: trust, manifest, checkpoints, proofs.

:class:`SignedParts` reads and checks, before the records are walked: the trust file
(signed by the pinned root key: which signing keys count, for which tree sizes), the
manifest (signed by one of them: every file's sha256, the log size, the export filter),
the keys, the signed checkpoints, the proofs for positions left out, and off-box copies of
checkpoints. After the walk it holds the files to the manifest and the proof gaps to the
export filter. What it finds goes into the :class:`~appliance.audit.verify_report.Report`;
what the walk needs (log size, checkpoints, gaps, off-box sizes to check) it keeps.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from appliance.audit import canonical
from appliance.audit.bundle_layout import CHECKPOINTS, MANIFEST, PROOFS, ROOT_PUB, TRUST, Manifest, parse_manifest
from appliance.audit.bundle_reader import Bundle, BundleError
from appliance.audit.cosignature import QuorumResult, WitnessKey, check_quorum, cosignatures
from appliance.audit.merkle import HASH_SIZE, decomposition
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
from appliance.audit.verify_members import MemberLines, hash_member
from appliance.audit.verify_report import Report

OFFBOX_MARK = re.compile(r"tollgate-checkpoint ([A-Za-z0-9+/]+={0,2})")
_sha256 = hashlib.sha256


@dataclass
class CheckedCheckpoint:
    """A checkpoint of the bundle; ``valid`` once its note checked out (its root is
    checked against the records by the walk)."""

    size: int
    root: bytes
    time: str | None
    where: str
    valid: bool
    witnessed: bool = True  # a quorum of witnesses cosigned it (True when no witnesses are required)
    cosigned_at: int | None = None  # by when a quorum had cosigned it (witness time, seconds since the epoch)


@dataclass
class ProofGap:
    """Positions [start, end) left out of the bundle, and the tree nodes that stand for them."""

    start: int
    end: int
    nodes: list[tuple[int, bytes]]  # (level, hash)
    where: str


@dataclass
class OffboxCheckpoint:
    """An off-box checkpoint of a size the bundle has no checkpoint of: checked by the walk."""

    where: str
    cp: Checkpoint


def seq_span(a: int, b: int) -> str:
    return f"seq {a}" if b - a == 1 else f"seq {a}–{b - 1}"


class SignedParts:
    """The parts of one bundle other than the records; see the module docstring."""

    def __init__(self, bundle: Bundle, report: Report, root: VerifierKey, hashed: dict[str, tuple[str, int]],
                 witnesses: Sequence[WitnessKey] = (), quorum: int = 0) -> None:
        self.bundle = bundle
        # Witness requirements: (where it comes from, keys, quorum), each must hold. The
        # auditor's --witness keys, and the trust file's witnesses (read_trust adds those).
        self.requirements: list[tuple[str, list[WitnessKey], int]] = (
            [("--witness", list(witnesses), quorum)] if witnesses else [])
        self.report = report
        self.fail = report.fail
        self.root = root
        self.hashed = hashed  # member -> (sha256, size), as read
        self.trust: Trust | None = None
        self.manifest: Manifest | None = None
        self.origin: str | None = None
        self.log_size = 0
        self.signed_size = 0  # the largest size a valid signed checkpoint covers
        self.checkpoints: list[CheckedCheckpoint] = []
        self.gaps: list[ProofGap] = []
        self.offbox_wanted: dict[int, list[OffboxCheckpoint]] = {}
        self._last_quorum: tuple[CheckedCheckpoint, list[tuple[str, int, QuorumResult]]] | None = None

    def _read_small(self, name: str) -> bytes | None:
        """A small member's bytes (hashed for the manifest check), or None if it is missing."""
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
        """The trust file, signed by the pinned root key: the signing keys and their sizes."""
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
        if self.trust.witnesses:
            self.requirements.append(("the trust file", self.trust.witnesses, self.trust.witness_quorum))
            self.report.witness_quorum = max(self.report.witness_quorum, self.trust.witness_quorum)

    @property
    def witness_keys(self) -> list[WitnessKey]:
        """Every witness key given or trusted (each once)."""
        return list(dict.fromkeys(k for _label, keys, _n in self.requirements for k in keys))

    def read_manifest(self) -> None:
        """The manifest: well formed, of the trust file's origin, signed by a trusted key
        valid at its log size."""
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
        """keys/: informational only (the pinned key and the trust file are what count), so
        what is odd about them is a note, not a failure."""
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
        """checkpoints.jsonl: each well formed, of the log's origin, signed by a key valid at
        its size, sizes never decreasing, one root per size. The last size is the log's."""
        if CHECKPOINTS not in self.bundle:
            self.fail("checkpoint", CHECKPOINTS, "missing: nothing ties the records to a signed tree head")
            return
        lines = MemberLines(self.bundle, CHECKPOINTS)
        keys = self.trust.verifier_keys() if self.trust is not None else []
        last = -1
        roots: dict[int, CheckedCheckpoint] = {}
        while (item := lines.next()) is not None:
            lineno, line, complete = item
            where = f"{CHECKPOINTS} line {lineno}"
            self.report.checkpoints_total += 1
            if not complete:
                self.fail("checkpoint", where, "partial last line (no newline): the file is truncated")
                continue
            try:
                obj = canonical.loads_canonical(line)
                if (not isinstance(obj, dict) or set(obj) != {"note", "size", "time"}
                        or not isinstance(obj["note"], str)):
                    raise canonical.CanonicalError('want {"note": …, "size": …, "time": …}')
                text, _sigs = split_note(obj["note"])
                cp = parse_checkpoint(text)
            except (canonical.CanonicalError, NoteError) as exc:
                self.fail("checkpoint", where, f"malformed: {exc}")
                continue
            where = f"checkpoint size {cp.size} ({CHECKPOINTS} line {lineno})"
            valid = True
            if obj["size"] != cp.size or obj["time"] != cp.time:
                self.fail("checkpoint", where,
                          f"size/time fields ({obj['size']}, {obj['time']}) differ from the note's")
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
            entry = CheckedCheckpoint(cp.size, cp.root, cp.time, where, valid)
            if self.requirements:
                results = [(label, n, check_quorum(obj["note"], keys_, n)) for label, keys_, n in self.requirements]
                for problem in dict.fromkeys(p for _label, _n, r in results for p in r.problems):
                    self.fail("witness", where, problem)
                entry.witnessed = all(r.ok for _label, _n, r in results)
                if entry.witnessed:
                    entry.cosigned_at = min(_quorum_time(r, n) for _label, n, r in results)
                self._last_quorum = (entry, results)
            other = roots.setdefault(cp.size, entry)
            if other.root != cp.root:
                self.fail("checkpoint", where, f"root differs from the other checkpoint of size {cp.size} "
                                               f"({other.where}): the log forked")
                entry.valid = False
            self.checkpoints.append(entry)
        self.hashed[CHECKPOINTS] = (lines.sha256 or "", lines.size)
        if lines.error:
            self.fail("file", CHECKPOINTS, lines.error)
        if not self.checkpoints:
            self.fail("checkpoint", CHECKPOINTS, "no checkpoints: nothing ties the records to a signed tree head")
        self.log_size = max(last, 0)
        # Records at or beyond this size are covered by no validly signed checkpoint: the walk
        # names each of them (a root mismatch is named by the walk, at the checkpoint).
        self.signed_size = max((c.size for c in self.checkpoints if c.valid and c.witnessed), default=0)
        if self.requirements and self._last_quorum is not None:
            entry, results = self._last_quorum
            self.report.witnessed_size = self.signed_size
            self.report.witnessed_at = max((c.cosigned_at for c in self.checkpoints
                                            if c.valid and c.witnessed and c.cosigned_at is not None), default=None)
            if self.signed_size < entry.size:
                short = "; ".join(f"{r.describe(n)}{'' if label == '--witness' else ' (' + label + ')'}"
                                  for label, n, r in results if not r.ok)
                self.fail("witness", entry.where,
                          f"{short}: no witness vouches that this is the log they saw "
                          f"(records beyond the last witnessed checkpoint, size {self.signed_size}, are not trusted)")
        if self.manifest is not None and self.manifest.log_size != self.log_size:
            self.fail("manifest", MANIFEST,
                      f"log-size {self.manifest.log_size} is not the last checkpoint's size {self.log_size}")
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
        """proofs.jsonl: the positions left out, in order, within the log, each as the tree
        nodes its range decomposes into, and none spanning a checkpoint size."""
        if PROOFS not in self.bundle:
            self.fail("proof", PROOFS, "missing")
            return
        lines = MemberLines(self.bundle, PROOFS)
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
                for (_s, level), h in zip(shape, hashes, strict=True):
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
            self.gaps.append(ProofGap(start, end, nodes, where))
            self.report.left_out += end - start
            if not inside:
                self.report.proofs_valid += 1
        self.hashed[PROOFS] = (lines.sha256 or "", lines.size)
        if lines.error:
            self.fail("file", PROOFS, lines.error)

    def read_offbox(self, sources: Sequence[Path], as_of: str | None) -> None:
        """Off-box copies of checkpoints: each must agree with the bundle where it can be
        checked; one beyond the bundle's end, made before it was exported, shows a cut tail."""
        items: list[tuple[str, str]] = []
        for src in sources:
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
        limit = self._tail_limit(last_time, as_of)
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
                self.offbox_wanted.setdefault(cp.size, []).append(OffboxCheckpoint(where, cp))

    def read_witness_views(self, views: Sequence[tuple[str, str, bool]]) -> None:
        """Witnesses' cosigned checkpoints of this log, ``(where, note, live)``.

        A saved view (``live`` False: fetched by the auditor when the export was asked for)
        is a size the log had reached before the bundle was made: the bundle must reach it,
        with the same root. A witness never cosigns a shrink or a fork, so a bundle of a log
        cut back or rewritten with the on-box key fails, whatever times it claims. A live
        view (asked now) is held to the same root where the bundle reaches it; beyond the
        bundle it is only noted, as an honest log goes on growing after an export."""
        keys = self.trust.verifier_keys() if self.trust is not None else []
        cp_roots = {c.size: c for c in self.checkpoints}
        for where, view, live in views:
            self.report.witness_views += 1
            try:
                text, _sigs = split_note(view)
                cp = parse_checkpoint(text)
                cosigned, problems = cosignatures(view, self.witness_keys)
            except NoteError as exc:
                self.fail("witness", where, f"not a cosigned checkpoint: {exc}")
                continue
            if self.origin is not None and cp.origin != self.origin:
                self.fail("witness", where, f"a checkpoint of {cp.origin!r}, not of this log ({self.origin!r})")
                continue
            if problems or not cosigned:
                self.fail("witness", where, "; ".join(problems) or "no cosignature by a witness key given")
                continue
            names = ", ".join(c.witness.label for c in cosigned)
            where = f"{where} (size {cp.size}, cosigned by {names})"
            if self.trust is None or not self._check_signature("witness", where, view, keys, cp.size):
                continue
            if cp.size > self.log_size:
                if live:
                    self.report.notes.append(f"{where}: the log has grown since this bundle "
                                             f"(size {cp.size} > {self.log_size})")
                else:
                    self.fail("tail-cut", where,
                              f"the witness had cosigned the log at size {cp.size} before this bundle was asked "
                              f"for, but the bundle ends at {self.log_size}: seq {self.log_size}–{cp.size - 1} "
                              f"are missing (the log's tail was cut)")
            elif cp.size in cp_roots:
                if cp_roots[cp.size].root != cp.root:
                    self.fail("witness", where, f"root differs from the bundle's checkpoint of that size "
                                                f"({cp_roots[cp.size].where}): the log was rewritten")
            else:
                self.offbox_wanted.setdefault(cp.size, []).append(OffboxCheckpoint(where, cp))

    def check_witness_freshness(self, as_of: str | None) -> None:
        """With ``--as-of`` (when the export was asked for): the bundle's newest witness
        cosignature must not be older. An export checkpoints the log and waits for the
        witnesses to cosign that checkpoint, so an honest bundle carries a cosignature made
        after it was asked for — even of a log that did not grow, which the witness cosigns
        again with a new time. A bundle cut back to a checkpoint the witnesses cosigned once
        carries only their old times, and those are the witnesses' to sign, not the
        insider's: back-dating the bundle can't change them."""
        if as_of is None or not self.requirements or self.report.witnessed_at is None:
            return
        limit = parse_time(as_of).timestamp() - WITNESS_CLOCK_SKEW
        cosigned = self.report.witnessed_at
        if cosigned < limit:
            self.fail("tail-cut", f"checkpoint size {self.signed_size}",
                      f"the newest witness cosignature ({format_time_of(cosigned)}) is older than --as-of {as_of}: "
                      f"the bundle ends at a checkpoint the witnesses cosigned before the export was asked for, "
                      f"so records written since are not in it (a tail cut, a back-dated bundle, or a log that "
                      f"stopped then: the witness's own view, --witness-url, tells which)")

    def _tail_limit(self, last_cp_time: datetime | None, as_of: str | None) -> datetime | None:
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
        if as_of is not None:
            candidates.append(parse_time(as_of))
        return max(candidates) if candidates else None

    # --- after the walk --------------------------------------------------------------------

    def check_files(self) -> None:
        """Every member is the one the manifest lists, byte for byte, and nothing else is there."""
        for name in self.bundle.names:
            if name not in self.hashed:
                hash_member(self.bundle, name, self.hashed, self.report)
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
                self.fail("proof", seq_span(a, b), "left out of a bundle whose manifest claims a full export "
                                                   "(from, to and session all '-')")
        elif self.manifest.session is None:
            # Records may carry times slightly out of seq order (a caller may stamp a record
            # before the writer serializes it), so a time range can leave holes: say so.
            for a, b in merged:
                if a != 0 and b != self.log_size:
                    self.report.notes.append(f"{seq_span(a, b)} left out between exported records of a time-range "
                                             "export (records out of time order, or removed)")


# How far a witness's clock may be behind the auditor's before a fresh cosignature looks old.
WITNESS_CLOCK_SKEW = 300


def _quorum_time(result: QuorumResult, quorum: int) -> int:
    """By when ``quorum`` of the witnesses had cosigned: the quorum-th newest of their times."""
    times = sorted((c.timestamp for c in result.valid), reverse=True)
    return times[min(quorum, len(times)) - 1] if times else 0


def format_time_of(timestamp: int) -> str:
    """Seconds since the epoch as the log writes times (UTC, to the second)."""
    return datetime.fromtimestamp(timestamp, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
