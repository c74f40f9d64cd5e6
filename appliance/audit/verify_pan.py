"""Finding clear card numbers (PANs) in audit records, fast enough for millions of them.

A record must never hold a card number in the clear (the proxy scrubs what it records):
:func:`find_clear_pans` walks a parsed record's strings, keys and integers (``\\x…`` hex
strings decoded first, as binary parameters are shown that way). Most records hold no run
of 13 digits at all, so :func:`line_may_hold_pan` and :func:`flagged_lines` rule lines out
from their canonical bytes first, a line or a whole block at a time. Detection itself is
:mod:`appliance.pan.detector`, the proxy's own detector.

What is reported quotes a card number masked (:func:`mask_digits`), and messages that
quote record content have every long digit run starred (:func:`redact_digits`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from appliance.pan.detector import CONTEXT, PREFILTER, find_pans, int_is_pan, is_pan_digits, may_hold_pan


def mask_digits(digits_and_separators: bytes) -> str:
    """A card number with every digit but the last four starred (separators kept)."""
    raw = digits_and_separators.decode("ascii", "replace")
    total = sum(c.isdigit() for c in raw)
    out = []
    seen = 0
    for c in raw:
        if c.isdigit():
            seen += 1
            out.append(c if seen > total - 4 else "*")
        else:
            out.append(c)
    return "".join(out)


_LONG_DIGITS = re.compile(r"[0-9](?:[ -]?[0-9]){5,}")


def redact_digits(message: str) -> str:
    """A message quoting record content with every run of 6+ digits starred: what a
    record holds may be a card number the detector cannot see whole in an excerpt."""
    return _LONG_DIGITS.sub(lambda m: re.sub(r"[0-9]", "*", m.group()), message)


def _format_path(trail: tuple[Any, ...]) -> str:
    out = "$"
    for part in trail:
        if type(part) is int:
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part):
            out += f".{part}"
        else:
            out += f"[{json.dumps(part, ensure_ascii=True)}]"
    return out


def _hex_param(s: str) -> bytes | None:
    """The bytes of a ``\\x…`` hex string (how binary parameters are shown), else None."""
    if len(s) > 2 and s[0] == "\\" and s[1] == "x" and len(s) % 2 == 0 and _HEX.fullmatch(s, 2):
        return bytes.fromhex(s[2:])
    return None


_HEX = re.compile(r"[0-9a-fA-F]+")


_MIN = 13  # the fewest digits a card number has
_MIN_INT = 10 ** (_MIN - 1)


def _scan_str(s: str, trail: tuple[Any, ...], suffix: str, found: list[tuple[str, str]]) -> None:
    data = s.encode("utf-8", "surrogatepass")
    if PREFILTER.search(data) is not None:
        for a, b in find_pans(data):
            found.append((_format_path(trail) + suffix, mask_digits(data[a:b])))
    if s[:2] == "\\x":
        raw = _hex_param(s)
        if raw is not None and may_hold_pan(raw):
            for a, b in find_pans(raw):
                found.append((_format_path(trail) + suffix + " (hex)", mask_digits(raw[a:b])))


def _scan(obj: Any, trail: tuple[Any, ...], found: list[tuple[str, str]]) -> None:
    t = type(obj)
    if t is str:
        if len(obj) >= _MIN:
            _scan_str(obj, trail, "", found)
    elif t is dict:
        for key, value in obj.items():
            if len(key) >= _MIN:
                _scan_str(key, (*trail, key), " (key)", found)
            vt = type(value)
            if (vt is str and len(value) < _MIN) or value is None or vt is bool:
                continue
            _scan(value, (*trail, key), found)
    elif t is list:
        for i, value in enumerate(obj):
            vt = type(value)
            if (vt is str and len(value) < _MIN) or value is None or vt is bool:
                continue
            _scan(value, (*trail, i), found)
    elif t is int and (obj >= _MIN_INT or obj <= -_MIN_INT) and int_is_pan(obj):
        found.append((_format_path(trail), mask_digits(str(abs(obj)).encode())))


def find_clear_pans(obj: Any) -> list[tuple[str, str]]:
    """(JSON path, masked PAN) for each card number in a string, key or integer of ``obj``
    (``\\x…`` hex strings are decoded first, as binary parameters are shown that way)."""
    found: list[tuple[str, str]] = []
    _scan(obj, (), found)
    return found


_ESCAPE = re.compile(rb'\\(?:u[0-9a-fA-F]{4}|.)', re.DOTALL)
# Shorter hex strings cannot hold 13 digits.
_HEX_STRING = re.compile(rb'"\\\\x([0-9a-fA-F]{13,})"')
_HEX_MARK = b'"\\\\x'
# Digits, spaces and dashes to "0", the rest to "x": every card number, and every digit
# the detector looks at to decide one, lies in a run of 13 or more zeros of this.
_RUN_TABLE = bytes(0x30 if 0x30 <= i <= 0x39 or i in b" -" else 0x78 for i in range(256))
_THIRTEEN = b"0" * 13


def line_may_hold_pan(line: bytes) -> bool:
    """False when no string, key or integer of this *canonical* line holds a card number.

    In a canonical line a string's text appears verbatim between quotes except for escapes,
    and escapes stand only for quote, backslash and control characters, which the detector
    treats like the quotes: as plain boundaries. With every escape replaced by one such
    character, a PAN in any string (or integer) is a PAN in the line. Hex-encoded binary
    parameters (``"\\\\x…"``) are looked at on their own.

    The detector is run only where a card number can be: on each run of 13 or more digits,
    spaces and dashes, with the CONTEXT bytes either side (detection is local: that is all
    it looks at, see appliance.pan.detector). A run of plain digits is a card number only
    as a whole (a candidate has no digit on either side), so ``is_pan_digits`` settles it.
    """
    if not may_hold_pan(line):  # linear, in C: no 13 digits in a row, raw or hex-encoded
        return False
    if b"\\" in line:
        for m in _HEX_STRING.finditer(line):
            if may_hold_pan(m.group(1)):
                return True
        line = _ESCAPE.sub(b"\x01", line)
    runs = line.translate(_RUN_TABLE)
    at = runs.find(_THIRTEEN)
    while at >= 0:
        start = runs.rfind(b"x", 0, at) + 1
        end = runs.find(b"x", at)
        if end < 0:
            end = len(line)
        digits = line[start:end].strip(b" -")
        if digits.isdigit():
            if is_pan_digits(digits):
                return True
        elif find_pans(line, max(0, start - CONTEXT), min(len(line), end + CONTEXT)):
            return True
        at = runs.find(_THIRTEEN, end)
    return False


def flagged_lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(index, line) of the lines of ``data`` (canonical lines, each ending in a newline)
    that ``line_may_hold_pan`` may say yes to, found by searching the whole block in C.

    A line is passed over when its only runs of 13 or more digits, spaces and dashes are
    plain digits that are not a card number (``is_pan_digits``), as ``line_may_hold_pan``
    would find — unless a run follows a "u": the hex digits of a ``\\u00XX`` escape may
    start it, and that escape is a boundary once replaced. Hex strings as there.
    """
    starts = set()
    runs = data.translate(_RUN_TABLE)
    at = runs.find(_THIRTEEN)
    while at >= 0:
        start = runs.rfind(b"x", 0, at) + 1
        end = runs.find(b"x", at)  # every line ends in a newline, an "x"
        digits = data[start:end].strip(b" -")
        if not digits.isdigit() or is_pan_digits(digits) or data[start - 1:start] == b"u":
            starts.add(data.rfind(b"\n", 0, start) + 1)
        at = runs.find(_THIRTEEN, end)
    if _HEX_MARK in data:
        for m in _HEX_STRING.finditer(data):
            if may_hold_pan(m.group(1)):
                starts.add(data.rfind(b"\n", 0, m.start()) + 1)
    index = counted = 0
    for start in sorted(starts):
        index += data.count(b"\n", counted, start)
        counted = start
        yield index, data[start:data.find(b"\n", start)]
