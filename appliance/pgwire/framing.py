"""Framing: where one message ends and the next begins, for both directions.

Every reader of the protocol frames here: the streaming decoders, and the proxy's relay,
which forwards messages as ranges of what it received without decoding them. So the limits
PostgreSQL puts on each message type exist once, in this module. A length is judged from
the five-byte header, as the server judges it: a Sync claiming a megabyte is refused at
once, not waited for.
"""

from __future__ import annotations

import struct
from functools import lru_cache

from . import messages as m
from .errors import ProtocolError

# PostgreSQL's limits (src/include/libpq/pqcomm.h, postgres.c, auth.h): larger packets
# are refused by the server, so a proxy has no reason to buffer them either.
MAX_STARTUP_PACKET_LENGTH = 10000
SMALL_MESSAGE_LIMIT = 10000
AUTH_TOKEN_LIMIT = 65535 + 4
DEFAULT_MAX_MESSAGE_SIZE = (1 << 30) + (1 << 20)

# (minimum, maximum) of the length field, which counts itself; a maximum of 0 means "the
# reader's max_message_size". A tag missing from a table is not a message of that side.
Bounds = tuple[int, int]
_ANY: Bounds = (4, 0)
_EMPTY: Bounds = (4, 4)

FRONTEND_BOUNDS: dict[int, Bounds] = {
    ord("Q"): (5, 0),  # the query's NUL
    ord("P"): (8, 0),  # two NULs and a parameter count
    ord("B"): (12, 0),  # two NULs and three counts
    ord("F"): (14, 0),  # OID, three counts and a result format
    ord("d"): _ANY,
    ord("E"): (9, SMALL_MESSAGE_LIMIT),
    ord("D"): (6, SMALL_MESSAGE_LIMIT),
    ord("C"): (6, SMALL_MESSAGE_LIMIT),
    ord("f"): (5, SMALL_MESSAGE_LIMIT),
    ord("S"): _EMPTY,
    ord("H"): _EMPTY,
    ord("X"): _EMPTY,
    ord("c"): _EMPTY,
    ord("p"): (4, AUTH_TOKEN_LIMIT),  # password, SASL and GSS responses
}
# Once logged in a client has nothing left to authenticate: what a relay accepts.
FRONTEND_SESSION_BOUNDS: dict[int, Bounds] = {tag: b for tag, b in FRONTEND_BOUNDS.items() if tag != ord("p")}

BACKEND_BOUNDS: dict[int, Bounds] = {
    **{ord(tag): _ANY for tag in "DTCENAStGHWVvd"},
    **{ord(tag): _EMPTY for tag in "123Ins" + "c"},
    ord("Z"): (5, 5),
    ord("R"): (8, 0),
    ord("K"): (8 + m.MIN_CANCEL_KEY_LENGTH, 8 + m.MAX_CANCEL_KEY_LENGTH),
}

unpack_length = struct.Struct("!I").unpack_from
_unpack_signed = struct.Struct("!i").unpack_from


def show_tag(tag: int) -> str:
    """A message type byte as error messages show it."""
    return f"'{chr(tag)}'" if 0x21 <= tag <= 0x7E else f"0x{tag:02x}"


def frame_end(buf: bytes | bytearray | memoryview, pos: int, bounds: dict[int, Bounds], max_size: int,
              side: str) -> int:
    """Where the message whose five-byte header starts at ``buf[pos]`` ends (possibly past
    the end of ``buf``: the message is incomplete). ``side`` names the sender in errors.

    Raises ProtocolError for a type ``bounds`` doesn't know, or a length outside its type's
    bounds or above ``max_size``.
    """
    tag = buf[pos]
    bound = bounds.get(tag)
    if bound is None:
        raise ProtocolError(f"unknown {side} message type {show_tag(tag)}")
    (length,) = unpack_length(buf, pos + 1)
    low, high = bound
    if high == 0 or high > max_size:
        high = max_size
    if low <= length <= high:
        return pos + 1 + length
    raise ProtocolError(_length_error(tag, _unpack_signed(buf, pos + 1)[0], low, high))


@lru_cache(maxsize=16)
def resolved_bounds(bounds_id: str, max_size: int) -> dict[int, tuple[int, int]]:
    """A side's bounds (``"frontend"``, ``"frontend-session"``, ``"backend"``) with "the
    reader's maximum" resolved to ``max_size``: what a relay's hot loop checks a length
    against before calling :func:`frame_end`, which names the problem, only when it fails."""
    bounds = {"frontend": FRONTEND_BOUNDS, "frontend-session": FRONTEND_SESSION_BOUNDS,
              "backend": BACKEND_BOUNDS}[bounds_id]
    return {tag: (low, max_size if high == 0 or high > max_size else high) for tag, (low, high) in bounds.items()}


def _length_error(tag: int, length: int, low: int, high: int) -> str:
    what = f"message type {show_tag(tag)}"
    if length < 4:
        return f"{what} has length {length}, below the minimum of 4"
    if low == high:
        return f"{what} has length {length}, but it must be exactly {low}"
    if length < low:
        return f"{what} has length {length}, below the minimum of {low}"
    return f"{what} has length {length}, above the limit of {high} bytes"


def startup_packet_end(buf: bytes | bytearray | memoryview, pos: int, max_size: int) -> int:
    """Where the untyped startup packet whose length starts at ``buf[pos]`` ends."""
    (length,) = _unpack_signed(buf, pos)
    if length < 8:
        raise ProtocolError(f"startup packet length {length} is below the minimum of 8")
    if length > max_size:
        # A TLS record starts with 0x16 0x03: a client trying direct TLS (PostgreSQL 17's
        # sslnegotiation=direct) rather than SSLRequest looks like a huge packet.
        hint = (" (it looks like a TLS handshake sent without SSLRequest)"
                if buf[pos] == 0x16 and len(buf) - pos > 1 and buf[pos + 1] == 0x03 else "")
        raise ProtocolError(f"startup packet of {length} bytes exceeds the {max_size}-byte limit{hint}")
    return pos + length
