"""A Bind message's parameters as text, for people: approvers and audit records.

Text-format values are shown as sent; binary ones as their text form for the types drivers
send in binary, else as ``\\x`` hex. Long values are cut and every value is passed through
the caller's scrubber (card numbers), so nothing shown or recorded holds one in clear.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable

from .decoder import decode_frontend
from .encodings import ClientEncoding
from .errors import ProtocolError

MAX_PARAM_SHOWN = 512  # characters of one parameter shown

_BINARY_SHOWN: dict[int, Callable[[bytes], str]] = {
    16: lambda b: "true" if b == b"\x01" else "false",
    21: lambda b: str(int.from_bytes(b, "big", signed=True)),
    23: lambda b: str(int.from_bytes(b, "big", signed=True)),
    20: lambda b: str(int.from_bytes(b, "big", signed=True)),
    26: lambda b: str(int.from_bytes(b, "big")),
    700: lambda b: repr(struct.unpack("!f", b)[0]),
    701: lambda b: repr(struct.unpack("!d", b)[0]),
    2950: lambda b: str(uuid.UUID(bytes=b)),
    **{oid: (lambda b: b.decode("utf-8", "replace")) for oid in (25, 1043, 1042, 19, 18, 114, 705)},
}


def _show_binary(oid: int, value: bytes) -> str:
    """A binary-format parameter as its text form, for the types drivers send binary."""
    shown = _BINARY_SHOWN.get(oid)
    if shown is not None:
        try:
            return shown(value)
        except (ValueError, struct.error):
            pass
    return "\\x" + value.hex()


def bind_params(bind: bytes | None, param_types: tuple[int, ...], scrub: Callable[[str], str],
                null: str | None = "NULL", encoding: ClientEncoding | None = None) -> list[str | None] | None:
    """The parameters of a Bind, as an approver is shown them and records keep them (PANs
    scrubbed, long ones cut); SQL NULL as ``null``.

    With the session's ``encoding`` (audit records), text values are converted from it, and
    bytes that don't convert are kept as lone surrogates (records write them escaped);
    without it, they are read as UTF-8 with U+FFFD for what isn't."""
    if bind is None:
        return None
    try:
        message = decode_frontend(b"B", bind)
    except ProtocolError:
        return ["<parameters could not be decoded>"]
    formats = message.param_formats
    shown: list[str] = []
    for i, value in enumerate(message.params):
        fmt = formats[0] if len(formats) == 1 else (formats[i] if i < len(formats) else 0)
        if value is None:
            shown.append(null)
            continue
        if fmt == 1:
            text = _show_binary(param_types[i] if i < len(param_types) else 0, value)
        elif encoding is None:
            text = value.decode("utf-8", "replace")
        else:
            text = _text_in(encoding, value)
        if len(text) > MAX_PARAM_SHOWN:
            text = text[:MAX_PARAM_SHOWN] + f"… ({len(text)} characters)"
        shown.append(scrub(text))
    return shown


def _text_in(encoding: ClientEncoding, value: bytes) -> str:
    try:
        return encoding.decode(value)
    except UnicodeError:
        return value.decode("utf-8", "surrogateescape")
