"""Type-aware masking of one column value, given its type OID and format (0 text, 1 binary).

The rule is: never hand the client a value its decoder can't parse. So each type is sorted
into a *kind* by how it carries text:

- text-like values (text, varchar, xml, bytea in binary, …) get ``*`` in place;
- structured text (arrays, records, ranges in text format) and text of types we don't
  know get ``*`` too, except that a card number written as a bare number is masked as a
  number (below): a record or a domain may hold a bigint. They can't be starred whole
  (FULL) without breaking the syntax;
- JSON stars digits inside strings, and masks a number that is a card number as a number;
- bytea in text format is hex (``\\x3431…``: decoded, searched, re-encoded as ``2a``) or
  escape format;
- int8, numeric, money (text and binary, and inside arrays, ranges, multiranges, records)
  can't hold ``*``: a card number there is *masked as a number of the same type*
  (:func:`appliance.pan.detector.number_mask`: ``4111111111111111`` → ``4111110000001111``,
  BIN and last four kept, never itself a card number). In text the digit count is the
  same, so the value keeps its length; in binary an int8 keeps its 8 bytes, a numeric is
  re-encoded (its length changes only when the last four digits are ``0000``);
- binary arrays, records and ranges are parsed and each element handled by its own type;
- a binary value of a type we don't know (extension types, enums, domains in binary) is
  scanned as bytes, and masked as an int8 or numeric if it has exactly that shape;
- types whose values can't spell a card number (int2, int4, oid, dates, UUIDs…) are
  skipped. float4/float8 are out of scope: their text output uses exponent notation for
  16-digit magnitudes (not a card number), but a binary float8 can hold a 16-digit
  integer exactly; detecting card numbers stored as floats is not attempted.

Unknown user types in text format (enums, domains, citext, hstore, composites) are masked
like text: a client that knows nothing of the type reads them as strings, and the server's
own text output is what ``*`` replaces; a client that decodes a composite with a bigint
field would fail on ``*``, which is the safe way to fail.
"""

from __future__ import annotations

import codecs
import re
import struct
from typing import TYPE_CHECKING

from appliance.pan.detector import (
    PCI,
    STAR,
    int_is_pan,
    int_mask,
    is_pan_digits,
    masked_positions,
    money_cents_mask,
)
from appliance.pan.scanner import ESCAPE, HEX, mask_text, neutralise_escapes
from appliance.pan.scanner import JSON as JSON_MODE
from appliance.pan.scanner import TEXT as TEXT_MODE

if TYPE_CHECKING:
    from appliance.model.decision import MaskMethod

# ---- kinds ---------------------------------------------------------------------------

SKIP = 0  # can't spell a card number, or out of scope
TEXT = 1  # scalar text-like: '*' in place
STRUCT = 2  # text-format arrays / records / ranges of text: '*' in place, never starred whole
JSON = 3  # json (text or binary), jsonb text
JSONB = 4  # jsonb binary: version byte 1, then JSON text
BYTEA = 5  # bytea text format: hex or escape
NUMTEXT = 6  # int8 / numeric / xid8 text and their arrays and ranges: can't hold '*'
MONEY = 7  # money, money[] text: formatted with group separators
INT8 = 8  # int8 / xid8 binary
MONEYBIN = 9  # money binary: int8 cents
NUMERIC = 10  # numeric binary
ARRAY = 11  # binary array: elements by their type
RECORD = 12  # binary record: fields by their types
RANGE = 13  # binary int8range
MULTIRANGE = 14  # binary int8multirange
UNKNOWN = 15  # binary value of a type we don't know
JSONARRAY = 16  # json[] / jsonb[] text
NUMRANGE = 17  # binary numrange
NUMMULTIRANGE = 18  # binary nummultirange
OPAQUE = 19  # text format of a type we don't know, and text arrays/records: may hold numbers

KIND_NAMES = ("skip", "text", "struct", "json", "jsonb", "bytea", "numtext", "money", "int8", "moneybin",
              "numeric", "array", "record", "range", "multirange", "unknown", "jsonarray", "numrange",
              "nummultirange", "opaque")
# Kinds that may hide a card number where no 13-digit run shows in the raw bytes, so the
# row pre-filter can't rule them out: checked on every row.
ALWAYS = frozenset({MONEY, INT8, MONEYBIN, NUMERIC, ARRAY, RECORD, RANGE, MULTIRANGE, NUMRANGE, NUMMULTIRANGE,
                    UNKNOWN})
# Kinds that can show '*' for a whole-value column mask (FULL / LAST4).
STARRABLE = frozenset({TEXT, OPAQUE, JSON, JSONB, BYTEA})

# ---- the type table -----------------------------------------------------------------

TYPE_NAMES: dict[int, str] = {
    16: "boolean", 17: "bytea", 18: "char", 19: "name", 20: "bigint", 21: "smallint", 23: "integer",
    25: "text", 26: "oid", 114: "json", 142: "xml", 700: "real", 701: "double precision", 705: "unknown",
    790: "money", 1042: "character", 1043: "character varying", 1700: "numeric", 2249: "record",
    3802: "jsonb", 5069: "xid8", 3926: "int8range", 3906: "numrange", 4536: "int8multirange",
    4532: "nummultirange", 199: "json[]", 3807: "jsonb[]", 1016: "bigint[]", 1231: "numeric[]",
    791: "money[]", 271: "xid8[]", 1009: "text[]", 1001: "bytea[]", 2287: "record[]",
    3927: "int8range[]", 3907: "numrange[]", 6157: "int8multirange[]", 6151: "nummultirange[]",
}

_NUMBERISH = {20, 1700, 5069}
_NUMBERISH_STRUCT = {1016, 1231, 271, 3926, 3906, 4536, 4532, 3927, 3907, 6157, 6151}
_JSON_TYPES = {114, 3802}
_TEXT_TYPES = {
    18, 19, 25, 142, 705, 1042, 1043, 1790, 2275, 3614, 3615, 3734, 3769, 4072, 24, 2202, 2203, 2204,
    2205, 2206, 4089, 4096, 4191, 1033,
}
# Types that cannot spell a card number (bounded integers, dates and times, network and
# geometric types, UUIDs) or are out of scope (floats, see the module docstring).
_SKIP_TYPES = {
    16, 21, 22, 23, 26, 27, 28, 29, 30, 600, 601, 602, 603, 604, 628, 650, 700, 701, 718, 774, 829,
    869, 1082, 1083, 1114, 1184, 1186, 1266, 1560, 1562, 2950, 2970, 3220, 3904, 3908, 3910, 3912,
    4451, 4533, 4534, 4535, 5038, 2278,
}

# Builtin array types and their element types (PostgreSQL 15 pg_type, OIDs below 10000).
ARRAY_ELEMENTS: dict[int, int] = {
    22: 21, 30: 26, 143: 142, 199: 114, 210: 71, 270: 75, 271: 5069, 272: 81, 273: 83, 629: 628,
    651: 650, 719: 718, 775: 774, 791: 790, 1000: 16, 1001: 17, 1002: 18, 1003: 19, 1005: 21,
    1006: 22, 1007: 23, 1008: 24, 1009: 25, 1010: 27, 1011: 28, 1012: 29, 1013: 30, 1014: 1042,
    1015: 1043, 1016: 20, 1017: 600, 1018: 601, 1019: 602, 1020: 603, 1021: 700, 1022: 701,
    1027: 604, 1028: 26, 1034: 1033, 1040: 829, 1041: 869, 1115: 1114, 1182: 1082, 1183: 1083,
    1185: 1184, 1187: 1186, 1231: 1700, 1263: 2275, 1270: 1266, 1561: 1560, 1563: 1562, 2201: 1790,
    2207: 2202, 2208: 2203, 2209: 2204, 2210: 2205, 2211: 2206, 2287: 2249, 2949: 2970, 2951: 2950,
    3221: 3220, 3643: 3614, 3644: 3642, 3645: 3615, 3735: 3734, 3770: 3769, 3807: 3802, 3905: 3904,
    3907: 3906, 3909: 3908, 3911: 3910, 3913: 3912, 3927: 3926, 4073: 4072, 4090: 4089, 4097: 4096,
    4192: 4191, 5039: 5038, 6150: 4451, 6151: 4532, 6152: 4533, 6153: 4534, 6155: 4535, 6157: 4536,
}
_BINARY_RANGES = {3926: RANGE, 3906: NUMRANGE, 4536: MULTIRANGE, 4532: NUMMULTIRANGE}
_MAXDIM = 6
SMALL_VALUE = 1024  # binary values of unknown types up to this size get the shape checks


def type_name(oid: int) -> str:
    name = TYPE_NAMES.get(oid)
    if name is not None:
        return name
    element = ARRAY_ELEMENTS.get(oid)
    if element is not None:
        return f"{type_name(element)}[]"
    return f"type {oid}"


def kind_of(oid: int, fmt: int) -> int:
    """How values of type ``oid`` in format ``fmt`` (0 text, 1 binary) are masked."""
    if oid in _SKIP_TYPES:
        return SKIP
    element = ARRAY_ELEMENTS.get(oid)
    if element is not None and element in _SKIP_TYPES:
        return SKIP
    if fmt == 0:
        if oid in _NUMBERISH or oid in _NUMBERISH_STRUCT:
            return NUMTEXT
        if oid in (790, 791):
            return MONEY
        if oid in _JSON_TYPES:
            return JSON
        if oid in (199, 3807):
            return JSONARRAY
        if oid == 17:
            return BYTEA
        if element is not None or oid == 2249:
            return STRUCT
        if oid in _TEXT_TYPES:
            return TEXT
        return OPAQUE  # every type we don't know (see module docstring)
    if oid in (20, 5069):
        return INT8
    if oid == 790:
        return MONEYBIN
    if oid == 1700:
        return NUMERIC
    if oid == 114:
        return JSON
    if oid == 3802:
        return JSONB
    if oid in _TEXT_TYPES or oid == 17:
        return TEXT
    if element is not None:
        return ARRAY
    if oid == 2249:
        return RECORD
    return _BINARY_RANGES.get(oid, UNKNOWN)


# ---- columns ---------------------------------------------------------------------------


class Column:
    """What a MaskingError message says about the value: its column and declared type."""

    __slots__ = ("fmt", "name", "oid")

    def __init__(self, name: str, oid: int, fmt: int):
        self.name, self.oid, self.fmt = name, oid, fmt


# ---- numbers ---------------------------------------------------------------------------

_I32 = struct.Struct("!i")
_I16 = struct.Struct("!h")
_NUMERIC_HEAD = struct.Struct("!hhHH")


_int_is_pan = int_is_pan


def int8_is_pan(value: bytes | memoryview) -> bool:
    if len(value) != 8:
        raise ValueError(f"an int8 value has 8 bytes, not {len(value)}")
    return _int_is_pan(int.from_bytes(value, "big", signed=True))


def money_is_pan(value: bytes | memoryview) -> bool:
    """Binary money: int8 cents. A card number may be the amount or the cents."""
    if len(value) != 8:
        raise ValueError(f"a money value has 8 bytes, not {len(value)}")
    cents = int.from_bytes(value, "big", signed=True)
    return _int_is_pan(cents) or _int_is_pan(abs(cents) // 100)


_INT8_MIN, _INT8_MAX = -(1 << 63), (1 << 63) - 1


def int8_mask(value: bytes | memoryview, fmt: str) -> bytes | None:
    """A binary int8 holding a card number, masked as an int8 (None if it holds none)."""
    if len(value) != 8:
        raise ValueError(f"an int8 value has 8 bytes, not {len(value)}")
    n = int.from_bytes(value, "big", signed=True)
    if not _int_is_pan(n):
        return None
    return int_mask(n, fmt).to_bytes(8, "big", signed=True)


def money_mask(value: bytes | memoryview, fmt: str) -> bytes | None:
    """Binary money (int8 cents) with the card numbers in it masked, or None."""
    if not money_is_pan(value):
        return None
    cents = money_cents_mask(int.from_bytes(value, "big", signed=True), fmt)
    if not _INT8_MIN <= cents <= _INT8_MAX:
        raise ValueError("masked money does not fit its type")
    return cents.to_bytes(8, "big", signed=True)


def numeric_integer(value: bytes | memoryview) -> int | None:
    """The value of a binary numeric if it is an integer that could be 13–19 digits long,
    else None (fractions, NaN, infinities, small or huge numbers). ValueError if malformed."""
    if len(value) < 8:
        raise ValueError("a numeric value has at least 8 bytes")
    ndigits, weight, sign, dscale = _NUMERIC_HEAD.unpack_from(value)
    if ndigits < 0 or len(value) != 8 + 2 * ndigits:
        raise ValueError("numeric digit count does not match its length")
    if sign not in (0, 0x4000) or dscale != 0 or weight not in (3, 4) or ndigits == 0 or ndigits > weight + 1:
        return None
    n = 0
    for d in struct.unpack_from(f"!{ndigits}H", value, 8):
        if d >= 10000:
            raise ValueError("numeric digit out of range")
        n = n * 10000 + d
    return n * 10000 ** (weight + 1 - ndigits)


def numeric_is_pan(value: bytes | memoryview) -> bool:
    n = numeric_integer(value)
    return n is not None and _int_is_pan(n)


def numeric_encode(n: int) -> bytes:
    """The binary numeric of an integer, as PostgreSQL sends it (no trailing zero groups)."""
    sign = 0x4000 if n < 0 else 0
    n = abs(n)
    groups: list[int] = []
    while n:
        n, d = divmod(n, 10000)
        groups.append(d)
    weight = len(groups) - 1
    while groups and groups[0] == 0:  # least significant first: drop trailing zero groups
        groups.pop(0)
    groups.reverse()
    return _NUMERIC_HEAD.pack(len(groups), max(weight, 0), sign, 0) + struct.pack(f"!{len(groups)}H", *groups)


def numeric_mask(value: bytes | memoryview, fmt: str) -> bytes | None:
    """A binary numeric holding a card number, masked and re-encoded (None if it holds none).
    Its length changes when the trailing zero groups differ (only if the last four digits
    are 0000): callers that must keep the length fail closed then."""
    n = numeric_integer(value)
    if n is None or not _int_is_pan(n):
        return None
    if _NUMERIC_HEAD.unpack_from(value)[2] == 0x4000:
        n = -n
    return numeric_encode(int_mask(n, fmt))


def numeric_shaped(value: bytes | memoryview) -> bool:
    """Could these bytes be a binary numeric holding a 13–19 digit integer?"""
    size = len(value)
    if size < 10 or size > 18 or size & 1:
        return False
    ndigits, weight, sign, dscale = _NUMERIC_HEAD.unpack_from(value)
    return ndigits == (size - 8) // 2 and sign in (0, 0x4000) and dscale == 0 and weight in (3, 4)


_MONEY_NUMBER = re.compile(rb"[0-9](?:[0-9,. ']*[0-9])?")


def money_text_is_pan(value: bytes | memoryview) -> bool:
    """Text money ("$4,111,111,111,111,111.00"): the amount's digits with or without cents."""
    for m in _MONEY_NUMBER.finditer(value):
        digits = bytes(b for b in m.group() if 0x30 <= b <= 0x39)
        if len(digits) >= 13 and (is_pan_digits(digits) or is_pan_digits(digits[:-2])):
            return True
    return False


def money_text_mask(value: bytes, fmt: str) -> tuple[bytes | None, int]:
    """Text money with its card numbers masked: the digits are rewritten in place (their
    count doesn't change), so currency sign, group separators and cents stay as they were."""
    out: bytearray | None = None
    count = 0
    for m in _MONEY_NUMBER.finditer(value):
        places = [m.start() + i for i, b in enumerate(m.group()) if 0x30 <= b <= 0x39]
        digits = bytes(value[p] for p in places)
        if len(digits) < 13 or not (is_pan_digits(digits) or is_pan_digits(digits[:-2])):
            continue
        masked = str(money_cents_mask(int(digits), fmt)).encode().rjust(len(digits), b"0")
        if len(masked) != len(digits):
            raise ValueError("masked money changed its digit count")
        if out is None:
            out = bytearray(value)
        for p, d in zip(places, masked, strict=True):
            out[p] = d
        count += 1
    return (None if out is None else bytes(out)), count


# ---- masking one value ---------------------------------------------------------------


def mask_value(value: bytes, kind: int, fmt: str, column: Column) -> tuple[bytes | None, int]:
    """The value with card numbers masked (None if unchanged), and how many were masked.
    Raises MaskingError for a card number in a type that can't hold a masked one, ValueError
    for a binary value that doesn't parse as its type."""
    if kind == TEXT:
        return mask_text(value, fmt, TEXT_MODE)
    if kind in (STRUCT, OPAQUE, NUMTEXT):
        return mask_text(value, fmt, TEXT_MODE, numbers=True)
    if kind == JSON:
        return mask_text(value, fmt, JSON_MODE)
    if kind == INT8:
        masked = int8_mask(value, fmt)
        return (None, 0) if masked is None else (masked, 1)
    if kind == NUMERIC:
        masked = numeric_mask(value, fmt)
        return (None, 0) if masked is None else (masked, 1)
    if kind == JSONB:
        if not value or value[0] != 1:
            raise ValueError("jsonb binary values start with version 1")
        masked, count = mask_text(value[1:], fmt, JSON_MODE)
        return (None if masked is None else value[:1] + masked), count
    if kind == BYTEA:
        return mask_text(value, fmt, HEX if value[:2] == b"\\x" else ESCAPE)
    if kind == MONEY:
        return money_text_mask(value, fmt)
    if kind == MONEYBIN:
        masked = money_mask(value, fmt)
        return (None, 0) if masked is None else (masked, 1)
    if kind == ARRAY:
        return _mask_array(value, fmt, column)
    if kind == RECORD:
        return _mask_record(value, fmt, column)
    if kind in (RANGE, NUMRANGE, MULTIRANGE, NUMMULTIRANGE):
        return _mask_range(value, kind, fmt, column)
    if kind == UNKNOWN:
        return mask_unknown(value, fmt, column)
    if kind == JSONARRAY:
        return _mask_json_array(value, fmt)
    return None, 0


def mask_unknown(value: bytes, fmt: str, column: Column) -> tuple[bytes | None, int]:
    """A binary value of a type we don't know (extension types, enums, user composites and
    their arrays): an int8 or numeric by shape is checked as one, a record or an array by
    shape is taken apart (a composite may hold a bigint); otherwise the bytes are scanned
    like text."""
    size = len(value)
    if size == 8 and not printable(value):
        masked = int8_mask(value, fmt)
        if masked is None:
            masked = money_mask(value, fmt)  # money in binary COPY: int8 cents
        if masked is not None:
            return masked, 1
    if numeric_shaped(value):
        masked = numeric_mask(value, fmt)
        if masked is not None:
            return masked, 1
    shape = unknown_shape(value)
    if shape:
        try:
            return _mask_record(value, fmt, column) if shape == RECORD else _mask_array(value, fmt, column)
        except ValueError:
            pass  # only looked like one: bytes after all
    return mask_text(value, fmt, TEXT_MODE, numbers=True)  # json in binary is text: its numbers stay numbers


def unknown_shape(head: bytes | memoryview) -> int:
    """RECORD or ARRAY if a binary value of unknown type starts like one, else 0. Text
    can't hold NUL bytes, so it never does; a record's first field OID is never 0 or 1,
    which tells it from an array's flags."""
    if len(head) < 12 or head[0] != 0:
        return 0
    first, second, _third = struct.unpack_from("!iiI", head)
    if 1 <= first <= 1664 and (second < 0 or second >= 2):
        return RECORD
    if 1 <= first <= _MAXDIM and second in (0, 1):
        return ARRAY
    return 0


def printable(value: bytes) -> bool:
    # Eight printable ASCII bytes are taken for text ("Approved"), not an int8: a 16-digit
    # card number as int8 starts with a 0x00 byte, and a 19-digit one looks like this by
    # chance about once in a thousand.
    return value.isascii() and all(0x20 <= b < 0x7F for b in value)


def _fields(value: bytes, pos: int, count: int) -> list[tuple[int, int]]:
    """(start, length) of ``count`` length-prefixed fields from ``pos`` (length -1: NULL)."""
    out = []
    size = len(value)
    for _ in range(count):
        if pos + 4 > size:
            raise ValueError("value ends inside a field length")
        (length,) = _I32.unpack_from(value, pos)
        pos += 4
        if length < -1 or (length > 0 and pos + length > size):
            raise ValueError("field length runs past the end of the value")
        out.append((pos, length))
        if length > 0:
            pos += length
    if pos != size:
        raise ValueError("trailing bytes after the last field")
    return out


def array_header(value: bytes) -> tuple[int, int, int]:
    """(element type OID, element count, offset of the first element) of a binary array."""
    if len(value) < 12:
        raise ValueError("binary array shorter than its header")
    ndim, flags, elem = struct.unpack_from("!iiI", value)
    if not 0 <= ndim <= _MAXDIM or flags not in (0, 1):
        raise ValueError("not a binary array header")
    pos = 12
    count = 1 if ndim else 0
    for _ in range(ndim):
        if pos + 8 > len(value):
            raise ValueError("binary array ends inside its dimensions")
        (dim,) = _I32.unpack_from(value, pos)
        if dim < 0:
            raise ValueError("negative array dimension")
        count *= dim
        pos += 8
    if count > len(value):
        raise ValueError("more array elements than bytes")
    return elem, count, pos


def _mask_parts(value: bytes, parts: list[tuple[int, int, int]], fmt: str, column: Column) -> tuple[bytes | None, int]:
    """``value`` with its length-prefixed parts (start, length, kind) masked; a part whose
    length changes (a re-encoded numeric) gets its int32 length prefix rewritten."""
    pieces: list[bytes] = []
    last = 0
    total = 0
    for start, length, kind in parts:
        if length <= 0 or kind == SKIP:
            continue
        masked, count = mask_value(value[start:start + length], kind, fmt, column)
        total += count
        if masked is not None:
            if len(masked) == length:
                pieces += (value[last:start], masked)
            else:
                pieces += (value[last:start - 4], _I32.pack(len(masked)), masked)
            last = start + length
    if not pieces:
        return None, total
    pieces.append(value[last:])
    return b"".join(pieces), total


def _mask_array(value: bytes, fmt: str, column: Column) -> tuple[bytes | None, int]:
    elem, count, pos = array_header(value)
    kind = kind_of(elem, 1)
    fields = _fields(value, pos, count)
    if kind == SKIP:
        return None, 0
    return _mask_parts(value, [(s, n, kind) for s, n in fields], fmt, column)


def record_fields(value: bytes) -> list[tuple[int, int, int]]:
    """(type OID, start, length) of each field of a binary record."""
    if len(value) < 4:
        raise ValueError("binary record shorter than its field count")
    (count,) = _I32.unpack_from(value, 0)
    if not 0 <= count <= 1664:
        raise ValueError("not a binary record")
    pos, size = 4, len(value)
    out = []
    for _ in range(count):
        if pos + 8 > size:
            raise ValueError("binary record ends inside a field header")
        oid, length = struct.unpack_from("!Ii", value, pos)
        pos += 8
        if length < -1 or (length > 0 and pos + length > size):
            raise ValueError("record field runs past the end of the value")
        out.append((oid, pos, length))
        if length > 0:
            pos += length
    if pos != size:
        raise ValueError("trailing bytes after the last record field")
    return out


def _mask_record(value: bytes, fmt: str, column: Column) -> tuple[bytes | None, int]:
    parts = [(start, length, kind_of(oid, 1)) for oid, start, length in record_fields(value)]
    return _mask_parts(value, parts, fmt, column)


def _range_parts(value: bytes) -> list[tuple[int, int]]:
    """(start, length) of the bound values of a binary range."""
    if not value:
        raise ValueError("empty range value")
    flags = value[0]
    if flags & 0x01:  # empty range
        if len(value) != 1:
            raise ValueError("trailing bytes after an empty range")
        return []
    wanted = (0 if flags & 0x08 else 1) + (0 if flags & 0x10 else 1)
    return [(s, n) for s, n in _fields(value, 1, wanted) if n >= 0]


def _mask_range(value: bytes, kind: int, fmt: str, column: Column) -> tuple[bytes | None, int]:
    """A binary range or multirange of int8 or numeric with card numbers in its bounds
    masked. Masking keeps each bound's BIN and last four, so two bounds may come out in
    the other order: the client decodes that, the server would refuse it back."""
    bound = INT8 if kind in (RANGE, MULTIRANGE) else NUMERIC
    if kind in (MULTIRANGE, NUMMULTIRANGE):
        if len(value) < 4:
            raise ValueError("binary multirange shorter than its count")
        (count,) = _I32.unpack_from(value, 0)
        if count < 0:
            raise ValueError("negative multirange count")
        one = RANGE if bound == INT8 else NUMRANGE
        return _mask_parts(value, [(s, n, one) for s, n in _fields(value, 4, count)], fmt, column)
    return _mask_parts(value, [(s, n, bound) for s, n in _range_parts(value)], fmt, column)


_ARRAY_ITEM = re.compile(rb'"((?:[^"\\]|\\.)*)"|([^,{}"\s][^,{}"]*)')
_UNESCAPE = re.compile(rb"\\(.)", re.DOTALL)


def _mask_json_array(value: bytes, fmt: str) -> tuple[bytes | None, int]:
    """json[] / jsonb[] text: each element is JSON inside array quoting."""
    start = value.find(b"{")
    if start < 0:
        raise ValueError("not an array")
    pieces: list[bytes] = []
    last = 0
    total = 0
    for m in _ARRAY_ITEM.finditer(value, start):
        quoted, bare = m.group(1), m.group(2)
        if bare is not None and bare.strip().upper() == b"NULL":
            continue
        element = _UNESCAPE.sub(rb"\1", quoted) if quoted is not None else bare
        masked, count = mask_text(element, fmt, JSON_MODE)
        total += count
        if masked is None:
            continue
        pieces.append(value[last:m.start()])
        pieces.append(b'"' + masked.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"')
        last = m.end()
    if not pieces:
        return None, total
    pieces.append(value[last:])
    return b"".join(pieces), total


# ---- column masks (policy) ---------------------------------------------------------------

NULL = None  # a column mask's answer when the value becomes SQL NULL


def _stars_json(size: int) -> bytes | None:
    return b'"' + b"*" * (size - 2) + b'"' if size >= 2 else None


def _last_chars_start(value: bytes, chars: int, codec: str | None = None) -> int:
    """Byte offset where the last ``chars`` characters begin: UTF-8, or in ``codec`` (the
    session's client encoding); all of it where the bytes aren't text in that codec."""
    if codec is not None:
        decoder = codecs.getincrementaldecoder(codec)()
        try:
            # Fed a byte at a time, the decoder gives a character as its last byte arrives.
            starts = [0, *(i + 1 for i in range(len(value)) if decoder.decode(value[i:i + 1]))]
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return len(value)  # not text in the session's encoding: shown as nothing
        return starts[-chars - 1] if len(starts) > chars else 0
    pos = len(value)
    seen = 0
    while pos > 0 and seen < chars:
        pos -= 1
        if value[pos] & 0xC0 != 0x80:
            seen += 1
    return pos


_ESCAPE_SEQ = re.compile(rb"\\(?:\\|[0-7]{3})|[^\\]", re.DOTALL)


def _bytea_escape_decode(value: bytes) -> bytes:
    out = bytearray()
    for m in _ESCAPE_SEQ.finditer(value):
        tok = m.group()
        if len(tok) == 1:
            out += tok
        elif tok == b"\\\\":
            out.append(0x5C)
        else:
            out.append(int(tok[1:], 8))
    return bytes(out)


def _bytea_escape_encode(data: bytes) -> bytes:
    out = bytearray()
    for b in data:
        if b == 0x5C:
            out += b"\\\\"
        elif b < 0x20 or b > 0x7E:
            out += b"\\%03o" % b
        else:
            out.append(b)
    return bytes(out)


def _digits_masked(value: bytes, detect: bytes) -> bytes:
    """All digits hidden but the first six and last four (positions found in ``detect``)."""
    out = bytearray(value)
    for p in masked_positions(detect, 0, len(detect), PCI):
        out[p] = STAR
    return bytes(out)


def column_mask(value: bytes, kind: int, method: MaskMethod, codec: str | None = None) -> bytes | None:
    """The value under a policy column mask; None means SQL NULL. Types that can't show
    stars become NULL (a partial number in an int8 would be a different number). ``codec``:
    the session's client encoding when it isn't UTF-8, for the characters ``last4`` keeps."""
    how = method.value
    if how == "null":
        return NULL
    size = len(value)
    if kind in (TEXT, OPAQUE):
        if how == "full":
            return b"*" * size
        if how == "last4":
            keep = _last_chars_start(value, 4, codec)
            return b"*" * keep + value[keep:]
        return _digits_masked(value, value)
    if kind == STRUCT:
        return _digits_masked(value, value) if how == "pan" else NULL
    if kind == JSON:
        return _stars_json(size)
    if kind == JSONB:
        inner = _stars_json(size - 1)
        return None if inner is None or not value or value[0] != 1 else value[:1] + inner
    if kind == BYTEA:
        if value[:2] == b"\\x":
            data = bytes.fromhex(value[2:].decode("ascii"))
            if how == "full":
                shown = b"*" * len(data)
            elif how == "last4":
                shown = b"*" * max(0, len(data) - 4) + data[-4:]
            else:
                shown = _digits_masked(data, data)
            return b"\\x" + shown.hex().encode()
        if how == "full":
            return b"*" * size
        if how == "pan":
            return _digits_masked(value, neutralise_escapes(value))
        data = _bytea_escape_decode(value)
        return _bytea_escape_encode(b"*" * max(0, len(data) - 4) + data[-4:])
    return NULL
