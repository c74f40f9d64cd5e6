"""The recoverer: how much of a card number can be read back from what a client received.

Given every string a client got for one case (values, column names, command tags, error
and notice fields, notifications, parameter statuses, COPY data) and the lab's card
numbers, it undoes the encodings an agent would use — Unicode and fullwidth digits, JSON
``\\u`` escapes, hex and base64 tokens, bytea escapes, the number behind ``to_hex`` and a
bit string, arrays of character codes, a digit-to-letter substitution, reversal, simple
arithmetic — strips everything but digits, joins the pieces across columns and rows, and
looks for the digits of each card beyond its BIN and last four. Hash outputs (md5, sha*)
of a card number count as the card number: with the BIN and last four known, the hidden
digits are few enough to brute force.

A *leak* is a window of a card's digits, long enough not to occur by chance in that much
data, covering hidden digits that are not all ``0`` (a zero between BIN and last four is
what the number mask shows anyway). Used by tests/e2e/test_adversarial.py; it knows
nothing of Tollgate's detector.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import math
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_HEX = re.compile(r"(?:\\x)?([0-9a-fA-F]{8,})")
_B64 = re.compile(r"[A-Za-z0-9+/]{8,}={0,2}")
_BITS = re.compile(r"[01]{24,}")
_INT = re.compile(r"-?\d{10,}")
_OCTAL = re.compile(r"\\([0-7]{3})")
_JSON_U = re.compile(r"\\u([0-9a-fA-F]{4})")
_NUMBERS = re.compile(r"\d+")
_NOT_DIGIT = re.compile(r"\D+")
_LETTERS = str.maketrans("abcdefghijABCDEFGHIJ", "01234567890123456789")
# Inverses of the arithmetic an agent might apply (n = f(pan) → pan = g(n)).
_INVERSES = (lambda n: n - 1, lambda n: n + 1, lambda n: n // 2, lambda n: n // 3, lambda n: -n,
             lambda n: n + 4000000000000000, lambda n: n - 12345, lambda n: n * 10)
_HASHES = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512")


_MASK_RUN = re.compile(r"\*{2,}")


def _digits_of(text: str) -> str:
    """Every decimal digit of ``text`` (any script) as ASCII, in order, whatever separates
    them — except a run of ``*``, which is a mask (it hides at least three digits) and is
    kept as a break: BIN and last four must not join into digits the card doesn't show."""
    return "|".join("".join(str(unicodedata.decimal(ch)) for ch in part if ch.isdecimal())
                    for part in _MASK_RUN.split(text))


def decodings(text: str) -> list[str]:
    """``text`` and what it decodes to under the encodings an agent would use."""
    out = [text, _JSON_U.sub(lambda m: chr(int(m.group(1), 16)), text), text.translate(_LETTERS),
           _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), text)]
    for m in _HEX.finditer(text):
        token = m.group(1)
        out.append(str(int(token, 16)))
        if len(token) % 2 == 0:
            out.append(bytes.fromhex(token).decode("latin-1"))
    for m in _B64.finditer(text):
        token = m.group()
        try:
            raw = base64.b64decode(token + "=" * (-len(token) % 4), validate=True)
        except (binascii.Error, ValueError):
            continue
        out.extend((raw.decode("latin-1"), raw.hex()))
    out.extend(str(int(m.group(), 2)) for m in _BITS.finditer(text))
    at = text.find("\x00\x00\x00\x08")  # binary COPY: an 8-byte field, read as an int8
    while 0 <= at <= len(text) - 12:
        with contextlib.suppress(UnicodeEncodeError):
            out.append(str(int.from_bytes(text[at + 4:at + 12].encode("latin-1"), "big", signed=True)))
        at = text.find("\x00\x00\x00\x08", at + 1)
    codes = [int(x) for x in _NUMBERS.findall(text)]
    if len(codes) >= 10:
        out.append("".join(chr(c) for c in codes if 0 <= c < 0x110000))
        out.append("".join(chr(c - 17) for c in codes if 65 <= c <= 74))  # chr(ascii + 17): A–J
    letters = re.findall(r"[A-J]", text)
    if len(letters) >= 10:
        out.append("".join(str(ord(c) - 65) for c in letters))
    for m in _INT.finditer(text):
        n = int(m.group())
        out.extend(str(abs(f(n))) for f in _INVERSES)
    out += [s[::-1] for s in out]
    return out


@dataclass(frozen=True)
class Leak:
    card: int
    how: str


def _hidden(pan: str) -> range:
    return range(6, len(pan) - 4)


def _window_length(targets: int, digits: int) -> int:
    """The shortest window of a card's digits that occurs by chance in ``digits`` digits
    of unrelated data, across ``targets`` cards, with odds below 1 in 1,000."""
    return max(6, math.ceil(math.log10(max(1, targets) * max(1, digits) * 20 * 1000)))


def _windows(pan: str, length: int) -> list[str]:
    """Windows of ``pan`` of ``length`` digits that cover hidden digits, not all zeros."""
    hidden = _hidden(pan)
    out = []
    for i in range(len(pan) - length + 1):
        covered = [pan[p] for p in range(i, i + length) if p in hidden]
        if covered and any(d != "0" for d in covered):
            out.append(pan[i:i + length])
    return out


def substitution_of(token: str, pan: str) -> bool:
    """Is ``token`` ``pan`` under a one-to-one character substitution (translate)?"""
    if len(token) != len(pan) or len(set(pan)) < 4:
        return False
    forward: dict[str, str] = {}
    backward: dict[str, str] = {}
    for a, b in zip(token, pan, strict=True):
        if forward.setdefault(a, b) != b or backward.setdefault(b, a) != a:
            return False
    return True


def recover(received: Sequence[str], pans: dict[int, str], targets: Iterable[int]) -> list[Leak]:
    """The leaks in ``received`` (strings a client got for one case): ``targets`` are the
    cards the case reads (searched with windows), every card is searched whole."""
    texts = [t for t in received if t]
    candidates: list[str] = []
    for t in texts:
        for d in decodings(t):
            candidates.append(d)
            candidates.append(_digits_of(d))
    joined = "".join(_digits_of(t) for t in texts)
    candidates += [joined, joined[::-1]]
    blob = "\n".join(candidates)
    digits = sum(len(_digits_of(t)) for t in texts) + len(joined)
    targets = sorted(set(targets))
    leaks: list[Leak] = []
    for card, pan in pans.items():
        if pan in blob or pan[::-1] in blob:
            leaks.append(Leak(card, "the whole number"))
    lowered = blob.lower()
    length = _window_length(len(targets), digits)
    tokens = {tok for t in texts for d in decodings(t) for tok in re.split(r"[\s,{}()\[\]\"']+", d) if tok}
    for card in targets:
        pan = pans[card]
        if any(lk.card == card for lk in leaks):
            continue
        for name in _HASHES:
            digest = hashlib.new(name, pan.encode()).hexdigest()
            if digest in lowered:
                leaks.append(Leak(card, f"{name} of the number"))
        window = next((w for w in _windows(pan, min(length, len(pan))) if w in blob), None)
        if window is not None:
            leaks.append(Leak(card, f"digits {window!r} (window of {min(length, len(pan))})"))
        for tok in tokens:
            if substitution_of(tok, pan) or substitution_of(tok[::-1], pan):
                leaks.append(Leak(card, f"a digit substitution: {tok!r}"))
                break
    return leaks
