"""Every message survives encode → decode → encode unchanged; golden bytes from the docs."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance import pgwire as pg
from appliance.pgwire import messages

from .strategies import ALL, AUTH_PAYLOADS, BACKEND, FRONTEND, ONE_BYTE_ANSWERS, STARTUP


def decode_wire(cls: type, wire: bytes) -> pg.Message:
    """Decode one encoded message the way a peer would, checking its framing on the way."""
    if cls in STARTUP:
        assert int.from_bytes(wire[:4], "big") == len(wire)
        decoder = pg.FrontendDecoder()
        decoder.feed(wire)
        streamed = decoder.next_message()
        assert streamed == pg.decode_startup(wire[4:])
        return streamed
    if cls in ONE_BYTE_ANSWERS:
        assert len(wire) == 1
        decoder = pg.BackendDecoder()
        if cls is pg.SSLResponse:
            decoder.expect_ssl_response()
        else:
            decoder.expect_gssenc_response()
        decoder.feed(wire)
        message = decoder.next_message()
        assert decoder.buffered_bytes == 0
        return message
    assert wire[:1] == cls.TYPE
    assert int.from_bytes(wire[1:5], "big") == len(wire) - 1
    if cls in AUTH_PAYLOADS:
        password = pg.decode_frontend(b"p", wire[5:])
        assert isinstance(password, pg.PasswordMessage)
        return cls.from_payload(password.payload)
    decoded = []
    if cls in FRONTEND:
        decoded.append(pg.decode_frontend(wire[:1], memoryview(wire)[5:]))
    if cls in BACKEND:
        decoded.append(pg.decode_backend(wire[:1], wire[5:]))
    assert decoded and all(d == decoded[0] for d in decoded)
    return decoded[0]


def test_every_message_class_has_a_strategy() -> None:
    concrete = {
        cls
        for _, cls in inspect.getmembers(messages, inspect.isclass)
        if issubclass(cls, pg.Message) and dataclasses.is_dataclass(cls)
    }
    assert len(concrete) == 54
    assert concrete == set(ALL)


@pytest.mark.parametrize("cls", list(ALL), ids=lambda cls: cls.__name__)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_roundtrip(cls: type, data: st.DataObject) -> None:
    message = data.draw(ALL[cls])
    wire = message.encode()
    decoded = decode_wire(cls, wire)
    assert type(decoded) is cls
    assert decoded == message
    assert decoded.encode() == wire


GOLDEN = [
    (pg.ReadyForQuery(b"I"), b"Z\x00\x00\x00\x05I"),
    (pg.SSLRequest(), b"\x00\x00\x00\x08\x04\xd2\x16\x2f"),
    (pg.GSSENCRequest(), b"\x00\x00\x00\x08\x04\xd2\x16\x30"),
    (
        pg.CancelRequest(1234, b"\xde\xad\xbe\xef"),
        b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x04\xd2\xde\xad\xbe\xef",
    ),
    (
        pg.StartupMessage(196608, {"user": "alice", "database": "db"}),
        b"\x00\x00\x00\x20\x00\x03\x00\x00user\x00alice\x00database\x00db\x00\x00",
    ),
    (pg.Query("SELECT 1"), b"Q\x00\x00\x00\x0dSELECT 1\x00"),
    (pg.Sync(), b"S\x00\x00\x00\x04"),
    (pg.Terminate(), b"X\x00\x00\x00\x04"),
    (pg.Execute("", 0), b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00"),
    (
        pg.Bind("", "s1", (1,), (b"\x00\x01", None), (1,)),
        (
            b"B\x00\x00\x00\x1c\x00s1\x00\x00\x01\x00\x01\x00\x02"
            b"\x00\x00\x00\x02\x00\x01\xff\xff\xff\xff\x00\x01\x00\x01"
        ),
    ),
    (pg.AuthenticationOk(), b"R\x00\x00\x00\x08\x00\x00\x00\x00"),
    (pg.AuthenticationMD5Password(b"abcd"), b"R\x00\x00\x00\x0c\x00\x00\x00\x05abcd"),
    (
        pg.AuthenticationSASL(("SCRAM-SHA-256",)),
        b"R\x00\x00\x00\x17\x00\x00\x00\x0aSCRAM-SHA-256\x00\x00",
    ),
    (
        pg.BackendKeyData(42, b"\x01\x02\x03\x04"),
        b"K\x00\x00\x00\x0c\x00\x00\x00\x2a\x01\x02\x03\x04",
    ),
    (
        pg.DataRow((b"1", None)),
        b"D\x00\x00\x00\x0f\x00\x02\x00\x00\x00\x011\xff\xff\xff\xff",
    ),
    (
        pg.RowDescription((pg.FieldDescription("id", 16384, 1, 23, 4, -1, 0),)),
        (
            b"T\x00\x00\x00\x1b\x00\x01id\x00\x00\x00\x40\x00\x00\x01"
            b"\x00\x00\x00\x17\x00\x04\xff\xff\xff\xff\x00\x00"
        ),
    ),
    (pg.CommandComplete("SELECT 1"), b"C\x00\x00\x00\x0dSELECT 1\x00"),
    (
        pg.ErrorResponse.build("ERROR", "42P01", "nope"),
        b"E\x00\x00\x00\x20SERROR\x00VERROR\x00C42P01\x00Mnope\x00\x00",
    ),
    (pg.SSLResponse(True), b"S"),
    (pg.SSLResponse(False), b"N"),
    (pg.GSSENCResponse(True), b"G"),
    (pg.CopyOutResponse(0, (0, 0)), b"H\x00\x00\x00\x0b\x00\x00\x02\x00\x00\x00\x00"),
    (
        pg.NegotiateProtocolVersion(0, ("_pq_.x",)),
        b"v\x00\x00\x00\x13\x00\x00\x00\x00\x00\x00\x00\x01_pq_.x\x00",
    ),
]


@pytest.mark.parametrize("message, wire", GOLDEN, ids=lambda v: type(v).__name__)
def test_golden_bytes(message: pg.Message, wire: bytes) -> None:
    assert message.encode() == wire
    assert decode_wire(type(message), wire) == message


def test_non_utf8_strings_survive_byte_for_byte() -> None:
    # A LATIN1 client: é is the lone byte 0xe9, which is not valid UTF-8.
    wire = b"Q\x00\x00\x00\x11SELECT '\xe9t\xe9'\x00"
    query = pg.decode_frontend(b"Q", wire[5:])
    assert query == pg.Query("SELECT '\udce9t\udce9'")
    assert query.encode() == wire


def test_sasl_initial_response_without_data() -> None:
    message = pg.SASLInitialResponse("SCRAM-SHA-256", None)
    assert message.encode() == b"p\x00\x00\x00\x16SCRAM-SHA-256\x00\xff\xff\xff\xff"
    assert pg.SASLInitialResponse.from_payload(message.encode()[5:]) == message


def test_password_helpers() -> None:
    message = pg.PasswordMessage.from_password("s3cret")
    assert message.encode() == b"p\x00\x00\x00\x0bs3cret\x00"
    assert message.password == "s3cret"
    with pytest.raises(pg.ProtocolError):
        _ = pg.PasswordMessage(b"no terminator").password
