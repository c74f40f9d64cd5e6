"""Export bundles: writing them (``BundleWriter``) and reading them (``open_bundle``).

A bundle is a gzip'd tar (or, for reading, a directory with the same layout) holding::

    manifest.note        signed by the current signing key: header, then one line per file
    trust.note           the trust file
    keys/root.pub        the root verifier key (informational)
    keys/KEYID.pub       every signing key's verifier key
    checkpoints.jsonl    {"note", "size", "time"} per checkpoint, by size
    proofs.jsonl         {"start", "end", "hashes"} per run of positions left out
    records/NNNNNNNNNNNN.jsonl   exported records (exact lines), one file per source segment
    records/NNNNNNNNNNNN.leaves  their leaf hashes, 32 bytes each, in order

The writer is fed every position of the log in order (``add``), keeps the records it is
given in temporary files and, for each run of positions it is not given, the compact
range of their leaf hashes (O(log n) memory): a run is closed at every checkpoint size in
the bundle so a verifier has the tree's compact range at hand there. ``close`` writes the
rest, signs the manifest and renames the finished archive into place.

The reader never extracts anything: members are read as streams, and names that are
absolute, hold ``..``, lie outside the layout, or are not regular files are listed in
``Bundle.problems`` instead of being opened.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import shutil
import tarfile
import tempfile
import time as _time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from appliance.audit import canonical
from appliance.audit.merkle import CompactRange
from appliance.audit.merkle import leaf_hash as _leaf_hash
from appliance.audit.note import (
    NoteError,
    SigningKey,
    format_time,
    parse_checkpoint,
    parse_time,
    parse_verifier_key,
    sign_note,
    split_note,
)
from appliance.audit.trust import parse_trust

__all__ = [
    "MANIFEST_HEADER",
    "Bundle",
    "BundleError",
    "BundleSummary",
    "BundleWriter",
    "Manifest",
    "ManifestFile",
    "make_manifest",
    "open_bundle",
    "parse_manifest",
    "safe_member_name",
    "segment_stem",
]

MANIFEST_HEADER = "tollgate-bundle v1"
MANIFEST = "manifest.note"
TRUST = "trust.note"
CHECKPOINTS = "checkpoints.jsonl"
PROOFS = "proofs.jsonl"
ROOT_PUB = "keys/root.pub"
_STEM = re.compile(r"[0-9]{12}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SIZE = re.compile(r"0|[1-9][0-9]{0,19}")


class BundleError(ValueError):
    """A bundle that cannot be read at all (not a tar, not a directory, …)."""


# --- manifest ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestFile:
    sha256: str
    size: int
    path: str


@dataclass(frozen=True)
class Manifest:
    origin: str
    log_size: int
    frm: str | None
    to: str | None
    session: str | None
    created: str
    files: tuple[ManifestFile, ...]

    @property
    def filtered(self) -> bool:
        return self.frm is not None or self.to is not None or self.session is not None


def _dash(value: str | None) -> str:
    return "-" if value is None else value


def make_manifest(origin: str, log_size: int, frm: str | None, to: str | None, session: str | None,
                  created: str, files: Sequence[ManifestFile]) -> str:
    """The manifest's note text (files sorted by path)."""
    for label, value in (("from", frm), ("to", to), ("session", session), ("created", created)):
        if value is not None and (not value or value == "-" or any(c.isspace() for c in value)):
            raise ValueError(f"manifest {label} {value!r} must be a non-empty word")
    lines = [
        MANIFEST_HEADER,
        f"origin {origin}",
        f"log-size {log_size}",
        f"from {_dash(frm)}",
        f"to {_dash(to)}",
        f"session {_dash(session)}",
        f"created {created}",
    ]
    for f in sorted(files, key=lambda f: f.path):
        lines.append(f"file {f.sha256} {f.size} {f.path}")
    return "\n".join(lines) + "\n"


def parse_manifest(text: str) -> Manifest:
    """Parse the manifest's (already verified) note text; NoteError naming what is wrong."""
    lines = text[:-1].split("\n") if text.endswith("\n") else []
    if len(lines) < 7 or lines[0] != MANIFEST_HEADER:
        raise NoteError(f"malformed manifest: it must start with {MANIFEST_HEADER!r} and 6 header lines")
    header: dict[str, str] = {}
    for line, want in zip(lines[1:7], ("origin", "log-size", "from", "to", "session", "created")):
        label, sep, value = line.partition(" ")
        if label != want or not sep or not value:
            raise NoteError(f"malformed manifest: expected a '{want} …' line, got {line[:60]!r}")
        header[want] = value
    if not _SIZE.fullmatch(header["log-size"]):
        raise NoteError("malformed manifest: log-size is not a decimal")
    try:
        parse_time(header["created"])
    except ValueError as exc:
        raise NoteError(f"malformed manifest: created: {exc}") from None
    for label in ("from", "to"):
        if header[label] != "-":
            try:
                parse_time(header[label])
            except ValueError as exc:
                raise NoteError(f"malformed manifest: {label}: {exc}") from None
    files = []
    seen: set[str] = set()
    for n, line in enumerate(lines[7:], 8):
        parts = line.split(" ")
        if len(parts) != 4 or parts[0] != "file" or not _HEX64.fullmatch(parts[1]) or not _SIZE.fullmatch(parts[2]):
            raise NoteError(f"malformed manifest: line {n} is not 'file <sha256> <bytes> <path>'")
        path = parts[3]
        if safe_member_name(path) != path or path == MANIFEST:
            raise NoteError(f"malformed manifest: line {n} names an unsafe or reserved path {path[:80]!r}")
        if path in seen:
            raise NoteError(f"malformed manifest: {path} is listed twice")
        seen.add(path)
        files.append(ManifestFile(parts[1], int(parts[2]), path))

    def opt(v: str) -> str | None:
        return None if v == "-" else v

    return Manifest(header["origin"], int(header["log-size"]), opt(header["from"]), opt(header["to"]),
                    opt(header["session"]), header["created"], tuple(files))


def safe_member_name(name: str) -> str | None:
    """``name`` normalized (a leading ``./`` dropped) if it is a safe bundle path, else None.

    Safe: relative, no ``..``/``.``/empty components, printable ASCII without spaces or
    backslashes, and at the top level or directly below ``records/`` or ``keys/``.
    """
    while name.startswith("./"):
        name = name[2:]
    if not name or not name.isascii() or not name.isprintable() or " " in name or "\\" in name:
        return None
    if name.startswith("/"):
        return None
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return None
    if len(parts) == 1 or (len(parts) == 2 and parts[0] in ("records", "keys")):
        return name
    return None


def segment_stem(segment: str) -> str:
    """The 12-digit stem of a segment name (``000000000123``, ``….jsonl``, ``segments/….jsonl``)."""
    name = PurePosixPath(str(segment)).name
    name = name.removesuffix(".jsonl")
    if not _STEM.fullmatch(name):
        raise ValueError(f"segment {segment!r} is not named by a 12-digit seq")
    return name


# --- writer --------------------------------------------------------------------------------


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
            raise ValueError(f"the manifest could not be verified: {exc}; make a checkpoint with this key first") from None
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
            raise ValueError(f"position {seq} is at or beyond the bundle's log size {self.log_size} (its last checkpoint)")
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

        order = [MANIFEST, TRUST, ROOT_PUB] + sorted(n for n in small if n.startswith("keys/") and n != ROOT_PUB)
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

    def __enter__(self) -> BundleWriter:  # noqa: PYI034 - final in practice
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


# --- reader --------------------------------------------------------------------------------


_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


class _Guarded(io.RawIOBase):
    """A member stream whose read errors (a cut or corrupt archive) become BundleError."""

    def __init__(self, f: Any, name: str, on_close: Any = None) -> None:
        super().__init__()
        self._f = f
        self._name = name
        self._on_close = on_close

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        try:
            return self._f.read(size)
        except _READ_ERRORS as exc:
            raise BundleError(f"{self._name}: unreadable (the archive is damaged): {exc}") from None

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._f.close()
        finally:
            super().close()
            if self._on_close is not None:
                self._on_close()
                self._on_close = None


class Bundle:
    """A bundle opened for reading: a .tar.gz (read in place) or an unpacked directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problems: list[str] = []
        self._sizes: dict[str, int] = {}
        self._tar: tarfile.TarFile | None = None
        # Readers of the archive not in use by an open member stream. A compressed archive
        # only reads forward cheaply (going back restarts decompression from the start), so
        # each open member gets a reader of its own, preferably one already just before it:
        # the verifier reads a .jsonl and its .leaves side by side.
        self._idle: list[tarfile.TarFile] = []
        self._readers: list[tarfile.TarFile] = []
        self._members: dict[str, tarfile.TarInfo] = {}
        self._dir: Path | None = None
        if path.is_dir():
            self._dir = path
            self._scan_dir()
        elif path.exists():
            try:
                self._tar = tarfile.open(path, "r:*")  # noqa: SIM115 - closed in close()
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise BundleError(f"{path}: not a tar archive ({exc})") from None
            self._readers.append(self._tar)
            self._idle.append(self._tar)
            self._scan_tar()
        else:
            raise BundleError(f"{path}: no such file or directory")

    def _scan_tar(self) -> None:
        assert self._tar is not None
        counts: dict[str, int] = {}
        try:
            for m in self._tar:
                name = safe_member_name(m.name)
                if m.isdir():
                    if name is None and m.name.strip("./") not in ("records", "keys"):
                        self.problems.append(f"unexpected directory {m.name!r} in the archive")
                    continue
                if name is None:
                    self.problems.append(f"unsafe or unexpected member name {m.name!r} (not read)")
                    continue
                if not m.isreg():
                    self.problems.append(f"{name}: not a regular file (link or device; not read)")
                    continue
                counts[name] = counts.get(name, 0) + 1
                self._members[name] = m
                self._sizes[name] = m.size
            # Read to the end so gzip checks its length and CRC: a damaged or cut archive is
            # reported even when every member happened to be whole.
            fileobj = self._tar.fileobj
            if fileobj is not None:
                while fileobj.read(1 << 20):
                    pass
        except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error) as exc:
            self.problems.append(f"the archive is damaged after {len(self._members)} members: {exc}")
        for name, n in counts.items():
            if n > 1:
                self.problems.append(f"{name}: {n} members of that name (ambiguous)")

    def _scan_dir(self) -> None:
        assert self._dir is not None
        base = self._dir
        for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
            rel_dir = Path(dirpath).relative_to(base)
            for d in list(dirnames):
                full = Path(dirpath) / d
                rel = (rel_dir / d).as_posix()
                if full.is_symlink() or rel not in ("records", "keys"):
                    self.problems.append(f"unexpected directory {rel!r} in the bundle")
                    dirnames.remove(d)
            for f in filenames:
                full = Path(dirpath) / f
                rel = (rel_dir / f).as_posix()
                name = safe_member_name(rel)
                if name is None:
                    self.problems.append(f"unsafe or unexpected file name {rel!r} (not read)")
                elif full.is_symlink() or not full.is_file():
                    self.problems.append(f"{name}: not a regular file (link or device; not read)")
                else:
                    self._sizes[name] = full.stat().st_size

    @property
    def names(self) -> list[str]:
        return sorted(self._sizes)

    def __contains__(self, name: str) -> bool:
        return name in self._sizes

    def size(self, name: str) -> int:
        return self._sizes[name]

    def open(self, name: str) -> BinaryIO:
        """A binary stream of member ``name`` (KeyError if the bundle has no such file).

        Reading it raises BundleError (a ValueError) if the archive turns out damaged.
        """
        if name not in self._sizes:
            raise KeyError(name)
        try:
            if self._dir is not None:
                return _Guarded(open(self._dir / name, "rb", buffering=1 << 20), name)
            member = self._members[name]
            tar = self._reader_for(member.offset_data)
            f = tar.extractfile(member)
        except _READ_ERRORS as exc:
            raise BundleError(f"{name}: unreadable: {exc}") from None
        assert f is not None
        return _Guarded(f, name, lambda: self._idle.append(tar))  # type: ignore[return-value]

    def _reader_for(self, offset: int) -> tarfile.TarFile:
        """An idle reader of the archive, the one that has to skip the least to reach
        ``offset`` without going back; a new one when every idle reader is past it."""
        assert self._tar is not None
        best = None
        for tar in self._idle:
            at = tar.fileobj.tell() if tar.fileobj is not None else 0
            if at <= offset and (best is None or at > best[0]):
                best = (at, tar)
        if best is not None:
            tar = best[1]
        else:
            tar = tarfile.open(self.path, "r:*")  # noqa: SIM115 - closed in close()
            self._readers.append(tar)
            self._idle.append(tar)
        self._idle.remove(tar)
        return tar

    def read(self, name: str) -> bytes:
        with self.open(name) as f:
            return f.read()

    def chunks(self, name: str, size: int = 1 << 20) -> Iterator[bytes]:
        with self.open(name) as f:
            while True:
                chunk = f.read(size)
                if not chunk:
                    return
                yield chunk

    def close(self) -> None:
        for tar in self._readers:
            tar.close()
        self._readers.clear()
        self._idle.clear()
        self._tar = None

    def __enter__(self) -> Bundle:  # noqa: PYI034 - final in practice
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Open a bundle (.tar.gz or directory) for reading; BundleError if it can't be."""
    return Bundle(Path(path))
