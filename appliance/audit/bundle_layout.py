"""What an export bundle holds: its member names, which names are safe, its signed manifest.

A bundle is a gzip'd tar (or, for reading, a directory with the same layout) holding::

    manifest.note        signed by the current signing key: header, then one line per file
    trust.note           the trust file
    keys/root.pub        the root verifier key (informational)
    keys/KEYID.pub       every signing key's verifier key
    checkpoints.jsonl    {"note", "size", "time"} per checkpoint, by size
    proofs.jsonl         {"start", "end", "hashes"} per run of positions left out
    records/NNNNNNNNNNNN.jsonl   exported records (exact lines), one file per source segment
    records/NNNNNNNNNNNN.leaves  their leaf hashes, 32 bytes each, in order

:mod:`~appliance.audit.bundle_writer` writes one, :mod:`~appliance.audit.bundle_reader`
opens one without extracting it; the manifest's format is in docs/audit-format.md.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from appliance.audit.note import NoteError, parse_time

MANIFEST_HEADER = "tollgate-bundle v1"
MANIFEST = "manifest.note"
TRUST = "trust.note"
CHECKPOINTS = "checkpoints.jsonl"
PROOFS = "proofs.jsonl"
ROOT_PUB = "keys/root.pub"
_STEM = re.compile(r"[0-9]{12}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SIZE = re.compile(r"0|[1-9][0-9]{0,19}")


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
    lines.extend(f"file {f.sha256} {f.size} {f.path}" for f in sorted(files, key=lambda f: f.path))
    return "\n".join(lines) + "\n"


def parse_manifest(text: str) -> Manifest:
    """Parse the manifest's (already verified) note text; NoteError naming what is wrong."""
    lines = text[:-1].split("\n") if text.endswith("\n") else []
    if len(lines) < 7 or lines[0] != MANIFEST_HEADER:
        raise NoteError(f"malformed manifest: it must start with {MANIFEST_HEADER!r} and 6 header lines")
    header: dict[str, str] = {}
    for line, want in zip(lines[1:7], ("origin", "log-size", "from", "to", "session", "created"), strict=True):
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
