"""The messages of PostgreSQL frontend/backend protocol 3.x, as immutable values.

Every message is a frozen dataclass whose ``encode()`` returns its exact wire bytes and
whose class attribute ``TYPE`` is its one-byte tag (``b""`` for the untyped startup packets
and the one-byte SSL/GSSENC answers). Decoding lives in :mod:`appliance.pgwire.decoder`.

Conventions:

* Text fields are ``str``. They are decoded as UTF-8 with ``surrogateescape`` so that any
  byte string (client_encoding need not be UTF-8) survives decode → encode unchanged.
* Object IDs are unsigned 32-bit (PostgreSQL's ``Oid``); 16-bit counts are unsigned, as
  PostgreSQL reads them (a Bind may carry up to 65535 parameters).
* Constructors do not validate, so decoding stays cheap; ``encode()`` does, and raises
  :class:`ProtocolError` for anything that cannot be put on the wire faithfully.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar, Self

from .errors import ProtocolError

# Startup packet codes: a protocol version (major << 16 | minor) or a magic request code.
PROTOCOL_3_0 = 3 << 16
PROTOCOL_3_2 = (3 << 16) | 2
CANCEL_REQUEST_CODE = (1234 << 16) | 5678
SSL_REQUEST_CODE = (1234 << 16) | 5679
GSSENC_REQUEST_CODE = (1234 << 16) | 5680

# Protocol 3.2 made cancel keys variable-length; 4 bytes is also the fixed 3.0 size.
MIN_CANCEL_KEY_LENGTH = 4
MAX_CANCEL_KEY_LENGTH = 256

INT8 = struct.Struct("!b")
INT16 = struct.Struct("!h")
UINT16 = struct.Struct("!H")
INT32 = struct.Struct("!i")
UINT32 = struct.Struct("!I")

_EMPTY_LENGTH = INT32.pack(4)


# --- encoding helpers --------------------------------------------------------------


def _pack(fmt: struct.Struct, value: int, what: str) -> bytes:
    try:
        return fmt.pack(value)
    except struct.error as exc:
        raise ProtocolError(f"cannot encode {what} {value!r}: {exc}") from None


def _count(n: int, what: str) -> bytes:
    if n > 0xFFFF:
        raise ProtocolError(f"too many {what}: {n}, the protocol allows at most 65535")
    return UINT16.pack(n)


def _cstr(value: str, what: str) -> bytes:
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise ProtocolError(f"cannot encode {what}: {exc}") from None
    if b"\x00" in raw:
        raise ProtocolError(f"{what} contains a NUL byte, which a protocol string cannot hold")
    return raw + b"\x00"


def _format_codes(codes: Iterable[int], what: str) -> bytes:
    codes = tuple(codes)
    for code in codes:
        if code not in (0, 1):
            raise ProtocolError(f"{what} {code!r} is neither 0 (text) nor 1 (binary)")
    return _count(len(codes), what + "s") + b"".join(INT16.pack(c) for c in codes)


def _nullable(value: bytes | None) -> bytes:
    if value is None:
        return b"\xff\xff\xff\xff"
    return INT32.pack(len(value)) + value


def _values(values: Iterable[bytes | None], what: str) -> bytes:
    values = tuple(values)
    return _count(len(values), what) + b"".join(_nullable(v) for v in values)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _frame(tag: bytes, body: bytes) -> bytes:
    return tag + _pack(INT32, len(body) + 4, "message length") + body


def check_cancel_key(key: bytes, owner: str) -> None:
    """Raise ProtocolError unless ``key`` has a length protocol 3.x allows for a cancel key."""
    if not MIN_CANCEL_KEY_LENGTH <= len(key) <= MAX_CANCEL_KEY_LENGTH:
        raise ProtocolError(
            f"{owner} secret key is {len(key)} bytes long; it must be "
            f"{MIN_CANCEL_KEY_LENGTH} to {MAX_CANCEL_KEY_LENGTH} bytes"
        )


# --- bases ---------------------------------------------------------------------------


class Message:
    """Any protocol message: immutable, compared by value, able to encode itself."""

    __slots__ = ()
    TYPE: ClassVar[bytes]

    def encode(self) -> bytes:
        raise NotImplementedError


class FrontendMessage(Message):
    """A message a client sends."""

    __slots__ = ()


class BackendMessage(Message):
    """A message a server sends."""

    __slots__ = ()


class _Empty(Message):
    """A message that is nothing but its tag and the length 4."""

    __slots__ = ()

    def encode(self) -> bytes:
        return self.TYPE + _EMPTY_LENGTH


# --- untyped startup packets (frontend) ---------------------------------------------


@dataclass(slots=True, frozen=True)
class StartupMessage(FrontendMessage):
    """Opens a session: protocol version and parameters (``user``, ``database``, ...)."""

    TYPE = b""
    protocol_version: int = PROTOCOL_3_0
    parameters: dict[str, str] = field(default_factory=dict)

    @property
    def major(self) -> int:
        return self.protocol_version >> 16

    @property
    def minor(self) -> int:
        return self.protocol_version & 0xFFFF

    def validate(self) -> None:
        """Raise ProtocolError if PostgreSQL would refuse this packet on its meaning."""
        if self.major != 3:
            raise ProtocolError(
                f"unsupported frontend protocol {self.major}.{self.minor}: only 3.x is supported"
            )
        if not self.parameters.get("user"):
            raise ProtocolError("no PostgreSQL user name specified in startup packet")

    def encode(self) -> bytes:
        parts = [_pack(UINT32, self.protocol_version, "protocol version")]
        for name, value in self.parameters.items():
            if not name:
                # An empty name is the list terminator on the wire.
                raise ProtocolError("startup parameter name must not be empty")
            parts.append(_cstr(name, "startup parameter name"))
            parts.append(_cstr(value, f"value of startup parameter {name!r}"))
        parts.append(b"\x00")
        body = b"".join(parts)
        return INT32.pack(len(body) + 4) + body


@dataclass(slots=True, frozen=True)
class SSLRequest(FrontendMessage):
    """Asks the server to switch the connection to TLS."""

    TYPE = b""

    def encode(self) -> bytes:
        return b"\x00\x00\x00\x08" + UINT32.pack(SSL_REQUEST_CODE)


@dataclass(slots=True, frozen=True)
class GSSENCRequest(FrontendMessage):
    """Asks the server to switch the connection to GSSAPI encryption."""

    TYPE = b""

    def encode(self) -> bytes:
        return b"\x00\x00\x00\x08" + UINT32.pack(GSSENC_REQUEST_CODE)


@dataclass(slots=True, frozen=True)
class CancelRequest(FrontendMessage):
    """Sent on a fresh connection to cancel the query running in another backend."""

    TYPE = b""
    process_id: int
    secret_key: bytes

    def encode(self) -> bytes:
        check_cancel_key(self.secret_key, "CancelRequest")
        return (
            INT32.pack(12 + len(self.secret_key))
            + UINT32.pack(CANCEL_REQUEST_CODE)
            + _pack(INT32, self.process_id, "process ID")
            + self.secret_key
        )


# --- typed frontend messages ----------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Bind(FrontendMessage):
    """Binds parameter values to a prepared statement, creating a portal."""

    TYPE = b"B"
    portal: str
    statement: str
    param_formats: tuple[int, ...]
    params: tuple[bytes | None, ...]
    result_formats: tuple[int, ...]

    def encode(self) -> bytes:
        nformats = len(self.param_formats)
        if nformats > 1 and nformats != len(self.params):
            raise ProtocolError(
                f"Bind has {nformats} parameter format codes for {len(self.params)} parameters"
            )
        return _frame(
            b"B",
            _cstr(self.portal, "portal name")
            + _cstr(self.statement, "statement name")
            + _format_codes(self.param_formats, "parameter format code")
            + _values(self.params, "parameters")
            + _format_codes(self.result_formats, "result format code"),
        )


@dataclass(slots=True, frozen=True)
class Close(FrontendMessage):
    """Closes a prepared statement (kind b"S") or a portal (kind b"P")."""

    TYPE = b"C"
    kind: bytes
    name: str

    def encode(self) -> bytes:
        if self.kind not in (b"S", b"P"):
            raise ProtocolError(f"Close kind must be b'S' or b'P', not {self.kind!r}")
        return _frame(b"C", self.kind + _cstr(self.name, "Close target name"))


@dataclass(slots=True, frozen=True)
class CopyData(FrontendMessage, BackendMessage):
    """A chunk of COPY data; flows in both directions."""

    TYPE = b"d"
    data: bytes

    def encode(self) -> bytes:
        return _frame(b"d", self.data)


@dataclass(slots=True, frozen=True)
class CopyDone(_Empty, FrontendMessage, BackendMessage):
    """End of COPY data; flows in both directions."""

    TYPE = b"c"


@dataclass(slots=True, frozen=True)
class CopyFail(FrontendMessage):
    """The client aborts a COPY FROM STDIN, giving a reason."""

    TYPE = b"f"
    message: str

    def encode(self) -> bytes:
        return _frame(b"f", _cstr(self.message, "CopyFail message"))


@dataclass(slots=True, frozen=True)
class Describe(FrontendMessage):
    """Asks for the description of a prepared statement (b"S") or a portal (b"P")."""

    TYPE = b"D"
    kind: bytes
    name: str

    def encode(self) -> bytes:
        if self.kind not in (b"S", b"P"):
            raise ProtocolError(f"Describe kind must be b'S' or b'P', not {self.kind!r}")
        return _frame(b"D", self.kind + _cstr(self.name, "Describe target name"))


@dataclass(slots=True, frozen=True)
class Execute(FrontendMessage):
    """Runs a portal; ``max_rows`` 0 means no limit."""

    TYPE = b"E"
    portal: str
    max_rows: int = 0

    def encode(self) -> bytes:
        return _frame(
            b"E", _cstr(self.portal, "portal name") + _pack(INT32, self.max_rows, "max_rows")
        )


@dataclass(slots=True, frozen=True)
class Flush(_Empty, FrontendMessage):
    """Asks the server to send whatever output it has pending."""

    TYPE = b"H"


@dataclass(slots=True, frozen=True)
class FunctionCall(FrontendMessage):
    """The legacy fast-path function call."""

    TYPE = b"F"
    function_oid: int
    arg_formats: tuple[int, ...]
    args: tuple[bytes | None, ...]
    result_format: int

    def encode(self) -> bytes:
        nformats = len(self.arg_formats)
        if nformats > 1 and nformats != len(self.args):
            raise ProtocolError(
                f"FunctionCall has {nformats} argument format codes for {len(self.args)} arguments"
            )
        if self.result_format not in (0, 1):
            raise ProtocolError(f"FunctionCall result format {self.result_format!r} is not 0 or 1")
        return _frame(
            b"F",
            _pack(UINT32, self.function_oid, "function OID")
            + _format_codes(self.arg_formats, "argument format code")
            + _values(self.args, "arguments")
            + INT16.pack(self.result_format),
        )


@dataclass(slots=True, frozen=True)
class Parse(FrontendMessage):
    """Prepares a statement; a parameter type OID of 0 leaves the type unspecified."""

    TYPE = b"P"
    name: str
    query: str
    param_types: tuple[int, ...] = ()

    def encode(self) -> bytes:
        return _frame(
            b"P",
            _cstr(self.name, "statement name")
            + _cstr(self.query, "query string")
            + _count(len(self.param_types), "parameter types")
            + b"".join(_pack(UINT32, oid, "parameter type OID") for oid in self.param_types),
        )


@dataclass(slots=True, frozen=True)
class PasswordMessage(FrontendMessage):
    """Any 'p' message. Whether it is a password, a SASLInitialResponse, a SASLResponse or
    a GSSResponse depends on the authentication exchange, which only the session knows;
    it reinterprets ``payload`` with the ``from_payload`` of the right class."""

    TYPE = b"p"
    payload: bytes

    @classmethod
    def from_password(cls, password: str) -> PasswordMessage:
        """A cleartext or MD5 ("md5" + hex digest) password response."""
        return cls(_cstr(password, "password"))

    @property
    def password(self) -> str:
        """The payload read as a password string."""
        if not self.payload.endswith(b"\x00") or b"\x00" in self.payload[:-1]:
            raise ProtocolError("password message is not a single NUL-terminated string")
        return _text(self.payload[:-1])

    def encode(self) -> bytes:
        return _frame(b"p", self.payload)


@dataclass(slots=True, frozen=True)
class SASLInitialResponse(FrontendMessage):
    """The client's first SASL message: chosen mechanism and optional initial response."""

    TYPE = b"p"
    mechanism: str
    data: bytes | None

    @classmethod
    def from_payload(cls, payload: bytes) -> SASLInitialResponse:
        payload = bytes(payload)
        end = payload.find(0)
        if end < 0:
            raise ProtocolError("SASLInitialResponse mechanism name is not NUL-terminated")
        pos = end + 1
        if len(payload) - pos < 4:
            raise ProtocolError("SASLInitialResponse is truncated before its data length")
        (length,) = INT32.unpack_from(payload, pos)
        data = payload[pos + 4 :]
        if length == -1:
            if data:
                raise ProtocolError(
                    f"SASLInitialResponse has {len(data)} bytes after an absent response"
                )
            return cls(_text(payload[:end]), None)
        if length < 0:
            raise ProtocolError(f"SASLInitialResponse data length {length} is invalid")
        if length != len(data):
            raise ProtocolError(
                f"SASLInitialResponse declares {length} bytes of data but carries {len(data)}"
            )
        return cls(_text(payload[:end]), data)

    def encode(self) -> bytes:
        return _frame(b"p", _cstr(self.mechanism, "SASL mechanism name") + _nullable(self.data))


@dataclass(slots=True, frozen=True)
class SASLResponse(FrontendMessage):
    """A later client message of a SASL exchange."""

    TYPE = b"p"
    data: bytes

    @classmethod
    def from_payload(cls, payload: bytes) -> SASLResponse:
        return cls(bytes(payload))

    def encode(self) -> bytes:
        return _frame(b"p", self.data)


@dataclass(slots=True, frozen=True)
class GSSResponse(FrontendMessage):
    """A client token of a GSSAPI or SSPI exchange."""

    TYPE = b"p"
    data: bytes

    @classmethod
    def from_payload(cls, payload: bytes) -> GSSResponse:
        return cls(bytes(payload))

    def encode(self) -> bytes:
        return _frame(b"p", self.data)


@dataclass(slots=True, frozen=True)
class Query(FrontendMessage):
    """A simple-protocol query string, possibly holding several statements."""

    TYPE = b"Q"
    query: str

    def encode(self) -> bytes:
        return _frame(b"Q", _cstr(self.query, "query string"))


@dataclass(slots=True, frozen=True)
class Sync(_Empty, FrontendMessage):
    """Ends an extended-protocol batch; the server answers with ReadyForQuery."""

    TYPE = b"S"


@dataclass(slots=True, frozen=True)
class Terminate(_Empty, FrontendMessage):
    """The client is closing the connection."""

    TYPE = b"X"


# --- backend: authentication ------------------------------------------------------------


class _Authentication(BackendMessage):
    """An 'R' message; the int32 after the length says which request it is."""

    __slots__ = ()
    TYPE = b"R"
    AUTH_CODE: ClassVar[int]

    def _extra(self) -> bytes:
        return b""

    def encode(self) -> bytes:
        return _frame(b"R", INT32.pack(self.AUTH_CODE) + self._extra())


@dataclass(slots=True, frozen=True)
class AuthenticationOk(_Authentication):
    AUTH_CODE = 0


@dataclass(slots=True, frozen=True)
class AuthenticationKerberosV5(_Authentication):
    AUTH_CODE = 2


@dataclass(slots=True, frozen=True)
class AuthenticationCleartextPassword(_Authentication):
    AUTH_CODE = 3


@dataclass(slots=True, frozen=True)
class AuthenticationMD5Password(_Authentication):
    AUTH_CODE = 5
    salt: bytes

    def _extra(self) -> bytes:
        if len(self.salt) != 4:
            raise ProtocolError(f"MD5 salt must be 4 bytes, not {len(self.salt)}")
        return self.salt


@dataclass(slots=True, frozen=True)
class AuthenticationGSS(_Authentication):
    AUTH_CODE = 7


@dataclass(slots=True, frozen=True)
class AuthenticationGSSContinue(_Authentication):
    AUTH_CODE = 8
    data: bytes

    def _extra(self) -> bytes:
        return self.data


@dataclass(slots=True, frozen=True)
class AuthenticationSSPI(_Authentication):
    AUTH_CODE = 9


@dataclass(slots=True, frozen=True)
class AuthenticationSASL(_Authentication):
    """Offers SASL mechanisms, in the server's order of preference."""

    AUTH_CODE = 10
    mechanisms: tuple[str, ...]

    def _extra(self) -> bytes:
        for name in self.mechanisms:
            if not name:
                # An empty name is the list terminator on the wire.
                raise ProtocolError("SASL mechanism name must not be empty")
        return b"".join(_cstr(m, "SASL mechanism name") for m in self.mechanisms) + b"\x00"


@dataclass(slots=True, frozen=True)
class AuthenticationSASLContinue(_Authentication):
    AUTH_CODE = 11
    data: bytes

    def _extra(self) -> bytes:
        return self.data


@dataclass(slots=True, frozen=True)
class AuthenticationSASLFinal(_Authentication):
    AUTH_CODE = 12
    data: bytes

    def _extra(self) -> bytes:
        return self.data


# --- backend: everything else -------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class BackendKeyData(BackendMessage):
    """The key a client needs to cancel queries of this backend (4 bytes before 3.2)."""

    TYPE = b"K"
    process_id: int
    secret_key: bytes

    def encode(self) -> bytes:
        check_cancel_key(self.secret_key, "BackendKeyData")
        return _frame(b"K", _pack(INT32, self.process_id, "process ID") + self.secret_key)


@dataclass(slots=True, frozen=True)
class BindComplete(_Empty, BackendMessage):
    TYPE = b"2"


@dataclass(slots=True, frozen=True)
class CloseComplete(_Empty, BackendMessage):
    TYPE = b"3"


@dataclass(slots=True, frozen=True)
class CommandComplete(BackendMessage):
    """A statement finished; ``tag`` is e.g. "SELECT 3" or "INSERT 0 1"."""

    TYPE = b"C"
    tag: str

    def encode(self) -> bytes:
        return _frame(b"C", _cstr(self.tag, "command tag"))


class _CopyResponse(BackendMessage):
    """Shared layout of CopyIn/CopyOut/CopyBothResponse."""

    __slots__ = ()
    format: int
    column_formats: tuple[int, ...]

    def encode(self) -> bytes:
        if self.format not in (0, 1):
            raise ProtocolError(f"COPY format {self.format!r} is neither 0 (text) nor 1 (binary)")
        return _frame(
            self.TYPE,
            INT8.pack(self.format) + _format_codes(self.column_formats, "column format code"),
        )


@dataclass(slots=True, frozen=True)
class CopyInResponse(_CopyResponse):
    TYPE = b"G"
    format: int
    column_formats: tuple[int, ...]


@dataclass(slots=True, frozen=True)
class CopyOutResponse(_CopyResponse):
    TYPE = b"H"
    format: int
    column_formats: tuple[int, ...]


@dataclass(slots=True, frozen=True)
class CopyBothResponse(_CopyResponse):
    TYPE = b"W"
    format: int
    column_formats: tuple[int, ...]


@dataclass(slots=True, frozen=True)
class DataRow(BackendMessage):
    """One result row; None is SQL NULL."""

    TYPE = b"D"
    values: tuple[bytes | None, ...]

    def encode(self) -> bytes:
        return _frame(b"D", _values(self.values, "columns"))


@dataclass(slots=True, frozen=True)
class EmptyQueryResponse(_Empty, BackendMessage):
    TYPE = b"I"


# Field codes of ErrorResponse/NoticeResponse that the helpers below name.
SEVERITY_LOCALIZED = "S"
SEVERITY = "V"
SQLSTATE = "C"
MESSAGE = "M"
DETAIL = "D"
HINT = "H"


class _FieldsResponse(BackendMessage):
    """Shared layout and helpers of ErrorResponse and NoticeResponse."""

    __slots__ = ()
    fields: tuple[tuple[str, str], ...]

    @classmethod
    def build(
        cls,
        severity: str,
        sqlstate: str,
        message: str,
        detail: str | None = None,
        hint: str | None = None,
    ) -> Self:
        """A response with both severity fields set, as PostgreSQL 9.6+ sends them."""
        fields = [
            (SEVERITY_LOCALIZED, severity),
            (SEVERITY, severity),
            (SQLSTATE, sqlstate),
            (MESSAGE, message),
        ]
        if detail is not None:
            fields.append((DETAIL, detail))
        if hint is not None:
            fields.append((HINT, hint))
        return cls(tuple(fields))

    def get(self, code: str, default: str | None = None) -> str | None:
        """The value of the first field with this one-letter code."""
        for key, value in self.fields:
            if key == code:
                return value
        return default

    @property
    def severity(self) -> str | None:
        """The non-localized severity if the server sent it (9.6+), else the localized one."""
        return self.get(SEVERITY) or self.get(SEVERITY_LOCALIZED)

    @property
    def sqlstate(self) -> str | None:
        return self.get(SQLSTATE)

    @property
    def message(self) -> str | None:
        return self.get(MESSAGE)

    def encode(self) -> bytes:
        parts = []
        for code, value in self.fields:
            raw_code = _cstr(code, "error field code")
            if len(raw_code) != 2:
                raise ProtocolError(f"error field code {code!r} is not a single non-NUL byte")
            parts.append(raw_code[:1])
            parts.append(_cstr(value, f"error field {code!r}"))
        parts.append(b"\x00")
        return _frame(self.TYPE, b"".join(parts))


@dataclass(slots=True, frozen=True)
class ErrorResponse(_FieldsResponse):
    TYPE = b"E"
    fields: tuple[tuple[str, str], ...]


@dataclass(slots=True, frozen=True)
class NoticeResponse(_FieldsResponse):
    TYPE = b"N"
    fields: tuple[tuple[str, str], ...]


@dataclass(slots=True, frozen=True)
class FunctionCallResponse(BackendMessage):
    TYPE = b"V"
    value: bytes | None

    def encode(self) -> bytes:
        return _frame(b"V", _nullable(self.value))


@dataclass(slots=True, frozen=True)
class NegotiateProtocolVersion(BackendMessage):
    """The server supports only up to ``newest_minor`` and ignored these ``_pq_.`` options."""

    TYPE = b"v"
    newest_minor: int
    unrecognized: tuple[str, ...] = ()

    def encode(self) -> bytes:
        return _frame(
            b"v",
            _pack(INT32, self.newest_minor, "newest minor version")
            + _pack(INT32, len(self.unrecognized), "option count")
            + b"".join(_cstr(o, "protocol option name") for o in self.unrecognized),
        )


@dataclass(slots=True, frozen=True)
class NoData(_Empty, BackendMessage):
    TYPE = b"n"


@dataclass(slots=True, frozen=True)
class NotificationResponse(BackendMessage):
    """A NOTIFY delivered to this session; may arrive at any time."""

    TYPE = b"A"
    process_id: int
    channel: str
    payload: str

    def encode(self) -> bytes:
        return _frame(
            b"A",
            _pack(INT32, self.process_id, "process ID")
            + _cstr(self.channel, "channel name")
            + _cstr(self.payload, "notification payload"),
        )


@dataclass(slots=True, frozen=True)
class ParameterDescription(BackendMessage):
    TYPE = b"t"
    type_oids: tuple[int, ...]

    def encode(self) -> bytes:
        return _frame(
            b"t",
            _count(len(self.type_oids), "parameter types")
            + b"".join(_pack(UINT32, oid, "parameter type OID") for oid in self.type_oids),
        )


@dataclass(slots=True, frozen=True)
class ParameterStatus(BackendMessage):
    TYPE = b"S"
    name: str
    value: str

    def encode(self) -> bytes:
        return _frame(
            b"S", _cstr(self.name, "parameter name") + _cstr(self.value, "parameter value")
        )


@dataclass(slots=True, frozen=True)
class ParseComplete(_Empty, BackendMessage):
    TYPE = b"1"


@dataclass(slots=True, frozen=True)
class PortalSuspended(_Empty, BackendMessage):
    TYPE = b"s"


TRANSACTION_STATUSES = (b"I", b"T", b"E")


@dataclass(slots=True, frozen=True)
class ReadyForQuery(BackendMessage):
    """Idle again; ``status`` is b"I" (idle), b"T" (in transaction) or b"E" (failed)."""

    TYPE = b"Z"
    status: bytes

    def encode(self) -> bytes:
        if self.status not in TRANSACTION_STATUSES:
            raise ProtocolError(f"transaction status {self.status!r} is not b'I', b'T' or b'E'")
        return b"Z\x00\x00\x00\x05" + self.status


@dataclass(slots=True, frozen=True)
class FieldDescription:
    """One column of a RowDescription."""

    name: str
    table_oid: int = 0
    column_number: int = 0
    type_oid: int = 0
    type_size: int = -1
    type_modifier: int = -1
    format: int = 0

    def encode(self) -> bytes:
        if self.format not in (0, 1):
            raise ProtocolError(f"column {self.name!r} format {self.format!r} is not 0 or 1")
        return (
            _cstr(self.name, "column name")
            + _pack(UINT32, self.table_oid, "table OID")
            + _pack(INT16, self.column_number, "column number")
            + _pack(UINT32, self.type_oid, "type OID")
            + _pack(INT16, self.type_size, "type size")
            + _pack(INT32, self.type_modifier, "type modifier")
            + INT16.pack(self.format)
        )


@dataclass(slots=True, frozen=True)
class RowDescription(BackendMessage):
    TYPE = b"T"
    fields: tuple[FieldDescription, ...]

    def encode(self) -> bytes:
        return _frame(
            b"T",
            _count(len(self.fields), "columns") + b"".join(f.encode() for f in self.fields),
        )


# --- one-byte answers to SSLRequest / GSSENCRequest ---------------------------------------


@dataclass(slots=True, frozen=True)
class SSLResponse(BackendMessage):
    """The server's single-byte answer to SSLRequest: b"S" (go ahead) or b"N"."""

    TYPE = b""
    accepted: bool

    def encode(self) -> bytes:
        return b"S" if self.accepted else b"N"


@dataclass(slots=True, frozen=True)
class GSSENCResponse(BackendMessage):
    """The server's single-byte answer to GSSENCRequest: b"G" (go ahead) or b"N"."""

    TYPE = b""
    accepted: bool

    def encode(self) -> bytes:
        return b"G" if self.accepted else b"N"
