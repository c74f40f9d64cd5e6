"""Masking COPY OUT data (server → client CopyData), text, CSV or binary.

COPY says nothing of column types, so:

- text and CSV are one long text: a card number written as a bare number (an int8,
  numeric or money column, or a number in JSON) is masked as a number of the same length
  (``4111110000001111``), so the data still loads back into its columns; others are
  starred in place (``*`` needs no escaping or quoting in either format); bytea hex in it
  (``\\\\x3431…``) is decoded and searched. Rows end with a newline, which no card number, UUID or decimal crosses,
  so a row is decided within its own CopyData message.
- binary is ``PGCOPY\\n\\377\\r\\n\\0``, flags, a header extension, then tuples (int16
  field count, each field int32 length + bytes) and a trailer (count −1). Each field is
  scanned as bytes in place, and an 8-byte field that reads as an int8 card number, or a
  field shaped like a binary numeric holding one, is masked as that number (a numeric
  whose masked encoding has another length fails closed: the field lengths are sent).

The data is a stream: PostgreSQL sends one row per CopyData, but a field or a card number
may span messages, so the parse state lives on between them (and across the windows of a
CopyData too large to hold). A card number that turns out to need masking in bytes that
already went to the client fails closed.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from appliance.masking import values as v
from appliance.masking.stream import LEAF, SKIP, TAKE, ColumnRule, Parser, Walker, _take, value_parser
from appliance.pan.detector import PCI, PREFIX_LENGTHS, may_hold_pan
from appliance.pan.scanner import TEXT, TextScanner

try:  # the compiled scanner for whole COPY text rows; take_line is the reference
    from appliance.masking import _fastrows as fastrows
except ImportError:  # pragma: no cover - depends on the build (the addon logs it)
    fastrows = None

SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")


def copy_text_parser(walker: Walker, fmt: str) -> Parser:
    """Text or CSV COPY data: one unbounded text."""
    yield (LEAF, -1, TextScanner(fmt, TEXT, numbers=True))


def copy_binary_parser(walker: Walker, fmt: str) -> Parser:
    """Binary COPY data: header, tuples of length-prefixed fields, trailer."""
    _at, signature = yield from _take(len(SIGNATURE))
    if signature != SIGNATURE:
        raise ValueError("binary COPY data does not start with the PGCOPY signature")
    _at, head = yield from _take(8)
    _flags, extension = struct.unpack("!Ii", head)
    if extension < 0:
        raise ValueError("negative COPY header extension length")
    if extension:
        yield (SKIP, extension)
    rules: dict[int, ColumnRule] = {}
    while True:
        _at, raw = yield from _take(2)
        (count,) = _I16.unpack(raw)
        if count == -1:
            return  # the trailer: nothing may follow
        if count < 0:
            raise ValueError("negative COPY field count")
        for i in range(count):
            _at, raw = yield from _take(4)
            (length,) = _I32.unpack(raw)
            if length < -1:
                raise ValueError("negative COPY field length")
            if length > 0:
                rule = rules.get(i)
                if rule is None:
                    rule = rules[i] = ColumnRule(v.UNKNOWN, None, v.Column(f"COPY column {i + 1}", 0, 1))
                yield from value_parser(walker, length, rule, fmt)


def _clean_tuples(body: bytes) -> bool:
    """Whole binary COPY tuples (no trailer) whose fields need no masking, given that no
    card number candidate is in the bytes: what value_parser would conclude for each."""
    pos, size = 0, len(body)
    while pos < size:
        if pos + 2 > size:
            return False
        (count,) = _I16.unpack_from(body, pos)
        pos += 2
        if count < 0:
            return False  # the trailer: let the parser see the end
        for _ in range(count):
            if pos + 4 > size:
                return False
            (length,) = _I32.unpack_from(body, pos)
            pos += 4
            if length < -1 or pos + max(length, 0) > size:
                return False
            if length <= 0:
                continue
            field = body[pos:pos + length]
            pos += length
            if v.unknown_shape(field):
                return False
            if length == 8 and (v.int8_is_pan(field) or v.money_is_pan(field)) and not v.printable(field):
                return False
            if v.numeric_shaped(field) and v.numeric_is_pan(field):
                return False
    return True


class CopyMasker:
    """The masking state of one COPY OUT: its parser, fed whole messages or windows."""

    __slots__ = ("binary", "pci", "walker")

    def __init__(self, binary: bool, fmt: str):
        self.binary = binary
        self.pci = fmt == PCI
        parser = copy_binary_parser if binary else copy_text_parser
        self.walker = Walker(lambda w: parser(w, fmt))

    def message(self, body: memoryview | bytes) -> tuple[bytes | None, int]:
        """A whole CopyData body: its replacement (same length) or None, and the count masked."""
        data = bytes(body)
        if self._clean(data):
            return None, 0
        walker = self.walker
        if not self.binary and not walker.pend_orig and not walker.carry_orig and walker.cmd is not None:
            # The compiled scanner decides the common row shape (tab-separated fields, card
            # numbers as whole fields) as take_line would; None leaves it to take_line.
            masked_as = fastrows.mask_copy_line(data, self.pci, PREFIX_LENGTHS) if fastrows is not None else None
            taken = walker.cmd[2].take_line(data, masked_as)
            if taken is not None:  # a whole text row after a whole row: masked alone
                walker.abs += len(data)
                walker.masked += taken[1]
                return taken
        before = self.walker.masked
        out, _keep = self.walker.feed(body, False)
        return out, self.walker.masked - before

    def rows(self, run: memoryview, message: Callable[[memoryview], bytes | None]) -> tuple[bytes | None, int]:
        """Whole CopyData messages back to back (tag and length included): the run's
        replacement (None if unchanged) and the count the compiled scanner masked. Rows it
        decides (text rows between rows, as :meth:`message` would take them) are masked
        there; each other message goes to ``message`` (the addon's copy_data)."""
        walker = self.walker
        n = len(run)
        pieces: list[bytes | memoryview] = []
        changed = False
        count = 0
        pos = 0
        while pos < n:
            if fastrows is not None and not self.binary and self._between_rows():
                out, found, upto = fastrows.mask_copy_run(run, pos, self.pci, PREFIX_LENGTHS)
                if upto > pos:
                    original = run[pos:upto]
                    masked = original if out is None else memoryview(out)[:upto - pos]
                    walker.cmd[2].took_lines(original, masked, found)  # type: ignore[index]
                    walker.abs += upto - pos
                    walker.masked += found
                    count += found
                    changed = changed or out is not None
                    pieces.append(masked)
                    pos = upto
                    if pos == n:
                        break
            end = pos + 1 + _I32.unpack_from(run, pos + 1)[0]
            new = message(run[pos:end])
            if new is not None:
                changed = True
            pieces.append(run[pos:end] if new is None else new)
            pos = end
        return (b"".join(pieces) if changed else None), count

    def _between_rows(self) -> bool:
        walker = self.walker
        return (not walker.pend_orig and not walker.carry_orig and walker.cmd is not None
                and walker.cmd[0] == LEAF and walker.cmd[2].lineable())

    def _clean(self, body: bytes) -> bool:
        """The common case, without the walker: a message that provably needs nothing (no
        13-digit candidate anywhere, and in binary, whole tuples whose 8-byte and numeric-
        shaped fields are no card numbers and none shaped like a record or an array).
        Leaves the walker's state as feeding it would have."""
        walker = self.walker
        if walker.pend_orig or walker.carry_orig or walker.cmd is None:
            return False
        if not self.binary:
            # Text is one unbounded LEAF, from before its first byte (left −2) to the end (−1).
            if walker.cmd[0] != LEAF or not walker.cmd[2].skip_clean(body):
                return False
        elif walker.left != -2 or walker.cmd != (TAKE, 2) or may_hold_pan(body) or not _clean_tuples(body):
            return False
        walker.abs += len(body)
        return True

    def window(self, window: memoryview | bytes, final: bool) -> tuple[bytes | None, int, int]:
        """A window of a CopyData too large to hold: replacement, bytes to keep back, count."""
        before = self.walker.masked
        out, keep = self.walker.feed(window, not final)
        return out, keep, self.walker.masked - before


def mask_copy(data: bytes, binary: bool, fmt: str = "pci") -> tuple[bytes, int]:
    """All of a COPY's data at once (for tests and tools): masked bytes and count."""
    masker = CopyMasker(binary, fmt)
    out, count = masker.message(data)
    return (out if out is not None else bytes(data)), count
