"""Garbage from either side, through a real ProxyServer on loopback sockets.

A ProxyServer and a scripted fake PostgreSQL backend (tests/proxy/fake_server.py) run on
an event loop in a background thread for the whole module; tests talk to the proxy with
plain blocking sockets from the main thread. The only test double is the intercept
method, which names the fake backend as every connection's original destination.

What is checked, per the acceptance criterion ("a malformed, truncated or oversized
message from either side ends only that connection, with a FATAL ErrorResponse that says
what was wrong; the server keeps serving everyone else"):

* an independent oracle (the pgwire codec plus PostgreSQL's framing rules) judges what a
  side sent; the bytes the other side receives must match the verdict exactly: relayed
  verbatim, or cut at a message boundary and ended by one FATAL naming the culprit;
* nothing hangs (every read has a deadline), nothing crashes (the loop's exception
  handler stays silent), nothing leaks (sessions, cancel keys, upstream connections), and
  a fresh session through the same proxy works after every example.

Regression tests for the defects this fuzzing found are at the end of the file. The fuzz
oracles know which server message types each proxy checks in full (``validated``); a
malformed body of any other type — DataRow without a row-parsing addon, by design — may be
relayed, and the oracle tolerates exactly that (``UNCHECKED``).
"""

from __future__ import annotations

import asyncio
import enum
import gc
import hashlib
import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from appliance.config import PG_MAX_MESSAGE, Config, Endpoint
from appliance.pgwire import BackendDecoder, FrontendDecoder, ProtocolError, decode_startup
from appliance.pgwire import messages as m
from appliance.proxy.hooks import Addon, AddonManager
from appliance.proxy.server import HIGH_WATER, ProxyServer
from tests.proxy.fake_server import BACKEND_PID, BACKEND_SECRET, BackendConn, FakeBackend, Script
from tests.proxy.loop_thread import LoopThread
from tests.proxy.real_proxy import (
    READ_TIMEOUT,
    Client,
    decode_clean,
    decode_lenient,
    frames,
    is_fatal,
    lone_fatal,
    proxy_config,
    start_proxy,
    startup_bytes,
)

SCALE = int(os.environ.get("TOLLGATE_FUZZ_SCALE", "1"))
# The bystander fixture is function-scoped on purpose: one session kept open across examples.
FUZZ = settings(max_examples=250 * SCALE, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
FUZZ_SMALL = settings(FUZZ, max_examples=150 * SCALE)
STREAM_THRESHOLD = 1 << 20  # the config default; server messages above it are streamed
SSL_REQUEST = m.SSLRequest().encode()
GSSENC_REQUEST = m.GSSENCRequest().encode()
u32 = struct.Struct("!I")


# ---- the harness: proxy + fake backend on a loop thread --------------------------------------

class PassThrough(Addon):
    """Implements every hook and changes nothing: switches on the session's parsing paths."""

    name = "pass-through"

    def session_start(self, session): pass
    def session_end(self, session, reason): pass
    def session_refused(self, session, reason): pass
    def statement(self, session, statement): return None
    def row_description(self, session, result): pass
    def data_row(self, session, result, message): return None
    def stream_chunk(self, session, result, tag, chunk, offset, total): return None
    def copy_data(self, session, result, from_client, message): return None
    def notice(self, session, is_error, message): return None
    def notification(self, session, message): return None
    def result_complete(self, session, result, tag, error): pass


@dataclass
class Proxy:
    name: str
    server: ProxyServer
    port: int
    validated: bytes  # backend message types whose bodies this proxy decodes whole


def make_config(listen_port: int, backend_port: int) -> Config:
    # The fuzz oracles judge lengths by PostgreSQL's own limit, so these proxies use it;
    # Tollgate's lower default and its other limits are tested in test_server_limits.py.
    return proxy_config(listen_port, backend_port,
                        f"max_client_message = {PG_MAX_MESSAGE}\nmax_buffered_total = {4 * PG_MAX_MESSAGE}")


class Harness(LoopThread):
    def __init__(self) -> None:
        super().__init__()
        self.backend = FakeBackend()
        backend_port = self.run(self.backend.start())
        self.destination = Endpoint.parse(f"127.0.0.1:{backend_port}")
        self.bare = self._start_proxy("bare", AddonManager(), b"ZS123nsIcCENAtGHWV", backend_port)
        self.hooked = self._start_proxy("hooked", AddonManager([PassThrough()]), b"ZS123nsIcCENAtGHWVT", backend_port)

    def _start_proxy(self, name: str, addons: AddonManager, validated: bytes, backend_port: int) -> Proxy:
        server, port = start_proxy(self, lambda port: make_config(port, backend_port), self.destination, addons)
        return Proxy(name, server, port, validated)

    def close(self) -> None:
        async def closing() -> None:
            for proxy in (self.bare, self.hooked):
                await asyncio.wait_for(proxy.server.close(), READ_TIMEOUT)
            await self.backend.close()
        self.stop(closing)


@pytest.fixture(scope="module")
def harness():
    h = Harness()
    yield h
    h.close()


@pytest.fixture(scope="module", params=["bare", "hooked"])
def proxy(request, harness) -> Proxy:
    return getattr(harness, request.param)


# ---- a blocking client ------------------------------------------------------------------------

class Verdict(enum.Enum):
    """What a byte stream from one side obliges the proxy to do."""

    OPEN = "valid so far; may end inside a message"  # no FATAL from the proxy
    PROXY_FATAL = "framing the proxy itself must refuse"  # FATAL from the proxy
    FATAL = "a complete invalid message"  # FATAL from the proxy or the server behind it
    EITHER = "a message that can't be valid, body not yet complete"  # refusing early is allowed
    TERMINATED = "Terminate sent"  # anything valid, closed
    SILENT = "a CancelRequest"  # closed without an answer, as PostgreSQL does
    REFUSED = "a StartupMessage the proxy refuses on its meaning"  # FATAL 28000
    LOGGED_IN = "a StartupMessage for a role the proxy has credentials for"
    TRUNCATED = "valid server messages, then the server hangs up inside one"  # FATAL 08006
    STREAMED = "a large streamable server message, cut short"  # bytes relayed, then a bare close
    # The open defect (test_malformed_server_message_is_not_relayed): tolerated, not required.
    UNCHECKED = "a complete server message whose body the proxy relays unread, malformed"


FRONTEND_TAGS = frozenset(b"QPBESDCdHcfXF")  # what the proxy relays after startup
# Lengths below which a message can't hold its fixed fields (a Parse needs two NULs and a count).
MIN_FRONTEND_LENGTH = {ord("Q"): 5, ord("P"): 8, ord("B"): 12, ord("F"): 14}
BACKEND_TAGS = frozenset(b"DZCsIENATn123dSGHWctV")  # what the proxy relays once ready
STREAMABLE = frozenset(b"DdV")
_TYPED_STARTUP = startup_bytes()


def _typed_frontend_decoder() -> FrontendDecoder:
    decoder = FrontendDecoder()
    decoder.feed(_TYPED_STARTUP)
    decoder.next_message()
    return decoder


def frontend_error(data: bytes) -> ProtocolError | None:
    """The codec's complaint about the typed frontend bytes, as PostgreSQL would judge them."""
    decoder = _typed_frontend_decoder()
    decoder.feed(data)
    try:
        decoder.next_message()
    except ProtocolError as exc:
        return exc
    return None


def backend_error(data: bytes) -> ProtocolError | None:
    decoder = BackendDecoder()
    decoder.feed(data)
    try:
        decoder.next_message()
    except ProtocolError as exc:
        return exc
    return None


def judge_client_typed(data: bytes, max_len: int = PG_MAX_MESSAGE) -> Verdict:
    """What typed frontend bytes (after a StartupMessage) oblige the proxy to do."""
    pos = 0
    while len(data) - pos >= 5:
        tag = data[pos]
        (length,) = u32.unpack_from(data, pos + 1)
        if length < 4 or length > max_len:
            return Verdict.PROXY_FATAL
        end = pos + 1 + length
        if end > len(data):
            # PostgreSQL checks the type and a per-type length bound before reading a body.
            if tag not in FRONTEND_TAGS or frontend_error(data[pos:pos + 5]):
                return Verdict.PROXY_FATAL
            if length < MIN_FRONTEND_LENGTH.get(tag, 4):
                return Verdict.EITHER
            return Verdict.OPEN
        if tag not in FRONTEND_TAGS:
            return Verdict.PROXY_FATAL
        if frontend_error(data[pos:end]):
            return Verdict.FATAL
        if tag == ord("X"):
            return Verdict.TERMINATED
        pos = end
    return Verdict.OPEN


@dataclass
class StartupJudgement:
    verdict: Verdict
    ssl_answers: int = 0
    rest: bytes = b""  # typed bytes behind an accepted StartupMessage


def judge_startup(data: bytes) -> StartupJudgement:
    """What a connection's first bytes oblige the proxy to do."""
    pos, answers = 0, 0
    while True:
        if len(data) - pos < 4:
            return StartupJudgement(Verdict.OPEN, answers)
        (length,) = u32.unpack_from(data, pos)
        if not 8 <= length <= 10_000:
            return StartupJudgement(Verdict.PROXY_FATAL, answers)
        if pos + length > len(data):
            return StartupJudgement(Verdict.OPEN, answers)
        try:
            packet = decode_startup(data[pos + 4:pos + length])
        except ProtocolError:
            return StartupJudgement(Verdict.PROXY_FATAL, answers)
        pos += length
        if isinstance(packet, (m.SSLRequest, m.GSSENCRequest)):
            if pos < len(data):  # plaintext behind it: CVE-2021-23222's injection
                return StartupJudgement(Verdict.PROXY_FATAL, answers)
            answers += 1
            continue
        if isinstance(packet, m.CancelRequest):
            return StartupJudgement(Verdict.SILENT, answers)
        try:
            packet.validate()
        except ProtocolError:
            return StartupJudgement(Verdict.PROXY_FATAL, answers)
        params = packet.parameters
        if (params.get("user") != "app"
                or params.get("replication", "false").lower() in {"1", "true", "yes", "on", "database"}):
            return StartupJudgement(Verdict.REFUSED, answers)
        return StartupJudgement(Verdict.LOGGED_IN, answers, data[pos:])


@dataclass
class ServerJudgement:
    verdict: Verdict
    boundaries: list[int]  # ends of the complete valid messages, from 0
    bad_at: int | None = None  # where the message the proxy must refuse starts
    streams: bool = False  # the stream ends inside a message large enough to be streamed
    errors: bool = False  # an ErrorResponse was relayed (it may have been the server's FATAL)


def judge_server(data: bytes, validated: bytes) -> ServerJudgement:
    """What backend bytes sent to a READY session oblige the proxy to do."""
    pos, boundaries, unchecked, errors = 0, [0], False, False

    def verdict(v: Verdict, bad_at: int | None = None, streams: bool = False) -> ServerJudgement:
        # After a malformed message the proxy relays unread, whatever follows is moot.
        return ServerJudgement(Verdict.UNCHECKED if unchecked else v, boundaries, bad_at, streams, errors)

    while len(data) - pos >= 5:
        tag = data[pos]
        (length,) = u32.unpack_from(data, pos + 1)
        if length < 4 or length > PG_MAX_MESSAGE:
            return verdict(Verdict.PROXY_FATAL, pos)
        end = pos + 1 + length
        if end > len(data):
            if tag in BACKEND_TAGS and backend_error(data[pos:pos + 5]):  # e.g. a 10-byte ParseComplete
                return verdict(Verdict.PROXY_FATAL, pos)
            if tag in STREAMABLE and length > STREAM_THRESHOLD:
                return verdict(Verdict.STREAMED, streams=True)
            if tag not in BACKEND_TAGS:
                return verdict(Verdict.EITHER)
            return verdict(Verdict.TRUNCATED)
        if tag not in BACKEND_TAGS:
            return verdict(Verdict.PROXY_FATAL, pos)
        if backend_error(data[pos:end]):
            if tag in validated:
                return verdict(Verdict.PROXY_FATAL, pos)
            unchecked = True
        errors = errors or tag == ord("E")
        pos = end
        boundaries.append(pos)
    if pos < len(data):
        return verdict(Verdict.TRUNCATED)
    return verdict(Verdict.OPEN)


# ---- health: after every example ------------------------------------------------------------

def session_count(proxy: Proxy) -> int:
    return len(proxy.server.sessions)


def assert_healthy(h: Harness, proxy: Proxy, bystander: Client | None = None) -> None:
    """The proxy still serves a fresh session and the bystander's; nothing leaked or crashed."""
    others = 0
    if bystander is not None:
        others = 1
        got = bystander.query("SELECT 1")
        assert [type(x) for x in got] == [m.RowDescription, m.DataRow, m.CommandComplete, m.ReadyForQuery], got
    client = Client(proxy.port)
    try:
        client.login(h.backend.script(Script()))
        got = client.query("SELECT 1")
        assert [type(x) for x in got] == [m.RowDescription, m.DataRow, m.CommandComplete, m.ReadyForQuery], got
        assert got[1].values == (b"1",)
        client.send(m.Terminate().encode())
        client.read_until_eof()
    finally:
        client.close()
    h.wait_for(lambda: session_count(proxy) == others, f"{proxy.name} proxy sessions to drop to {others}")
    h.wait_for(lambda: len(h.backend.open_connections()) == others, "every upstream connection to be closed")
    assert h.call(lambda: len(proxy.server.cancels)) == others, "cancel keys outlived their sessions"
    assert not h.loop_errors, f"the event loop reported errors: {h.loop_errors}"


@pytest.fixture
def bystander(harness, proxy):
    """A session open across all the examples of a test, queried after each one."""
    client = Client(proxy.port)
    client.login(harness.backend.script(Script()))
    yield client
    client.close()
    harness.wait_for(lambda: session_count(proxy) == 0, "the bystander's session to end")


# ---- strategies ---------------------------------------------------------------------------------

TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=12)
NAMES = st.sampled_from(["", "s1", "p1"]) | st.text("ab_1", max_size=4)
SQL = st.sampled_from(["SELECT 1", "BEGIN", "COMMIT", "", "select $1"]) | TEXT
NULLABLE = st.none() | st.binary(max_size=12)
FORMAT = st.sampled_from([0, 1])
OID = st.integers(0, 2**32 - 1)


@st.composite
def binds(draw: st.DrawFn) -> m.Bind:
    params = tuple(draw(st.lists(NULLABLE, max_size=4)))
    nformats = draw(st.sampled_from(sorted({0, 1, len(params)})))
    return m.Bind(draw(NAMES), draw(NAMES), tuple(draw(FORMAT) for _ in range(nformats)), params,
                  tuple(draw(st.lists(FORMAT, max_size=3))))


@st.composite
def function_calls(draw: st.DrawFn) -> m.FunctionCall:
    args = tuple(draw(st.lists(NULLABLE, max_size=3)))
    nformats = draw(st.sampled_from(sorted({0, 1, len(args)})))
    return m.FunctionCall(draw(OID), tuple(draw(FORMAT) for _ in range(nformats)), args, draw(FORMAT))


FRONTEND_MESSAGES = st.one_of(
    SQL.map(m.Query),
    st.builds(m.Parse, NAMES, SQL, st.lists(OID, max_size=3).map(tuple)),
    binds(),
    st.builds(m.Execute, NAMES, st.integers(0, 10)),
    st.just(m.Sync()), st.just(m.Flush()),
    st.builds(m.Describe, st.sampled_from([b"S", b"P"]), NAMES),
    st.builds(m.Close, st.sampled_from([b"S", b"P"]), NAMES),
    st.builds(m.CopyData, st.binary(max_size=16)), st.just(m.CopyDone()), st.builds(m.CopyFail, TEXT),
    function_calls(),
    st.just(m.Terminate()),
)

_FIELDS = st.lists(st.tuples(st.sampled_from("SVCMDHPW") | st.characters(min_codepoint=1, max_codepoint=127), TEXT),
                   max_size=5).map(tuple)
_COLUMNS = st.lists(st.builds(m.FieldDescription, TEXT, OID, st.integers(-(2**15), 2**15 - 1), OID,
                              st.integers(-(2**15), 2**15 - 1), st.integers(-(2**31), 2**31 - 1), FORMAT),
                    max_size=3).map(tuple)
_COPY_FORMATS = st.lists(FORMAT, max_size=3).map(tuple)
BACKEND_MESSAGES = st.one_of(
    _COLUMNS.map(m.RowDescription),
    st.lists(NULLABLE, max_size=4).map(tuple).map(m.DataRow),
    TEXT.map(m.CommandComplete),
    st.sampled_from([b"I", b"T", b"E"]).map(m.ReadyForQuery),
    _FIELDS.map(m.ErrorResponse), _FIELDS.map(m.NoticeResponse),
    st.builds(m.ParameterStatus, TEXT, TEXT),
    st.builds(m.NotificationResponse, st.integers(0, 2**31 - 1), TEXT, TEXT),
    st.sampled_from([m.ParseComplete(), m.BindComplete(), m.CloseComplete(), m.NoData(), m.PortalSuspended(),
                     m.EmptyQueryResponse(), m.CopyDone()]),
    st.lists(OID, max_size=3).map(tuple).map(m.ParameterDescription),
    st.binary(max_size=16).map(m.CopyData),
    st.builds(m.CopyInResponse, FORMAT, _COPY_FORMATS), st.builds(m.CopyOutResponse, FORMAT, _COPY_FORMATS),
    st.builds(m.CopyBothResponse, FORMAT, _COPY_FORMATS),
    NULLABLE.map(m.FunctionCallResponse),
    # Valid messages that have no business arriving once a session is ready:
    st.builds(m.BackendKeyData, st.integers(0, 2**31 - 1), st.binary(min_size=4, max_size=8)),
    st.just(m.AuthenticationOk()),
    st.builds(m.NegotiateProtocolVersion, st.integers(0, 5), st.lists(TEXT, max_size=2).map(tuple)),
)

LOGIN_MESSAGES = st.one_of(
    st.just(m.AuthenticationOk()),
    st.binary(min_size=4, max_size=4).map(m.AuthenticationMD5Password),
    st.just(m.AuthenticationCleartextPassword()),
    st.sampled_from([("SCRAM-SHA-256",), ("SCRAM-SHA-256-PLUS",), ()]).map(m.AuthenticationSASL),
    st.binary(max_size=16).map(m.AuthenticationSASLContinue),
    st.builds(m.ParameterStatus, TEXT, TEXT),
    st.builds(m.BackendKeyData, st.integers(0, 2**31 - 1), st.binary(min_size=4, max_size=8)),
    st.sampled_from([b"I", b"T", b"E"]).map(m.ReadyForQuery),
    _FIELDS.map(m.NoticeResponse), _FIELDS.map(m.ErrorResponse),
    st.builds(m.NegotiateProtocolVersion, st.integers(0, 5), st.lists(TEXT, max_size=2).map(tuple)),
    BACKEND_MESSAGES,
)

INTERESTING_LENGTHS = st.sampled_from([0, 1, 3, 4, 5, 6, 8, 9, 10_000, 10_001, 1 << 20, (1 << 20) + 1,
                                       PG_MAX_MESSAGE, PG_MAX_MESSAGE + 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF])


@st.composite
def mutated(draw: st.DrawFn, messages: st.SearchStrategy[m.Message], max_messages: int = 6) -> bytes:
    """Valid messages, encoded, then damaged a few times in the ways a broken peer damages them."""
    return damage(draw, b"".join(x.encode() for x in draw(st.lists(messages, min_size=1, max_size=max_messages))))


def damage(draw: st.DrawFn, raw: bytes) -> bytes:
    data = bytearray(raw)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "length", "tag"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        elif op == "length":
            data[at:at + 4] = u32.pack(draw(INTERESTING_LENGTHS | st.integers(0, 2**32 - 1)))
        elif op == "tag" and data:
            data[at] = draw(st.integers(0, 255))
    return bytes(data)


def valid_then(messages: st.SearchStrategy[m.Message]) -> st.SearchStrategy[bytes]:
    return st.builds(lambda msgs, tail: b"".join(x.encode() for x in msgs) + tail,
                     st.lists(messages, max_size=5), st.binary(max_size=24))


def framed_noise() -> st.SearchStrategy[bytes]:
    """Tag + length + random body: gets past the first framing check more often than noise."""
    return st.builds(lambda tag, length, body: bytes([tag]) + u32.pack(length) + body,
                     st.integers(0, 255), INTERESTING_LENGTHS | st.integers(0, 64), st.binary(max_size=40))


def typed_garbage(messages: st.SearchStrategy[m.Message]) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=80), mutated(messages), valid_then(messages), framed_noise(),
                     st.lists(messages, min_size=1, max_size=5).map(lambda xs: b"".join(x.encode() for x in xs)))


STARTUP_PARAMS = st.dictionaries(
    st.sampled_from(["user", "database", "application_name", "replication", "options"]) | TEXT.filter(bool),
    st.sampled_from(["app", "postgres", "true", "false", ""]) | TEXT, max_size=4)


@st.composite
def startup_garbage(draw: st.DrawFn) -> bytes:
    """A connection's first bytes: noise, near-miss startup packets, or valid ones with a tail."""
    prefix = draw(st.sampled_from([b""] * 6 + [SSL_REQUEST, GSSENC_REQUEST]))
    code = draw(st.sampled_from([m.PROTOCOL_3_0, m.PROTOCOL_3_2, 2 << 16, 4 << 16, m.SSL_REQUEST_CODE,
                                 m.CANCEL_REQUEST_CODE, (1234 << 16) | 1]) | st.integers(0, 2**32 - 1))
    kind = draw(st.sampled_from(["noise", "length", "coded", "startup", "startup+typed"]))
    if kind == "noise":
        body = draw(st.binary(max_size=64))
    elif kind == "length":
        body = u32.pack(draw(INTERESTING_LENGTHS | st.integers(0, 200))) + draw(st.binary(max_size=64))
    elif kind == "coded":
        tail = draw(st.binary(max_size=40))
        body = u32.pack(8 + len(tail)) + u32.pack(code) + tail
    else:
        params = draw(STARTUP_PARAMS)
        params.setdefault("user", draw(st.sampled_from(["app", "app", "nobody"])))
        body = m.StartupMessage(m.PROTOCOL_3_0, params).encode()
        if draw(st.booleans()):
            body = draw(mutated(st.just(m.StartupMessage(m.PROTOCOL_3_0, params)), max_messages=1))
        if kind == "startup+typed":
            body += draw(typed_garbage(FRONTEND_MESSAGES))
    return prefix + body


# ---- 1. garbage from a client ----------------------------------------------------------------

def check_client_outcome(received: bytes, verdict: Verdict, ssl_answers: int = 0) -> None:
    got = decode_clean(received, ssl_answers)
    fatals = [x for x in got if is_fatal(x)]
    if verdict in (Verdict.PROXY_FATAL, Verdict.FATAL, Verdict.REFUSED):
        assert fatals and got[-1] is fatals[-1], f"{verdict}: expected a final FATAL, got {got!r}"
        assert len(fatals) == 1, got
        error = fatals[0]
        assert error.message, error
        if verdict is Verdict.REFUSED:
            assert error.sqlstate == "28000", error
        else:
            assert error.sqlstate in ("08P01", "0A000"), error
        if verdict is Verdict.PROXY_FATAL:  # blamed on the client, pipelined or not
            assert error.message.startswith("invalid frontend message"), error
    elif verdict is Verdict.OPEN:
        assert not fatals, f"valid input was refused: {fatals!r}"
    else:  # TERMINATED, SILENT, EITHER: closed, at most one FATAL and nothing after it
        assert len(fatals) <= 1 and (not fatals or got[-1] is fatals[0]), got


def client_must_wait(verdict: Verdict) -> bool:
    """Whether the proxy must end the connection itself (else the client half-closes)."""
    return verdict in (Verdict.PROXY_FATAL, Verdict.FATAL, Verdict.REFUSED, Verdict.SILENT)


@FUZZ
@given(data=startup_garbage())
# The server's FATAL for a bad Bind is the client's last message: no second FATAL of ours.
@example(data=b"\x00\x00\x00\x12\x00\x03\x00\x00user\x00app\x00\x00B\x00\x00\x00\x0f\x00\x01\x00\x00\x01\x01"
              b"\x00\x00\x00\x00\x00")
def test_client_garbage_before_startup(harness, proxy, bystander, data):
    judged = judge_startup(data)
    verdict = judged.verdict
    if verdict is Verdict.LOGGED_IN:
        verdict = judge_client_typed(judged.rest)
    event(f"{judged.verdict.name} -> {verdict.name}")
    client = Client(proxy.port)
    try:
        client.send(data)
        if not client_must_wait(verdict):
            client.half_close()
        received = client.read_until_eof()
    finally:
        client.close()
    if judged.verdict is Verdict.LOGGED_IN and verdict in (Verdict.PROXY_FATAL, Verdict.FATAL):
        login = decode_clean(received)
        assert isinstance(login[0], m.AuthenticationOk), login
    check_client_outcome(received, verdict, ssl_answers=judged.ssl_answers if received else 0)
    assert_healthy(harness, proxy, bystander)


CUTS = st.lists(st.integers(1, 120), max_size=4).map(tuple)


@FUZZ
@given(garbage=typed_garbage(FRONTEND_MESSAGES), pipelined=st.booleans(), cuts=CUTS)
@example(garbage=b"\x00\x00\x00\x00\x08abcd", pipelined=True, cuts=())  # blamed on the client
@example(garbage=b"S" + u32.pack(1 << 20), pipelined=False, cuts=())  # refused from the header
@example(garbage=b"P\x00\x00\x00\x06\x00", pipelined=False, cuts=())  # can't be valid: either
@example(garbage=m.Query("SELECT 1").encode() + b"X\x00\x00\x00\x04", pipelined=False, cuts=(3,))
def test_client_garbage_after_startup(harness, proxy, bystander, garbage, pipelined, cuts):
    """Startup then garbage: pipelined in one write (buffered during login), or once ready."""
    verdict = judge_client_typed(garbage)
    event(verdict.name)
    client = Client(proxy.port)
    try:
        key = harness.backend.script(Script())
        if pipelined:
            client.send(startup_bytes(key) + garbage)
            client.read_until_ready()
        else:
            client.login(key)
            client.send(garbage, cuts)
        if not client_must_wait(verdict):
            client.half_close()
        client.read_until_eof()
    finally:
        client.close()
    check_client_outcome(client.after_login(), verdict)
    # The upstream connection of a refused session is closed, not left to idle.
    [upstream] = harness.backend.connections_for(key)
    assert upstream.finished.wait(READ_TIMEOUT), "the upstream connection outlived the session"
    assert_healthy(harness, proxy, bystander)


# ---- 2. garbage from a server ------------------------------------------------------------------

def check_server_outcome(post: bytes, garbage: bytes, judged: ServerJudgement) -> None:
    """post: what the client got after sending its query; garbage: what the server sent."""
    common = 0
    limit = min(len(post), len(garbage))
    while common < limit and post[common] == garbage[common]:
        common += 1
    cuts = [b for b in judged.boundaries if b <= common]
    if (judged.streams or judged.verdict is Verdict.UNCHECKED) and common == len(garbage):  # mid-message
        cuts.append(len(garbage))
    for cut in sorted(cuts, reverse=True):
        rest = post[cut:]
        fatal = lone_fatal(rest) if rest else None
        if not rest or fatal is not None:
            break
    else:
        raise AssertionError(f"the client got bytes that are neither the server's messages nor one FATAL: "
                             f"{decode_lenient(post)!r}")
    v = judged.verdict
    complete = judged.boundaries[-1]  # every complete message is relayed before anything else
    if v is Verdict.PROXY_FATAL:
        assert fatal is not None, f"expected a FATAL after {cut} relayed bytes, got {decode_lenient(post)!r}"
        assert cut <= judged.bad_at
        assert fatal.sqlstate == "08P01" and "database server" in (fatal.message or ""), fatal
    elif v is Verdict.STREAMED:  # half a message is out: a FATAL now would break the framing
        assert cut == len(garbage) and fatal is None, decode_lenient(post)
    elif v is not Verdict.UNCHECKED:  # OPEN, TRUNCATED, EITHER; then the server hung up
        assert cut == complete, f"complete server messages were held back: {decode_lenient(post)!r}"
        if fatal is None:
            assert v is Verdict.EITHER or judged.errors, "the server hung up and the client wasn't told"
        else:
            assert fatal.sqlstate.startswith("08") and "database server" in (fatal.message or ""), fatal
    if (v is not Verdict.UNCHECKED and cut != len(garbage)) or v is Verdict.OPEN:
        decode_clean(post)  # the client was left with whole, valid messages only


def server_garbage() -> st.SearchStrategy[bytes]:
    return typed_garbage(BACKEND_MESSAGES)


@FUZZ
@given(garbage=server_garbage(), close_after=st.booleans(), cuts=CUTS)
@example(garbage=b"", close_after=True, cuts=())  # hangs up: FATAL 08006
@example(garbage=b"N\x00\x00\x00\x04", close_after=True, cuts=())  # malformed, relayed unread
@example(garbage=b"1\x00\x00\x00\x08abcd", close_after=False, cuts=(6,))  # fixed length broken
@example(garbage=b"D" + u32.pack(0x7FFFFFFF) + b"\x00\x01", close_after=False, cuts=())  # above 1 GB
@example(garbage=b"D" + u32.pack(2 << 20) + b"\x00\x01", close_after=True, cuts=())  # streamed, cut short
@example(garbage=m.ErrorResponse.build("FATAL", "57P01", "bye").encode(), close_after=True, cuts=())
def test_server_garbage_after_login(harness, proxy, bystander, garbage, close_after, cuts):
    judged = judge_server(garbage, proxy.validated)
    event(judged.verdict.name)
    if judged.verdict is not Verdict.PROXY_FATAL:
        close_after = True  # nothing obliges the proxy to hang up: the server does
    key = harness.backend.script(Script("garbage", garbage=garbage, close_after=close_after, cuts=cuts))
    client = Client(proxy.port)
    try:
        client.login(key)
        client.send(m.Query("SELECT 1").encode())
        client.read_until_eof()
    finally:
        client.close()
    check_server_outcome(client.after_login(), garbage, judged)
    [upstream] = harness.backend.connections_for(key)
    assert upstream.finished.wait(READ_TIMEOUT), "the upstream connection outlived the session"
    if not close_after:
        assert upstream.eof.is_set(), "the proxy left the upstream connection open"
    assert_healthy(harness, proxy, bystander)


_AFTER_AUTH = st.one_of(
    st.builds(m.ParameterStatus, TEXT, TEXT),
    st.builds(m.BackendKeyData, st.integers(0, 2**31 - 1), st.binary(min_size=4, max_size=8)),
    _FIELDS.map(m.NoticeResponse),
)


@st.composite
def login_answers(draw: st.DrawFn) -> bytes:
    """A plausible login answer (AuthenticationOk, status, key, ready), maybe damaged, then more."""
    messages = [m.AuthenticationOk(), *draw(st.lists(_AFTER_AUTH, max_size=4)),
                draw(st.sampled_from([b"I", b"T", b"E"]).map(m.ReadyForQuery))]
    data = b"".join(x.encode() for x in messages)
    if draw(st.booleans()):
        data = damage(draw, data)
    return data + draw(st.binary(max_size=16) | server_garbage())


@FUZZ_SMALL
@given(garbage=st.one_of(st.binary(max_size=80), mutated(LOGIN_MESSAGES, 7), valid_then(LOGIN_MESSAGES),
                         framed_noise(), login_answers()), cuts=CUTS)
def test_server_garbage_during_login(harness, proxy, bystander, garbage, cuts):
    key = harness.backend.script(Script("login-garbage", garbage=garbage, cuts=cuts))
    client = Client(proxy.port)
    try:
        client.send(startup_bytes(key))
        received = client.read_until_eof()
    finally:
        client.close()
    found, _ = frames(received)
    ready = next((end for tag, _, end in found if tag == ord("Z")), None)
    if ready is None:
        got = decode_clean(received)
        assert got and is_fatal(got[-1]), f"login failed without a FATAL: {got!r}"
        assert [x for x in got if is_fatal(x)] == [got[-1]], got
        assert got[-1].message, got[-1]
    else:  # the garbage happened to log us in; the login part must be clean
        got = decode_clean(received[:ready])
        assert isinstance(got[-1], m.ReadyForQuery)
    keys = [x for x in got if isinstance(x, m.BackendKeyData)]
    event(f"login {'ready' if ready else 'refused'}, {len(keys)} BackendKeyData")
    server_keys = {decode_lenient(garbage[start:end])[0].secret_key
                   for tag, start, end in frames(garbage)[0]
                   if tag == ord("K") and not backend_error(garbage[start:end])}
    assert not {k.secret_key for k in keys} & server_keys, "the database's cancel key reached the client"
    assert len(keys) <= 1, f"the client was given {len(keys)} cancel keys"
    assert_healthy(harness, proxy, bystander)


# ---- 3. oversized messages ----------------------------------------------------------------------

@pytest.mark.parametrize("length", [0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, PG_MAX_MESSAGE + 1, 3])
@pytest.mark.parametrize("when", ["ready", "pipelined"])
def test_oversized_client_message_ends_only_that_session(harness, proxy, length, when):
    other = Client(proxy.port)  # an innocent bystander, open across the whole test
    bad = Client(proxy.port)
    try:
        other.login(harness.backend.script(Script()))
        key = harness.backend.script(Script())
        header = b"Q" + u32.pack(length) + b"SELECT"
        if when == "pipelined":
            bad.send(startup_bytes(key) + header)
            bad.read_until_ready()
        else:
            bad.login(key)
            bad.send(header)
        bad.read_until_eof()  # on the header alone: the proxy does not wait for the body
        [error] = decode_clean(bad.after_login())
        assert is_fatal(error) and error.sqlstate == "08P01", error
        # PostgreSQL reads the length as a signed 32-bit number; either rendering names it.
        assert str(length) in error.message or str(length - (1 << 32)) in error.message, error
        [upstream] = harness.backend.connections_for(key)
        assert upstream.eof.wait(READ_TIMEOUT), "the upstream of the refused session was not closed"
        assert not upstream.received.endswith(header), "the oversized header was forwarded"
        got = other.query("SELECT 1")
        assert [type(x) for x in got] == [m.RowDescription, m.DataRow, m.CommandComplete, m.ReadyForQuery]
        assert harness.call(lambda: session_count(proxy)) == 1
    finally:
        other.close()
        bad.close()
    assert_healthy(harness, proxy)


@pytest.mark.parametrize("length", [0x7FFFFFFF, 10_001, 7])
def test_oversized_startup_packet_is_refused_at_once(harness, proxy, length):
    client = Client(proxy.port)
    try:
        client.send(u32.pack(length) + u32.pack(m.PROTOCOL_3_0) + b"user\0app\0")
        [error] = decode_clean(client.read_until_eof())
    finally:
        client.close()
    assert is_fatal(error) and error.sqlstate == "08P01" and str(length) in error.message, error
    assert_healthy(harness, proxy)


# ---- 4. truncated messages; nothing leaks ------------------------------------------------------

@pytest.mark.parametrize("abort", [False, True], ids=["fin", "reset"])
@pytest.mark.parametrize("phase", ["startup", "login", "ready"])
def test_client_leaving_mid_message_closes_upstream(harness, proxy, phase, abort):
    key = harness.backend.script(Script("hold" if phase == "login" else "normal"))
    client = Client(proxy.port)
    if phase == "startup":
        client.send(startup_bytes(key)[:11])
    elif phase == "login":
        client.send(startup_bytes(key))
        [upstream] = wait_connections(harness, key, 1)
        assert upstream.startup_seen.wait(READ_TIMEOUT)
        client.send(b"Q\x00\x00")  # buffered behind the login
    else:
        client.login(key)
        client.send(m.Query("SELECT 1").encode()[:7])
    harness.wait_for(lambda: session_count(proxy) == 1, "the session to be registered")
    if abort:
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    if phase != "startup":
        [upstream] = harness.backend.connections_for(key)
        assert upstream.eof.wait(READ_TIMEOUT), "the database never saw the proxy hang up"
        if phase == "ready":
            assert not upstream.received.endswith(b"SE"), "half a message was forwarded"
    else:
        assert harness.backend.connections_for(key) == []
    harness.wait_for(lambda: session_count(proxy) == 0, "the session to be forgotten")
    assert_healthy(harness, proxy)


def wait_connections(h: Harness, key: str, n: int) -> list[BackendConn]:
    h.wait_for(lambda: len(h.backend.connections_for(key)) >= n, f"{n} upstream connection(s) for {key}")
    return h.backend.connections_for(key)


# ---- many at once; cancel requests ----------------------------------------------------------

def bad_client(port: int, key: str, kind: str) -> tuple[str, list[m.Message]]:
    """One misbehaving connection; returns what it was told."""
    client = Client(port)
    try:
        if kind == "noise":
            client.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(64)))
            return kind, decode_clean(client.read_until_eof())
        client.login(key)
        if kind == "oversized":
            client.send(b"Q" + u32.pack(0x7FFFFFFF))
        elif kind == "unknown-type":
            client.send(b"\x00\x00\x00\x00\x08abcd")
        elif kind == "bad-bind":
            client.send(b"B\x00\x00\x00\x08\x00\x00\xff\xff")
        elif kind == "truncated":
            client.send(b"Q\x00\x00\x00\x20SEL")
            return kind, []  # and hang up mid-message
        client.read_until_eof()
        return kind, decode_clean(client.after_login())
    finally:
        client.close()


def test_garbage_on_many_connections_at_once_leaves_the_others_served(harness, proxy, bystander):
    from concurrent.futures import ThreadPoolExecutor
    kinds = ["noise", "oversized", "unknown-type", "bad-bind", "truncated"] * 8
    with ThreadPoolExecutor(len(kinds)) as pool:
        futures = [pool.submit(bad_client, proxy.port, harness.backend.script(Script()), kind) for kind in kinds]
        for _ in range(20):  # the bystander keeps being served while they misbehave
            assert bystander.query("SELECT 1")[1].values == (b"1",)
        results = [f.result(timeout=READ_TIMEOUT * 2) for f in futures]
    for kind, got in results:
        if kind != "truncated":
            assert len(got) == 1 and is_fatal(got[0]) and got[0].sqlstate == "08P01", (kind, got)
    assert_healthy(harness, proxy, bystander)


def test_cancel_requests_with_unknown_keys_are_dropped_and_known_ones_translated(harness, proxy, bystander):
    victim = Client(proxy.port)
    try:
        got = victim.login(harness.backend.script(Script()))
        [key] = [x for x in got if isinstance(x, m.BackendKeyData)]
        before = len(harness.backend.connections)
        for cancel in (m.CancelRequest(key.process_id, bytes(b ^ 1 for b in key.secret_key)),  # wrong key
                       m.CancelRequest(key.process_id, key.secret_key)):
            client = Client(proxy.port)
            try:
                client.send(cancel.encode())
                assert client.read_until_eof() == b"", "a CancelRequest is never answered"
            finally:
                client.close()
        # Only the right key reaches the database, and as the database's own key.
        harness.wait_for(lambda: any(c.cancel for c in harness.backend.connections[before:]),
                         "the translated cancel request to reach the database")
        cancels = [c.cancel for c in harness.backend.connections[before:] if c.cancel]
        assert cancels == [m.CancelRequest(BACKEND_PID, BACKEND_SECRET)]
        assert victim.query("SELECT 1")[1].values == (b"1",)
    finally:
        victim.close()
    assert_healthy(harness, proxy, bystander)


# ---- back-pressure, end to end ------------------------------------------------------------------

def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def session_for(proxy: Proxy, key: str) -> Any:
    return next(s for s in proxy.server.sessions.values() if s.info.application_name == key)


@pytest.mark.parametrize("rows,row_size", [(3200, 64 * 1024), (50, 4 * 1024 * 1024)],
                         ids=["64KiB-rows", "4MiB-rows-streamed"])
def test_backpressure_holds_a_200MB_result_at_the_database(harness, rows, row_size):
    proxy = harness.bare
    key = harness.backend.script(Script("stream", rows=rows, row_size=row_size))
    client = Client(proxy.port)
    try:
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        client.login(key)
        gc.collect()
        baseline = rss()
        client.send(m.Query("SELECT blob FROM big").encode())
        [upstream] = harness.backend.connections_for(key)
        assert upstream.blocked.wait(20), "the fake backend was never held back"

        def paused() -> bool:
            conn = session_for(proxy, key).io
            return conn.upstream.transport is not None and not conn.upstream.transport.is_reading()
        harness.wait_for(lambda: paused() or upstream.stream_done.is_set(),
                         "the proxy to stop reading from the database", 20)
        assert not upstream.stream_done.is_set(), "the proxy took the whole result while the client read nothing"
        buffered = harness.call(lambda: session_for(proxy, key).io.transport.get_write_buffer_size())
        assert buffered <= HIGH_WATER + (4 << 20), f"{buffered} bytes queued for the client"
        grown = rss() - baseline
        assert grown < 50 << 20, f"RSS grew by {grown >> 20} MB while the client did not read"
        total = len(m.RowDescription((m.FieldDescription("blob", 0, 0, 17, -1, -1, 0),)).encode()) \
            + rows * (row_size + 11) + len(m.CommandComplete(f"SELECT {rows}").encode()) + 6
        assert total > 200_000_000
        assert upstream.sent < total // 2, f"the database got {upstream.sent} of {total} bytes out"

        digest = hashlib.md5()
        got = 0
        client.sock.settimeout(READ_TIMEOUT)
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while got < total:
            n = client.sock.recv_into(view)
            assert n, f"connection closed after {got} of {total} bytes"
            digest.update(view[:n])
            got += n
        assert got == total, f"the client got {got - total} bytes more than the database sent"
        assert upstream.stream_done.wait(READ_TIMEOUT)
        assert upstream.sent == total and digest.hexdigest() == upstream.digest, "the result was altered"
        assert client.query("SELECT 1")[1].values == (b"1",)
    finally:
        client.close()
    assert_healthy(harness, proxy)


# ---- defects the fuzzing found: regressions, and the one still open (strict xfail) -------
#
# Each reproduces one finding with the smallest input found, and asserts what the
# acceptance criterion asks for.

PROMPTLY = READ_TIMEOUT  # the proxy answers these on the bytes already received; a safety net only


def fatal_after(client: Client, timeout: float = PROMPTLY) -> m.ErrorResponse:
    client.read_until_eof(timeout)
    got = decode_clean(client.after_login())
    assert got and is_fatal(got[-1]), f"no FATAL: {got!r}"
    return got[-1]


def server_says(proxy: Proxy, harness: Harness, garbage: bytes) -> m.ErrorResponse:
    """Log in, ask a query, get ``garbage`` back from a server that then waits: the FATAL."""
    key = harness.backend.script(Script("garbage", garbage=garbage, close_after=False, linger=10))
    client = Client(proxy.port)
    try:
        client.login(key)
        client.send(m.Query("SELECT 1").encode())
        return fatal_after(client)
    finally:
        client.close()
        harness.wait_for(lambda: session_count(proxy) == 0, "the session to end")


def test_pipelined_client_garbage_is_blamed_on_the_client(harness, proxy):
    """Was: bytes pipelined behind the StartupMessage were framed inside server_data(), so
    their error read 'invalid message from the database server'."""
    client = Client(proxy.port)
    try:
        client.send(startup_bytes(harness.backend.script(Script())) + b"\x00\x00\x00\x00\x08abcd")
        client.read_until_ready()
        error = fatal_after(client)
    finally:
        client.close()
    assert error.message.startswith("invalid frontend message"), error.message
    assert_healthy(harness, proxy)


@pytest.mark.parametrize("header", [b"\x00" + u32.pack(1 << 20), b"S" + u32.pack(1 << 20), b"p" + u32.pack(100)],
                         ids=["unknown-type", "sync-1MB", "password-after-login"])
def test_client_header_postgres_refuses_is_refused_at_once(harness, proxy, header):
    """Was: the type and length were judged only once the whole declared body had arrived."""
    client = Client(proxy.port)
    try:
        client.login(harness.backend.script(Script()))
        client.send(header)
        error = fatal_after(client)
    finally:
        client.close()
    assert error.sqlstate == "08P01" and error.message.startswith("invalid frontend message"), error
    assert_healthy(harness, proxy)


@pytest.mark.parametrize("header", [b"T" + u32.pack(0x7FFFFFFF), b"E" + u32.pack(PG_MAX_MESSAGE + 1),
                                    b"D" + u32.pack(0x7FFFFFFF)], ids=["T-2GB", "E-over-1GB", "D-2GB"])
def test_oversized_server_message_is_refused_promptly(harness, proxy, header):
    """Was: no size limit once ready; a 2 GB RowDescription was waited for (and buffered)."""
    error = server_says(proxy, harness, header + b"\0\1")
    assert error.sqlstate == "08P01" and "database server" in error.message, error
    assert_healthy(harness, proxy)


def test_malformed_data_row_is_relayed_unchecked_by_design(harness):
    # DataRow is the hot message: the session frames it but leaves its columns to the
    # addons that parse rows (masking does, and fails closed). Without one, a malformed
    # row reaches the client, whose decoder refuses it — as it would from the server.
    proxy = harness.bare
    garbage = b"D\x00\x00\x00\x0a\x00\x01\x00\x00\x00\x09"
    key = harness.backend.script(Script("garbage", garbage=garbage, close_after=False, linger=10))
    client = Client(proxy.port)
    try:
        client.login(key)
        client.send(m.Query("SELECT 1").encode())
        deadline = time.monotonic() + READ_TIMEOUT
        while len(client.after_login()) < len(garbage) and client._recv(deadline):
            pass
        assert client.after_login()[:len(garbage)] == garbage
    finally:
        client.close()


@pytest.mark.parametrize("garbage", [m.DataRow((b"abc",)).encode()[:-2], b""], ids=["mid-message", "idle"])
def test_server_hanging_up_sends_fatal(harness, proxy, garbage):
    """Was: Session.server_closed() closed the client without a word once the session was ready."""
    key = harness.backend.script(Script("garbage", garbage=garbage))
    client = Client(proxy.port)
    try:
        client.login(key)
        client.send(m.Query("SELECT 1").encode())
        error = fatal_after(client, READ_TIMEOUT)
    finally:
        client.close()
    assert error.sqlstate == "08006" and "database server" in error.message, error
    assert_healthy(harness, proxy)


_MALFORMED_SERVER_MESSAGES = {
    "ParseComplete-with-body": b"1\x00\x00\x00\x08abcd",
    "CommandComplete-without-NUL": b"C\x00\x00\x00\x06ab",
    "RowDescription-empty": b"T\x00\x00\x00\x04",
    "ErrorResponse-unterminated": b"E\x00\x00\x00\x08SERR",
    "NoticeResponse-unterminated": b"N\x00\x00\x00\x08SERR",
    "NotificationResponse-short": b"A\x00\x00\x00\x06ab",
    "ParameterDescription-count-lies": b"t\x00\x00\x00\x08\x00\x05\x00\x00",
    "CopyInResponse-bad-format": b"G\x00\x00\x00\x05\x07",
    "FunctionCallResponse-short": b"V\x00\x00\x00\x06ab",
    "CommandComplete-two-NULs": b"C\x00\x00\x00\x08a\x00b\x00",
    "RowDescription-count-lies": b"T\x00\x00\x00\x06\x00\x05",
}


@pytest.mark.parametrize("name", list(_MALFORMED_SERVER_MESSAGES))
def test_malformed_server_message_is_not_relayed(harness, name):
    proxy = harness.bare
    error = server_says(proxy, harness, _MALFORMED_SERVER_MESSAGES[name])
    assert error.sqlstate == "08P01" and "database server" in error.message, error
    assert_healthy(harness, proxy)


def test_bind_with_40000_parameters_is_relayed(harness, proxy):
    """Was: Bind's counts were read as signed int16, refusing 32768..65535 parameters."""
    client = Client(proxy.port)
    try:
        client.login(harness.backend.script(Script()))
        client.send(m.Parse("s", "INSERT ...", ()).encode()
                    + m.Bind("", "s", (), (None,) * 40000, ()).encode() + m.Sync().encode())
        got = client.read_until_ready()
    finally:
        client.close()
    assert [type(x) for x in got] == [m.ParseComplete, m.BindComplete, m.ReadyForQuery], got
    assert_healthy(harness, proxy)


@pytest.mark.parametrize("request_", [SSL_REQUEST, GSSENC_REQUEST], ids=["SSLRequest", "GSSENCRequest"])
def test_encryption_request_followed_by_data_gets_a_fatal(harness, proxy, request_):
    """Was: closed silently; PostgreSQL answers FATAL 08P01 (CVE-2021-23222's injection)."""
    client = Client(proxy.port)
    try:
        client.send(request_ + startup_bytes())
        got = decode_clean(client.read_until_eof(PROMPTLY))
    finally:
        client.close()
    assert len(got) == 1 and is_fatal(got[0]) and got[0].sqlstate == "08P01", got
    assert_healthy(harness, proxy)


def test_duplicate_backend_key_data_is_refused_without_leaking_cancel_keys(harness, proxy):
    """Was: a second BackendKeyData issued a second client key and the first stayed registered."""
    garbage = b"".join(x.encode() for x in (m.AuthenticationOk(), m.BackendKeyData(1, b"abcd"),
                                            m.BackendKeyData(2, b"efgh"), m.ReadyForQuery(b"I")))
    client = Client(proxy.port)
    try:
        client.send(startup_bytes(harness.backend.script(Script("login-garbage", garbage=garbage))))
        got = decode_clean(client.read_until_eof())
    finally:
        client.close()
    assert is_fatal(got[-1]) and [type(x) for x in got].count(m.BackendKeyData) <= 1, got
    assert_healthy(harness, proxy)  # includes: no cancel key outlives its session
