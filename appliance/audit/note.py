"""C2SP signed notes (c2sp.org/signed-note) and tlog-checkpoints (c2sp.org/tlog-checkpoint).

A signed note is a text, a blank line, and signature lines::

    <text: one or more lines, each ending in \\n, none empty>

    — <key name> <base64(4-byte key hash ‖ signature)>

The text is valid UTF-8 without control characters other than newline, ends with a
newline and holds no blank line. A key name is non-empty and holds no Unicode space and no
``+``. For Ed25519 (signature type 0x01) the key hash is the first 4 bytes of
SHA-256(name ‖ "\\n" ‖ 0x01 ‖ 32-byte public key), the signature is over the text bytes,
and the verifier key is written ``name+HHHHHHHH+base64(0x01 ‖ public key)``. This follows
golang.org/x/mod/sumdb/note byte for byte (the tests check its published example), and,
like it, parsing stops at 100 signatures, an unknown key's signature is skipped, and a
known key's bad signature is an error.

A checkpoint is a note whose text is: origin, tree size (decimal, no leading zeros),
root hash (standard base64), then extension lines; Tollgate writes one extension,
``time YYYY-MM-DDTHH:MM:SSZ``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

__all__ = [
    "ALG_ED25519",
    "MAX_SIGNATURES",
    "Checkpoint",
    "NoteError",
    "SigningKey",
    "VerifierKey",
    "format_time",
    "is_valid_name",
    "key_hash",
    "make_checkpoint",
    "note_signatures",
    "open_note",
    "parse_checkpoint",
    "parse_time",
    "parse_verifier_key",
    "sign_note",
    "split_note",
]

ALG_ED25519 = 0x01
MAX_SIGNATURES = 100
SIG_PREFIX = "\u2014 "  # em dash, space
_SPACE = re.compile(r"\s")
_HEX8 = re.compile(r"[0-9a-f]{8}")


class NoteError(ValueError):
    """A malformed note, key or checkpoint, or a signature that does not verify."""


def is_valid_name(name: str) -> bool:
    """Non-empty, valid UTF-8, no Unicode white space, no ``+`` (Go's isValidName) and, as
    the whole note may hold none, no control character below U+0020."""
    if not isinstance(name, str) or not name or "+" in name or _SPACE.search(name) or _bad_control(name):
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def key_hash(name: str, encoded_key: bytes) -> bytes:
    """SHA-256(name ‖ "\\n" ‖ encoded key)[:4]; the encoded key is 0x01 ‖ public key."""
    return hashlib.sha256(name.encode("utf-8") + b"\n" + encoded_key).digest()[:4]


def _b64decode(s: str) -> bytes:
    """Strict standard base64 (padding required, no other characters)."""
    try:
        raw = base64.b64decode(s.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise NoteError("malformed base64") from None
    if base64.b64encode(raw).decode("ascii") != s:
        raise NoteError("non-canonical base64")
    return raw


class VerifierKey:
    """A public key with its name: checks Ed25519 signatures on notes."""

    __slots__ = ("_key", "key_hash", "name", "public_bytes")

    def __init__(self, name: str, public_bytes: bytes) -> None:
        if not is_valid_name(name):
            raise NoteError(f"invalid key name {name!r} (must be non-empty, no spaces, no '+')")
        if len(public_bytes) != 32:
            raise NoteError("an Ed25519 public key is 32 bytes")
        self.name = name
        self.public_bytes = bytes(public_bytes)
        self.key_hash = key_hash(name, bytes([ALG_ED25519]) + self.public_bytes)
        self._key = Ed25519PublicKey.from_public_bytes(self.public_bytes)

    @property
    def key_id(self) -> str:
        return self.key_hash.hex()

    def verify(self, message: bytes, sig: bytes) -> bool:
        if len(sig) != 64:
            return False
        try:
            self._key.verify(bytes(sig), bytes(message))
        except InvalidSignature:
            return False
        return True

    def __str__(self) -> str:
        return f"{self.name}+{self.key_id}+{base64.b64encode(bytes([ALG_ED25519]) + self.public_bytes).decode()}"

    def __repr__(self) -> str:
        return f"VerifierKey({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VerifierKey):
            return NotImplemented
        return self.name == other.name and self.public_bytes == other.public_bytes

    def __hash__(self) -> int:
        return hash((self.name, self.public_bytes))

    @property
    def label(self) -> str:
        """``name+HHHHHHHH`` as diagnostics name a key."""
        return f"{self.name}+{self.key_id}"


def parse_verifier_key(s: str) -> VerifierKey:
    """Parse ``name+HHHHHHHH+base64(0x01 ‖ key)``; NoteError naming what is wrong."""
    if not isinstance(s, str):
        raise NoteError("a verifier key is a string")
    s = s.strip()
    parts = s.split("+", 2)
    if len(parts) != 3:
        raise NoteError("malformed verifier key (want name+hash+key)")
    name, hash16, key64 = parts
    if not is_valid_name(name):
        raise NoteError(f"malformed verifier key: invalid name {name!r}")
    if not _HEX8.fullmatch(hash16):
        raise NoteError("malformed verifier key: the key hash must be 8 lower-case hex digits")
    try:
        raw = _b64decode(key64)
    except NoteError as exc:
        raise NoteError(f"malformed verifier key: {exc}") from None
    if not raw:
        raise NoteError("malformed verifier key: empty key")
    if raw[0] != ALG_ED25519:
        raise NoteError(f"unknown verifier key algorithm {raw[0]}")
    if len(raw) != 33:
        raise NoteError("malformed verifier key: an Ed25519 key is 32 bytes")
    if key_hash(name, raw) != bytes.fromhex(hash16):
        raise NoteError("verifier key hash does not match its name and key")
    try:
        return VerifierKey(name, raw[1:])
    except ValueError as exc:
        raise NoteError(f"malformed verifier key: {exc}") from None


class SigningKey:
    """An Ed25519 private key with its name."""

    __slots__ = ("_key", "_verifier", "name")

    def __init__(self, name: str, private_key: Ed25519PrivateKey) -> None:
        if not is_valid_name(name):
            raise NoteError(f"invalid key name {name!r} (must be non-empty, no spaces, no '+')")
        self.name = name
        self._key = private_key
        pub = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self._verifier = VerifierKey(name, pub)

    @classmethod
    def generate(cls, name: str) -> SigningKey:
        return cls(name, Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, name: str, seed: bytes) -> SigningKey:
        if len(seed) != 32:
            raise NoteError("an Ed25519 seed is 32 bytes")
        return cls(name, Ed25519PrivateKey.from_private_bytes(bytes(seed)))

    @classmethod
    def from_pem(cls, data: bytes, name: str) -> SigningKey:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise NoteError(f"not an unencrypted PEM private key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise NoteError("the PEM key is not Ed25519")
        return cls(name, key)

    @classmethod
    def from_note_key(cls, skey: str) -> SigningKey:
        """Go's ``PRIVATE+KEY+name+HHHHHHHH+base64(0x01 ‖ seed)`` form."""
        parts = skey.strip().split("+", 4)
        if len(parts) != 5 or parts[0] != "PRIVATE" or parts[1] != "KEY":
            raise NoteError("malformed signer key (want PRIVATE+KEY+name+hash+key)")
        _p, _k, name, hash16, key64 = parts
        if not _HEX8.fullmatch(hash16):
            raise NoteError("malformed signer key hash")
        raw = _b64decode(key64)
        if len(raw) != 33 or raw[0] != ALG_ED25519:
            raise NoteError("malformed signer key (want 0x01 and a 32-byte seed)")
        key = cls.from_seed(name, raw[1:])
        if key.key_id != hash16:
            raise NoteError("signer key hash does not match its name and key")
        return key

    def to_note_key(self) -> str:
        seed = self._key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                       serialization.NoEncryption())
        return f"PRIVATE+KEY+{self.name}+{self.key_id}+{base64.b64encode(bytes([ALG_ED25519]) + seed).decode()}"

    def to_pem(self) -> bytes:
        """PKCS#8 PEM, unencrypted (the file is 0600; the name is kept elsewhere)."""
        return self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())

    @property
    def key_hash(self) -> bytes:
        return self._verifier.key_hash

    @property
    def key_id(self) -> str:
        return self._verifier.key_id

    @property
    def public_bytes(self) -> bytes:
        return self._verifier.public_bytes

    @property
    def verifier(self) -> VerifierKey:
        return self._verifier

    def verifier_key(self) -> str:
        return str(self._verifier)

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(bytes(message))

    def __repr__(self) -> str:
        return f"SigningKey({self.name}+{self.key_id})"


def _check_text(text: str) -> bytes:
    """The note text's bytes, or NoteError if it cannot be a note's text."""
    if not isinstance(text, str):
        raise NoteError("note text must be a str")
    if not text:
        raise NoteError("malformed note: empty text")
    if not text.endswith("\n"):
        raise NoteError("malformed note: the text must end with a newline")
    if text.startswith("\n") or "\n\n" in text:
        raise NoteError("malformed note: the text holds a blank line")
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        raise NoteError("malformed note: the text is not valid UTF-8") from None
    if _bad_control(text):
        raise NoteError("malformed note: control character in the text")
    return raw


_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f]")


def _bad_control(s: str) -> bool:
    return _CONTROL.search(s) is not None


def sign_note(text: str, *keys: SigningKey) -> str:
    """The signed note: ``text``, a blank line, one signature line per key."""
    if not keys:
        raise NoteError("sign_note needs at least one key")
    if len(keys) > MAX_SIGNATURES:
        raise NoteError(f"at most {MAX_SIGNATURES} signatures")
    raw = _check_text(text)
    lines = []
    for key in keys:
        sig = key.sign(raw)
        lines.append(f"{SIG_PREFIX}{key.name} {base64.b64encode(key.key_hash + sig).decode()}\n")
    return text + "\n" + "".join(lines)


def split_note(note: str | bytes) -> tuple[str, list[tuple[str, bytes, bytes]]]:
    """The text and the (name, key hash, signature) of each signature line, unverified.

    NoteError if the note is malformed. Identical signature lines are kept once.
    """
    if isinstance(note, (bytes, bytearray, memoryview)):
        try:
            note = bytes(note).decode("utf-8")
        except UnicodeDecodeError:
            raise NoteError("malformed note: not valid UTF-8") from None
    if not isinstance(note, str):
        raise NoteError("a note is text")
    try:
        note.encode("utf-8")
    except UnicodeEncodeError:
        raise NoteError("malformed note: not valid UTF-8") from None
    if _bad_control(note):
        raise NoteError("malformed note: control character")
    split = note.rfind("\n\n")
    if split < 0:
        raise NoteError("malformed note: no blank line before the signatures")
    text = note[: split + 1]
    sigs = note[split + 2:]
    if not sigs or not sigs.endswith("\n"):
        raise NoteError("malformed note: no signature lines, or the last one does not end with a newline")
    _check_text(text)
    out: list[tuple[str, bytes, bytes]] = []
    seen: set[str] = set()
    for count, line in enumerate(sigs[:-1].split("\n"), 1):
        if count > MAX_SIGNATURES:
            raise NoteError(f"malformed note: more than {MAX_SIGNATURES} signatures")
        if not line.startswith(SIG_PREFIX):
            raise NoteError(f"malformed note: signature line {count} does not start with '— '")
        rest = line[len(SIG_PREFIX):]
        name, sep, b64 = rest.partition(" ")
        if not sep or not is_valid_name(name) or not b64:
            raise NoteError(f"malformed note: signature line {count} is not '— NAME SIGNATURE'")
        try:
            raw = _b64decode(b64)
        except NoteError:
            raise NoteError(f"malformed note: signature line {count} has bad base64") from None
        if len(raw) < 5:
            raise NoteError(f"malformed note: signature line {count} is too short")
        if line in seen:
            continue
        seen.add(line)
        out.append((name, raw[:4], raw[4:]))
    return text, out


def note_signatures(note: str | bytes) -> list[tuple[str, bytes, bytes]]:
    """(key name, key hash, signature) of each signature line (unverified; diagnostics)."""
    return split_note(note)[1]


def open_note(note: str | bytes, keys: Iterable[VerifierKey]) -> tuple[str, list[VerifierKey]]:
    """Verify ``note`` against the known ``keys``: its text and the keys whose signatures held.

    Signatures by keys not in ``keys`` are skipped; NoteError if the note is malformed, if a
    known key's signature is bad ("bad signature by NAME+HASH"), or if no known key signed
    it ("no known key: signed by NAME+HASH, …").
    """
    text, sigs = split_note(note)
    known: dict[tuple[str, bytes], VerifierKey] = {}
    for key in keys:
        slot = (key.name, key.key_hash)
        other = known.get(slot)
        if other is not None and other.public_bytes != key.public_bytes:
            raise NoteError(f"ambiguous key {key.label}: two known keys share its name and hash")
        known[slot] = key
    raw = text.encode("utf-8")
    verified: list[VerifierKey] = []
    unknown: list[str] = []
    for name, khash, sig in sigs:
        key = known.get((name, khash))
        if key is None:
            unknown.append(f"{name}+{khash.hex()}")
            continue
        if not key.verify(raw, sig):
            raise NoteError(f"bad signature by {key.label}")
        if key not in verified:
            verified.append(key)
    if not verified:
        if unknown:
            raise NoteError(f"no known key: signed by unknown key {', '.join(unknown)}")
        raise NoteError("no known key: the note has no signatures")
    return text, verified


# --- tlog-checkpoint ---------------------------------------------------------------------

_SIZE = re.compile(r"0|[1-9][0-9]{0,19}")
_TIME = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?Z")


def parse_time(s: str) -> datetime:
    """UTC ``YYYY-MM-DDTHH:MM:SS[.f…]Z`` as an aware datetime; ValueError otherwise."""
    m = _TIME.fullmatch(s) if isinstance(s, str) else None
    if m is None:
        raise ValueError(f"bad time {s!r} (want YYYY-MM-DDTHH:MM:SS[.ffffff]Z)")
    year, month, day, hour, minute, second, frac = m.groups()
    micro = int((frac or "0")[:6].ljust(6, "0"))
    try:
        return datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), micro, tzinfo=UTC)
    except ValueError as exc:
        raise ValueError(f"bad time {s!r}: {exc}") from None


def format_time(t: datetime | None = None) -> str:
    """``YYYY-MM-DDTHH:MM:SSZ`` (the checkpoint form, whole seconds, UTC)."""
    if t is None:
        t = datetime.now(UTC)
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes
    time: str | None = None
    extensions: tuple[str, ...] = field(default=())

    def text(self) -> str:
        root = base64.b64encode(self.root).decode()
        return f"{self.origin}\n{self.size}\n{root}\n" + "".join(f"{e}\n" for e in self.extensions)


def make_checkpoint(origin: str, size: int, root: bytes, time: str) -> str:
    """The checkpoint's note text: origin, size, base64 root, ``time …`` (each line + \\n)."""
    if not origin or "\n" in origin or _bad_control(origin):
        raise NoteError("a checkpoint origin is one non-empty line")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise NoteError("tree size must be a non-negative integer")
    if len(root) != 32:
        raise NoteError("root hash must be 32 bytes")
    parse_time(time)
    return f"{origin}\n{size}\n{base64.b64encode(root).decode()}\ntime {time}\n"


def parse_checkpoint(text: str) -> Checkpoint:
    """Parse a checkpoint's note text (not the signatures: see ``open_note``)."""
    if not isinstance(text, str) or not text.endswith("\n"):
        raise NoteError("malformed checkpoint: the text must end with a newline")
    lines = text[:-1].split("\n")
    if len(lines) < 3:
        raise NoteError("malformed checkpoint: fewer than 3 lines")
    origin, size_s, root_s, *ext = lines
    if not origin or _bad_control(origin):
        raise NoteError("malformed checkpoint: empty origin")
    if not _SIZE.fullmatch(size_s):
        raise NoteError(f"malformed checkpoint: tree size {size_s[:30]!r} is not a decimal without leading zeros")
    size = int(size_s)
    if size >= 2**63:
        raise NoteError("malformed checkpoint: tree size too large")
    try:
        root = _b64decode(root_s)
    except NoteError:
        raise NoteError("malformed checkpoint: root hash is not base64") from None
    if len(root) != 32:
        raise NoteError("malformed checkpoint: root hash is not 32 bytes")
    time = None
    for line in ext:
        if not line:
            raise NoteError("malformed checkpoint: empty extension line")
        if line.startswith("time "):
            if time is not None:
                raise NoteError("malformed checkpoint: two time lines")
            time = line[5:]
            try:
                parse_time(time)
            except ValueError as exc:
                raise NoteError(f"malformed checkpoint: {exc}") from None
    return Checkpoint(origin, size, root, time, tuple(ext))
