"""Writing an export bundle (:class:`BundleWriter`), streamed, with proofs for what it leaves out.

The writer is fed every position of the log in order (``add``), keeps the records it is
given in temporary files and, for each run of positions it is not given, the compact
range of their leaf hashes (O(log n) memory): a run is closed at every checkpoint size in
the bundle so a verifier has the tree's compact range at hand there. ``close`` writes the
rest, signs the manifest and renames the finished archive into place. The layout is in
:mod:`~appliance.audit.bundle_layout`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import shutil
import tarfile
import tempfile
import time as _time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.audit import canonical
from appliance.audit.bundle_layout import (
    CHECKPOINTS,
    MANIFEST,
    PROOFS,
    ROOT_PUB,
    TRUST,
    ManifestFile,
    make_manifest,
    segment_stem,
)
from appliance.audit.merkle import CompactRange
from appliance.audit.merkle import leaf_hash as _leaf_hash
from appliance.audit.note import (
    SigningKey,
    format_time,
    parse_checkpoint,
    parse_time,
    parse_verifier_key,
    sign_note,
    split_note,
)
from appliance.audit.trust import parse_trust


@dataclass
class BundleSummary:
    path: Path
    log_size: int
    records: int
    left_out: int
    proofs: int
    checkpoints: int
    files: int
    bytes: int
    sha256: str
    manifest: str
    warnings: list[str] = field(default_factory=list)


class _HashingFile:
    """A buffered file being written whose SHA-256 and length are kept as it grows."""

    __slots__ = ("file", "path", "sha", "size")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "wb", buffering=1 << 20)  # noqa: SIM115 - closed in close()
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.sha.update(data)
        self.size += len(data)

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()


class BundleWriter:
    """Writes one bundle; see the module docstring. Use as a context manager."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        origin: str,
        signing_key: SigningKey,
        trust_note: str,
        root_verifier_key: str,
        verifier_keys: Sequence[str],
        checkpoints: Sequence[dict[str, Any]],
        frm: str | None = None,
        to: str | None = None,
        session: str | None = None,
        created: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.origin = origin
        self.signing_key = signing_key
        self.frm, self.to, self.session = frm, to, session
        self.created = created or format_time()
        self.warnings: list[str] = []
        if signing_key.name != origin:
            raise ValueError(f"the signing key is named {signing_key.name!r}, not after the origin {origin!r}")

        root = parse_verifier_key(root_verifier_key)
        self._trust = parse_trust(trust_note, root)
        if self._trust.origin != origin:
            raise ValueError(f"the trust file is for origin {self._trust.origin!r}, not {origin!r}")
        self.trust_note = trust_note
        self.root_verifier_key = str(root)
        self.verifier_keys = [parse_verifier_key(k) for k in verifier_keys]

        if not checkpoints:
            raise ValueError("a bundle needs at least one checkpoint")
        self._checkpoint_lines: list[bytes] = []
        self._roots: dict[int, bytes] = {}
        last = -1
        for i, cp in enumerate(checkpoints):
            if set(cp) != {"note", "size", "time"}:
                raise ValueError(f"checkpoint {i} must have exactly the keys note, size, time")
            text, _sigs = split_note(cp["note"])
            parsed = parse_checkpoint(text)
            if parsed.origin != origin or parsed.size != cp["size"] or parsed.time != cp["time"]:
                raise ValueError(f"checkpoint {i} (size {cp['size']}) does not match its note's origin, size or time")
            if parsed.size < last:
                raise ValueError("checkpoints must be sorted by size")
            last = parsed.size
            previous = self._roots.setdefault(parsed.size, parsed.root)
            if previous != parsed.root:
                self.warnings.append(f"two checkpoints of size {parsed.size} have different roots (a fork)")
            self._checkpoint_lines.append(canonical.dumps(dict(cp)) + b"\n")
        self.log_size = last
        try:
            self._trust.check(signing_key.name, signing_key.key_hash, self.log_size)
        except ValueError as exc:
            raise ValueError(f"the manifest could not be verified: {exc}; "
                             "make a checkpoint with this key first") from None
        self._cut_sizes = sorted(s for s in self._roots if s > 0)
        self._next_cut = 0

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
        (self._tmp / "records").mkdir()
        self._proofs = _HashingFile(self._tmp / PROOFS)
        self._pos = 0
        self._records = 0
        self._left_out = 0
        self._proof_count = 0
        self._full = CompactRange()
        self._gap: CompactRange | None = None
        self._stem: str | None = None
        self._stem_start = -1
        self._stems: list[str] = []
        self._jsonl: _HashingFile | None = None
        self._leaves: _HashingFile | None = None
        self._files: dict[str, _HashingFile] = {}
        self._closed = False

    # -- feeding --

    def add(self, seq: int, leaf_hash: bytes, line: bytes | None, segment: str) -> None:
        """Position ``seq`` (every one, in order): its record line, or None to leave it out."""
        if self._closed:
            raise ValueError("the bundle is closed")
        if seq != self._pos:
            raise ValueError(f"add() must be called for every position in order: expected {self._pos}, got {seq}")
        if seq >= self.log_size:
            raise ValueError(f"position {seq} is at or beyond the bundle's log size {self.log_size} "
                             "(its last checkpoint)")
        if len(leaf_hash) != 32:
            raise ValueError("a leaf hash is 32 bytes")
        if line is None:
            if self._gap is None:
                self._gap = CompactRange(seq)
            self._gap.append_leaf(leaf_hash)
            self._left_out += 1
        else:
            line = bytes(line)
            if self._gap is not None:
                self._close_gap()
            self._record(seq, leaf_hash, line, segment)
        self._full.append_leaf(leaf_hash)
        self._pos = pos = seq + 1
        cuts = self._cut_sizes
        if self._next_cut < len(cuts) and cuts[self._next_cut] == pos:
            self._next_cut += 1
            if self._gap is not None:
                self._close_gap()
            root = self._full.root()
            if root != self._roots[pos]:
                self.warnings.append(f"the log's records do not match its checkpoint of size {pos} (root differs)")

    def add_pruned(self, prefix: CompactRange) -> None:
        """Positions ``[0, prefix.end)`` left out, given by their compact range (what the
        online log keeps of a prefix retention removed) instead of leaf by leaf."""
        if self._pos != 0 or prefix.begin != 0:
            raise ValueError("a pruned prefix starts the bundle, at position 0")
        if prefix.end == 0:
            return
        if prefix.end > self.log_size:
            raise ValueError(f"the pruned prefix ({prefix.end}) is beyond the bundle's log size {self.log_size}")
        self._gap = CompactRange(0, prefix.end, prefix.hashes)
        self._full = CompactRange(0, prefix.end, prefix.hashes)
        self._left_out += prefix.end
        self._pos = prefix.end
        cuts = self._cut_sizes
        while self._next_cut < len(cuts) and cuts[self._next_cut] <= prefix.end:
            if cuts[self._next_cut] == prefix.end and self._full.root() != self._roots[prefix.end]:
                self.warnings.append(f"the pruned prefix does not match the checkpoint of size {prefix.end}")
            self._next_cut += 1

    def _record(self, seq: int, h: bytes, line: bytes, segment: str) -> None:
        stem = segment_stem(segment)
        if stem != self._stem:
            if stem in self._files or (self._stem is not None and stem < self._stem):
                raise ValueError(f"segment {stem} comes after segment {self._stem}")
            self._open_segment(stem)
        if seq < self._stem_start:
            raise ValueError(f"seq {seq} cannot be in segment {stem}")
        if b"\n" in line:
            raise ValueError(f"the record at {seq} holds a newline")
        if _leaf_hash(line) != h:
            self.warnings.append(f"seq {seq}: the record's leaf hash differs from the log's (record altered?)")
        try:
            obj = canonical.loads_canonical(line)
            if not isinstance(obj, dict) or obj.get("seq") != seq:
                self.warnings.append(f"seq {seq}: the record's seq field is not {seq}")
        except canonical.CanonicalError as exc:
            self.warnings.append(f"seq {seq}: the record is not canonical JSON: {exc}")
        assert self._jsonl is not None and self._leaves is not None
        self._jsonl.write(line + b"\n")
        self._leaves.write(h)
        self._records += 1

    def _open_segment(self, stem: str) -> None:
        self._close_segment()
        self._stem = stem
        self._stem_start = int(stem)
        self._stems.append(stem)
        self._jsonl = self._files[f"records/{stem}.jsonl"] = _HashingFile(self._tmp / "records" / f"{stem}.jsonl")
        self._leaves = self._files[f"records/{stem}.leaves"] = _HashingFile(self._tmp / "records" / f"{stem}.leaves")

    def _close_segment(self) -> None:
        for f in (self._jsonl, self._leaves):
            if f is not None:
                f.close()
        self._jsonl = self._leaves = None

    def _close_gap(self) -> None:
        gap = self._gap
        assert gap is not None
        self._gap = None
        obj = {"start": gap.begin, "end": gap.end, "hashes": [base64.b64encode(h).decode() for h in gap.hashes]}
        self._proofs.write(canonical.dumps(obj) + b"\n")
        self._proof_count += 1

    # -- finishing --

    def close(self) -> BundleSummary:
        """Write the remaining files, sign the manifest, pack and rename into place."""
        if self._closed:
            raise ValueError("the bundle is closed")
        try:
            return self._finish()
        except BaseException:
            self.abort()
            raise

    def _finish(self) -> BundleSummary:
        if self._pos != self.log_size:
            raise ValueError(f"add() was called for {self._pos} positions; the bundle's log size is {self.log_size}")
        if self._gap is not None:  # cannot happen: log_size is a checkpoint size
            self._close_gap()
        self._close_segment()
        self._proofs.close()
        small: dict[str, bytes] = {
            TRUST: self.trust_note.encode("utf-8"),
            ROOT_PUB: (self.root_verifier_key + "\n").encode(),
            CHECKPOINTS: b"".join(self._checkpoint_lines),
        }
        for key in self.verifier_keys:
            small[f"keys/{key.key_id}.pub"] = (str(key) + "\n").encode()
        entries = [ManifestFile(hashlib.sha256(data).hexdigest(), len(data), name) for name, data in small.items()]
        big: dict[str, _HashingFile] = {PROOFS: self._proofs, **self._files}
        for name, f in big.items():
            entries.append(ManifestFile(f.sha.hexdigest(), f.size, name))
        text = make_manifest(self.origin, self.log_size, self.frm, self.to, self.session, self.created, entries)
        manifest = sign_note(text, self.signing_key)

        order = [MANIFEST, TRUST, ROOT_PUB, *sorted(n for n in small if n.startswith("keys/") and n != ROOT_PUB)]
        order += [CHECKPOINTS, PROOFS]
        for stem in self._stems:
            order += [f"records/{stem}.jsonl", f"records/{stem}.leaves"]
        small[MANIFEST] = manifest.encode("utf-8")

        fd, tmp_name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        tmp_tar = Path(tmp_name)
        try:
            mtime = int(parse_time(self.created).timestamp()) if self.created else int(_time.time())
            with os.fdopen(fd, "wb") as raw:
                with tarfile.open(fileobj=raw, mode="w:gz", format=tarfile.PAX_FORMAT, compresslevel=6) as tar:
                    for name in order:
                        info = tarfile.TarInfo(name)
                        info.mtime = mtime
                        info.mode = 0o644
                        info.uid = info.gid = 0
                        info.uname = info.gname = ""
                        if name in small:
                            data = small[name]
                            info.size = len(data)
                            tar.addfile(info, io.BytesIO(data))
                        else:
                            f = big[name]
                            info.size = f.size
                            with open(f.path, "rb") as src:
                                tar.addfile(info, src)
                raw.flush()
                os.fsync(raw.fileno())
            sha = hashlib.sha256()
            with open(tmp_tar, "rb") as done:
                for chunk in iter(lambda: done.read(1 << 20), b""):
                    sha.update(chunk)
            size = tmp_tar.stat().st_size
            os.replace(tmp_tar, self.path)
            _fsync_dir(self.path.parent)
        except BaseException:
            tmp_tar.unlink(missing_ok=True)
            raise
        self._closed = True
        shutil.rmtree(self._tmp, ignore_errors=True)
        return BundleSummary(self.path, self.log_size, self._records, self._left_out, self._proof_count,
                             len(self._checkpoint_lines), len(order), size, sha.hexdigest(), manifest,
                             list(self.warnings))

    def abort(self) -> None:
        """Drop everything written so far (nothing appears at ``path``)."""
        self._closed = True
        for f in [self._proofs, *self._files.values()]:
            f.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self._closed:
            self.abort()  # an error, or left without close(): nothing half-written stays behind


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
