"""Masking messages that arrive in windows: large DataRows, FunctionCallResponses, COPY data.

A :class:`Walker` drives a *parser* — a generator that describes a message's structure as
a sequence of commands — over the bytes as they come:

- ``(TAKE, n)`` / ``(PEEK, n)``: the next ``n`` bytes, whole (headers, and small values such
  as an int8, which are judged only once complete); the parser gets ``(offset, bytes)``
  and may :meth:`Walker.write` a replacement;
- ``(LEAF, n, scanner)``: ``n`` bytes (−1: no end) of text through a windowed
  :class:`~appliance.pan.scanner.TextScanner`;
- ``(SKIP, n)``: pass ``n`` bytes; ``(STARS, n, pattern)``: overwrite them as they pass.

Between windows the walker either keeps back the bytes from where it stopped (the session
carries them into the next window: never more than a small value, a header, or a
scanner's ~130-byte tail), or, where it may not keep anything (the end of a message, whole
CopyData messages), releases them and remembers them read-only; a later edit that would
change a byte already sent raises :class:`MaskLeak`, and the caller fails closed.

The same value-level rules as :mod:`appliance.masking.values` apply — small values are
taken whole and given to it — so a message masked in windows comes out as it would whole.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Generator, Sequence

from appliance.masking import values as v
from appliance.masking.errors import MaskingError
from appliance.pan.scanner import ESCAPE, HEX, JSON, TEXT, MaskLeak, PanFound, TextScanner

TAKE, PEEK, LEAF, SKIP, STARS = range(5)

Command = tuple
Parser = Generator[Command, object, None]
Pattern = Callable[[int, int], bytes]  # (offset in the value, count) -> bytes to write there

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
UNBOUNDED = -1


class Walker:
    """Runs one parser over a message (or a COPY stream) fed in pieces."""

    __slots__ = (
        "_out",
        "_ro",
        "_seen",
        "_window",
        "abs",
        "carry_orig",
        "cmd",
        "gen",
        "left",
        "masked",
        "pend_orig",
        "pend_sent",
    )

    def __init__(self, parser: Callable[[Walker], Parser]):
        self.gen = parser(self)
        self.abs = 0  # absolute offset of the first byte of the next view
        self.pend_orig = b""  # bytes already sent that a TAKE still waits to complete
        self.pend_sent = b""
        self.carry_orig = b""  # original bytes of what we kept back (the session re-sends them edited)
        self.left = -2  # bytes left in the current LEAF/SKIP/STARS command; -2: not started
        self.masked = 0
        self._seen = b""
        self._ro = 0
        self._out: bytearray | None = None
        self._window: memoryview | bytes = b""
        self.cmd: Command | None = next(self.gen)

    @property
    def finished(self) -> bool:
        return self.cmd is None and not self.pend_orig and not self.carry_orig

    def feed(self, window: memoryview | bytes, may_keep: bool) -> tuple[bytes | None, int]:
        """Process the next window (starting with what we kept back last time). Returns the
        replacement for the window (same length) or None, and how many bytes to keep back."""
        ro = self.pend_orig
        k = len(self.carry_orig)
        if len(window) < k:
            raise ValueError("the window is shorter than what was kept back")
        seen = ro + self.carry_orig + bytes(window[k:]) if (ro or k) else bytes(window)
        self._seen, self._ro, self._out, self._window = seen, len(ro), None, window
        n = len(seen)
        pos = 0
        try:
            while True:
                cmd = self.cmd
                if cmd is None:
                    if pos < n:
                        raise ValueError("bytes after the end of the message structure")
                    break
                op = cmd[0]
                if op in (TAKE, PEEK):
                    need = cmd[1]
                    if n - pos < need:
                        break
                    data = seen[pos:pos + need]
                    at = self.abs + pos
                    if op == TAKE:
                        pos += need
                    self._advance((at, data))
                    continue
                if self.left == -2:
                    self.left = cmd[1]
                left = self.left
                avail = n - pos if left < 0 else min(left, n - pos)
                if op == LEAF:
                    final = left >= 0 and avail == left
                    if not avail and not final:
                        break
                    scanner: TextScanner = cmd[2]
                    before = scanner.found
                    try:
                        edits, cut = scanner.feed(seen[pos:pos + avail], final, may_keep)
                    except PanFound as exc:
                        self.gen.throw(exc)  # the parser turns it into its column's MaskingError
                        raise
                    self.masked += scanner.found - before
                    for off, rep in edits:
                        self.write(self.abs + pos + off, rep)
                elif op == SKIP:
                    cut = avail
                else:  # STARS
                    pattern: Pattern = cmd[2]
                    start = cmd[1] - left
                    if avail:
                        self.write(self.abs + pos, pattern(start, avail))
                    cut = avail
                pos += cut
                if left >= 0:
                    self.left = left - cut
                if self.left == 0:
                    self.left = -2
                    self._advance(None)
                    continue
                break
        except MaskLeak as exc:
            raise MaskingError("XX000", f"a card number could not be masked: {exc}") from None
        return self._finish(pos, may_keep)

    def _advance(self, reply: object) -> None:
        try:
            self.cmd = self.gen.send(reply)
        except StopIteration:
            self.cmd = None

    def write(self, at: int, data: bytes) -> None:
        """Replace bytes from absolute offset ``at`` (only bytes not sent yet can change)."""
        i = at - self.abs
        ro = self._ro
        if i < ro:
            head = data[:ro - i]
            if self.pend_sent[i:i + len(head)] != head:
                raise MaskLeak("part of the value was sent before it could be judged")
            data = data[ro - i:]
            i = ro
        if not data:
            return
        if self._out is None:
            self._out = bytearray(self._window)
        j = i - ro
        self._out[j:j + len(data)] = data

    def _finish(self, stop: int, may_keep: bool) -> tuple[bytes | None, int]:
        seen, ro, out = self._seen, self._ro, self._out
        n = len(seen)
        sent = bytes(out) if out is not None else None
        if may_keep:
            cut = max(stop, ro)
            keep = n - cut
            self.carry_orig = seen[cut:]
            if stop < ro:
                self.pend_orig, self.pend_sent = self.pend_orig[stop:], self.pend_sent[stop:]
            else:
                self.pend_orig = self.pend_sent = b""
        else:
            keep = 0
            self.carry_orig = b""
            window = sent if sent is not None else bytes(self._window)
            if stop < ro:
                self.pend_orig = seen[stop:]
                self.pend_sent = self.pend_sent[stop:] + window
            else:
                self.pend_orig = seen[stop:]
                self.pend_sent = window[stop - ro:]
        self.abs += stop
        self._seen = b""
        self._out = None
        self._window = b""
        return sent, keep


# ---- parsers ---------------------------------------------------------------------------


class ColumnRule:
    """How one column is masked: its kind, a policy column mask (or None), its name, and
    the Python codec of the session's client encoding when it isn't UTF-8 (where a
    mask that keeps the last characters finds them)."""

    __slots__ = ("codec", "column", "kind", "method")

    def __init__(self, kind: int, method: object, column: v.Column, codec: str | None = None):
        self.kind, self.method, self.column, self.codec = kind, method, column, codec


def _take(n: int) -> Generator[Command, object, tuple[int, bytes]]:
    reply = yield (TAKE, n)
    return reply  # type: ignore[return-value]


def _stars(kind: int, hexed: bool, size: int) -> Pattern:
    """What FULL masking writes at each offset of a streamed value of ``size`` bytes."""
    if kind == v.BYTEA and hexed:
        def pattern(start: int, count: int) -> bytes:
            head = b"\\x"[start:start + count] if start < 2 else b""
            body_from = max(start, 2)
            body = count - len(head)
            phase = (body_from - 2) & 1
            return head + (b"2a" * (body // 2 + 2))[phase:phase + body]
        return pattern
    if kind in (v.JSON, v.JSONB):
        first = 0 if kind == v.JSON else 1

        def quoted(start: int, count: int) -> bytes:
            out = bytearray(b"*" * count)
            for i in (first, size - 1):
                if start <= i < start + count:
                    out[i - start] = 0x22
            if first and start == 0 and count:
                out[0] = 1  # jsonb's version byte stays
            return bytes(out)
        return quoted
    return lambda start, count: b"*" * count


def value_parser(walker: Walker, size: int, rule: ColumnRule, fmt: str) -> Parser:
    """Commands for one value of ``size`` bytes, masked by ``rule`` the way
    :func:`appliance.masking.values.mask_value` / ``column_mask`` would mask it whole."""
    kind, method, column = rule.kind, rule.method, rule.column
    if method is not None:
        if size <= v.SMALL_VALUE:
            at, data = yield from _take(size)
            new = v.column_mask(bytes(data), kind, method, rule.codec)  # type: ignore[arg-type]
            if new is None or len(new) != size:
                raise MaskingError("42501", f"{column.name} is masked by policy as {method.value}, which its type "  # type: ignore[attr-defined]
                                 "can't show in a row this large", hint="select it cast to text, e.g. col::text")
            if new != data:
                walker.write(at, new)
            walker.masked += 1
            return
        if kind in v.STARRABLE and method.value != "null":  # type: ignore[attr-defined]
            hexed = False
            if kind == v.BYTEA:
                _at, head = yield (PEEK, min(2, size))
                hexed = head == b"\\x"
            walker.masked += 1
            # Too large to hold for the exact PAN/LAST4 form: hidden entirely instead.
            yield (STARS, size, _stars(kind, hexed, size))
            return
        raise MaskingError("42501", f"{column.name} is masked by policy, and a value this large of its type "
                         "can't be masked while streamed", hint="select it cast to text, e.g. col::text")
    if kind == v.SKIP:
        yield (SKIP, size)
    elif kind == v.TEXT:
        yield (LEAF, size, TextScanner(fmt, TEXT))
    elif kind in (v.STRUCT, v.OPAQUE, v.NUMTEXT):
        yield (LEAF, size, TextScanner(fmt, TEXT, numbers=True))
    elif kind == v.JSON:
        yield (LEAF, size, TextScanner(fmt, JSON))
    elif kind == v.JSONB:
        _at, version = yield from _take(1)
        if version != b"\x01":
            raise ValueError("jsonb binary values start with version 1")
        if size > 1:
            yield (LEAF, size - 1, TextScanner(fmt, JSON))
    elif kind == v.BYTEA:
        _at, head = yield (PEEK, min(2, size))
        yield (LEAF, size, TextScanner(fmt, HEX if head == b"\\x" else ESCAPE))
    elif kind == v.ARRAY and size > v.SMALL_VALUE:
        yield from _array_parser(walker, size, fmt, column)
    elif kind == v.RECORD and size > v.SMALL_VALUE:
        yield from _record_parser(walker, size, fmt, column)
    elif kind == v.UNKNOWN and size > v.SMALL_VALUE:
        _at, head = yield (PEEK, 12)
        shape = v.unknown_shape(head)
        if shape == v.RECORD:
            yield from _record_parser(walker, size, fmt, column)
        elif shape == v.ARRAY:
            yield from _array_parser(walker, size, fmt, column)
        else:
            yield (LEAF, size, TextScanner(fmt, TEXT, numbers=True))
    elif kind == v.NUMERIC and size > 18:
        yield (SKIP, size)  # more than five base-10000 digits: not a 13–19 digit integer
    elif kind == v.JSONARRAY and size > v.SMALL_VALUE:
        try:
            yield (LEAF, size, TextScanner(fmt, TEXT, detect_only=True))
        except PanFound:
            raise MaskingError("42501", f"{column.name} ({v.type_name(column.oid)}) holds a card number that "
                             "can't be masked while streamed", hint="select it cast to text, e.g. col::text") from None
    elif size > v.SMALL_VALUE:
        raise MaskingError("42501", f"{column.name} ({v.type_name(column.oid)}) is too large to check for card "
                         "numbers while streamed", hint="select it cast to text, e.g. col::text")
    else:
        at, data = yield from _take(size)
        masked, count = v.mask_value(bytes(data), kind, fmt, column)
        walker.masked += count
        if masked is not None:
            if len(masked) != size:
                # a re-encoded numeric whose length changed (last four digits 0000) inside
                # a value streamed or in COPY binary, where lengths are already sent
                raise MaskingError("42501", f"{column.name} ({v.type_name(column.oid)}) holds a card number that "
                                 "could not be masked in place", hint="select it cast to text, e.g. col::text")
            walker.write(at, masked)


def _sized(size: int, used: int, need: int) -> None:
    if used + need > size:
        raise ValueError("a structure runs past the end of its value")


def _array_parser(walker: Walker, size: int, fmt: str, column: v.Column) -> Parser:
    _at, head = yield from _take(12)
    ndim, flags, elem = struct.unpack("!iiI", head)
    if not 0 <= ndim <= 6 or flags not in (0, 1):
        raise ValueError("not a binary array header")
    used = 12
    count = 1 if ndim else 0
    if ndim:
        _sized(size, used, 8 * ndim)
        _at, dims = yield from _take(8 * ndim)
        used += 8 * ndim
        for d in range(ndim):
            (dim,) = _I32.unpack_from(dims, 8 * d)
            if dim < 0:
                raise ValueError("negative array dimension")
            count *= dim
    rule = ColumnRule(v.kind_of(elem, 1), None, column)
    for _ in range(count):
        _sized(size, used, 4)
        _at, raw = yield from _take(4)
        (length,) = _I32.unpack(raw)
        used += 4
        if length < -1:
            raise ValueError("negative element length")
        if length > 0:
            _sized(size, used, length)
            yield from value_parser(walker, length, rule, fmt)
            used += length
    if used != size:
        raise ValueError("array elements don't fill the value")


def _record_parser(walker: Walker, size: int, fmt: str, column: v.Column) -> Parser:
    _at, raw = yield from _take(4)
    (count,) = _I32.unpack(raw)
    if not 0 <= count <= 1664:
        raise ValueError("not a binary record")
    used = 4
    for _ in range(count):
        _sized(size, used, 8)
        _at, head = yield from _take(8)
        oid, length = struct.unpack("!Ii", head)
        used += 8
        if length < -1:
            raise ValueError("negative field length")
        if length > 0:
            _sized(size, used, length)
            yield from value_parser(walker, length, ColumnRule(v.kind_of(oid, 1), None, column), fmt)
            used += length
    if used != size:
        raise ValueError("record fields don't fill the value")


def data_row_parser(walker: Walker, rules: Sequence[ColumnRule] | Callable[[int], Sequence[ColumnRule]],
                    fmt: str) -> Parser:
    """A DataRow body: column count, then each column's length and value. ``rules`` may be
    a function of the column count (for rows whose columns were never described)."""
    _at, raw = yield from _take(2)
    (count,) = _I16.unpack(raw)
    if callable(rules):
        rules = rules(count)
    if count != len(rules):
        raise ValueError(f"DataRow has {count} columns, its RowDescription {len(rules)}")
    for rule in rules:
        _at, raw = yield from _take(4)
        (length,) = _I32.unpack(raw)
        if length < -1:
            raise ValueError("negative column length")
        if length > 0:
            yield from value_parser(walker, length, rule, fmt)


def function_result_parser(walker: Walker, fmt: str) -> Parser:
    """A FunctionCallResponse body: one length-prefixed value of unknown type, masked as text."""
    _at, raw = yield from _take(4)
    (length,) = _I32.unpack(raw)
    if length > 0:
        yield (LEAF, length, TextScanner(fmt, TEXT))

