"""The compiled DataRow scanner (appliance/masking/_fastrows.c) against the Python path.

``MaskingAddon.data_rows`` with the extension and without it (one ``data_row`` per row)
must give the same bytes, the same counts and the same errors for any run of rows; and the
C entry point must survive any buffer at all (it bounds-checks every read).
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from appliance.config import Endpoint

# Not skipped when missing: `make test` builds the extensions, and a build that
# silently left them out must fail here.
from appliance.masking import _fastrows as fastrows
from appliance.masking import addon as masking_addon
from appliance.masking import copy as copy_module
from appliance.masking.addon import MaskingAddon
from appliance.masking.copy import CopyMasker
from appliance.masking.errors import MaskingError
from appliance.pan.detector import PREFIX_LENGTHS
from appliance.pan.scanner import TEXT, MaskLeak, PanFound, mask_text
from appliance.pgwire import messages as m
from appliance.proxy.hooks import Result, SessionInfo, row_spans

VISA = b"4111111111111111"
AMEX = b"378282246310005"
# text, varchar, int4 (text format), bytea, json: plans with only text-ish columns go to C
# entirely; a json or bytea column makes the plan one the scanner only pre-filters.
TEXTISH = (25, 1043, 23)
OTHER = (17, 114, 20)


def luhn_complete(body: bytes) -> bytes:
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = ch - 48
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return body + bytes([48 + (10 - total % 10) % 10])


digits = st.text("0123456789", min_size=1, max_size=22).map(str.encode)
pans = st.builds(lambda prefix, n, body: luhn_complete((prefix + body)[:n - 1].ljust(n - 1, b"0")),
                 st.sampled_from([b"4", b"51", b"37", b"6011", b"35", b"62", b"2221", b"9"]),
                 st.integers(12, 20), digits)
separated = st.builds(lambda p, sep: sep.join(p[i:i + 4] for i in range(0, len(p), 4)), pans,
                      st.sampled_from([b" ", b"-", b"  ", b".", b"d"]))
texts = st.one_of(st.text(max_size=30).map(lambda t: t.encode("utf-8", "surrogatepass")),
                  st.sampled_from([b"", b"visa", "é€😀".encode(), b"\\x34313131", b"12345678901234567890123"]))
embedded = st.builds(lambda a, p, b: a + p + b, texts, st.one_of(pans, separated), texts)
values = st.one_of(st.none(), pans, digits, separated, embedded, texts, st.binary(max_size=24),
                   st.just(VISA), st.just(AMEX))


def data_row(vals: list[bytes | None]) -> bytes:
    return m.DataRow(tuple(vals)).encode()


def lie(row: bytes, how: int, at: int) -> bytes:
    """A malformed variant of a well-formed DataRow."""
    body = bytearray(row[5:])
    if how == 0:  # another column count
        body[0:2] = struct.pack("!h", struct.unpack("!h", body[0:2])[0] + (1 if at % 2 else -1))
    elif how == 1 and len(body) > 2:  # cut short
        del body[2 + at % (len(body) - 2):]
    elif how == 2 and len(body) >= 6:  # a column length that lies
        body[2:6] = struct.pack("!i", [-2, -7, 1 << 30, 13, 19, 200][at % 6])
    elif how == 3:  # trailing bytes
        body += b"4111111111111111"
    return b"D" + struct.pack("!i", len(body) + 4) + bytes(body)


@st.composite
def runs(draw):  # type: ignore[no-untyped-def]
    ncols = draw(st.integers(0, 6))
    types = draw(st.lists(st.sampled_from(TEXTISH if draw(st.booleans()) else TEXTISH + OTHER),
                          min_size=ncols, max_size=ncols))
    rows = []
    for _ in range(draw(st.integers(1, 8))):
        row = data_row([draw(values) for _ in range(ncols)])
        if draw(st.integers(0, 9)) == 0:
            row = lie(row, draw(st.integers(0, 3)), draw(st.integers(0, 100)))
        rows.append(row)
    return types, b"".join(rows)


def judge(compiled: bool, types: list[int], run: bytes, fmt: str, formats: tuple[int, ...] = ()) -> tuple:
    saved = masking_addon.fastrows
    masking_addon.fastrows = fastrows if compiled else None
    try:
        return _judge(types, run, fmt, formats)
    finally:
        masking_addon.fastrows = saved


def _judge(types: list[int], run: bytes, fmt: str, formats: tuple[int, ...]) -> tuple:
    addon = MaskingAddon(fmt)
    info = SessionInfo(Endpoint.parse("127.0.0.1:1"), Endpoint.parse("127.0.0.1:2"))
    fields = tuple(m.FieldDescription(f"c{i}", 0, 0, t, -1, -1, 0) for i, t in enumerate(types))
    result = Result(None, m.RowDescription(fields), result_formats=formats)
    addon.row_description(info, result)
    try:
        out = addon.data_rows(info, result, memoryview(run))
    except MaskingError as exc:
        return ("error", exc.sqlstate, exc.message)
    return (run if out is None else bytes(out), result.masked, info.masked_values)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(runs(), st.sampled_from(["pci", "last4"]))
@example(([25, 25], data_row([VISA, b"x"]) + data_row([b"4111 1111 1111 1111", AMEX])), "pci")
@example(([25], data_row([luhn_complete(b"411111111111111111")])), "pci")  # 19 digits
@example(([25], data_row([b"411111111111111"]) + data_row([b"41111111111111111111"])), "pci")
@example(([25, 23], lie(data_row([VISA, b"1"]), 2, 0)), "pci")
@example(([25], lie(data_row([VISA]), 1, 5)), "last4")
def test_the_compiled_path_masks_exactly_as_python(case, fmt):
    types, run = case
    python = judge(False, types, run, fmt)
    compiled = judge(True, types, run, fmt)
    assert compiled == python


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(runs())
def test_undescribed_and_binary_results_agree_too(case):
    types, run = case
    # Binary result formats make every plan one the scanner only pre-filters.
    assert judge(True, types, run, "pci", (1,)) == judge(False, types, run, "pci", (1,))


def test_a_huge_column_count_agrees():
    types = [25] * 1600
    vals: list[bytes | None] = [VISA if i % 7 == 0 else None if i % 5 == 0 else b"x" * (i % 20) for i in range(1600)]
    run = data_row(vals) * 3
    compiled = judge(True, types, run, "pci")
    assert compiled == judge(False, types, run, "pci")
    assert compiled[1] == 3 * len(range(0, 1600, 7))


def test_rows_it_cannot_judge_are_handed_back_untouched():
    run = data_row([VISA]) + data_row([b"card " + VISA]) + data_row([b"1234"]) + data_row([VISA, b"x"])
    out, count, fallback = fastrows.mask_rows(run, 1, b"\x01", 6, PREFIX_LENGTHS)
    spans = list(row_spans(run))
    # the one it can mask, masked; the embedded number and the wrong column count: handed back
    assert count == 1 and fallback == [spans[1], spans[3]]
    assert out[:spans[0][1]] == data_row([b"411111******1111"]) and out[spans[0][1]:] == run[spans[0][1]:]


def test_without_columns_to_search_it_only_prefilters():
    run = data_row([b"abc"]) + data_row([VISA])
    assert fastrows.mask_rows(run, 1, None, 6, PREFIX_LENGTHS) == (None, 0, [list(row_spans(run))[1]])


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=200), st.integers(-2, 8), st.sampled_from([None, b"", b"\x01", b"\x01\x00\x01"]))
def test_any_buffer_is_read_within_bounds(buf, ncols, wanted):
    """Malformed runs raise ValueError; nothing else, and nothing read past the buffer."""
    if wanted is not None and ncols >= 0:
        wanted = (wanted * 8)[:ncols]
    try:
        out, _count, fallback = fastrows.mask_rows(buf, ncols, wanted, 6, PREFIX_LENGTHS)
    except ValueError:
        return
    assert out is None or len(out) == len(buf)
    assert all(0 <= s < e <= len(buf) for s, e in fallback)


@given(st.lists(st.binary(max_size=40), min_size=1, max_size=5), st.integers(0, 3))
def test_framed_garbage_is_read_within_bounds(bodies, ncols):
    run = b"".join(b"D" + struct.pack("!i", len(b) + 4) + b for b in bodies)
    out, _count, fallback = fastrows.mask_rows(run, ncols, b"\x01" * ncols, 0, PREFIX_LENGTHS)
    assert out is None or len(out) == len(run)
    assert all(0 <= s < e <= len(run) for s, e in fallback)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="10\\*\\*6"):
        fastrows.mask_rows(b"", 1, b"\x01", 6, b"short")
    with pytest.raises(ValueError, match="one byte per column"):
        fastrows.mask_rows(b"", 2, b"\x01", 6, PREFIX_LENGTHS)
    with pytest.raises(ValueError, match="runs past"):
        fastrows.mask_rows(b"D\x00\x00\x00\x09abc", 1, b"\x01", 6, PREFIX_LENGTHS)


# ---- COPY text rows ------------------------------------------------------------------------------

fields = st.one_of(values.filter(lambda x: x is not None), st.sampled_from([b"\\N", b"1.5", b"1e5", b"+49", b"a,b"]),
                   st.builds(lambda p: b"-" + p, pans), st.builds(lambda p: p + b".25", pans),
                   st.builds(lambda p: b"x" + p, pans), st.just(b"12345678-1234-1234-1234-123456789012"))
copy_lines = st.builds(lambda fs, sep, end: sep.join(fs) + end, st.lists(fields, min_size=1, max_size=6),
                       st.sampled_from([b"\t", b"\t", b"|", b" ", b"\n"]),
                       st.sampled_from([b"\n", b"\n", b"", b"\r\n"]))


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(copy_lines, st.sampled_from(["pci", "last4"]))
@example(b"1\t4111111111111111\tvisa\n", "pci")
@example(b"4111111111111111\n378282246310005\t\n", "last4")
@example(b"\\x4111111111111111\t4111111111111111\n", "pci")
def test_a_copy_row_the_scanner_decides_is_masked_as_take_line_masks_it(line, fmt):
    decided = fastrows.mask_copy_line(line, fmt == "pci", PREFIX_LENGTHS)
    if decided is None:
        return
    assert decided == mask_text(line, fmt, TEXT, numbers=True)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(copy_lines, min_size=1, max_size=8), st.sampled_from(["pci", "last4"]))
def test_copy_out_through_the_scanner_is_copy_out_through_python(lines, fmt):
    def masked(compiled: bool) -> list:
        saved = copy_module.fastrows
        copy_module.fastrows = fastrows if compiled else None
        try:
            masker = CopyMasker(False, fmt)
            out = []
            for line in lines:
                try:
                    out.append(masker.message(line))
                except (ValueError, MaskingError, PanFound, MaskLeak) as exc:
                    out.append((type(exc), str(exc)))
                    break
            return out
        finally:
            copy_module.fastrows = saved
    assert masked(True) == masked(False)


def test_the_copy_scanner_decides_the_common_row_and_leaves_the_rest():
    assert fastrows.mask_copy_line(b"7\t4111111111111111\tvisa\n", True, PREFIX_LENGTHS) == (
        b"7\t4111110000001111\tvisa\n", 1)  # pci number mask: Luhn-breaking, length kept
    assert fastrows.mask_copy_line(b"7\tcard 4111111111111111\n", True, PREFIX_LENGTHS) is None
    assert fastrows.mask_copy_line(b"7\t$4,111\n", True, PREFIX_LENGTHS) is None
    assert fastrows.mask_copy_line(b"7\tvisa\n", True, PREFIX_LENGTHS) == (None, 0)


def copy_data(body: bytes) -> bytes:
    return m.CopyData(body).encode()


copy_messages = st.one_of(copy_lines, copy_lines.map(lambda line: line[:-1] if len(line) > 1 else line),
                          st.builds(lambda a, b: a + b, copy_lines, copy_lines), st.binary(max_size=30))


def copy_rows(compiled: bool, bodies: list[bytes], fmt: str) -> tuple:
    saved = copy_module.fastrows
    copy_module.fastrows = fastrows if compiled else None
    try:
        addon = MaskingAddon(fmt)
        info = SessionInfo(Endpoint.parse("127.0.0.1:1"), Endpoint.parse("127.0.0.1:2"))
        result = Result(None, copy_format=0)
        outs = []
        # the rows in runs of up to three messages, as reads would bring them
        for i in range(0, len(bodies), 3):
            run = b"".join(copy_data(b) for b in bodies[i:i + 3])
            try:
                out = addon.copy_rows(info, result, memoryview(run))
            except MaskingError as exc:
                return (*outs, ("error", exc.sqlstate, exc.message))
            outs.append(run if out is None else bytes(out))
        return (*outs, result.masked, info.masked_values)
    finally:
        copy_module.fastrows = saved


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(copy_messages, min_size=1, max_size=12), st.sampled_from(["pci", "last4"]))
@example([b"1\t4111111111111111\tvisa\n"] * 4, "pci")
@example([b"1\t4111111111", b"111111\tvisa\n", b"2\t378282246310005\n"], "last4")
@example([b"1\t$4,", b"111,111,111,111.11\n", b"2\t4111111111111111\n"], "pci")
def test_copy_runs_through_the_scanner_are_copy_out_message_by_message(bodies, fmt):
    assert copy_rows(True, bodies, fmt) == copy_rows(False, bodies, fmt)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 210))
def test_any_copy_run_is_read_within_bounds(buf, start):
    try:
        out, _count, upto = fastrows.mask_copy_run(buf, start, True, PREFIX_LENGTHS)
    except ValueError:
        return
    assert start <= upto <= len(buf)
    assert out is None or len(out) == len(buf) - start


@given(st.lists(st.binary(max_size=40), min_size=1, max_size=5))
def test_framed_copy_garbage_is_read_within_bounds(bodies):
    run = b"".join(copy_data(b) for b in bodies)
    out, _count, upto = fastrows.mask_copy_run(run, 0, False, PREFIX_LENGTHS)
    assert out is None or len(out) == len(run)
    assert upto in {0, len(run)} | {sum(len(copy_data(b)) for b in bodies[:i]) for i in range(len(bodies))}
