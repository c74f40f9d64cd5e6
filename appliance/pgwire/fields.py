"""Reading one or two fields of a message in place, without decoding the whole of it.

The decoders build whole messages; a relay that forwards a message as it came needs only
a name or a count from it, and a Bind may carry a gigabyte of parameters it must not copy.
These readers take the message body's range in a buffer and raise ProtocolError on
anything malformed, so a bad message still ends the connection cleanly.
"""

from __future__ import annotations

import struct

from .errors import ProtocolError

unpack_int16 = struct.Struct("!h").unpack_from
# PostgreSQL reads parameter and format counts as unsigned 16-bit (up to 65535 parameters).
unpack_count = struct.Struct("!H").unpack_from
unpack_int32 = struct.Struct("!i").unpack_from


def cstring(buf: bytes | bytearray, pos: int, end: int) -> tuple[str, int]:
    """The NUL-terminated string at ``pos`` and the offset just past its NUL."""
    nul = buf.find(b"\0", pos, end)
    if nul < 0:
        raise ProtocolError("string field is not NUL-terminated within its message")
    # Unnamed statements and portals are the common case on the hot path.
    return (buf[pos:nul].decode("utf-8", "surrogateescape") if nul > pos else ""), nul + 1


def bind_fields(body: bytes, start: int, end: int) -> tuple[str, str, tuple[int, ...]]:
    """Portal name, statement name and result-format codes of a Bind body.

    Parameter values are skipped by their lengths, never copied: a Bind can carry a
    1 GB value and all we need is what follows it.
    """
    try:
        portal, pos = cstring(body, start, end)
        statement, pos = cstring(body, pos, end)
        (nformats,) = unpack_count(body, pos)
        pos += 2 + 2 * nformats
        (nparams,) = unpack_count(body, pos)
        pos += 2
        for _ in range(nparams):
            (size,) = unpack_int32(body, pos)
            pos += 4
            if size > 0:
                pos += size
            elif size < -1:
                raise ProtocolError(f"Bind parameter length {size} is invalid")
        (nresults,) = unpack_count(body, pos)
        pos += 2
        formats = _unpack_int16s(nresults, body, pos)
        pos += 2 * nresults
    except struct.error:
        raise ProtocolError("Bind message is shorter than its fields say") from None
    if pos != end:
        raise ProtocolError("Bind message has trailing bytes")
    if any(f not in (0, 1) for f in formats):
        raise ProtocolError("Bind result format codes must be 0 or 1")
    return portal, statement, formats


def _unpack_int16s(count: int, body: bytes, pos: int) -> tuple[int, ...]:
    # Zero or one result format is what nearly every client sends.
    if count == 0:
        return ()
    if count == 1:
        return unpack_int16(body, pos)
    return struct.unpack_from(f"!{count}h", body, pos)


def parse_fields(body: bytes, start: int, end: int) -> tuple[str, str, tuple[int, ...]]:
    """Statement name, query text and parameter type OIDs of a Parse body."""
    name, pos = cstring(body, start, end)
    query, pos = cstring(body, pos, end)
    try:
        (count,) = unpack_count(body, pos)
        types = struct.unpack_from(f"!{count}I", body, pos + 2) if count else ()
    except struct.error:
        raise ProtocolError("Parse message is shorter than its fields say") from None
    if pos + 2 + 4 * count != end:
        raise ProtocolError("Parse message has trailing bytes")
    return name, query, types


def kind_and_name(body: bytes, start: int, end: int, what: str) -> tuple[int, str]:
    """The 'S'/'P' byte and the name of a Describe or Close body."""
    if end - start < 2 or body[start] not in (0x53, 0x50):
        raise ProtocolError(f"{what} must name a statement ('S') or a portal ('P')")
    name, pos = cstring(body, start + 1, end)
    if pos != end:
        raise ProtocolError(f"{what} message has trailing bytes")
    return body[start], name


def check_row_description(body: bytes, start: int, end: int) -> None:
    """Walk a RowDescription's fields (name + 18 bytes each) without building them."""
    try:
        (count,) = unpack_count(body, start)
    except struct.error:
        raise ProtocolError("RowDescription has no field count") from None
    pos = start + 2
    for _ in range(count):
        nul = body.find(b"\0", pos, end)
        if nul < 0:
            raise ProtocolError("RowDescription field name is not NUL-terminated")
        pos = nul + 19
        if pos > end:
            raise ProtocolError("RowDescription is shorter than its field count says")
    if pos != end:
        raise ProtocolError("RowDescription has trailing bytes")


def query_text(body: bytes, start: int, end: int) -> str:
    """The SQL of a Query body."""
    if end <= start or body[end - 1] != 0:
        raise ProtocolError("Query text is not NUL-terminated")
    return body[start:end - 1].decode("utf-8", "surrogateescape")


def execute_portal(body: bytes, start: int, end: int) -> str:
    """The portal name of an Execute body (its row limit is the server's business)."""
    portal, after = cstring(body, start, end)
    if end - after != 4:
        raise ProtocolError("Execute must end with a 4-byte row limit")
    return portal
