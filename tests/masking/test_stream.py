"""Windows give what whole messages give: a DataRow (or a text value) split at any point,
masked window by window with bytes kept back, comes out exactly as masked whole."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.masking import values as v
from appliance.masking.addon import MaskingAddon
from appliance.masking.errors import MaskingError
from appliance.model.decision import ColumnMask, MaskMethod
from appliance.pan.detector import find_pans
from appliance.pan.scanner import ESCAPE, HEX, JSON, TEXT, TextScanner, mask_text
from appliance.pgwire import messages as m
from appliance.proxy.hooks import Result, SessionInfo, Statement, StatementKind
from tests.masking.policy import DictCatalog, decision
from tests.masking.wire import array_bin, numeric_bin, record_bin

PAN = b"4111111111111111"
AMEX = b"378282246310005"
PIECES = [PAN, AMEX, b"4111 1111 1111 1111", b"3782-822463-10005", b"0.4111111111111111", b"1712345678901",
          b"41111111-1111-1111-1111-111111111111", b"2024", b" ", b"-", b".", b"e", b'"', b"\\", b"x", b"\n",
          b"5500000000000004", b"12", b"4111111111111111.5", b"\\x", PAN.hex().encode(), b"2d", b"Z"]


def text_values(max_pieces: int = 40):
    return st.lists(st.sampled_from(PIECES), max_size=max_pieces).map(b"".join)


def stream(addon: MaskingAddon, session: SessionInfo, result: Result | None, tag: bytes, body: bytes,
           cuts: list[int]) -> bytes:
    """Feed a message body the way the session does: windows of new bytes after what was kept."""
    out, carry, pos = bytearray(), b"", 0
    bounds = [*sorted({c for c in cuts if 0 < c < len(body)}), len(body)]
    for end in bounds:
        window = carry + body[pos:end]
        pos = end
        offset = pos - len(window)
        edit = addon.stream_chunk(session, result, tag, memoryview(window), offset, len(body))
        data = window if edit is None or edit.data is None else edit.data
        keep = edit.keep if edit is not None else 0
        assert len(data) == len(window) and keep <= 4096
        assert keep == 0 or end < len(body)
        out += data[:len(data) - keep]
        carry = bytes(data[len(data) - keep:])
    return bytes(out)


def info() -> SessionInfo:
    return SessionInfo(client=None, destination=None)  # type: ignore[arg-type]


def whole_and_streamed(fields: tuple[m.FieldDescription, ...], values: tuple[bytes | None, ...],
                       cuts_list: list[list[int]]) -> None:
    rd = m.RowDescription(fields)
    message = m.DataRow(values).encode()
    addon = MaskingAddon()
    s = info()
    r = Result(None, rd)
    addon.row_description(s, r)
    try:
        out = addon.data_row(s, r, memoryview(message))
        whole: bytes | MaskingError = (out if out is not None else message)[5:]
    except MaskingError as exc:
        whole = exc
    for cuts in cuts_list:
        s2 = info()
        r2 = Result(None, rd)
        addon.row_description(s2, r2)
        try:
            got: bytes | MaskingError = stream(addon, s2, r2, b"D", message[5:], cuts)
        except MaskingError as exc:
            got = exc
        if isinstance(whole, MaskingError):
            assert isinstance(got, MaskingError), cuts
        else:
            assert got == whole, cuts
            assert s2.masked_values == s.masked_values and r2.masked == r.masked


# ---- every split point -------------------------------------------------------------------------

FIELDS = (
    m.FieldDescription("t", 0, 0, 25, -1, -1, 0),
    m.FieldDescription("j", 0, 0, 3802, -1, -1, 1),
    m.FieldDescription("a", 0, 0, 1009, -1, -1, 1),
    m.FieldDescription("n", 0, 0, 20, -1, -1, 1),
    m.FieldDescription("b", 0, 0, 17, -1, -1, 0),
    m.FieldDescription("r", 0, 0, 2249, -1, -1, 1),
    m.FieldDescription("x", 0, 0, 1700, -1, -1, 1),
)
VALUES = (
    b"x " + PAN + b" 4111 1111 1111 1111 2024 " + AMEX + b".",
    b'\x01{"p": ' + PAN + b', "s": "' + AMEX + b'", "n": -' + PAN + b"}",
    array_bin(25, [PAN, None, b"a 3782-822463-10005"]),
    struct.pack("!q", 77),
    b"\\x" + b"4111-1111-1111-1111".hex().encode(),
    record_bin([(25, PAN), (23, struct.pack("!i", 4)), (20, struct.pack("!q", 9))]),
    numeric_bin("4111111111111111.25"),
)


def test_a_row_split_at_every_point_is_masked_as_whole():
    length = len(m.DataRow(VALUES).encode()) - 5
    whole_and_streamed(FIELDS, VALUES, [[cut] for cut in range(1, length)])


def test_a_row_split_at_every_pair_of_points_is_masked_as_whole():
    values = (b"ab " + PAN + b" cd", b'\x01{"p": ' + PAN + b"}")
    length = len(m.DataRow(values).encode()) - 5
    whole_and_streamed(FIELDS[:2], values, [[a, b] for a in range(1, length) for b in range(a + 1, length)])


def test_a_row_fed_byte_by_byte_is_masked_as_whole():
    length = len(m.DataRow(VALUES).encode()) - 5
    whole_and_streamed(FIELDS, VALUES, [list(range(1, length))])


def test_a_card_number_in_a_streamed_bigint_fails_closed_at_every_split():
    values = (b"x", struct.pack("!q", int(PAN)))
    length = len(m.DataRow(values).encode()) - 5
    whole_and_streamed((FIELDS[0], FIELDS[3]), values, [[c] for c in range(1, length)])


def test_large_binary_arrays_and_records_are_parsed_incrementally():
    big_array = array_bin(25, [b"e%d %s" % (i, PAN) for i in range(120)] + [None])
    big_record = record_bin([(25, b"w" * 700), (1009, big_array), (20, struct.pack("!q", 5)),
                             (3802, b'\x01{"a": ' + PAN + b"}")])
    assert len(big_array) > v.SMALL_VALUE and len(big_record) > v.SMALL_VALUE
    fields = (FIELDS[2], FIELDS[5])
    values = (big_array, big_record)
    length = len(m.DataRow(values).encode()) - 5
    whole_and_streamed(fields, values, [[c] for c in range(1, length, 37)] + [list(range(50, length, 50))])
    bad = array_bin(20, [struct.pack("!q", 1)] * 200 + [struct.pack("!q", int(PAN))])
    whole_and_streamed((m.FieldDescription("a", 0, 0, 1016, -1, -1, 1),), (bad,), [[c] for c in range(1, 1700, 13)])


def test_large_unknown_binary_composites_are_parsed_incrementally():
    composite = record_bin([(25, b"v" * 1500), (20, struct.pack("!q", int(PAN)))])
    fields = (m.FieldDescription("c", 0, 0, 16390, -1, -1, 1),)
    whole_and_streamed(fields, (composite,), [[c] for c in range(1, len(composite), 97)])
    fine = record_bin([(25, b"v" * 1500 + PAN), (20, struct.pack("!q", 3))])
    whole_and_streamed(fields, (fine,), [[c] for c in range(1, len(fine), 97)])


# ---- hypothesis ---------------------------------------------------------------------------------

def column(draw) -> tuple[m.FieldDescription, bytes | None]:  # type: ignore[no-untyped-def]
    kind = draw(st.sampled_from(["text", "textbin", "json", "jsonb", "int8", "int8pan", "numeric", "bytea",
                                 "byteabin", "array", "int8text", "record", "null", "xml", "skip", "unknown"]))
    text = draw(text_values())
    if kind == "text":
        return m.FieldDescription(kind, 0, 0, 25, -1, -1, 0), text
    if kind == "textbin":
        return m.FieldDescription(kind, 0, 0, 1043, -1, -1, 1), text
    if kind in ("json", "jsonb"):
        body = b'{"a": ' + draw(st.sampled_from([PAN, b"1", b"-" + PAN, AMEX])) + b', "s": "' \
            + text.replace(b"\\", b"").replace(b'"', b"") + b'"}'
        if kind == "jsonb":
            return m.FieldDescription(kind, 0, 0, 3802, -1, -1, 1), b"\x01" + body
        return m.FieldDescription(kind, 0, 0, 114, -1, -1, 0), body
    if kind == "int8":
        return m.FieldDescription(kind, 0, 0, 20, -1, -1, 1), struct.pack("!q", draw(st.integers(-2**63, 2**63 - 1)))
    if kind == "int8pan":
        return m.FieldDescription(kind, 0, 0, 20, -1, -1, 1), struct.pack("!q", int(PAN))
    if kind == "numeric":
        return m.FieldDescription(kind, 0, 0, 1700, -1, -1, 1), numeric_bin(draw(st.sampled_from(
            ["1", "4111111111111111.5", "12345678901234567890123", "-0.5"])))
    if kind == "bytea":
        raw = text if draw(st.booleans()) else bytes(draw(st.binary(max_size=30))) + text
        return m.FieldDescription(kind, 0, 0, 17, -1, -1, 0), b"\\x" + raw.hex().encode()
    if kind == "byteabin":
        return m.FieldDescription(kind, 0, 0, 17, -1, -1, 1), draw(st.binary(max_size=20)) + text
    if kind == "array":
        items = draw(st.lists(st.one_of(st.none(), text_values(8)), max_size=5))
        return m.FieldDescription(kind, 0, 0, 1009, -1, -1, 1), array_bin(25, items)
    if kind == "int8text":
        return m.FieldDescription(kind, 0, 0, 20, -1, -1, 0), str(draw(st.integers(-10**18, 10**18))).encode()
    if kind == "record":
        return m.FieldDescription(kind, 0, 0, 2249, -1, -1, 1), record_bin([(25, text), (23, b"\0\0\0\1")])
    if kind == "null":
        return m.FieldDescription(kind, 0, 0, 25, -1, -1, 0), None
    if kind == "xml":
        return m.FieldDescription(kind, 0, 0, 142, -1, -1, 0), b"<a>" + text.replace(b"<", b"") + b"</a>"
    if kind == "skip":
        return m.FieldDescription(kind, 0, 0, 23, -1, -1, 0), b"12345"
    return m.FieldDescription(kind, 0, 0, 16400, -1, -1, 1), draw(st.binary(max_size=12)) + text


@st.composite
def rows(draw):  # type: ignore[no-untyped-def]
    columns = [column(draw) for _ in range(draw(st.integers(1, 5)))]
    fields = tuple(c[0] for c in columns)
    values = tuple(c[1] for c in columns)
    length = len(m.DataRow(values).encode()) - 5
    cuts = draw(st.lists(st.integers(1, max(1, length - 1)), max_size=8))
    return fields, values, cuts


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows())
def test_random_rows_in_random_windows_are_masked_as_whole(row):
    fields, values, cuts = row
    whole_and_streamed(fields, values, [cuts, list(range(1, 4000, 3))])


@settings(max_examples=400, deadline=None)
@given(text_values(60), st.sampled_from([TEXT, JSON, HEX, ESCAPE]), st.sampled_from(["pci", "last4"]),
       st.lists(st.integers(1, 800), max_size=10))
def test_text_scanner_windows_match_one_shot(text, mode, fmt, cuts):
    if mode == HEX:
        text = b"\\x" + text.hex().encode()
    whole = mask_text(text, fmt, mode)[0] or text
    scanner = TextScanner(fmt, mode)
    out, carry_orig, kept, pos = bytearray(), b"", b"", 0
    bounds = [*sorted({c for c in cuts if 0 < c < len(text)}), len(text)]
    for end in bounds:
        new = text[pos:end]
        pos = end
        original = carry_orig + new
        window = bytearray(kept + new)
        edits, cut = scanner.feed(original, end == len(text), True)
        for off, rep in edits:
            window[off:off + len(rep)] = rep
        out += window[:cut]
        kept, carry_orig = bytes(window[cut:]), original[cut:]
        assert len(kept) <= 200
    assert not kept and bytes(out) == whole
    if mode == TEXT:
        assert find_pans(whole) == []


def test_long_digit_runs_are_released_not_held():
    # A run of digits longer than any card number can't hold one: released as it comes.
    scanner = TextScanner("pci", TEXT)
    for _ in range(100):
        _edits, cut = scanner.feed(b"1" * 1000, False, True)
        assert cut >= 1000 - 64


@pytest.mark.parametrize("mode", [TEXT, JSON, HEX])
def test_a_value_split_inside_a_card_number_is_kept_back_then_masked(mode):
    text = b"abc " + PAN + b" def" if mode != HEX else b"\\x" + (b"abc " + PAN + b" def").hex().encode()
    whole = mask_text(text, "pci", mode)[0]
    for cut in range(1, len(text)):
        scanner = TextScanner("pci", mode)
        edits, done = scanner.feed(text[:cut], False, True)
        first = bytearray(text[:cut])
        for off, rep in edits:
            first[off:off + len(rep)] = rep
        rest = text[done:]
        edits2, done2 = scanner.feed(rest, True, True)
        second = bytearray(bytes(first[done:]) + text[cut:])
        for off, rep in edits2:
            second[off:off + len(rep)] = rep
        assert bytes(first[:done]) + bytes(second) == whole and done2 == len(rest)


@pytest.mark.parametrize("type_oid,fmt,value", [
    (25, 0, b"t" * 3000), (3802, 1, b'\x01{"a": "' + b"j" * 3000 + b'"}'), (114, 0, b'["' + b"j" * 3000 + b'"]'),
    (17, 0, b"\\x" + b"ab" * 1500), (17, 0, b"e\\001" * 700),
])
def test_a_large_fully_masked_column_streams_what_the_whole_row_gets(type_oid, fmt, value):
    rd = m.RowDescription((m.FieldDescription("c", 99, 1, type_oid, -1, -1, fmt),))
    message = m.DataRow((value,)).encode()
    dec = decision(ColumnMask("public.t.c", MaskMethod.FULL))
    statement = Statement(StatementKind.QUERY, "SELECT c FROM t", decision=dec)
    addon = MaskingAddon(catalog=DictCatalog({(99, 1): "public.t.c"}))
    results = []
    for _ in range(2):
        s = info()
        r = Result(statement, rd)
        addon.row_description(s, r)
        results.append((s, r))
    whole = addon.data_row(results[0][0], results[0][1], memoryview(message))
    streamed = stream(addon, results[1][0], results[1][1], b"D", message[5:], list(range(500, len(message), 500)))
    assert whole is not None and streamed == whole[5:]


def _json_reference(data: bytes) -> tuple[bool, bool]:
    in_str = esc = False
    for b in data:
        if esc:
            esc = False
        elif in_str and b == 0x5C:
            esc = True
        elif b == 0x22:
            in_str = not in_str
    return in_str, esc


@settings(max_examples=500)
@given(st.lists(st.sampled_from([b'"', b"\\", b"a", b"1", b"{", b":"]), max_size=40).map(b"".join),
       st.integers(0, 40))
def test_json_string_state_carries_across_any_split(data, cut):
    from appliance.pan.scanner import json_advance

    cut = min(cut, len(data))
    state = json_advance(data, 0, cut, False, False)
    assert state == _json_reference(data[:cut])
    assert json_advance(data, cut, len(data), *state) == _json_reference(data)


def test_a_large_function_result_is_masked_in_windows():
    addon = MaskingAddon()
    value = b"lo " * 3000 + PAN + b" end"
    message = m.FunctionCallResponse(value).encode()
    whole = addon.function_result(info(), memoryview(message))
    for step in (1, 5, 100, 1000):
        streamed = stream(addon, info(), None, b"V", message[5:], list(range(step, len(message), step)))
        assert streamed == whole[5:], step


def test_a_large_bigint_array_in_text_fails_closed_as_whole():
    value = b"{" + b",".join(b"%d" % i for i in range(600)) + b"," + PAN + b"}"
    fields = (m.FieldDescription("a", 0, 0, 1016, -1, -1, 0),)
    assert len(value) > v.SMALL_VALUE
    whole_and_streamed(fields, (value,), [[c] for c in range(1, len(value), 61)])
    fine = b"{" + b",".join(b"%d" % i for i in range(600)) + b"}"
    whole_and_streamed(fields, (fine,), [[c] for c in range(1, len(fine), 61)])
