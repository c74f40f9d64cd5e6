"""The trust file: which signing keys may sign checkpoints for which tree sizes.

``trust.note`` is a signed note by the root key (key name ``<origin>/root``)::

    tollgate-trust v1
    origin <origin>
    key <verifier key> <valid from size> <valid until size or ->
    …
    witness <witness key>                  (optional, repeatable)
    witness-quorum <n>                     (with witnesses: how many must cosign)

A key may sign checkpoints (and bundle manifests) whose tree size lies in [from, until],
both inclusive, ``-`` meaning no end yet. Signing keys are named after the origin.
Witnesses (c2sp.org/tlog-cosignature keys, ``name+hash+base64(0x04 ‖ key)``): the
checkpoint a verifier relies on must carry cosignatures by ``witness-quorum`` of them —
set with the root key, so whoever holds only the signing key can't drop the requirement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from appliance.audit.cosignature import WitnessKey, parse_witness_key
from appliance.audit.note import (
    NoteError,
    SigningKey,
    VerifierKey,
    open_note,
    parse_verifier_key,
    sign_note,
)

__all__ = ["HEADER", "Trust", "TrustEntry", "TrustError", "build_trust", "parse_trust", "root_name"]

HEADER = "tollgate-trust v1"


class TrustError(ValueError):
    """A signature by a key the trust file doesn't know, or outside the key's validity."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def root_name(origin: str) -> str:
    return f"{origin}/root"


@dataclass(frozen=True)
class TrustEntry:
    key: VerifierKey
    valid_from: int
    valid_until: int | None = None

    def covers(self, size: int) -> bool:
        return self.valid_from <= size and (self.valid_until is None or size <= self.valid_until)

    @property
    def range_text(self) -> str:
        until = "-" if self.valid_until is None else str(self.valid_until)
        return f"[{self.valid_from}, {until}]"

    def line(self) -> str:
        until = "-" if self.valid_until is None else str(self.valid_until)
        return f"key {self.key} {self.valid_from} {until}"


def _size(s: str, what: str) -> int:
    if not s.isascii() or not s.isdigit() or (len(s) > 1 and s[0] == "0") or len(s) > 19:
        raise NoteError(f"malformed trust file: {what} {s[:30]!r} is not a tree size")
    return int(s)


def _check_entries(origin: str, entries: Sequence[TrustEntry]) -> None:
    seen: set[tuple[str, bytes]] = set()
    for e in entries:
        if e.key.name != origin:
            raise NoteError(f"trust file: key {e.key.label} is not named after the origin {origin!r}")
        if e.valid_from < 0 or (e.valid_until is not None and e.valid_until < e.valid_from):
            raise NoteError(f"trust file: key {e.key.label} has an empty validity range {e.range_text}")
        slot = (e.key.name, e.key.key_hash)
        if slot in seen:
            raise NoteError(f"trust file: key {e.key.label} is listed twice")
        seen.add(slot)


class Trust:
    """A parsed, verified trust file."""

    def __init__(self, origin: str, entries: Sequence[TrustEntry], root: VerifierKey | None = None,
                 witnesses: Sequence[WitnessKey] = (), witness_quorum: int = 0) -> None:
        _check_entries(origin, entries)
        if len(set(witnesses)) != len(witnesses):
            raise NoteError("trust file: a witness is listed twice")
        if witnesses and not 1 <= witness_quorum <= len(witnesses):
            raise NoteError(f"trust file: witness-quorum {witness_quorum} is not between 1 and {len(witnesses)}")
        if not witnesses and witness_quorum:
            raise NoteError("trust file: witness-quorum without witnesses")
        self.origin = origin
        self.entries = list(entries)
        self.root = root
        self.witnesses = list(witnesses)
        self.witness_quorum = witness_quorum
        self._by_slot = {(e.key.name, e.key.key_hash): e for e in self.entries}

    def verifier_keys(self) -> list[VerifierKey]:
        return [e.key for e in self.entries]

    def entry(self, name: str, key_hash: bytes) -> TrustEntry | None:
        return self._by_slot.get((name, bytes(key_hash)))

    def check(self, name: str, key_hash: bytes, size: int) -> TrustEntry:
        """The entry of key (name, key_hash) if it may sign tree ``size``; TrustError if not."""
        e = self._by_slot.get((name, bytes(key_hash)))
        if e is None:
            raise TrustError(f"unknown key {name}+{bytes(key_hash).hex()} (not in the trust file)")
        if not e.covers(size):
            raise TrustError(f"key {e.key.label} is valid for tree sizes {e.range_text}, not {size}")
        return e

    def text(self) -> str:
        witnesses = "".join(f"witness {w}\n" for w in self.witnesses)
        if self.witnesses:
            witnesses += f"witness-quorum {self.witness_quorum}\n"
        return f"{HEADER}\norigin {self.origin}\n" + "".join(e.line() + "\n" for e in self.entries) + witnesses


def build_trust(origin: str, entries: Sequence[TrustEntry], root: SigningKey,
                witnesses: Sequence[WitnessKey] = (), witness_quorum: int = 0) -> str:
    """The trust file, signed by ``root`` (whose name must be ``<origin>/root``)."""
    if root.name != root_name(origin):
        raise NoteError(f"the root key must be named {root_name(origin)!r}, not {root.name!r}")
    if not origin or any(c.isspace() for c in origin):
        raise NoteError("the origin must be non-empty and hold no white space")
    return sign_note(Trust(origin, entries, None, witnesses, witness_quorum).text(), root)


def parse_trust(note: str | bytes, root: VerifierKey) -> Trust:
    """Verify the trust file against the pinned ``root`` key and parse it.

    NoteError (a ValueError) naming the problem: bad or missing root signature, a root key
    not named ``<origin>/root``, malformed lines, keys not named after the origin.
    """
    try:
        text, _keys = open_note(note, [root])
    except NoteError as exc:
        raise NoteError(f"trust file not signed by the pinned root key {root.label}: {exc}") from None
    lines = text[:-1].split("\n")
    if lines[0] != HEADER:
        raise NoteError(f"malformed trust file: first line is {lines[0][:40]!r}, not {HEADER!r}")
    if len(lines) < 2 or not lines[1].startswith("origin "):
        raise NoteError("malformed trust file: second line must be 'origin <origin>'")
    origin = lines[1][len("origin "):]
    if not origin or any(c.isspace() for c in origin):
        raise NoteError("malformed trust file: bad origin")
    if root.name != root_name(origin):
        raise NoteError(f"trust file for origin {origin!r} must be signed by a key named {root_name(origin)!r}, "
                        f"not {root.name!r}")
    entries = []
    witnesses: list[WitnessKey] = []
    quorum = 0
    for n, line in enumerate(lines[2:], 3):
        parts = line.split(" ")
        if len(parts) == 2 and parts[0] == "witness":
            witnesses.append(parse_witness_key(parts[1]))
            continue
        if len(parts) == 2 and parts[0] == "witness-quorum":
            quorum = _size(parts[1], "witness-quorum")
            continue
        if len(parts) != 4 or parts[0] != "key":
            raise NoteError(f"malformed trust file: line {n} is not 'key <verifier key> <from> <until or ->'")
        key = parse_verifier_key(parts[1])
        valid_from = _size(parts[2], "valid-from")
        valid_until = None if parts[3] == "-" else _size(parts[3], "valid-until")
        entries.append(TrustEntry(key, valid_from, valid_until))
    return Trust(origin, entries, root, witnesses, quorum)
