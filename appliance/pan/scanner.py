"""Masking card numbers in one text value, whole or fed in windows.

A value reaches us either whole (a DataRow held in memory) or as a stream of windows (a
message too large to hold, or COPY data). Both go through :class:`TextScanner`, so both
give the same bytes. Since detection is local (:mod:`appliance.pan.detector`), a span can be
*decided* once 64 bytes after its start have been seen, or a byte that no candidate, UUID,
decimal or exponent can cross (a "hard" byte). The scanner:

- decides and masks every span that starts before that point (the *natural cut*),
- when allowed, keeps back the rest (at most ~130 bytes) to see it again with what follows,
- otherwise (a whole message that must go now) releases it undecided and, if a span later
  turns out to need bytes already sent, raises :class:`MaskLeak` — the caller fails closed,
- remembers the last bytes released, original and as sent, as read-only left context.

Modes: ``TEXT`` (any text: raw digits, plus bytea hex runs ``\\x3431…`` embedded in it, as
in COPY text or records), ``JSON`` (a card number that is a JSON *number* stays a number
of the same length, masked by :func:`~appliance.pan.detector.number_mask`), ``HEX`` (a bytea value in hex
output: only the decoded bytes are searched) and ``ESCAPE`` (bytea escape output: octal
escapes can't glue onto digits).

:func:`scrub` masks a whole ``str`` (SQL, parameters, log lines, approval requests) in
``TEXT`` mode, so card numbers in bytea hex are masked too.

With ``numbers=True`` (text whose parts may be typed numbers: COPY data, arrays, records,
values of types we don't know, int8/numeric text) a card number written as contiguous
digits that overlaps no other candidate is masked as a number (``4111110000001111``), so
the value still parses as its type; other card numbers get ``*`` as usual.
"""

from __future__ import annotations

import re

from appliance.pan.detector import (
    CONTEXT,
    PCI,
    PREFILTER,
    STAR,
    check_format,
    find_pans,
    is_pan_digits,
    masked_positions,
    may_hold_pan,
    money_cents_mask,
    number_mask,
)

TEXT, JSON, HEX, ESCAPE = 0, 1, 2, 3
MODE_NAMES = ("text", "json", "hex", "escape")

# Left context kept from released bytes. Spans are decided up to ~130 raw bytes (64 decoded
# hex bytes) before the end; their own left context reaches ~75 more back (a UUID in hex).
KEEP_LEFT = 256

# Bytes that may be part of a candidate or of the context that rules one out (digits,
# separators, '.', exponent signs, UUID hex): anything else ends every such shape.
_SOFT = b"0123456789abcdefABCDEF .+-"
_COMMA = ord(",")
_HARD = re.compile(rb"[^0-9a-fA-F .+\-]")
_HARD_NUMBERS = re.compile(rb"[^0-9a-fA-F .+\-,]")  # money's group commas don't end a candidate
# Money as PostgreSQL writes it in COPY (lc_monetary C and its kin): 11–19 digits of amount
# in groups of three, and cents. An amount or all its digits may be a card number.
_MONEY = re.compile(rb"[0-9]{1,3}(?:,[0-9]{3}){3,6}\.[0-9]{2}")
_MONEY_EDGE = frozenset(b"0123456789,.")
_HEX_MARK = re.compile(rb"\\x(?=[0-9a-fA-F])")
_HEX_RUN = re.compile(rb"[0-9a-fA-F]*")
# A card number in hex: 13 encoded digits, optionally 0x20 / 0x2d between them.
HEX_PREFILTER = re.compile(rb"3[0-9](?:(?:2[0dD])?3[0-9]){12}")
_ESCAPES = re.compile(rb"\\(?:\\|[0-7]{3})")
# The rest of a JSON string from inside it, up to and including its closing quote
# (the unrolled form: one C loop per run of plain bytes), and the same without the quote.
_JSON_REST = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_JSON_OPEN = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*(\\?)', re.DOTALL)
_MINUS = 0x2D
_NEWLINE = 0x0A
_DIGITS = frozenset(b"0123456789")
_STAR_HEX = b"2a"


class MaskLeak(Exception):
    """A card number turned out to need masking in bytes that were already sent."""


class PanFound(Exception):
    """A card number in a value that can't hold a masked one (detect-only scanning)."""


def json_advance(data: bytes, pos: int, stop: int, in_str: bool, esc: bool) -> tuple[bool, bool]:
    """JSON string state after ``data[pos:stop]``, from the state at ``pos``: inside a
    string or not, and whether the byte at ``stop`` is escaped."""
    if esc:
        if pos >= stop:
            return in_str, True
        pos += 1
    while pos < stop:
        if in_str:
            m = _JSON_REST.match(data, pos, stop)
            if m is None:  # the string goes on past stop: is its last byte a lone backslash?
                return True, bool(_JSON_OPEN.match(data, pos, stop).group(1))
            pos, in_str = m.end(), False
        else:
            q = data.find(b'"', pos, stop)  # a backslash outside strings is not JSON: ignored
            if q < 0:
                return False, False
            pos, in_str = q + 1, True
    return in_str, False


def _last_soft_start(data: bytes, n: int, numbers: bool = False) -> int:
    """Position just after the last hard byte among the final CONTEXT bytes, else n - CONTEXT."""
    lo = max(0, n - CONTEXT)
    tail = data[lo:n]
    m = (_HARD_NUMBERS if numbers else _HARD).search(tail[::-1])
    if m is None:
        return lo
    return n - m.start()


# Next to a card number, these make it part of text: PostgreSQL quotes no number in an
# array's, a record's or COPY's text, so a quote means a string.
_WORDISH = frozenset(b'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_"')
_AFTER_PUNCT = frozenset(b":,[")


def _bare(data: bytes, s: int, e: int) -> bool:
    """Does span [s, e) stand as a number of its own — not a word's or a sentence's part?
    Which mask a card number gets is only a matter of looks (both show the BIN and last
    four at most): ``card 4111…`` reads better starred, ``(x,4111…)`` must stay a number."""
    before = s - 1
    if before >= 0 and data[before] == 0x2D:  # a minus sign
        before -= 1
    if before >= 0:
        b = data[before]
        if b in _WORDISH or (b == 0x20 and (before == 0 or data[before - 1] not in _AFTER_PUNCT)):
            return False
    return e >= len(data) or (data[e] not in _WORDISH and data[e] != 0x20)


def _lone_numbers(spans: list[tuple[int, int]], data: bytes) -> list[bool]:
    """For each span: is it a bare number (contiguous digits, :func:`_bare`) overlapping no
    other span? Only those are masked as a number; where spans overlap, the union of their
    ``*`` positions hides what each must hide, which a number mask of one would show."""
    out = []
    for i, (s, e) in enumerate(spans):
        lone = data[s:e].isdigit() and _bare(data, s, e)
        if lone:
            for j, (s2, e2) in enumerate(spans):
                if j != i and s2 < e and e2 > s:
                    lone = False
                    break
        out.append(lone)
    return out


def _json_number(seen: bytes, s: int, e: int, fmt: str) -> tuple[int, bytes]:
    """A JSON number holding a card number in groups (not valid JSON, but seen), as a JSON
    string of the same length."""
    if s > 0 and seen[s - 1] == _MINUS:
        s -= 1
    masked = bytearray(seen[s:e])
    for p in masked_positions(seen, s, e, fmt):
        masked[p - s] = STAR
    # Two stars give way to the quotes: pci hides at least 3 digits, last4 at least 9.
    first = masked.index(STAR)
    del masked[first:first + 2]
    return s, b'"' + bytes(masked) + b'"'


class TextScanner:
    """Finds and masks card numbers in one text value (or unbounded text) fed in windows."""

    __slots__ = (
        "detect_only",
        "fmt",
        "found",
        "hex_from",
        "js_esc",
        "js_in",
        "lo",
        "lr",
        "mode",
        "numbers",
        "pos",
        "undecided",
    )

    def __init__(self, fmt: str, mode: int = TEXT, detect_only: bool = False, numbers: bool = False):
        self.fmt, self.mode, self.detect_only = fmt, mode, detect_only
        self.numbers = numbers or mode == JSON
        self.lo = b""  # the last released bytes, as they were
        self.lr = b""  # the same bytes, as sent
        self.pos = 0  # absolute offset of the next byte to feed
        self.undecided = 0  # absolute offset from which spans are not decided yet
        self.js_in = False  # JSON: inside a string at ``undecided``
        self.js_esc = False  # JSON: the byte at ``undecided`` is escaped
        self.hex_from = -1  # absolute offset where a hex run open at ``undecided`` starts
        self.found = 0  # spans masked so far

    def feed(self, o: bytes, final: bool, may_keep: bool) -> tuple[list[tuple[int, bytes]], int]:
        """Scan the next bytes ``o`` (originals). Returns edits ``(offset in o, bytes)`` and
        how many bytes of ``o`` are done (the rest must be fed again, after more bytes)."""
        ll = len(self.lo)
        seen = self.lo + o if ll else o
        n = len(seen)
        base = self.pos - ll
        und = self.undecided - base
        mode = self.mode
        money = self.numbers and mode == TEXT
        nat = n if final else _last_soft_start(seen, n, money)
        if nat < n and nat > 0 and seen[nat - 1] == _MINUS and seen[nat] in _DIGITS:
            nat -= 1  # keep a minus sign with its digits (a JSON number may need it)
        edits: list[tuple[int, bytes]] = []
        runs: list[tuple[int, int, int, bool]] = []
        if mode != ESCAPE:
            runs = self._hex_runs(seen, n, final)
            for a, r, _ds, open_end in runs:
                if open_end:
                    nat = min(nat, self._hex_natural(seen, a, r))
        if mode != HEX and may_hold_pan(seen):
            det = seen if mode != ESCAPE else neutralise_escapes(seen)
            if PREFILTER.search(det, max(0, und - CONTEXT)) is not None:
                self._raw(seen, det, und, nat, edits)
        for a, r, _ds, _open in runs:
            self._hex(seen, a, r, und, nat, edits)
        if money and b"," in seen:
            self._money(seen, und, nat, edits)
        if mode == JSON:
            self.js_in, self.js_esc = json_advance(seen, max(und, 0), max(nat, und), self.js_in, self.js_esc)
        cut = (max(nat, ll) if may_keep else n) - ll
        out_edits = self._apply(edits, ll, o)
        # The hex run the undecided point falls inside, if any: its parity must survive
        # even when its marker scrolls out of the left context.
        self.hex_from = -1
        for _a, r, ds, _open in runs:
            if ds < nat < r or (ds == nat and _open):
                self.hex_from = base + ds
        done = o[:cut]
        self.lo = (self.lo + done)[-KEEP_LEFT:]
        if out_edits:
            sent = bytearray(done)
            for off, rep in out_edits:
                if off < cut:
                    sent[off:off + len(rep)] = rep[:cut - off]
            done = bytes(sent)
        self.lr = (self.lr + done)[-KEEP_LEFT:]
        self.pos += cut
        self.undecided = base + nat
        return out_edits, cut

    def skip_clean(self, o: bytes) -> bool:
        """Take ``o`` without scanning it, if that is sure to change nothing: everything so
        far decided, no hex run open, ``o`` holding no candidate and ending with a byte no
        card number can continue across (a COPY row's newline). False if not."""
        if (self.undecided != self.pos or self.hex_from >= 0 or self.mode != TEXT or not o
                or o[-1] in _SOFT or may_hold_pan(o)
                or (self.numbers and (o[-1] == _COMMA or _MONEY.search(o) is not None))):
            # (A comma can be money's group separator, with the amount going on in the next
            # message: ``$4,`` then ``111,111,…``; see _HARD_NUMBERS.)
            return False
        self.lo = (self.lo + o)[-KEEP_LEFT:]
        self.lr = (self.lr + o)[-KEEP_LEFT:]
        self.pos += len(o)
        self.undecided = self.pos
        return True

    def take_line(self, o: bytes, masked_as: tuple[bytes | None, int] | None = None,
                  ) -> tuple[bytes | None, int] | None:
        """Mask ``o`` at once, if that is sure to give what :meth:`feed` would: everything
        so far decided, no hex run open, the bytes before ``o`` (if any) ending with a
        newline and ``o`` ending with one (a COPY text row, as PostgreSQL sends it). No
        card number, number, UUID or hex run crosses a newline, and every look around a
        span treats it as the data's edge, so ``o`` masked alone is ``o`` fed. Returns
        the masked bytes (None if unchanged) and the count; None if not sure.
        ``masked_as``: what masking ``o`` alone with numbers=True gives, worked out by the
        caller (the masking addon's compiled COPY row scanner)."""
        if (self.undecided != self.pos or self.hex_from >= 0 or self.mode != TEXT or self.detect_only
                or not o or o[-1] != _NEWLINE or (self.lo and self.lo[-1] != _NEWLINE)):
            return None
        if masked_as is not None and self.numbers:
            masked, count = masked_as
        elif self.numbers and b"," in o:  # money may be in it: mask_text doesn't look for money
            alone = TextScanner(self.fmt, TEXT, numbers=True)
            edits, _cut = alone.feed(o, True, False)
            masked, count = (apply_edits(o, edits) if edits else None), alone.found
        else:
            masked, count = mask_text(o, self.fmt, TEXT, numbers=self.numbers)
        self.found += count
        self.lo = (self.lo + o)[-KEEP_LEFT:]
        self.lr = (self.lr + (o if masked is None else masked))[-KEEP_LEFT:]
        self.pos += len(o)
        self.undecided = self.pos
        return masked, count

    def lineable(self) -> bool:
        """Would :meth:`take_line` (and :meth:`skip_clean`) take a whole row now: everything
        decided, no hex run open, the bytes so far ending a row?"""
        return (self.undecided == self.pos and self.hex_from < 0 and self.mode == TEXT and not self.detect_only
                and self.numbers and (not self.lo or self.lo[-1] == _NEWLINE))

    def took_lines(self, o: bytes | memoryview, masked: bytes | memoryview, count: int) -> None:
        """Whole rows ``o``, masked as ``masked`` (``count`` card numbers) by a caller that
        decided them as :meth:`skip_clean` and :meth:`take_line` would, one by one: the
        state those calls would leave."""
        self.found += count
        self.lo = (self.lo + o[-KEEP_LEFT:])[-KEEP_LEFT:]
        self.lr = (self.lr + masked[-KEEP_LEFT:])[-KEEP_LEFT:]
        self.pos += len(o)
        self.undecided = self.pos

    # ---- detection ------------------------------------------------------------------

    def _raw(self, seen: bytes, det: bytes, und: int, nat: int, edits: list[tuple[int, bytes]]) -> None:
        in_str, esc, at = self.js_in, self.js_esc, max(und, 0)
        fmt = self.fmt
        # Only spans from ``und`` on are decided here, and they matter along with the spans
        # that overlap them (for _lone_numbers): none of those ends at or before ``und``,
        # and none starts more than MAX_SPAN before it. A span's decision reads at most
        # CONTEXT bytes before it, so searching from 2 * CONTEXT before ``und`` sees all
        # they need, without going again over all the left context kept (a COPY of short
        # rows would otherwise re-check the card numbers of the rows before, every row).
        spans = find_pans(det, max(0, und - 2 * CONTEXT), ends_after=und)
        lone = _lone_numbers(spans, det) if self.numbers else None
        for i, (s, e) in enumerate(spans):
            if s < und or s >= nat:
                continue
            self._found()
            if self.mode == JSON:
                in_str, esc = json_advance(seen, at, s, in_str, esc)
                at = s
                if not in_str and not esc:
                    edits.append((s, number_mask(det[s:e], fmt)) if lone[i] else _json_number(seen, s, e, fmt))  # type: ignore[index]
                    continue
                lone[i] = False  # type: ignore[index]  # inside a JSON string: text, so stars
            if lone is not None and lone[i]:
                edits.append((s, number_mask(det[s:e], fmt)))
                continue
            edits.extend((p, b"*") for p in masked_positions(det, s, e, fmt))

    def _money(self, seen: bytes, und: int, nat: int, edits: list[tuple[int, bytes]]) -> None:
        """Money written with group commas whose amount, or all of whose digits, is a card
        number: its digits rewritten in place as a masked number (separators and cents
        kept), so the value still loads back as money."""
        for m in _MONEY.finditer(seen, max(und, 0)):
            s, e = m.span()
            if s >= nat:
                break
            if (s > 0 and seen[s - 1] in _MONEY_EDGE) or (e < len(seen) and seen[e] in _DIGITS):
                continue
            places = [p for p in range(s, e) if seen[p] in _DIGITS]
            digits = bytes(seen[p] for p in places)
            if not (is_pan_digits(digits[:-2]) or is_pan_digits(digits)):
                continue
            self._found()
            masked = str(money_cents_mask(int(digits), self.fmt)).encode().rjust(len(digits), b"0")
            out = bytearray(seen[s:e])
            for p, d in zip(places, masked, strict=True):
                out[p - s] = d
            edits.append((s, bytes(out)))

    def _hex_runs(self, seen: bytes, n: int, final: bool) -> list[tuple[int, int, int, bool]]:
        """Hex runs in view: (first aligned digit, end, digits start (may be < 0), open at end)."""
        starts: list[int] = []
        if self.hex_from >= 0:
            starts.append(self.hex_from - (self.pos - len(self.lo)))
        for m in _HEX_MARK.finditer(seen):
            if m.end() not in starts:
                starts.append(m.end())
        runs = []
        for ds in starts:
            a = max(ds, 0)
            r = _HEX_RUN.match(seen, a).end()
            if (a - ds) & 1:
                a += 1
            if r - a >= 2:
                runs.append((a, r, ds, r == n and not final))
            elif r == n and not final:
                runs.append((a, r, ds, True))
        return runs

    def _hex_natural(self, seen: bytes, a: int, r: int) -> int:
        dlen = (r - a) // 2
        decoded = bytes.fromhex(seen[a:a + 2 * dlen].decode("ascii"))
        return a + 2 * _last_soft_start(decoded, dlen) if dlen else a

    def _hex(self, seen: bytes, a: int, r: int, und: int, nat: int, edits: list[tuple[int, bytes]]) -> None:
        dlen = (r - a) // 2
        if dlen < 13:
            return
        hexed = seen[a:a + 2 * dlen]
        if HEX_PREFILTER.search(hexed) is None:
            return
        decoded = bytes.fromhex(hexed.decode("ascii"))
        for s, e in find_pans(decoded):
            rs = a + 2 * s
            if rs < und or rs >= nat:
                continue
            self._found()
            edits.extend((a + 2 * p, _STAR_HEX) for p in masked_positions(decoded, s, e, self.fmt))

    def _found(self) -> None:
        if self.detect_only:
            raise PanFound()
        self.found += 1

    def _apply(self, edits: list[tuple[int, bytes]], ll: int, o: bytes) -> list[tuple[int, bytes]]:
        """Edits relative to ``o``; those that fall on released bytes must already be so."""
        out = []
        for p, rep in edits:
            if p < ll:
                head = rep[:ll - p]
                if self.lr[p:p + len(head)] != head:
                    raise MaskLeak("a card number continued past the end of data already sent")
                if len(rep) > ll - p:
                    out.append((0, rep[ll - p:]))
            else:
                out.append((p - ll, rep))
        return out


def neutralise_escapes(data: bytes) -> bytes:
    """bytea escape output with every escape sequence turned into NULs (same length), so an
    octal escape's digits can't join the digits next to it."""
    if b"\\" not in data:
        return data
    return _ESCAPES.sub(lambda m: b"\0" * len(m.group()), data)


def apply_edits(data: bytes | bytearray | memoryview, edits: list[tuple[int, bytes]]) -> bytes:
    out = bytearray(data)
    for p, rep in edits:
        out[p:p + len(rep)] = rep
    return bytes(out)


def mask_text(value: bytes | bytearray | memoryview, fmt: str, mode: int = TEXT,
              numbers: bool = False) -> tuple[bytes | None, int]:
    """One whole value: its masked bytes (None if unchanged) and the number of card numbers.
    ``numbers``: contiguous card numbers are masked as numbers (see the module docstring)."""
    raw = bytes(value)
    if mode == HEX:
        if HEX_PREFILTER.search(raw) is None:
            return None, 0
    elif b"\\x" not in raw or mode == ESCAPE:
        if PREFILTER.search(raw) is None:
            return None, 0
        if mode != ESCAPE:
            return _mask_whole(raw, fmt, mode == JSON, numbers or mode == JSON)
    elif PREFILTER.search(raw) is None and HEX_PREFILTER.search(raw) is None:
        return None, 0
    scanner = TextScanner(fmt, mode, numbers=numbers)
    edits, _ = scanner.feed(raw, True, False)
    if not edits:
        return None, scanner.found
    return apply_edits(raw, edits), scanner.found


def scrub(text: str, fmt: str = PCI) -> str:
    """``text`` (SQL, parameters, log lines, approval requests) with card numbers masked,
    including those in bytea hex (``\\x3431…``, as binary parameters are shown)."""
    if not text:
        return text
    masked, _count = mask_text(text.encode("utf-8", "surrogateescape"), check_format(fmt))
    return text if masked is None else masked.decode("utf-8", "surrogateescape")


def _mask_whole(raw: bytes, fmt: str, json: bool, numbers: bool) -> tuple[bytes | None, int]:
    """What TextScanner does with one whole value that has no hex run, without its
    windowing: every span is decided at once."""
    spans = find_pans(raw)
    if not spans:
        return None, 0
    out = bytearray(raw)
    in_str, esc, at = False, False, 0
    lone = _lone_numbers(spans, raw) if numbers else [False] * len(spans)
    for i, (s, e) in enumerate(spans):
        if json:
            in_str, esc = json_advance(raw, at, s, in_str, esc)
            at = s
            if not in_str and not esc:
                start, rep = (s, number_mask(raw[s:e], fmt)) if lone[i] else _json_number(raw, s, e, fmt)
                out[start:start + len(rep)] = rep
                continue
            lone[i] = False
        if lone[i]:
            out[s:e] = number_mask(raw[s:e], fmt)
            continue
        for p in masked_positions(raw, s, e, fmt):
            out[p] = STAR
    return bytes(out), len(spans)


def has_pan(value: bytes | bytearray | memoryview, mode: int = TEXT) -> bool:
    """True if the value holds a card number (for types that can't hold a masked one)."""
    if PREFILTER.search(value) is None and (b"\\x" not in value or HEX_PREFILTER.search(value) is None):
        return False
    scanner = TextScanner("pci", mode, detect_only=True)
    try:
        scanner.feed(bytes(value), True, False)
    except PanFound:
        return True
    return False
