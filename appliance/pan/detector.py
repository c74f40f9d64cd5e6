"""The card-number (PAN) detector: which digit runs in a byte string are card numbers.

A candidate is 13–19 digits, written contiguously or in groups joined by one consistent
separator (a single space or a single dash), with no digit on either side. It is a PAN
when an issuer's prefix and length match (the table below) and the Luhn check passes.
About one random digit string in ten passes Luhn, so the shapes that are digits but not
card numbers are ruled out explicitly: decimals (``0.4111…``, ``4111….25``), exponent
notation, UUID-shaped tokens, runs of 20 or more digits; epoch-millisecond timestamps
(13 digits starting with 1) and IMEIs fall out of the prefix/length table.

Detection is local: whether a span is a PAN, and which of its digits are shown, depends
only on the bytes from 64 before its start to 64 after it. The windowed scanner in
:mod:`appliance.pan.scanner` relies on that to decide spans before a value is whole.

This module imports nothing of the appliance: the auditor's standalone verifier ships it
alone (``make verifier``). What builds on it — masking whole texts, bytea hex included
(``scanner.scrub``), and values fed in windows — lives in :mod:`appliance.pan.scanner`.

Masking keeps the length and the separators and replaces digits by ``*``: ``pci`` shows at
most the first six and last four digits (PCI DSS v4 3.4.1), ``last4`` only the last four.
Where ``*`` can't go (a number), :func:`number_mask` writes digits that show the same and
form no card number.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass
from itertools import pairwise

PCI = "pci"
LAST4 = "last4"
FORMATS = (PCI, LAST4)

MIN_DIGITS = 13
MAX_DIGITS = 19
# The longest candidate: 19 digits with a separator between every two of them.
MAX_SPAN = 2 * MAX_DIGITS - 1
# Bytes after a span's start that can change whether it is a PAN and how it is shown: its
# own 37, the UUID test (36 from the start), the display rule's look at the digits after
# it (up to 18 more). See the module docstring.
CONTEXT = 64

STAR = 0x2A
_DOT = 0x2E
_DIGITS = frozenset(b"0123456789")


@dataclass(frozen=True, slots=True)
class Issuer:
    """One row of the issuer table: a prefix range (inclusive, equal widths) and lengths."""

    brand: str
    low: str
    high: str
    lengths: tuple[int, ...]


def _span(low: int, high: int) -> tuple[int, ...]:
    return tuple(range(low, high + 1))


# Issuer prefixes and the lengths they issue. A number may match several rows (65 is both
# Discover and RuPay): it is a candidate if any matching row allows its length.
ISSUERS: tuple[Issuer, ...] = (
    Issuer("Visa", "4", "4", (13, 16, 19)),
    Issuer("Mastercard", "51", "55", (16,)),
    Issuer("Mastercard", "2221", "2720", (16,)),
    Issuer("American Express", "34", "34", (15,)),
    Issuer("American Express", "37", "37", (15,)),
    Issuer("Discover", "6011", "6011", _span(16, 19)),
    Issuer("Discover", "644", "649", _span(16, 19)),
    Issuer("Discover", "65", "65", _span(16, 19)),
    Issuer("Discover", "622126", "622925", _span(16, 19)),
    Issuer("Diners Club", "36", "36", _span(14, 19)),
    Issuer("Diners Club", "38", "38", _span(14, 19)),  # DESIGN.md; the lab issues 14-digit 38…
    Issuer("Diners Club", "39", "39", _span(16, 19)),
    Issuer("Diners Club", "300", "305", _span(14, 19)),
    Issuer("JCB", "3528", "3589", _span(16, 19)),
    Issuer("UnionPay", "62", "62", _span(16, 19)),
    Issuer("Maestro", "50", "50", _span(13, 19)),
    Issuer("Maestro", "56", "58", _span(13, 19)),
    Issuer("Mir", "2200", "2204", _span(16, 19)),
    Issuer("RuPay", "60", "60", (16,)),
    Issuer("RuPay", "65", "65", (16,)),
    Issuer("RuPay", "81", "82", (16,)),
    Issuer("Verve", "506099", "506198", (16, 19)),
    Issuer("Verve", "650002", "650027", (16, 19)),
)
# Maestro also issues under every other 6… prefix (12–19 digits; 12 is below what we look
# at): it applies only where no row above matches the prefix.
MAESTRO_OTHER_6 = Issuer("Maestro", "6", "6", _span(13, 19))


def _lookup_tables() -> tuple[tuple[tuple[int, dict[bytes, int]], ...], dict[bytes, str]]:
    by_width: dict[int, dict[bytes, int]] = {}
    brands: dict[bytes, str] = {}
    for issuer in ISSUERS:
        width = len(issuer.low)
        table = by_width.setdefault(width, {})
        lengths = 0
        for n in issuer.lengths:
            lengths |= 1 << n
        for prefix in range(int(issuer.low), int(issuer.high) + 1):
            key = str(prefix).zfill(width).encode()
            table[key] = table.get(key, 0) | lengths
            brands.setdefault(key, issuer.brand)
    return tuple(sorted(by_width.items())), brands


_BY_WIDTH, _BRANDS = _lookup_tables()
_MAESTRO_LENGTHS = sum(1 << n for n in MAESTRO_OTHER_6.lengths)


def issuer_lengths(digits: bytes) -> int:
    """Bit mask of the lengths the issuers matching ``digits``' prefix give out (bit n = n digits)."""
    lengths = 0
    for width, table in _BY_WIDTH:
        lengths |= table.get(digits[:width], 0)
    if not lengths and digits[:1] == b"6":
        return _MAESTRO_LENGTHS
    return lengths


def _prefix_table() -> bytes:
    """For each 6-digit prefix (the widest in the table), the lengths issued under it as
    bits 0–6 (13–19 digits): what :func:`issuer_lengths` answers, in one index."""
    bounds = {0, 10 ** 6}
    ranges = []
    for issuer in ISSUERS:
        scale = 10 ** (6 - len(issuer.low))
        lengths = sum(1 << (n - MIN_DIGITS) for n in issuer.lengths if n >= MIN_DIGITS)
        low, high = int(issuer.low) * scale, (int(issuer.high) + 1) * scale
        ranges.append((low, high, lengths))
        bounds.update((low, high))
    maestro = sum(1 << (n - MIN_DIGITS) for n in MAESTRO_OTHER_6.lengths if n >= MIN_DIGITS)
    bounds.update((600_000, 700_000))
    table = bytearray(10 ** 6)
    edges = sorted(bounds)
    for low, high in pairwise(edges):
        lengths = 0
        for r_low, r_high, r_lengths in ranges:
            if r_low <= low and high <= r_high:
                lengths |= r_lengths
        if not lengths and 600_000 <= low < 700_000:
            lengths = maestro
        table[low:high] = bytes((lengths,)) * (high - low)
    return bytes(table)


PREFIX_LENGTHS = _prefix_table()


def _issuer_intervals() -> tuple[int, ...]:
    """Sorted bounds of the integers whose digits start with an issuer prefix and have a
    length it issues: [b0, b1) ∪ [b2, b3) ∪ … — one bisect tells if a number may be a PAN."""
    spans: list[tuple[int, int]] = []
    for n in range(MIN_DIGITS, MAX_DIGITS + 1):
        for issuer in ISSUERS:
            if n in issuer.lengths:
                scale = 10 ** (n - len(issuer.low))
                spans.append((int(issuer.low) * scale, (int(issuer.high) + 1) * scale))
        if n in MAESTRO_OTHER_6.lengths:
            spans.append((6 * 10 ** (n - 1), 7 * 10 ** (n - 1)))  # a superset of Maestro's "other 6…"
    spans.sort()
    merged: list[list[int]] = []
    for low, high in spans:
        if merged and low <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], high)
        else:
            merged.append([low, high])
    return tuple(b for pair in merged for b in pair)


ISSUER_INTERVALS = _issuer_intervals()


def int_may_be_pan(n: int) -> bool:
    """False for a non-negative integer no issuer could have issued (by prefix and length)."""
    return bool(bisect_right(ISSUER_INTERVALS, n) & 1)


def int_is_pan(n: int) -> bool:
    """Is this integer (sign ignored) a card number?"""
    if n < 0:
        n = -n
    return bool(bisect_right(ISSUER_INTERVALS, n) & 1) and is_pan_digits(str(n).encode())


def brand(digits: bytes | str) -> str | None:
    """The issuer a card number belongs to (longest matching prefix), or None."""
    raw = digits.encode() if isinstance(digits, str) else bytes(digits)
    if not issuer_lengths(raw) >> len(raw) & 1:
        return None
    for width, _table in reversed(_BY_WIDTH):
        name = _BRANDS.get(raw[:width])
        if name is not None:
            return name
    return MAESTRO_OTHER_6.brand


# Luhn without a Python loop per digit: translate every other digit through a
# "doubled, digits summed" table, and let sum() add the byte values in C.
LUHN_VALUE = bytes.maketrans(b"0123456789", bytes(range(10)))
LUHN_DOUBLED = bytes.maketrans(b"0123456789", bytes((0, 2, 4, 6, 8, 1, 3, 5, 7, 9)))


def luhn_ok(digits: bytes) -> bool:
    """True if the ASCII digit string passes the Luhn check."""
    odd = len(digits) & 1  # every second digit from the right is doubled
    return (sum(digits[odd::2].translate(LUHN_DOUBLED)) + sum(digits[1 - odd::2].translate(LUHN_VALUE))) % 10 == 0


def is_pan_digits(digits: bytes | bytearray | memoryview | str) -> bool:
    """True if the digits alone (no separators) are a card number: length, issuer, Luhn."""
    raw = digits.encode() if isinstance(digits, str) else bytes(digits)
    n = len(raw)
    if n < MIN_DIGITS or n > MAX_DIGITS or not raw.isdigit() or not raw.isascii():
        return False
    return bool(PREFIX_LENGTHS[int(raw[:6])] >> (n - MIN_DIGITS) & 1) and luhn_ok(raw)


# The pre-filter: 13 digits, each pair at most one space or dash apart. Every candidate
# contains such a run, and most rows contain none: one C-level search rules them out.
PREFILTER = re.compile(rb"[0-9](?:[ -]?[0-9]){12}")
# A cheaper superset of the pre-filter, linear in C: digits become "0", everything else
# "x", and spaces, dashes and the "d" of a hex-encoded dash ("2d") are dropped; data in
# which no 13 zeros then follow each other holds no card number, raw or in bytea hex.
ZERO_TABLE = bytes(0x30 if 0x30 <= i <= 0x39 else 0x78 for i in range(256))
ZERO_DROP = b" -dD"
THIRTEEN_ZEROS = b"0" * MIN_DIGITS


def may_hold_pan(data: bytes | bytearray | memoryview) -> bool:
    """False when ``data`` certainly holds no card number (raw digits or bytea hex)."""
    return bytes(data).translate(ZERO_TABLE, ZERO_DROP).find(THIRTEEN_ZEROS) >= 0


# Maximal runs of digit groups joined by single separators (mixed separators allowed here;
# consistency is checked per candidate).
_RUN = re.compile(rb"[0-9]+(?:[ -][0-9]+)*")
_GROUP = re.compile(rb"[0-9]+")
_UUID = re.compile(rb"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


_PLUS = ord("+")
# E.164 allows at most 15 digits after the "+"; longer runs after one are still searched.
E164_MAX_DIGITS = 15


def _word_byte(b: int) -> bool:
    return 0x30 <= b <= 0x39 or 0x41 <= b <= 0x5A or 0x61 <= b <= 0x7A or b == 0x5F


def _context_ok(data: bytes, s: int, e: int, lo: int, hi: int) -> bool:
    """Rules out the digit shapes that are not card numbers, looking around span [s, e)."""
    if s - 2 >= lo:
        before = data[s - 1]
        if before == _DOT and data[s - 2] in _DIGITS:
            return False  # the fraction of a decimal: 0.4111…
        if before in b"eE" and data[s - 2] in _DIGITS:
            return False  # the exponent of a float: 1e4111… (also keeps a starred number's
        if before in b"+-" and s - 3 >= lo and data[s - 2] in b"eE" and data[s - 3] in _DIGITS:
            return False  # neighbour's "…e" context as it was)
    if s - 1 >= lo and data[s - 1] == _PLUS and (s - 2 < lo or not _word_byte(data[s - 2])) \
            and sum(1 for b in bytes(data[s:e]) if b in _DIGITS) <= E164_MAX_DIGITS:
        return False  # a phone number in E.164 (+49 151 12345678): a card number has no "+"
    if e + 1 < hi:
        after = data[e]
        if after == _DOT and data[e + 1] in _DIGITS:
            return False  # the integer part of a decimal: 4111….25
        if after in b"eE":
            nxt = data[e + 1]
            if nxt in _DIGITS or (nxt in b"+-" and e + 2 < hi and data[e + 2] in _DIGITS):
                return False  # the mantissa of a float in exponent notation
    # Digits inside a UUID-shaped token (even an all-digit one) are not a card number.
    return not any(m.start() < e and m.end() > s for m in _UUID.finditer(data, max(lo, s - 36), min(hi, e + 36)))


def find_pans(data: bytes | bytearray | memoryview, start: int = 0, end: int | None = None,
              ends_after: int = -1) -> list[tuple[int, int]]:
    """Spans ``(start, end)`` of the card numbers in ``data[start:end]``, separators included.

    The slice's ends count as boundaries. Spans are in ascending order of start; spans of a
    grouped run may overlap (both are masked). Spans that end at or before ``ends_after``
    are not looked at (a caller that has decided those already).
    """
    if end is None:
        end = len(data)
    first = PREFILTER.search(data, start, end)
    if first is None:
        return []
    found: list[tuple[int, int]] = []
    # The pre-filter's leftmost match starts a maximal run (an earlier digit or separator
    # would have matched first), so runs can be taken from there.
    for run in _RUN.finditer(data, first.start(), end):
        s, e = run.span()
        if e - s < MIN_DIGITS or e <= ends_after:
            continue
        text = bytes(run.group())
        if text.isdigit():
            if e - s <= MAX_DIGITS and e > ends_after and is_pan_digits(text) and _context_ok(data, s, e, start, end):
                found.append((s, e))
            continue
        groups = [g.span() for g in _GROUP.finditer(data, s, e)]
        count = len(groups)
        for i in range(count):
            digits = 0
            separator = -1
            parts: list[bytes] = []
            for j in range(i, count):
                g0, g1 = groups[j]
                if j > i:
                    sep = data[g0 - 1]
                    if separator < 0:
                        separator = sep
                    elif sep != separator:
                        break
                digits += g1 - g0
                if digits > MAX_DIGITS:
                    break
                parts.append(bytes(data[g0:g1]))
                if digits >= MIN_DIGITS and g1 > ends_after:
                    gs = groups[i][0]
                    if is_pan_digits(b"".join(parts)) and _context_ok(data, gs, g1, start, end):
                        found.append((gs, g1))
    return found


def _continues(data: bytes | bytearray | memoryview, at: int, step: int, need: int, lo: int, hi: int) -> bool:
    """Does the digit run go on from ``at`` (the byte just past a span's end, going ``step``
    = ±1) with at least ``need`` more digits, in groups joined by single separators?"""
    count = 0
    while lo <= at < hi and data[at] in b" -":
        at += step
        if not (lo <= at < hi and data[at] in _DIGITS):
            break
        while lo <= at < hi and data[at] in _DIGITS:
            count += 1
            if count >= need:
                return True
            at += step
    return False


def masked_positions(data: bytes | bytearray | memoryview, s: int, e: int, fmt: str,
                     lo: int = 0, hi: int | None = None) -> list[int]:
    """Positions in span [s, e) whose digit the format hides.

    Where the digit run goes on past the span with enough digits (more groups before or
    after it), only whole groups are shown on that side: a group cut short by stars could
    otherwise join its neighbours into a new 13–19 digit look-alike never in the data.
    """
    if hi is None:
        hi = len(data)
    positions = [p for p in range(s, e) if data[p] in _DIGITS]
    n = len(positions)
    head = 6 if fmt == PCI else 0
    tail = 4
    if head and _continues(data, s - 1, -1, MIN_DIGITS - head, lo, hi):
        head = _whole_groups(positions, head)
    if _continues(data, e, 1, MIN_DIGITS - tail, lo, hi):
        tail = _whole_groups(positions[::-1], tail)
    return positions[head:n - tail]


def _whole_groups(positions: list[int], limit: int) -> int:
    """How many of the first ``limit`` digits (in the order given) make whole groups."""
    shown = 0
    for i in range(1, min(limit, len(positions)) + 1):
        if i == len(positions) or abs(positions[i] - positions[i - 1]) > 1:
            shown = i  # a group ends after the i-th digit
    return shown


def mask_span(out: bytearray, data: bytes | bytearray | memoryview, s: int, e: int, fmt: str, shift: int = 0) -> None:
    """Star the hidden digits of span [s, e) of ``data`` into ``out`` (at ``p - shift``)."""
    for p in masked_positions(data, s, e, fmt):
        out[p - shift] = STAR


NUMBER_FILLER = ord("0")
NUMBER_FIX = ord("1")
NUMBER_LAST4_HEAD = ord("9")  # no issuer's prefix starts with 9


def number_mask(digits: bytes | bytearray | memoryview, fmt: str = PCI) -> bytes:
    """A card number written as contiguous digits, masked as a number of the same length
    (for int8, numeric, money and JSON numbers, where ``*`` can't go): ``pci`` keeps the
    first six and last four digits and writes ``0`` between them; ``last4`` writes ``9``
    then ``0`` up to the last four. The result depends on nothing but the shown digits and
    the length, and is never itself a card number: a ``pci`` mask that would pass Luhn has
    its last hidden digit set to ``1`` (one digit changed by one always breaks Luhn); a
    ``last4`` mask starts with no issuer's prefix."""
    raw = bytes(digits)
    n = len(raw)
    if n < MIN_DIGITS:
        raise ValueError(f"a card number has at least {MIN_DIGITS} digits, not {n}")
    if fmt == PCI:
        out = bytearray(raw[:6] + b"0" * (n - 10) + raw[-4:])
        if is_pan_digits(out):
            out[n - 5] = NUMBER_FIX
        return bytes(out)
    return bytes((NUMBER_LAST4_HEAD,)) + b"0" * (n - 5) + raw[-4:]


def int_mask(n: int, fmt: str = PCI) -> int:
    """:func:`number_mask` of an integer, sign kept."""
    masked = int(number_mask(str(abs(n)).encode(), fmt))
    return -masked if n < 0 else masked


def money_cents_mask(cents: int, fmt: str = PCI) -> int:
    """Money as an integer of cents with every card number in it masked: the amount (cents
    kept) and the cents as one number, until neither is one (each step only hides digits)."""
    sign = -1 if cents < 0 else 1
    c = abs(cents)
    for _ in range(4):
        if int_is_pan(c // 100):
            c = int_mask(c // 100, fmt) * 100 + c % 100
        elif int_is_pan(c):
            c = int_mask(c, fmt)
        else:
            return sign * c
    raise ValueError("money value still holds a card number after masking")


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"PAN mask format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    return fmt


def mask_pans(data: bytes | bytearray | memoryview, fmt: str = PCI) -> tuple[bytes, int]:
    """``data`` with every card number masked in place, and how many were found."""
    spans = find_pans(data)
    if not spans:
        return bytes(data), 0
    out = bytearray(data)
    for s, e in spans:
        mask_span(out, data, s, e, fmt)
    return bytes(out), len(spans)


def luhn_complete(partial: str) -> str:
    """``partial`` plus the check digit that makes it pass Luhn (for tests and tooling)."""
    for d in "0123456789":
        if luhn_ok((partial + d).encode()):
            return partial + d
    raise ValueError(f"{partial!r} is not a string of digits")
