"""Hypothesis strategies for every pgwire message, shared by the pgwire tests."""

from __future__ import annotations

import itertools

from hypothesis import strategies as st

from appliance import pgwire as pg

INT16 = st.integers(-(2**15), 2**15 - 1)
INT32 = st.integers(-(2**31), 2**31 - 1)
UINT32 = st.integers(0, 2**32 - 1)
FORMAT = st.sampled_from([0, 1])
FORMATS = st.lists(FORMAT, max_size=5).map(tuple)
NULLABLE = st.none() | st.binary(max_size=24)
SMALL_BYTES = st.binary(max_size=48)

# Protocol strings: any text without NUL or lone surrogates, plus arbitrary non-UTF-8
# bytes in their surrogateescape form (client_encoding need not be UTF-8).
_utf8_text = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=24
)
_raw_text = st.binary(max_size=24).map(
    lambda b: b.replace(b"\x00", b"").decode("utf-8", "surrogateescape")
)
TEXT = _utf8_text | _raw_text
NONEMPTY_TEXT = TEXT.filter(bool)

# An error field code is one non-NUL byte.
FIELD_CODE = st.integers(1, 255).map(lambda b: bytes([b]).decode("utf-8", "surrogateescape"))
FIELDS = st.lists(st.tuples(FIELD_CODE, TEXT), max_size=6).map(tuple)
CANCEL_KEY = st.binary(min_size=pg.MIN_CANCEL_KEY_LENGTH, max_size=pg.MAX_CANCEL_KEY_LENGTH)
KIND = st.sampled_from([b"S", b"P"])


@st.composite
def _binds(draw: st.DrawFn) -> pg.Bind:
    params = tuple(draw(st.lists(NULLABLE, max_size=6)))
    # Format codes: none (all text), one for all, or one per parameter.
    nformats = draw(st.sampled_from(sorted({0, 1, len(params)})))
    formats = tuple(draw(FORMAT) for _ in range(nformats))
    return pg.Bind(draw(TEXT), draw(TEXT), formats, params, draw(FORMATS))


@st.composite
def _function_calls(draw: st.DrawFn) -> pg.FunctionCall:
    args = tuple(draw(st.lists(NULLABLE, max_size=6)))
    nformats = draw(st.sampled_from(sorted({0, 1, len(args)})))
    formats = tuple(draw(FORMAT) for _ in range(nformats))
    return pg.FunctionCall(draw(UINT32), formats, args, draw(FORMAT))


_field_descriptions = st.builds(
    pg.FieldDescription, TEXT, UINT32, INT16, UINT32, INT16, INT32, FORMAT
)

STARTUP = {
    pg.StartupMessage: st.builds(
        pg.StartupMessage,
        st.integers(0, 0xFFFF).map(lambda minor: (3 << 16) | minor),
        st.dictionaries(NONEMPTY_TEXT, TEXT, max_size=5),
    ),
    pg.SSLRequest: st.just(pg.SSLRequest()),
    pg.GSSENCRequest: st.just(pg.GSSENCRequest()),
    pg.CancelRequest: st.builds(pg.CancelRequest, INT32, CANCEL_KEY),
}

# Typed frontend messages that decode to themselves.
FRONTEND = {
    pg.Bind: _binds(),
    pg.Close: st.builds(pg.Close, KIND, TEXT),
    pg.CopyData: st.builds(pg.CopyData, SMALL_BYTES),
    pg.CopyDone: st.just(pg.CopyDone()),
    pg.CopyFail: st.builds(pg.CopyFail, TEXT),
    pg.Describe: st.builds(pg.Describe, KIND, TEXT),
    pg.Execute: st.builds(pg.Execute, TEXT, INT32),
    pg.Flush: st.just(pg.Flush()),
    pg.FunctionCall: _function_calls(),
    pg.Parse: st.builds(pg.Parse, TEXT, TEXT, st.lists(UINT32, max_size=6).map(tuple)),
    pg.PasswordMessage: st.builds(pg.PasswordMessage, SMALL_BYTES),
    pg.Query: st.builds(pg.Query, TEXT),
    pg.Sync: st.just(pg.Sync()),
    pg.Terminate: st.just(pg.Terminate()),
}

# 'p' messages the decoder yields as PasswordMessage, to be re-read with from_payload.
AUTH_PAYLOADS = {
    pg.SASLInitialResponse: st.builds(pg.SASLInitialResponse, TEXT, NULLABLE),
    pg.SASLResponse: st.builds(pg.SASLResponse, SMALL_BYTES),
    pg.GSSResponse: st.builds(pg.GSSResponse, SMALL_BYTES),
}

BACKEND = {
    pg.AuthenticationOk: st.just(pg.AuthenticationOk()),
    pg.AuthenticationKerberosV5: st.just(pg.AuthenticationKerberosV5()),
    pg.AuthenticationCleartextPassword: st.just(pg.AuthenticationCleartextPassword()),
    pg.AuthenticationMD5Password: st.builds(
        pg.AuthenticationMD5Password, st.binary(min_size=4, max_size=4)
    ),
    pg.AuthenticationGSS: st.just(pg.AuthenticationGSS()),
    pg.AuthenticationGSSContinue: st.builds(pg.AuthenticationGSSContinue, SMALL_BYTES),
    pg.AuthenticationSSPI: st.just(pg.AuthenticationSSPI()),
    pg.AuthenticationSASL: st.builds(
        pg.AuthenticationSASL, st.lists(NONEMPTY_TEXT, max_size=3).map(tuple)
    ),
    pg.AuthenticationSASLContinue: st.builds(pg.AuthenticationSASLContinue, SMALL_BYTES),
    pg.AuthenticationSASLFinal: st.builds(pg.AuthenticationSASLFinal, SMALL_BYTES),
    pg.BackendKeyData: st.builds(pg.BackendKeyData, INT32, CANCEL_KEY),
    pg.BindComplete: st.just(pg.BindComplete()),
    pg.CloseComplete: st.just(pg.CloseComplete()),
    pg.CommandComplete: st.builds(pg.CommandComplete, TEXT),
    pg.CopyData: st.builds(pg.CopyData, SMALL_BYTES),
    pg.CopyDone: st.just(pg.CopyDone()),
    pg.CopyInResponse: st.builds(pg.CopyInResponse, FORMAT, FORMATS),
    pg.CopyOutResponse: st.builds(pg.CopyOutResponse, FORMAT, FORMATS),
    pg.CopyBothResponse: st.builds(pg.CopyBothResponse, FORMAT, FORMATS),
    pg.DataRow: st.builds(pg.DataRow, st.lists(NULLABLE, max_size=8).map(tuple)),
    pg.EmptyQueryResponse: st.just(pg.EmptyQueryResponse()),
    pg.ErrorResponse: st.builds(pg.ErrorResponse, FIELDS),
    pg.NoticeResponse: st.builds(pg.NoticeResponse, FIELDS),
    pg.FunctionCallResponse: st.builds(pg.FunctionCallResponse, NULLABLE),
    pg.NegotiateProtocolVersion: st.builds(
        pg.NegotiateProtocolVersion, INT32, st.lists(TEXT, max_size=4).map(tuple)
    ),
    pg.NoData: st.just(pg.NoData()),
    pg.NotificationResponse: st.builds(pg.NotificationResponse, INT32, TEXT, TEXT),
    pg.ParameterDescription: st.builds(
        pg.ParameterDescription, st.lists(UINT32, max_size=6).map(tuple)
    ),
    pg.ParameterStatus: st.builds(pg.ParameterStatus, TEXT, TEXT),
    pg.ParseComplete: st.just(pg.ParseComplete()),
    pg.PortalSuspended: st.just(pg.PortalSuspended()),
    pg.ReadyForQuery: st.builds(pg.ReadyForQuery, st.sampled_from([b"I", b"T", b"E"])),
    pg.RowDescription: st.builds(
        pg.RowDescription, st.lists(_field_descriptions, max_size=4).map(tuple)
    ),
}

ONE_BYTE_ANSWERS = {
    pg.SSLResponse: st.builds(pg.SSLResponse, st.booleans()),
    pg.GSSENCResponse: st.builds(pg.GSSENCResponse, st.booleans()),
}

ALL = {**STARTUP, **FRONTEND, **AUTH_PAYLOADS, **BACKEND, **ONE_BYTE_ANSWERS}

frontend_typed = st.one_of(*FRONTEND.values())
backend_typed = st.one_of(*BACKEND.values())


@st.composite
def frontend_streams(draw: st.DrawFn) -> list[pg.Message]:
    """A plausible client byte stream: negotiation requests, StartupMessage, then typed."""
    prefix = draw(st.lists(st.sampled_from([pg.SSLRequest(), pg.GSSENCRequest()]), max_size=2))
    startup = draw(STARTUP[pg.StartupMessage])
    return [*prefix, startup, *draw(st.lists(frontend_typed, max_size=12))]


def encode_all(messages: list[pg.Message]) -> bytes:
    return b"".join(message.encode() for message in messages)


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` split at random points (including empty chunks)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]
