"""Hostile input: the decoders raise ProtocolError or nothing, always terminate, and
whatever they accept re-encodes to exactly the bytes they were given."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance import pgwire as pg

from .strategies import backend_typed, chunked, encode_all, frontend_streams, frontend_typed

# PGWIRE_FUZZ_SCALE multiplies every example budget, for a long fuzzing run outside CI.
SCALE = int(os.environ.get("PGWIRE_FUZZ_SCALE", "1"))
FUZZ = settings(
    max_examples=1500 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def run(decoder: pg.FrontendDecoder | pg.BackendDecoder, chunks: list[bytes]) -> list[pg.Message]:
    """Feed chunk by chunk, draining after each; return what was decoded before any error.

    Each next_message() either consumes bytes or returns None, so the inner loop is
    bounded by the input size: a hang would show up as the iteration guard tripping.
    """
    received: list[pg.Message] = []
    total = sum(len(c) for c in chunks)
    try:
        for chunk in chunks:
            decoder.feed(chunk)
            for _ in range(total + 2):
                message = decoder.next_message()
                if message is None:
                    break
                received.append(message)
            else:
                raise AssertionError("decoder kept producing messages without consuming input")
    except pg.ProtocolError as exc:
        assert str(exc)  # noqa: PT017 - raising is one of the valid outcomes here; its message must not be empty
        # Dead from now on, whatever arrives.
        for poke in (lambda: decoder.next_message(), lambda: decoder.feed(b"S\x00\x00\x00\x04")):
            try:
                poke()
            except pg.ProtocolError:
                pass
            else:
                raise AssertionError("a failed decoder accepted more work")
    return received


def assert_reencodes(messages: list[pg.Message], consumed: bytes) -> None:
    """Accepted messages are a canonical reading of the bytes: nothing is normalized away."""
    assert consumed.startswith(encode_all(messages))


def mutate(data: bytes, edits: list[tuple[int, int, int, bytes]]) -> bytes:
    buf = bytearray(data)
    for op, pos, value, extra in edits:
        pos = pos % (len(buf) + 1)
        if op == 0 and pos < len(buf):
            buf[pos] ^= value or 1
        elif op == 1:
            buf[pos:pos] = extra
        else:
            del buf[pos : pos + value % 8 + 1]
    return bytes(buf)


EDITS = st.lists(
    # (operation: flip/insert/delete, position, xor value or delete length, inserted bytes)
    st.tuples(
        st.integers(0, 2), st.integers(0, 10_000), st.integers(0, 255), st.binary(max_size=5)
    ),
    min_size=1,
    max_size=4,
)


@FUZZ
@given(data=st.data(), raw=st.binary(max_size=300))
def test_arbitrary_bytes(data: st.DataObject, raw: bytes) -> None:
    chunks = data.draw(chunked(raw))
    assert_reencodes(run(pg.FrontendDecoder(), chunks), raw)
    assert_reencodes(run(pg.BackendDecoder(), chunks), raw)
    ssl = pg.BackendDecoder()
    ssl.expect_ssl_response()
    assert_reencodes(run(ssl, chunks), raw)


@FUZZ
@given(data=st.data(), tail=st.binary(max_size=200))
def test_arbitrary_bytes_after_a_valid_prefix(data: st.DataObject, tail: bytes) -> None:
    frontend = encode_all(data.draw(frontend_streams())) + tail
    assert_reencodes(run(pg.FrontendDecoder(), data.draw(chunked(frontend))), frontend)
    backend = encode_all(data.draw(st.lists(backend_typed, max_size=6))) + tail
    assert_reencodes(run(pg.BackendDecoder(), data.draw(chunked(backend))), backend)


@FUZZ
@given(data=st.data(), edits=EDITS)
def test_mutated_frontend_stream(data: st.DataObject, edits: list) -> None:
    wire = mutate(encode_all(data.draw(frontend_streams())), edits)
    assert_reencodes(run(pg.FrontendDecoder(), data.draw(chunked(wire))), wire)


@FUZZ
@given(data=st.data(), edits=EDITS)
def test_mutated_backend_stream(data: st.DataObject, edits: list) -> None:
    wire = mutate(encode_all(data.draw(st.lists(backend_typed, min_size=1, max_size=8))), edits)
    assert_reencodes(run(pg.BackendDecoder(), data.draw(chunked(wire))), wire)


def check_single(decode, tag: bytes, body: bytes) -> None:
    try:
        message = decode(tag, body)
    except pg.ProtocolError as exc:
        assert str(exc)  # noqa: PT017 - raising is one of the valid outcomes here; its message must not be empty
        return
    assert message.encode() == tag + (len(body) + 4).to_bytes(4, "big") + body


@settings(max_examples=4000 * SCALE, deadline=None)
@given(tag=st.integers(0, 255).map(lambda b: bytes([b])), body=st.binary(max_size=64))
def test_single_message_any_tag(tag: bytes, body: bytes) -> None:
    check_single(pg.decode_frontend, tag, body)
    check_single(pg.decode_backend, tag, body)


@settings(max_examples=2000 * SCALE, deadline=None)
@given(
    message=st.one_of(backend_typed, frontend_typed).filter(
        lambda m: len(m.encode()) > 5
    ),
    edits=EDITS,
)
def test_single_message_mutated_body(message: pg.Message, edits: list) -> None:
    wire = message.encode()
    body = mutate(wire[5:], edits)
    check_single(pg.decode_frontend, wire[:1], body)
    check_single(pg.decode_backend, wire[:1], body)


def test_every_tag_with_every_short_body() -> None:
    bodies = [b"", b"\x00", b"\xff", b"\x00\x00", b"\xff\xff\xff\xff", b"\x00\x01\xff\xff\xff\xfe"]
    for tag in range(256):
        for body in bodies:
            check_single(pg.decode_frontend, bytes([tag]), body)
            check_single(pg.decode_backend, bytes([tag]), body)


@settings(max_examples=2000 * SCALE, deadline=None)
@given(
    code=st.sampled_from(
        [pg.PROTOCOL_3_0, pg.PROTOCOL_3_2, pg.CANCEL_REQUEST_CODE, pg.SSL_REQUEST_CODE, 0]
    )
    | st.integers(0, 2**32 - 1),
    rest=st.binary(max_size=64),
)
def test_startup_bodies(code: int, rest: bytes) -> None:
    body = code.to_bytes(4, "big") + rest
    try:
        packet = pg.decode_startup(body)
    except pg.ProtocolError as exc:
        assert str(exc)  # noqa: PT017 - raising is one of the valid outcomes here; its message must not be empty
        return
    assert packet.encode() == (len(body) + 4).to_bytes(4, "big") + body


@settings(max_examples=2000 * SCALE, deadline=None)
@given(payload=st.binary(max_size=48))
def test_password_payload_readings(payload: bytes) -> None:
    """Every reading of a 'p' payload is total: a value that re-encodes exactly, or an error."""
    message = pg.PasswordMessage(payload)
    wire = message.encode()
    for cls in (pg.SASLInitialResponse, pg.SASLResponse, pg.GSSResponse):
        try:
            reading = cls.from_payload(payload)
        except pg.ProtocolError:
            assert cls is pg.SASLInitialResponse
            continue
        assert reading.encode() == wire
    try:
        password = message.password
    except pg.ProtocolError:
        return
    assert pg.PasswordMessage.from_password(password) == message
