"""Witness cosignatures on checkpoints (c2sp.org/tlog-cosignature, ``cosignature/v1``).

A witness that has checked a checkpoint is consistent with everything it saw of the log
before adds a signature line of its own to the checkpoint note::

    — <witness name> base64(key hash[4] ‖ timestamp[8, big-endian] ‖ Ed25519 signature[64])

The key hash is SHA-256(name ‖ "\\n" ‖ 0x04 ‖ 32-byte public key)[:4] (0x04: the
cosignature/v1 type byte), and the signature is over::

    cosignature/v1
    time <timestamp, decimal seconds since the epoch>
    <the checkpoint's note text>

A witness key is written ``name+HHHHHHHH+base64(0x04 ‖ public key)``. This module is part
of the standalone verifier: stdlib and cryptography only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance.audit.note import SIG_PREFIX, NoteError, is_valid_name, split_note

__all__ = [
    "ALG_COSIGNATURE_V1",
    "Cosignature",
    "Cosigner",
    "QuorumResult",
    "WitnessKey",
    "check_quorum",
    "cosignature_message",
    "cosignatures",
    "merge_signature_lines",
    "parse_witness_key",
]

ALG_COSIGNATURE_V1 = 0x04
_HEX8 = re.compile(r"[0-9a-f]{8}")


def _key_hash(name: str, public_bytes: bytes) -> bytes:
    return hashlib.sha256(name.encode("utf-8") + b"\n" + bytes([ALG_COSIGNATURE_V1]) + public_bytes).digest()[:4]


def cosignature_message(checkpoint_text: str, timestamp: int) -> bytes:
    """The bytes a cosignature/v1 signature is over."""
    return f"cosignature/v1\ntime {timestamp}\n".encode() + checkpoint_text.encode("utf-8")


class WitnessKey:
    """A witness's public key with its name: checks its cosignatures."""

    __slots__ = ("_key", "key_hash", "name", "public_bytes")

    def __init__(self, name: str, public_bytes: bytes) -> None:
        if not is_valid_name(name):
            raise NoteError(f"invalid witness name {name!r} (must be non-empty, no spaces, no '+')")
        if len(public_bytes) != 32:
            raise NoteError("an Ed25519 public key is 32 bytes")
        self.name = name
        self.public_bytes = bytes(public_bytes)
        self.key_hash = _key_hash(name, self.public_bytes)
        self._key = Ed25519PublicKey.from_public_bytes(self.public_bytes)

    @property
    def label(self) -> str:
        return f"{self.name}+{self.key_hash.hex()}"

    def verify(self, checkpoint_text: str, timestamp: int, sig: bytes) -> bool:
        if len(sig) != 64:
            return False
        try:
            self._key.verify(bytes(sig), cosignature_message(checkpoint_text, timestamp))
        except InvalidSignature:
            return False
        return True

    def __str__(self) -> str:
        raw = bytes([ALG_COSIGNATURE_V1]) + self.public_bytes
        return f"{self.name}+{self.key_hash.hex()}+{base64.b64encode(raw).decode()}"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WitnessKey):
            return NotImplemented
        return (self.name, self.public_bytes) == (other.name, other.public_bytes)

    def __hash__(self) -> int:
        return hash((self.name, self.public_bytes))


def parse_witness_key(s: str) -> WitnessKey:
    """Parse ``name+HHHHHHHH+base64(0x04 ‖ key)``; NoteError naming what is wrong."""
    parts = s.strip().split("+", 2) if isinstance(s, str) else []
    if len(parts) != 3:
        raise NoteError("malformed witness key (want name+hash+key)")
    name, hash16, key64 = parts
    if not _HEX8.fullmatch(hash16):
        raise NoteError("malformed witness key: the key hash must be 8 lower-case hex digits")
    try:
        raw = base64.b64decode(key64.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise NoteError("malformed witness key: bad base64") from None
    if len(raw) != 33 or raw[0] != ALG_COSIGNATURE_V1:
        raise NoteError("malformed witness key: want 0x04 (cosignature/v1) and a 32-byte Ed25519 key")
    key = WitnessKey(name, raw[1:])
    if key.key_hash.hex() != hash16:
        raise NoteError("witness key hash does not match its name and key")
    return key


class Cosigner:
    """A witness's private key: makes cosignature lines."""

    __slots__ = ("_key", "key")

    def __init__(self, name: str, private_key: Ed25519PrivateKey) -> None:
        pub = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.key = WitnessKey(name, pub)
        self._key = private_key

    @classmethod
    def generate(cls, name: str) -> Cosigner:
        return cls(name, Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, name: str, data: bytes) -> Cosigner:
        key = serialization.load_pem_private_key(data, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise NoteError("the witness key is not Ed25519")
        return cls(name, key)

    def to_pem(self) -> bytes:
        return self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())

    def cosign(self, checkpoint_text: str, timestamp: int) -> str:
        """One signature line (with its newline) cosigning ``checkpoint_text`` at ``timestamp``."""
        sig = self._key.sign(cosignature_message(checkpoint_text, timestamp))
        blob = self.key.key_hash + struct.pack(">Q", timestamp) + sig
        return f"{SIG_PREFIX}{self.key.name} {base64.b64encode(blob).decode()}\n"


@dataclass(frozen=True)
class Cosignature:
    witness: WitnessKey
    timestamp: int


def cosignatures(note: str, witnesses: Iterable[WitnessKey]) -> tuple[list[Cosignature], list[str]]:
    """The valid cosignatures on ``note`` by ``witnesses``, and the problems found (a bad
    signature by a known witness). Lines by other keys are skipped. NoteError if malformed."""
    text, sigs = split_note(note)
    known = {(w.name, w.key_hash): w for w in witnesses}
    good: dict[WitnessKey, Cosignature] = {}
    problems: list[str] = []
    for name, khash, blob in sigs:
        witness = known.get((name, khash))
        if witness is None:
            continue
        if len(blob) != 8 + 64:
            problems.append(f"cosignature by {witness.label} is not timestamp + signature")
            continue
        (timestamp,) = struct.unpack(">Q", blob[:8])
        if witness.verify(text, timestamp, blob[8:]):
            if witness not in good or good[witness].timestamp < timestamp:
                good[witness] = Cosignature(witness, timestamp)
        else:
            problems.append(f"bad cosignature by {witness.label}")
    return list(good.values()), problems


@dataclass(frozen=True)
class QuorumResult:
    ok: bool
    valid: list[Cosignature]
    missing: list[WitnessKey]
    problems: list[str]

    def describe(self, quorum: int) -> str:
        names = ", ".join(w.label for w in self.missing) or "none"
        return f"{len(self.valid)} of the {quorum} witness cosignatures required (missing: {names})"


def check_quorum(note: str, witnesses: Sequence[WitnessKey], quorum: int) -> QuorumResult:
    """Does ``note`` carry valid cosignatures by at least ``quorum`` of ``witnesses``?"""
    valid, problems = cosignatures(note, witnesses)
    signed = {c.witness for c in valid}
    missing = [w for w in witnesses if w not in signed]
    return QuorumResult(len(valid) >= quorum and not problems, valid, missing, problems)


def merge_signature_lines(note: str, lines: Iterable[str]) -> str:
    """``note`` with the signature ``lines`` appended (each once, in order)."""
    _text, _sigs = split_note(note)
    present = set(note.split("\n"))
    extra = []
    for line in lines:
        line = line if line.endswith("\n") else line + "\n"
        if line[:-1] not in present:
            present.add(line[:-1])
            extra.append(line)
    return note + "".join(extra)
