"""Streaming decoders, phases, limits and the exact validation of message bodies."""

from __future__ import annotations

import struct
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance import pgwire as pg

from .strategies import backend_typed, chunked, encode_all, frontend_streams

i16 = struct.Struct("!h").pack
u16 = struct.Struct("!H").pack
i32 = struct.Struct("!i").pack
u32 = struct.Struct("!I").pack

STARTUP = pg.StartupMessage(pg.PROTOCOL_3_0, {"user": "agent", "database": "cards"})


def frame(tag: bytes, body: bytes) -> bytes:
    return tag + i32(len(body) + 4) + body


def drain(decoder: pg.FrontendDecoder | pg.BackendDecoder) -> list[pg.Message]:
    return list(decoder)


def typed_frontend() -> pg.FrontendDecoder:
    decoder = pg.FrontendDecoder()
    decoder.feed(STARTUP.encode())
    assert decoder.next_message() == STARTUP
    return decoder


def error_of(decoder: pg.FrontendDecoder | pg.BackendDecoder, data: bytes) -> str:
    decoder.feed(data)
    with pytest.raises(pg.ProtocolError) as info:
        drain(decoder)
    return str(info.value)


# --- streaming -------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_frontend_stream_split_anywhere(data: st.DataObject) -> None:
    sent = data.draw(frontend_streams())
    decoder = pg.FrontendDecoder()
    received: list[pg.Message] = []
    for chunk in data.draw(chunked(encode_all(sent))):
        decoder.feed(chunk)
        received.extend(decoder)
    assert received == sent
    assert decoder.buffered_bytes == 0
    assert decoder.next_message() is None


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_backend_stream_split_anywhere(data: st.DataObject) -> None:
    answer = data.draw(st.none() | st.builds(pg.SSLResponse, st.booleans()))
    sent = ([answer] if answer else []) + data.draw(st.lists(backend_typed, max_size=15))
    decoder = pg.BackendDecoder()
    if answer:
        decoder.expect_ssl_response()
    received: list[pg.Message] = []
    for chunk in data.draw(chunked(encode_all(sent))):
        decoder.feed(chunk)
        received.extend(decoder)
    assert received == sent
    assert decoder.buffered_bytes == 0


def test_one_byte_at_a_time() -> None:
    sent = [STARTUP, pg.Parse("s", "SELECT $1", (23,)), pg.Bind("", "s", (), (b"7",), ()),
            pg.Execute("", 0), pg.Sync()]
    decoder = pg.FrontendDecoder()
    received = []
    for byte in encode_all(sent):
        decoder.feed(bytes([byte]))
        received.extend(decoder)
    assert received == sent


def test_memoryview_and_bytearray_feeds() -> None:
    wire = encode_all([STARTUP, pg.Query("SELECT 1")])
    decoder = pg.FrontendDecoder()
    decoder.feed(memoryview(wire)[:10])
    decoder.feed(bytearray(wire[10:]))
    assert drain(decoder) == [STARTUP, pg.Query("SELECT 1")]


def test_ssl_and_gssenc_requests_keep_the_startup_phase() -> None:
    decoder = pg.FrontendDecoder()
    decoder.feed(pg.SSLRequest().encode())
    assert decoder.next_message() == pg.SSLRequest()
    assert decoder.in_startup_phase
    assert decoder.buffered_bytes == 0
    decoder.feed(pg.GSSENCRequest().encode() + STARTUP.encode() + pg.Sync().encode())
    assert drain(decoder) == [pg.GSSENCRequest(), STARTUP, pg.Sync()]
    assert not decoder.in_startup_phase


def test_bytes_after_ssl_request_are_visible_to_the_caller() -> None:
    # The proxy must refuse bytes that precede the TLS handshake: it needs to see them.
    decoder = pg.FrontendDecoder()
    decoder.feed(pg.SSLRequest().encode() + b"\x16\x03\x01injected")
    assert decoder.next_message() == pg.SSLRequest()
    assert decoder.buffered_bytes == 11


def test_typed_message_is_not_accepted_before_startup() -> None:
    message = error_of(pg.FrontendDecoder(), pg.Query("SELECT 1").encode())
    assert "startup packet of" in message and "exceeds the 10000-byte limit" in message


def test_nothing_is_valid_after_cancel_request() -> None:
    decoder = pg.FrontendDecoder()
    cancel = pg.CancelRequest(77, b"\x00\x01\x02\x03")
    decoder.feed(cancel.encode())
    assert decoder.next_message() == cancel
    assert decoder.next_message() is None
    decoder.feed(b"\x00")
    with pytest.raises(pg.ProtocolError, match="1 unexpected bytes after a CancelRequest"):
        decoder.next_message()


def test_a_failed_decoder_stays_failed() -> None:
    decoder = typed_frontend()
    decoder.feed(b"\x7f\x00\x00\x00\x04")
    with pytest.raises(pg.ProtocolError, match="unknown frontend message type 0x7f"):
        decoder.next_message()
    with pytest.raises(pg.ProtocolError, match=r"already failed.*0x7f"):
        decoder.next_message()
    with pytest.raises(pg.ProtocolError, match="already failed"):
        decoder.feed(pg.Sync().encode())
    with pytest.raises(pg.ProtocolError):
        drain(decoder)


def test_backend_decoder_dies_too() -> None:
    decoder = pg.BackendDecoder()
    decoder.feed(b"Z\x00\x00\x00\x05X")
    with pytest.raises(pg.ProtocolError, match="transaction status 'X'"):
        decoder.next_message()
    with pytest.raises(pg.ProtocolError):
        decoder.expect_ssl_response()


@pytest.mark.parametrize(
    "expect, byte, result",
    [
        ("ssl", b"S", pg.SSLResponse(True)),
        ("ssl", b"N", pg.SSLResponse(False)),
        ("gssenc", b"G", pg.GSSENCResponse(True)),
        ("gssenc", b"N", pg.GSSENCResponse(False)),
    ],
)
def test_one_byte_answers(expect: str, byte: bytes, result: pg.Message) -> None:
    decoder = pg.BackendDecoder()
    getattr(decoder, f"expect_{expect}_response")()
    assert decoder.next_message() is None
    decoder.feed(byte + pg.AuthenticationOk().encode())
    assert drain(decoder) == [result, pg.AuthenticationOk()]


@pytest.mark.parametrize("expect, byte", [("ssl", b"G"), ("ssl", b"E"), ("gssenc", b"S")])
def test_wrong_one_byte_answer(expect: str, byte: bytes) -> None:
    decoder = pg.BackendDecoder()
    getattr(decoder, f"expect_{expect}_response")()
    assert "instead of" in error_of(decoder, byte)


# --- lengths and limits -------------------------------------------------------------------


def test_length_below_four() -> None:
    decoder = pg.BackendDecoder()
    assert error_of(decoder, b"Z\x00\x00\x00\x03") == (
        "message type 'Z' has length 3, below the minimum of 4"
    )


def test_negative_length() -> None:
    message = error_of(typed_frontend(), b"Q\xff\xff\xff\xff")
    assert message == "message type 'Q' has length -1, below the minimum of 4"


def test_fixed_size_messages_are_checked_before_their_body_arrives() -> None:
    assert "must be exactly 4" in error_of(typed_frontend(), b"S\x00\x10\x00\x00")
    assert "must be exactly 5" in error_of(pg.BackendDecoder(), b"Z\x00\x00\x00\x06")


def test_small_frontend_messages_follow_postgres_limits() -> None:
    message = error_of(typed_frontend(), b"E\x00\x01\x00\x00")
    assert message == "message type 'E' has length 65536, above the limit of 10000 bytes"
    assert "above the limit of 65539" in error_of(typed_frontend(), b"p\x00\x01\x00\x04")


def test_startup_packet_limit() -> None:
    decoder = pg.FrontendDecoder()
    message = error_of(decoder, i32(20000) + u32(pg.PROTOCOL_3_0))
    assert message == "startup packet of 20000 bytes exceeds the 10000-byte limit"


def test_startup_packet_too_short() -> None:
    message = error_of(pg.FrontendDecoder(), i32(7) + b"\x00\x03\x00")
    assert message == "startup packet length 7 is below the minimum of 8"


def test_direct_tls_gets_a_hint() -> None:
    message = error_of(pg.FrontendDecoder(), b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc")
    assert "looks like a TLS handshake" in message


def test_configurable_limit() -> None:
    decoder = pg.BackendDecoder(max_message_size=100)
    decoder.feed(pg.DataRow((b"x" * 90,)).encode())
    assert decoder.next_message() == pg.DataRow((b"x" * 90,))
    assert "above the limit of 100 bytes" in error_of(decoder, pg.DataRow((b"x" * 100,)).encode())


@pytest.mark.parametrize("make", [pg.FrontendDecoder, pg.BackendDecoder])
def test_huge_declared_length_waits_without_allocating(make: type) -> None:
    tag = b"Q" if make is pg.FrontendDecoder else b"D"
    header = tag + b"\x7f\xff\xff\xff" + b"abc"

    default = typed_frontend() if make is pg.FrontendDecoder else make()
    assert "above the limit of 1074790400 bytes" in error_of(default, header)

    tracemalloc.start()
    try:
        decoder = make(max_message_size=2**31 - 1)
        if make is pg.FrontendDecoder:
            decoder.feed(STARTUP.encode())
            decoder.next_message()
        decoder.feed(header)
        for _ in range(1000):
            assert decoder.next_message() is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoder.buffered_bytes == len(header)
    assert peak < 1 << 20


class CountingBuffer(bytearray):
    """A decoder buffer that counts the bytes a front deletion shifts (memmove work)."""

    moved = 0

    def __delitem__(self, key: slice | int) -> None:
        if isinstance(key, slice) and (key.start or 0) == 0:
            self.moved += len(self) - min(key.stop if key.stop is not None else len(self), len(self))
        super().__delitem__(key)


def counting(decoder):
    decoder._buf = CountingBuffer()
    return decoder


def test_big_message_in_many_chunks_is_linear() -> None:
    payload = bytes(range(256)) * (32 * 1024)  # 8 MiB
    wire = pg.CopyData(payload).encode()
    decoder = counting(typed_frontend())
    for start in range(0, len(wire), 1024):
        decoder.feed(wire[start : start + 1024])
        message = decoder.next_message()
    assert message == pg.CopyData(payload)
    # Quadratic buffering would shift ~32 GB here; linear shifts at most the input once.
    assert decoder._buf.moved <= len(wire)


@pytest.mark.parametrize("count, size", [(100_000, 4), (20_000, 1024)])
def test_many_messages_in_one_feed_are_linear(count: int, size: int) -> None:
    row = pg.DataRow((b"4" * size, None))
    decoder = counting(pg.BackendDecoder())
    wire = row.encode() * count
    decoder.feed(wire)
    n = sum(1 for message in decoder if message == row)
    assert n == count
    assert decoder.buffered_bytes == 0
    # Re-copying the remaining buffer per message would shift ~200 GB; linear, at most the input.
    assert decoder._buf.moved <= len(wire)


# --- startup packets --------------------------------------------------------------------------


def test_protocol_3_2_startup_keeps_parameter_order() -> None:
    body = u32(pg.PROTOCOL_3_2) + b"user\x00u\x00_pq_.opt\x00on\x00database\x00d\x00\x00"
    message = pg.decode_startup(body)
    assert message == pg.StartupMessage(pg.PROTOCOL_3_2, {"user": "u", "_pq_.opt": "on",
                                                          "database": "d"})
    assert list(message.parameters) == ["user", "_pq_.opt", "database"]
    assert (message.major, message.minor) == (3, 2)
    message.validate()


@pytest.mark.parametrize(
    "body, text",
    [
        (u32(131072) + b"user\x00u\x00\x00", "unsupported frontend protocol 2.0"),
        (u32(0x12345678), "unsupported frontend protocol 4660.22136"),
        (u32((1234 << 16) | 5681), "unknown startup request code 1234/5681"),
        (u32(pg.PROTOCOL_3_0) + b"user\x00u\x00", "expected terminator as last byte"),
        (u32(pg.PROTOCOL_3_0), "expected terminator as last byte"),
        (u32(pg.PROTOCOL_3_0) + b"user\x00u\x00\x00x", "1 bytes follow the terminator"),
        (u32(pg.PROTOCOL_3_0) + b"user\x00u", "value of startup parameter 'user'"),
        (u32(pg.PROTOCOL_3_0) + b"user", "not NUL-terminated"),
        (u32(pg.PROTOCOL_3_0) + b"user\x00a\x00user\x00b\x00\x00", "given more than once"),
        (u32(pg.SSL_REQUEST_CODE) + b"\x00", "SSLRequest packet must be 8 bytes long, not 9"),
        (u32(pg.GSSENC_REQUEST_CODE) + b"\x00", "GSSENCRequest packet must be 8 bytes"),
        (u32(pg.CANCEL_REQUEST_CODE) + i32(1) + b"abc", "secret key is 3 bytes long"),
        (u32(pg.CANCEL_REQUEST_CODE) + i32(1) + b"k" * 257, "secret key is 257 bytes long"),
        (u32(pg.CANCEL_REQUEST_CODE) + b"\x00\x01", "CancelRequest message is truncated"),
        (b"\x00\x03", "too short to hold a protocol code"),
    ],
)
def test_bad_startup_packets(body: bytes, text: str) -> None:
    with pytest.raises(pg.ProtocolError, match=None) as info:
        pg.decode_startup(body)
    assert text in str(info.value)


def test_cancel_request_with_protocol_3_2_key() -> None:
    key = bytes(range(32))
    message = pg.decode_startup(u32(pg.CANCEL_REQUEST_CODE) + i32(4242) + key)
    assert message == pg.CancelRequest(4242, key)


@pytest.mark.parametrize(
    "parameters, text",
    [({}, "no PostgreSQL user name"), ({"user": ""}, "no PostgreSQL user name")],
)
def test_startup_validate(parameters: dict[str, str], text: str) -> None:
    with pytest.raises(pg.ProtocolError, match=text):
        pg.StartupMessage(pg.PROTOCOL_3_0, parameters).validate()
    with pytest.raises(pg.ProtocolError, match=r"unsupported frontend protocol 2\.0"):
        pg.StartupMessage(131072, {"user": "u"}).validate()
    pg.StartupMessage(pg.PROTOCOL_3_0, {"user": "u"}).validate()


# --- body validation ----------------------------------------------------------------------------

FRONTEND_BAD = [
    (b"Q", b"SELECT 1", "Query message: query string at offset 0 is not NUL-terminated"),
    (b"Q", b"SELECT 1\x00x", "Query message has 1 unexpected trailing bytes at offset 9"),
    (b"S", b"x", "Sync message must be empty but has 1 bytes of content"),
    (b"C", b"X\x00", "target kind 'X' is neither 'S' nor 'P'"),
    (b"D", b"", "Describe message is truncated"),
    (b"E", b"\x00\x00\x00\x00", "row limit needs 4 bytes at offset 1, but only 3 remain"),
    (b"B", b"\x00\x00" + u16(1) + i16(2), "parameter format code 0 is 2"),
    (b"B", b"\x00\x00" + u16(0) + u16(1) + i32(-2), "parameter 0 has invalid length -2"),
    (b"B", b"\x00\x00" + u16(0) + u16(1) + i32(5) + b"ab", "parameter 0 needs 5 bytes"),
    (
        b"B",
        b"\x00\x00" + u16(2) + i16(0) + i16(1) + u16(3) + i32(-1) * 3,
        "2 parameter formats but 3 parameters",
    ),
    (b"B", b"\x00\x00" + u16(0) + u16(0) + u16(1) + i16(-1), "result format code 0 is -1"),
    (b"F", u32(1) + u16(0) + u16(0) + i16(7), "result format code is 7"),
    (b"F", u32(1) + u16(2) + i16(0) * 2 + u16(1) + i32(-1) + i16(0), "2 argument formats"),
    (b"P", b"s\x00SELECT 1\x00" + u16(2) + u32(23), "parameter type 1 needs 4 bytes"),
    (b"y", b"", "unknown frontend message type 'y'"),
    (b"Z", b"I", "unknown frontend message type 'Z'"),
]

BACKEND_BAD = [
    (b"Z", b"X", "transaction status 'X', not 'I', 'T' or 'E'"),
    (b"Z", b"", "ReadyForQuery message must hold 1 status byte, not 0"),
    (b"D", u16(1) + i32(-2), "column 0 has invalid length -2"),
    (b"D", u16(2) + i32(-1), "column 1 length needs 4 bytes"),
    (b"D", u16(1) + i32(3) + b"ab", "column 0 declares 3 bytes at offset 6, but only 2 remain"),
    (b"D", u16(0) + b"\x00", "DataRow message has 1 unexpected trailing bytes"),
    (b"D", b"\x00", "cannot hold a column count"),
    (b"R", i32(4), "unknown authentication request code 4"),
    (b"R", i32(0) + b"\x00", "trailing bytes"),
    (b"R", i32(5) + b"abc", "salt needs 4 bytes"),
    (b"R", i32(10) + b"SCRAM-SHA-256\x00", "mechanism name at offset 18 is not NUL-terminated"),
    (b"K", i32(1) + b"\x01\x02", "BackendKeyData secret key is 2 bytes long"),
    (b"E", b"SERROR\x00", "field code needs 1 bytes"),
    (b"E", b"SERROR", "field 'S' at offset 1 is not NUL-terminated"),
    (b"G", b"\x02" + u16(0), "overall format is 2"),
    (b"H", b"\x00" + u16(1) + i16(3), "column format code 0 is 3"),
    (b"T", u16(1) + b"id\x00" + b"\x00" * 16 + i16(2), "column 0 format code is 2"),
    (b"T", u16(1) + b"id\x00" + b"\x00" * 10, "column 0 type size needs 2 bytes"),
    (b"v", i32(0) + i32(-1), "negative option count -1"),
    (b"v", i32(0) + i32(2) + b"a\x00", "option name 1 at offset 10 is not NUL-terminated"),
    (b"V", i32(-5), "result value has invalid length -5"),
    (b"t", u16(1), "parameter type 0 needs 4 bytes"),
    (b"A", i32(1) + b"chan\x00", "payload at offset 9 is not NUL-terminated"),
    (b"S", b"a\x00b\x00c", "trailing bytes"),
    (b"1", b"\x00", "ParseComplete message must be empty"),
    (b"Q", b"", "unknown backend message type 'Q'"),
]


@pytest.mark.parametrize("tag, body, text", FRONTEND_BAD)
def test_bad_frontend_bodies(tag: bytes, body: bytes, text: str) -> None:
    with pytest.raises(pg.ProtocolError) as info:
        pg.decode_frontend(tag, body)
    assert text in str(info.value)


@pytest.mark.parametrize("tag, body, text", BACKEND_BAD)
def test_bad_backend_bodies(tag: bytes, body: bytes, text: str) -> None:
    with pytest.raises(pg.ProtocolError) as info:
        pg.decode_backend(tag, body)
    assert text in str(info.value)


def test_bad_body_through_the_stream() -> None:
    message = error_of(pg.BackendDecoder(), frame(b"D", u16(1) + i32(-7)))
    assert message == "DataRow message: column 0 has invalid length -7"


def test_tag_must_be_one_byte() -> None:
    with pytest.raises(pg.ProtocolError, match="one byte"):
        pg.decode_backend(b"ZZ", b"I")


def test_sixteen_bit_counts_are_unsigned() -> None:
    # PostgreSQL accepts up to 65535 Bind parameters: 0xffff is a count, not -1.
    params = (None,) * 65535
    wire = pg.Bind("", "", (), params, ()).encode()
    assert wire[7:11] == b"\x00\x00\xff\xff"
    assert pg.decode_frontend(b"B", wire[5:]).params == params


def test_oids_are_unsigned() -> None:
    wire = pg.Parse("", "SELECT $1", (4294967295,)).encode()
    assert wire.endswith(b"\xff\xff\xff\xff")
    assert pg.decode_frontend(b"P", wire[5:]).param_types == (4294967295,)


def test_sasl_initial_response_payload_errors() -> None:
    with pytest.raises(pg.ProtocolError, match="not NUL-terminated"):
        pg.SASLInitialResponse.from_payload(b"SCRAM")
    with pytest.raises(pg.ProtocolError, match="declares 5 bytes of data but carries 2"):
        pg.SASLInitialResponse.from_payload(b"SCRAM\x00" + i32(5) + b"ab")
    with pytest.raises(pg.ProtocolError, match="invalid"):
        pg.SASLInitialResponse.from_payload(b"SCRAM\x00" + i32(-3))
    with pytest.raises(pg.ProtocolError, match="after an absent response"):
        pg.SASLInitialResponse.from_payload(b"SCRAM\x00" + i32(-1) + b"x")
    with pytest.raises(pg.ProtocolError, match="truncated"):
        pg.SASLInitialResponse.from_payload(b"SCRAM\x00\x00")


# --- encoding errors and helpers -----------------------------------------------------------------


@pytest.mark.parametrize(
    "message, text",
    [
        (pg.Query("SELECT 1\x00; DROP TABLE cards"), "contains a NUL byte"),
        (pg.Parse("s", "q", (2**32,)), "parameter type OID"),
        (pg.Execute("", 2**31), "max_rows"),
        (pg.Close(b"X", ""), "Close kind"),
        (pg.Describe(b"", ""), "Describe kind"),
        (pg.Bind("", "", (2,), (None,), ()), "neither 0 (text) nor 1 (binary)"),
        (pg.Bind("", "", (0, 0), (None,), ()), "2 parameter format codes for 1 parameters"),
        (pg.ReadyForQuery(b"X"), "transaction status"),
        (pg.AuthenticationMD5Password(b"abc"), "MD5 salt must be 4 bytes"),
        (pg.AuthenticationSASL(("",)), "must not be empty"),
        (pg.BackendKeyData(1, b"k" * 257), "secret key is 257 bytes long"),
        (pg.CancelRequest(1, b""), "secret key is 0 bytes long"),
        (pg.StartupMessage(pg.PROTOCOL_3_0, {"": "x"}), "must not be empty"),
        (pg.ErrorResponse((("SV", "x"),)), "not a single non-NUL byte"),
        (pg.ErrorResponse((("é", "x"),)), "not a single non-NUL byte"),
        (pg.CopyInResponse(2, ()), "COPY format 2"),
        (pg.RowDescription((pg.FieldDescription("c", format=3),)), "format 3"),
        (pg.DataRow((None,) * 65536), "too many columns: 65536"),
        (pg.Query("\ud800"), "cannot encode query string"),
    ],
)
def test_encode_rejects(message: pg.Message, text: str) -> None:
    with pytest.raises(pg.ProtocolError) as info:
        message.encode()
    assert text in str(info.value)


def test_error_response_helpers() -> None:
    error = pg.ErrorResponse.build("FATAL", "08P01", "bad", detail="why", hint="fix")
    assert error.fields == (("S", "FATAL"), ("V", "FATAL"), ("C", "08P01"), ("M", "bad"),
                            ("D", "why"), ("H", "fix"))
    assert (error.severity, error.sqlstate, error.message) == ("FATAL", "08P01", "bad")
    assert error.get("D") == "why" and error.get("P") is None and error.get("P", "-") == "-"
    # A localized severity only (pre-9.6 servers) still yields a severity.
    notice = pg.NoticeResponse((("S", "AVISO"), ("M", "hola")))
    assert (notice.severity, notice.sqlstate, notice.message) == ("AVISO", None, "hola")
    assert isinstance(pg.NoticeResponse.build("NOTICE", "00000", "x"), pg.NoticeResponse)


def test_protocol_error_carries_sqlstate() -> None:
    error = pg.ProtocolError("boom")
    assert error.sqlstate == "08P01" and error.message == "boom"
    reply = pg.ErrorResponse.build("FATAL", error.sqlstate, error.message)
    assert pg.decode_backend(b"E", reply.encode()[5:]) == reply


def test_copy_messages_are_shared_between_directions() -> None:
    for message in (pg.CopyData(b"1\t2\n"), pg.CopyDone()):
        body = message.encode()[5:]
        assert pg.decode_frontend(message.TYPE, body) == pg.decode_backend(message.TYPE, body)
        assert isinstance(message, pg.FrontendMessage) and isinstance(message, pg.BackendMessage)


def test_messages_are_frozen() -> None:
    query = pg.Query("SELECT 1")
    with pytest.raises(AttributeError):
        query.query = "DROP TABLE cards"  # type: ignore[misc]
