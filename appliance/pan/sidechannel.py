"""The wider search for the side channels: text an agent can make the server say back
outside a result value — column names, ParameterStatus, error and notice fields,
notifications — and everything the audit log stores.

:func:`mask_side` runs the ordinary text search (:func:`appliance.pan.scanner.mask_text`)
and then looks for the shapes it leaves alone, on purpose, in result values (where their
false-positive cost is a broken value):

- digits grouped by other separators: ``.``, ``_``, ``/``, tab, or two of them (double
  space) between groups;
- Unicode decimal digits (fullwidth U+FF10–U+FF19, Arabic-Indic …) and JSON ``\\u0034``
  escapes, alone or mixed with ASCII digits;
- contiguous runs longer than 19 digits: leading zeros are dropped, and a card number
  starting anywhere in the run (an issuer prefix, the issuer's length, Luhn) is masked —
  ``lpad`` to 20 digits, two numbers concatenated, ``string_agg`` with no separator.

A separated or encoded run is a card number when its digits, all of them, are one (13–19
digits, issuer, Luhn), as in the ordinary search. Kept untouched: UUIDs, IBANs (a run right
after two capital letters), and every run of 19 digits or fewer that is not a whole card
number (timestamps, epoch values, ISBNs, ordinary ids).

The mask shows at most the BIN (first six) and last four digits; the others become ``*``.
The result may differ in length from the input (a fullwidth digit is three bytes, its
``*`` one): callers reframe.
"""

from __future__ import annotations

import re

from appliance.pan.detector import MAX_DIGITS, MIN_DIGITS, PCI, is_pan_digits
from appliance.pan.scanner import TEXT, mask_text

# One digit: any Unicode decimal digit, or a JSON escape of an ASCII one.
_DIGIT = r"(?:\d|\\u003[0-9])"
_SEP = r"[ ._/\t,\-]{0,2}"
# The pre-filter for ASCII text, a superset of what either search finds (as the
# detector's ZERO_TABLE): digits become "0", separators, escape marks and the "d" of
# bytea hex's 2d are dropped, anything else ends a run; no 13 zeros, no card number.
_WIDE_TABLE = bytes(0x30 if 0x30 <= i <= 0x39 else 0x78 for i in range(256))
_WIDE_DROP = b" ._/\t,-\\udD"
_THIRTEEN = b"0" * MIN_DIGITS
_DECIMAL = re.compile(r"[0-9]+\.[0-9]+")
_EXPONENT = re.compile(r"[eE][-+]?[0-9]")
_GROUPED = re.compile(r"[0-9]{1,3}(?:,[0-9]{3})+")  # to_char's group commas
_RUN = re.compile(rf"{_DIGIT}(?:{_SEP}{_DIGIT})*")
_TOKEN = re.compile(_DIGIT)
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_IBAN_HEAD = re.compile(r"[A-Z]{2}$")
_DIGIT_BYTES = b"0123456789"


def clean_text(text: str) -> bool:
    """True when ``text`` surely holds no card number in any shape either search finds
    (one C-level pass); False means: search it."""
    return text.isascii() and text.encode().translate(_WIDE_TABLE, _WIDE_DROP).find(_THIRTEEN) < 0


def may_hide(raw: bytes) -> bool:
    """Cheap: 13 ASCII digits (a \\u escape carries four each) or a non-ASCII byte."""
    return len(raw) - len(raw.translate(None, _DIGIT_BYTES)) >= MIN_DIGITS or not raw.isascii()


def _value(token: str) -> str:
    return token[-1] if len(token) > 1 else str(int(token))


def _keep(n: int, fmt: str) -> set[int]:
    """Indexes (of n digits) shown: BIN and last four in PCI, last four otherwise."""
    shown = set(range(n - 4, n))
    if fmt == PCI:
        shown |= set(range(min(6, n)))
    return shown


def _uuid_at(text: str, s: int, e: int) -> bool:
    lo = max(0, s - 36)
    return any(m.start() <= s and e <= m.end() for m in _UUID.finditer(text, lo, min(len(text), e + 36)))


def _anchored(digits: str) -> list[tuple[int, int]]:
    """Card numbers in a run of more than 19 digits, at its issuer boundaries: from its
    start (after leading zeros), each one right after the last found, and one ending at
    its end."""
    spans: list[tuple[int, int]] = []
    i = len(digits) - len(digits.lstrip("0"))
    while i <= len(digits) - MIN_DIGITS:
        for length in range(min(MAX_DIGITS, len(digits) - i), MIN_DIGITS - 1, -1):
            if is_pan_digits(digits[i:i + length]):
                spans.append((i, i + length))
                i += length
                break
        else:
            break
    end = spans[-1][1] if spans else 0
    if end < len(digits):
        for length in range(MAX_DIGITS, MIN_DIGITS - 1, -1):
            start = len(digits) - length
            if start >= end and is_pan_digits(digits[start:]):
                spans.append((start, len(digits)))
                break
    return spans


def _mask_str(text: str, fmt: str) -> tuple[str, int]:
    edits: list[tuple[int, int]] = []  # (start, end) of tokens to star
    found = 0
    for run in _RUN.finditer(text):
        s, e = run.span()
        tokens = list(_TOKEN.finditer(text, s, e))
        if len(tokens) < MIN_DIGITS:
            continue
        chunk = run.group()
        if "," in chunk and not _GROUPED.fullmatch(chunk):
            continue  # a list, not a number with group commas
        if _DECIMAL.fullmatch(chunk) or _EXPONENT.match(text, e):
            continue  # a decimal or float (4.111111111111111e+15): arithmetic is not for the detector
        plain = chunk.isascii() and "\\u" not in chunk
        digits = "".join(_value(t.group()) for t in tokens)
        separated = any(tokens[i + 1].start() != tokens[i].end() for i in range(len(tokens) - 1))
        if plain and not separated and len(digits) <= MAX_DIGITS:
            continue  # the ordinary search's shape: decided there
        if _uuid_at(text, s, e) or (_IBAN_HEAD.search(text, max(0, s - 2), s) and plain):
            continue
        spans: list[tuple[int, int]] = []
        if len(digits) <= MAX_DIGITS:
            if is_pan_digits(digits):
                spans.append((0, len(digits)))
        elif not separated or not plain:
            spans = _anchored(digits)
        for a, b in spans:
            found += 1
            shown = _keep(b - a, fmt)
            edits.extend(tokens[a + k].span() for k in range(b - a) if k not in shown)
    if not edits:
        return text, 0
    out: list[str] = []
    last = 0
    for a, b in sorted(edits):
        out.append(text[last:a])
        out.append("*")
        last = b
    out.append(text[last:])
    return "".join(out), found


def mask_side(value: bytes | bytearray | memoryview, fmt: str = PCI) -> tuple[bytes | None, int]:
    """``value`` with every card number masked, the ordinary and the wider shapes: the new
    bytes (None if unchanged; maybe another length) and how many were masked."""
    raw = bytes(value)
    if raw.isascii() and raw.translate(_WIDE_TABLE, _WIDE_DROP).find(_THIRTEEN) < 0:
        return None, 0
    first, count = mask_text(raw, fmt, TEXT)
    current = raw if first is None else first
    if current.isascii() and current.translate(_WIDE_TABLE, _WIDE_DROP).find(_THIRTEEN) < 0:
        return first, count
    text = current.decode("utf-8", "surrogateescape")
    masked, more = _mask_str(text, fmt)
    if not more:
        return first, count
    return masked.encode("utf-8", "surrogateescape"), count + more


def scrub_side(text: str, fmt: str = PCI) -> str:
    """A ``str`` with every card number masked, ordinary and wider shapes (audit fields)."""
    if not text:
        return text
    masked, _count = mask_side(text.encode("utf-8", "surrogateescape"), fmt)
    return text if masked is None else masked.decode("utf-8", "surrogateescape")
