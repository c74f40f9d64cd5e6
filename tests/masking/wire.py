"""Binary wire encodings built by hand, as PostgreSQL's send functions write them
(numeric_send, array_send, record_send, range_send, binary COPY); test_values checks them
against a real server."""

from __future__ import annotations

import struct

from appliance.masking.copy import SIGNATURE


def int8_bin(n: int) -> bytes:
    return struct.pack("!q", n)


def numeric_bin(text: str) -> bytes:
    """numeric_send: int16 ndigits, int16 weight, uint16 sign, uint16 dscale, base-10000 digits."""
    if text in ("NaN", "Infinity", "-Infinity"):
        # PostgreSQL 15 sends the infinities with a display scale of 32.
        sign = {"NaN": 0xC000, "Infinity": 0xD000, "-Infinity": 0xF000}[text]
        return struct.pack("!hhHH", 0, 0, sign, 0 if text == "NaN" else 32)
    negative = text.startswith("-")
    whole, _, frac = text.lstrip("-").partition(".")
    dscale = len(frac)
    whole = whole.lstrip("0")
    whole = "0" * (-len(whole) % 4) + whole
    frac = frac + "0" * (-len(frac) % 4)
    groups = ([int(whole[i:i + 4]) for i in range(0, len(whole), 4)]
              + [int(frac[i:i + 4]) for i in range(0, len(frac), 4)])
    weight = len(whole) // 4 - 1
    while groups and groups[0] == 0:
        groups.pop(0)
        weight -= 1
    while groups and groups[-1] == 0:
        groups.pop()
    if not groups:
        weight = 0
    return struct.pack("!hhHH", len(groups), weight, 0x4000 if negative else 0, dscale) + struct.pack(
        f"!{len(groups)}H", *groups)


def array_bin(elem: int, items: list[bytes | None], dims: tuple[int, ...] | None = None) -> bytes:
    """array_send: ndim, has-nulls flag, element OID, (dim, lower bound) per dimension, elements."""
    dims = dims if dims is not None else ((len(items),) if items else ())
    out = struct.pack("!iiI", len(dims), int(any(i is None for i in items)), elem)
    out += b"".join(struct.pack("!ii", d, 1) for d in dims)
    for item in items:
        out += struct.pack("!i", -1) if item is None else struct.pack("!i", len(item)) + item
    return out


def record_bin(fields: list[tuple[int, bytes | None]]) -> bytes:
    """record_send: field count, then (type OID, length, bytes) per field."""
    out = struct.pack("!i", len(fields))
    for oid, data in fields:
        out += struct.pack("!Ii", oid, -1) if data is None else struct.pack("!Ii", oid, len(data)) + data
    return out


def range_bin(lower: bytes | None, upper: bytes | None, flags: int = 0x02) -> bytes:
    """range_send: flags byte (0x02 lower inclusive, 0x08/0x10 infinite bounds), then bounds."""
    if lower is None:
        flags |= 0x08
    if upper is None:
        flags |= 0x10
    out = bytes([flags])
    for bound in (lower, upper):
        if bound is not None:
            out += struct.pack("!i", len(bound)) + bound
    return out


def binary_copy(rows: list[list[bytes | None]], extension: bytes = b"", trailer: bool = True) -> bytes:
    out = SIGNATURE + struct.pack("!Ii", 0, len(extension)) + extension
    for row in rows:
        out += struct.pack("!h", len(row))
        for field in row:
            out += struct.pack("!i", -1) if field is None else struct.pack("!i", len(field)) + field
    return out + (struct.pack("!h", -1) if trailer else b"")
