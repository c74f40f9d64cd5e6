"""Turning the body of one message into a message, validating every field.

``decode_frontend``/``decode_backend``/``decode_startup`` take the body of one message and
return the message, validating every length, count, terminator and code against the
body. The streaming decoders that find message boundaries in a connection's bytes are in
``stream``.

Untrusted input can only ever produce :class:`ProtocolError`; a streaming decoder that
has raised it stays failed. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Callable

from . import messages as m
from .errors import ProtocolError
from .framing import show_tag as _show_tag
from .messages import INT8, INT16, INT32, UINT16, UINT32, _text

Body = bytes | bytearray | memoryview


class _Reader:
    """A cursor over one message body whose errors name the message and field."""

    __slots__ = ("data", "name", "pos")

    def __init__(self, data: bytes, name: str) -> None:
        self.data = data
        self.pos = 0
        self.name = name

    def _need(self, n: int, what: str) -> int:
        pos = self.pos
        if pos + n > len(self.data):
            raise ProtocolError(
                f"{self.name} message is truncated: {what} needs {n} bytes at offset {pos}, "
                f"but only {len(self.data) - pos} remain"
            )
        self.pos = pos + n
        return pos

    def int8(self, what: str) -> int:
        return INT8.unpack_from(self.data, self._need(1, what))[0]

    def int16(self, what: str) -> int:
        return INT16.unpack_from(self.data, self._need(2, what))[0]

    def uint16(self, what: str) -> int:
        return UINT16.unpack_from(self.data, self._need(2, what))[0]

    def int32(self, what: str) -> int:
        return INT32.unpack_from(self.data, self._need(4, what))[0]

    def uint32(self, what: str) -> int:
        return UINT32.unpack_from(self.data, self._need(4, what))[0]

    def take(self, n: int, what: str) -> bytes:
        pos = self._need(n, what)
        return self.data[pos : pos + n]

    def rest(self) -> bytes:
        data, self.pos = self.data[self.pos :], len(self.data)
        return data

    def at_end(self) -> bool:
        return self.pos == len(self.data)

    def cstring(self, what: str) -> str:
        end = self.data.find(0, self.pos)
        if end < 0:
            raise ProtocolError(
                f"{self.name} message: {what} at offset {self.pos} is not NUL-terminated"
            )
        raw = self.data[self.pos : end]
        self.pos = end + 1
        return _text(raw)

    def nullable(self, what: str) -> bytes | None:
        n = self.int32(what + " length")
        if n == -1:
            return None
        if n < 0:
            raise ProtocolError(f"{self.name} message: {what} has invalid length {n}")
        return self.take(n, what)

    def format_code(self, what: str) -> int:
        code = self.int16(what)
        if code not in (0, 1):
            raise ProtocolError(
                f"{self.name} message: {what} is {code}, neither 0 (text) nor 1 (binary)"
            )
        return code

    def format_codes(self, what: str) -> tuple[int, ...]:
        n = self.uint16(what + " count")
        return tuple(self.format_code(f"{what} {i}") for i in range(n))

    def values(self, what: str) -> tuple[bytes | None, ...]:
        n = self.uint16(what + " count")
        return tuple(self.nullable(f"{what} {i}") for i in range(n))

    def oids(self, what: str) -> tuple[int, ...]:
        n = self.uint16(what + " count")
        return tuple(self.uint32(f"{what} {i}") for i in range(n))

    def kind(self) -> bytes:
        kind = self.take(1, "target kind")
        if kind not in (b"S", b"P"):
            raise ProtocolError(
                f"{self.name} message: target kind {_show_tag(kind[0])} is neither 'S' nor 'P'"
            )
        return kind

    def finish(self) -> None:
        extra = len(self.data) - self.pos
        if extra:
            raise ProtocolError(
                f"{self.name} message has {extra} unexpected trailing bytes at offset {self.pos}"
            )


# --- typed frontend messages -------------------------------------------------------------


def _bind(body: bytes) -> m.Bind:
    r = _Reader(body, "Bind")
    portal = r.cstring("portal name")
    statement = r.cstring("statement name")
    formats = r.format_codes("parameter format code")
    params = r.values("parameter")
    if len(formats) > 1 and len(formats) != len(params):
        raise ProtocolError(
            f"Bind message has {len(formats)} parameter formats but {len(params)} parameters"
        )
    results = r.format_codes("result format code")
    r.finish()
    return m.Bind(portal, statement, formats, params, results)


def _close(body: bytes) -> m.Close:
    r = _Reader(body, "Close")
    kind = r.kind()
    name = r.cstring("name")
    r.finish()
    return m.Close(kind, name)


def _copy_data(body: bytes) -> m.CopyData:
    return m.CopyData(body)


def _copy_fail(body: bytes) -> m.CopyFail:
    r = _Reader(body, "CopyFail")
    message = r.cstring("error message")
    r.finish()
    return m.CopyFail(message)


def _describe(body: bytes) -> m.Describe:
    r = _Reader(body, "Describe")
    kind = r.kind()
    name = r.cstring("name")
    r.finish()
    return m.Describe(kind, name)


def _execute(body: bytes) -> m.Execute:
    r = _Reader(body, "Execute")
    portal = r.cstring("portal name")
    max_rows = r.int32("row limit")
    r.finish()
    return m.Execute(portal, max_rows)


def _function_call(body: bytes) -> m.FunctionCall:
    r = _Reader(body, "FunctionCall")
    oid = r.uint32("function OID")
    formats = r.format_codes("argument format code")
    args = r.values("argument")
    if len(formats) > 1 and len(formats) != len(args):
        raise ProtocolError(
            f"FunctionCall message has {len(formats)} argument formats but {len(args)} arguments"
        )
    result_format = r.format_code("result format code")
    r.finish()
    return m.FunctionCall(oid, formats, args, result_format)


def _parse(body: bytes) -> m.Parse:
    r = _Reader(body, "Parse")
    name = r.cstring("statement name")
    query = r.cstring("query string")
    types = r.oids("parameter type")
    r.finish()
    return m.Parse(name, query, types)


def _password(body: bytes) -> m.PasswordMessage:
    return m.PasswordMessage(body)


def _query(body: bytes) -> m.Query:
    r = _Reader(body, "Query")
    query = r.cstring("query string")
    r.finish()
    return m.Query(query)


def _empty(cls: type[m.Message]) -> Callable[[bytes], m.Message]:
    instance = cls()  # no fields, so one shared immutable instance will do

    def decode(body: bytes) -> m.Message:
        if body:
            raise ProtocolError(
                f"{cls.__name__} message must be empty but has {len(body)} bytes of content"
            )
        return instance

    return decode


# --- backend messages ----------------------------------------------------------------------


def _authentication(body: bytes) -> m.BackendMessage:
    r = _Reader(body, "Authentication")
    code = r.int32("request code")
    if code in _AUTH_EMPTY:
        r.finish()
        return _AUTH_EMPTY[code]
    if code == m.AuthenticationMD5Password.AUTH_CODE:
        r.name = "AuthenticationMD5Password"
        salt = r.take(4, "salt")
        r.finish()
        return m.AuthenticationMD5Password(salt)
    if code == m.AuthenticationSASL.AUTH_CODE:
        r.name = "AuthenticationSASL"
        mechanisms = []
        while True:
            name = r.cstring("mechanism name")
            if not name:
                break
            mechanisms.append(name)
        r.finish()
        return m.AuthenticationSASL(tuple(mechanisms))
    if code in _AUTH_DATA:
        return _AUTH_DATA[code](r.rest())
    raise ProtocolError(f"unknown authentication request code {code}")


_AUTH_EMPTY: dict[int, m.BackendMessage] = {
    cls.AUTH_CODE: cls()
    for cls in (
        m.AuthenticationOk,
        m.AuthenticationKerberosV5,
        m.AuthenticationCleartextPassword,
        m.AuthenticationGSS,
        m.AuthenticationSSPI,
    )
}
_AUTH_DATA: dict[int, Callable[[bytes], m.BackendMessage]] = {
    cls.AUTH_CODE: cls
    for cls in (
        m.AuthenticationGSSContinue,
        m.AuthenticationSASLContinue,
        m.AuthenticationSASLFinal,
    )
}


def _cancel_key(key: bytes, owner: str) -> bytes:
    m.check_cancel_key(key, owner)
    return key


def _backend_key_data(body: bytes) -> m.BackendKeyData:
    r = _Reader(body, "BackendKeyData")
    pid = r.int32("process ID")
    return m.BackendKeyData(pid, _cancel_key(r.rest(), "BackendKeyData"))


def _command_complete(body: bytes) -> m.CommandComplete:
    r = _Reader(body, "CommandComplete")
    tag = r.cstring("command tag")
    r.finish()
    return m.CommandComplete(tag)


def _copy_response(cls: type[m._CopyResponse]) -> Callable[[bytes], m.BackendMessage]:
    def decode(body: bytes) -> m.BackendMessage:
        r = _Reader(body, cls.__name__)
        overall = r.int8("overall format")
        if overall not in (0, 1):
            raise ProtocolError(
                f"{cls.__name__} message: overall format is {overall}, "
                "neither 0 (text) nor 1 (binary)"
            )
        columns = r.format_codes("column format code")
        r.finish()
        return cls(overall, columns)  # type: ignore[call-arg]

    return decode


def _data_row(body: bytes) -> m.DataRow:
    # The hottest path of a proxy: inlined rather than going through _Reader per column.
    end = len(body)
    if end < 2:
        raise ProtocolError(f"DataRow message is truncated: {end} bytes cannot hold a column count")
    (count,) = UINT16.unpack_from(body, 0)
    pos = 2
    values: list[bytes | None] = []
    append = values.append
    unpack = INT32.unpack_from
    for i in range(count):
        if pos + 4 > end:
            raise ProtocolError(
                f"DataRow message is truncated: column {i} length needs 4 bytes at offset {pos}, "
                f"but only {end - pos} remain"
            )
        (n,) = unpack(body, pos)
        pos += 4
        if n < 0:
            if n != -1:
                raise ProtocolError(f"DataRow message: column {i} has invalid length {n}")
            append(None)
        elif pos + n > end:
            raise ProtocolError(
                f"DataRow message is truncated: column {i} declares {n} bytes at offset {pos}, "
                f"but only {end - pos} remain"
            )
        else:
            append(body[pos : pos + n])
            pos += n
    if pos != end:
        raise ProtocolError(
            f"DataRow message has {end - pos} unexpected trailing bytes at offset {pos}"
        )
    return m.DataRow(tuple(values))


def _fields_response(cls: type[m._FieldsResponse]) -> Callable[[bytes], m.BackendMessage]:
    def decode(body: bytes) -> m.BackendMessage:
        r = _Reader(body, cls.__name__)
        fields = []
        while True:
            code = r.take(1, "field code")
            if code == b"\x00":
                break
            fields.append((_text(code), r.cstring(f"field {_show_tag(code[0])}")))
        r.finish()
        return cls(tuple(fields))  # type: ignore[call-arg]

    return decode


def _function_call_response(body: bytes) -> m.FunctionCallResponse:
    r = _Reader(body, "FunctionCallResponse")
    value = r.nullable("result value")
    r.finish()
    return m.FunctionCallResponse(value)


def _negotiate_protocol_version(body: bytes) -> m.NegotiateProtocolVersion:
    r = _Reader(body, "NegotiateProtocolVersion")
    minor = r.int32("newest minor version")
    count = r.int32("option count")
    if count < 0:
        raise ProtocolError(f"NegotiateProtocolVersion message has a negative option count {count}")
    options = tuple(r.cstring(f"option name {i}") for i in range(count))
    r.finish()
    return m.NegotiateProtocolVersion(minor, options)


def _notification_response(body: bytes) -> m.NotificationResponse:
    r = _Reader(body, "NotificationResponse")
    pid = r.int32("process ID")
    channel = r.cstring("channel name")
    payload = r.cstring("payload")
    r.finish()
    return m.NotificationResponse(pid, channel, payload)


def _parameter_description(body: bytes) -> m.ParameterDescription:
    r = _Reader(body, "ParameterDescription")
    oids = r.oids("parameter type")
    r.finish()
    return m.ParameterDescription(oids)


def _parameter_status(body: bytes) -> m.ParameterStatus:
    r = _Reader(body, "ParameterStatus")
    name = r.cstring("parameter name")
    value = r.cstring("parameter value")
    r.finish()
    return m.ParameterStatus(name, value)


_READY = {status: m.ReadyForQuery(status) for status in m.TRANSACTION_STATUSES}


def _ready_for_query(body: bytes) -> m.ReadyForQuery:
    try:
        return _READY[body]
    except KeyError:
        pass
    if len(body) != 1:
        raise ProtocolError(f"ReadyForQuery message must hold 1 status byte, not {len(body)}")
    raise ProtocolError(
        f"ReadyForQuery message has transaction status {_show_tag(body[0])}, not 'I', 'T' or 'E'"
    )


def _row_description(body: bytes) -> m.RowDescription:
    r = _Reader(body, "RowDescription")
    count = r.uint16("column count")
    fields = []
    for i in range(count):
        name = r.cstring(f"column {i} name")
        table_oid = r.uint32(f"column {i} table OID")
        column_number = r.int16(f"column {i} attribute number")
        type_oid = r.uint32(f"column {i} type OID")
        type_size = r.int16(f"column {i} type size")
        type_modifier = r.int32(f"column {i} type modifier")
        fmt = r.format_code(f"column {i} format code")
        fields.append(
            m.FieldDescription(
                name, table_oid, column_number, type_oid, type_size, type_modifier, fmt
            )
        )
    r.finish()
    return m.RowDescription(tuple(fields))


Decoder = Callable[[bytes], m.Message]

FRONTEND_DECODERS: dict[int, Decoder] = {
    ord("B"): _bind,
    ord("C"): _close,
    ord("d"): _copy_data,
    ord("c"): _empty(m.CopyDone),
    ord("f"): _copy_fail,
    ord("D"): _describe,
    ord("E"): _execute,
    ord("H"): _empty(m.Flush),
    ord("F"): _function_call,
    ord("P"): _parse,
    ord("p"): _password,
    ord("Q"): _query,
    ord("S"): _empty(m.Sync),
    ord("X"): _empty(m.Terminate),
}

BACKEND_DECODERS: dict[int, Decoder] = {
    ord("R"): _authentication,
    ord("K"): _backend_key_data,
    ord("2"): _empty(m.BindComplete),
    ord("3"): _empty(m.CloseComplete),
    ord("C"): _command_complete,
    ord("d"): _copy_data,
    ord("c"): _empty(m.CopyDone),
    ord("G"): _copy_response(m.CopyInResponse),
    ord("H"): _copy_response(m.CopyOutResponse),
    ord("W"): _copy_response(m.CopyBothResponse),
    ord("D"): _data_row,
    ord("I"): _empty(m.EmptyQueryResponse),
    ord("E"): _fields_response(m.ErrorResponse),
    ord("V"): _function_call_response,
    ord("v"): _negotiate_protocol_version,
    ord("n"): _empty(m.NoData),
    ord("N"): _fields_response(m.NoticeResponse),
    ord("A"): _notification_response,
    ord("t"): _parameter_description,
    ord("S"): _parameter_status,
    ord("1"): _empty(m.ParseComplete),
    ord("s"): _empty(m.PortalSuspended),
    ord("Z"): _ready_for_query,
    ord("T"): _row_description,
}

def _decode(table: dict[int, Decoder], side: str, tag: bytes, body: Body) -> m.Message:
    if len(tag) != 1:
        raise ProtocolError(f"a message type is one byte, not {len(tag)}")
    decode = table.get(tag[0])
    if decode is None:
        raise ProtocolError(f"unknown {side} message type {_show_tag(tag[0])}")
    return decode(body if type(body) is bytes else bytes(body))


def decode_frontend(tag: bytes, body: Body) -> m.FrontendMessage:
    """Decode the body of one typed message sent by a client."""
    return _decode(FRONTEND_DECODERS, "frontend", tag, body)  # type: ignore[return-value]


def decode_backend(tag: bytes, body: Body) -> m.BackendMessage:
    """Decode the body of one typed message sent by a server."""
    return _decode(BACKEND_DECODERS, "backend", tag, body)  # type: ignore[return-value]


StartupPacket = m.StartupMessage | m.SSLRequest | m.GSSENCRequest | m.CancelRequest


def decode_startup(body: Body) -> StartupPacket:
    """Decode an untyped startup packet from the bytes after its length field."""
    data = bytes(body)
    if len(data) < 4:
        raise ProtocolError(
            f"startup packet of {len(data) + 4} bytes is too short to hold a protocol code"
        )
    (code,) = UINT32.unpack_from(data, 0)
    if code in (m.SSL_REQUEST_CODE, m.GSSENC_REQUEST_CODE):
        name = "SSLRequest" if code == m.SSL_REQUEST_CODE else "GSSENCRequest"
        if len(data) != 4:
            raise ProtocolError(f"{name} packet must be 8 bytes long, not {len(data) + 4}")
        return m.SSLRequest() if code == m.SSL_REQUEST_CODE else m.GSSENCRequest()
    if code == m.CANCEL_REQUEST_CODE:
        r = _Reader(data, "CancelRequest")
        r.pos = 4
        pid = r.int32("process ID")
        return m.CancelRequest(pid, _cancel_key(r.rest(), "CancelRequest"))
    major, minor = code >> 16, code & 0xFFFF
    if major == 1234:
        raise ProtocolError(f"unknown startup request code 1234/{minor} ({code})")
    if major != 3:
        raise ProtocolError(
            f"unsupported frontend protocol {major}.{minor} (code {code}): only 3.x is supported"
        )
    return m.StartupMessage(code, _startup_parameters(data))


def _startup_parameters(data: bytes) -> dict[str, str]:
    parameters: dict[str, str] = {}
    pos = 4
    while True:
        end = data.find(0, pos)
        if end < 0:
            raise ProtocolError(
                "invalid startup packet layout: expected terminator as last byte"
                if pos == len(data)
                else f"startup parameter name at offset {pos + 4} is not NUL-terminated"
            )
        if end == pos:
            if end != len(data) - 1:
                raise ProtocolError(
                    f"invalid startup packet layout: {len(data) - end - 1} bytes "
                    "follow the terminator"
                )
            return parameters
        name = _text(data[pos:end])
        pos = end + 1
        end = data.find(0, pos)
        if end < 0:
            raise ProtocolError(f"value of startup parameter {name!r} is not NUL-terminated")
        if name in parameters:
            # Refused rather than merged: a proxy and a server that resolve a duplicate
            # differently (first vs. last wins) would disagree about who is connecting.
            raise ProtocolError(f"startup parameter {name!r} is given more than once")
        parameters[name] = _text(data[pos:end])
        pos = end + 1
