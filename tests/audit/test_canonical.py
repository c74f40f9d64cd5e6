"""RFC 8785 canonical JSON for the audit model (no floats)."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.audit.canonical import (
    MAX_INT,
    CanonicalError,
    dumps,
    is_canonical,
    loads,
    loads_canonical,
    loads_canonical_lines,
)

ints = st.integers(min_value=-MAX_INT, max_value=MAX_INT)
texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
values = st.recursive(
    st.none() | st.booleans() | ints | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=20,
)


def test_known_forms() -> None:
    assert dumps({"b": 1, "a": [True, False, None, -5, 0]}) == b'{"a":[true,false,null,-5,0],"b":1}'
    assert dumps("\u2028 \x7f \x01 \x1f \b\f\n\r\t \" \\ é") == \
        '"\u2028 \x7f \\u0001 \\u001f \\b\\f\\n\\r\\t \\" \\\\ é"'.encode()
    assert dumps([]) == b"[]" and dumps({}) == b"{}"


def test_keys_sort_by_utf16_code_units() -> None:
    # RFC 8785 §3.2.3: U+1F600 (D83D DE00) sorts before U+FFFF, unlike code-point order.
    assert dumps({"\uffff": 1, "\U0001F600": 2, "a": 3}) == '{"a":3,"\U0001F600":2,"\uffff":1}'.encode()
    assert dumps({"\ue000": {"\U00010000": 1, "\ue001": 2}}) == '{"\ue000":{"\U00010000":1,"\ue001":2}}'.encode()


def test_rfc8785_sorting_example() -> None:
    # The RFC's own sorting example (§3.2.3), without its float-free-incompatible values.
    obj = {"\u20ac": "Euro Sign", "\r": "Carriage Return", "\ufb33": "Hebrew Letter Dalet With Dagesh",
           "1": "One", "\U0001f600": "Emoji: Grinning Face", "\u0080": "Control",
           "\u00f6": "Latin Small Letter O With Diaeresis"}
    keys = list(loads(dumps(obj)))
    assert keys == ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]


@pytest.mark.parametrize("bad", [1.0, float("nan"), {"a": 0.5}, [1e3]])
def test_floats_refused(bad: object) -> None:
    with pytest.raises(TypeError):
        dumps(bad)


@pytest.mark.parametrize("bad", [{1: "a"}, {None: 1}, {("a",): 1}, object(), b"bytes", {1, 2}])
def test_other_types_refused(bad: object) -> None:
    with pytest.raises(TypeError):
        dumps(bad)


def test_lone_surrogates_and_big_ints_refused() -> None:
    with pytest.raises(ValueError, match="lone surrogate"):
        dumps("a\ud800b")
    with pytest.raises(ValueError, match="lone surrogate"):
        dumps({"\udfff": 1})
    with pytest.raises(ValueError, match="RFC 8785 cannot represent exactly"):
        dumps(MAX_INT + 1)
    assert dumps(-MAX_INT) == str(-MAX_INT).encode()


@pytest.mark.parametrize("line", [
    b'{"a":1.0}', b'{"a":1e2}', b"NaN", b"Infinity", b'{"a":1,"a":2}', b'"\\ud800"', b'"\xff"',
    b"", b"{", b"[1,]", b"\xef\xbb\xbf{}", b"9007199254740992", b"[" * 100000,
])
def test_loads_refuses(line: bytes) -> None:
    with pytest.raises(CanonicalError):
        loads(line)
    assert not is_canonical(line)


@pytest.mark.parametrize("line", [
    b'{"b":1,"a":2}', b'{"a": 1}', b' {"a":1}', b'"\\u0041"', b'"\\/"', b"-0", b'"\\u001F"', b'"\\u000a"',
    b'{"a":1}\n', '"\u2028"'.encode("utf-16-le"),
])
def test_not_canonical(line: bytes) -> None:
    assert not is_canonical(line)
    with pytest.raises(CanonicalError):
        loads_canonical(line)


@settings(max_examples=300, deadline=None)
@given(values)
def test_round_trip(value: object) -> None:
    line = dumps(value)
    assert loads(line) == value
    assert is_canonical(line)
    assert b"\n" not in line
    # The stdlib agrees wherever code-point and UTF-16 order agree.
    if not any(ord(c) >= 0xE000 for c in json.dumps(value, ensure_ascii=False)):
        assert line == json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()
        assert dumps(value, trusted=True) == line  # the proxy's path skips the walk, never changes the bytes


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=60) | st.text(max_size=40).map(lambda s: s.encode("utf-8", "surrogatepass")))
def test_fuzz_loads_raises_only_canonical_error(data: bytes) -> None:
    with contextlib.suppress(CanonicalError):
        loads(data)
    assert is_canonical(data) in (True, False)


@settings(max_examples=300, deadline=None)
@given(values, st.integers(min_value=0, max_value=200), st.binary(min_size=1, max_size=3))
def test_fuzz_mutated_lines(value: object, at: int, junk: bytes) -> None:
    line = dumps(value)
    at = min(at, len(line))
    mutated = line[:at] + junk + line[at:]
    try:
        obj = loads_canonical(mutated)
    except CanonicalError:
        return
    assert dumps(obj) == mutated


# --- loads_canonical_lines: a block of lines at once, exactly as loads_canonical line by line --


def _per_line(lines: list[bytes]) -> list[object] | None:
    try:
        return [loads_canonical(line) for line in lines]
    except CanonicalError:
        return None


BAD_LINES = [
    b'{"a":1.0}', b"NaN", b'{"a":1,"a":2}', b'{"a":1,"a":1}', b'"\\ud800"', b'"\xff"', b"", b"[1,]",
    b"9007199254740992", b"-9007199254740992", b"[" * 100000, b'{"b":1,"a":2}', b'{"a": 1}', b' {"a":1}',
    b'"\\u0041"', b'"\\/"', b"-0", b'"\\u001F"', b'{"a":1},{"b":2}', b"1,2", b"[1]]", b"[[1]", b'{"a":1}\r',
    "{\"\ue000\":1,\"\U0001F600\":2}".encode(),
]
GOOD_LINES = [
    b"{}", b"[]", b"0", b"-5", b"9007199254740991", b'"12345678901234567890"', b'{"a":[1,null,true,"\\n"]}',
    "{\"\U0001F600\":2,\"\ue000\":1}".encode(), '"é ☕ \u2028"'.encode(),
]


@pytest.mark.parametrize("bad", BAD_LINES)
@pytest.mark.parametrize("at", [0, 1, 3])
def test_lines_refused_wherever_a_bad_one_is(bad: bytes, at: int) -> None:
    lines = [dumps({"seq": i, "t": "x\ny"}) for i in range(3)]
    lines.insert(at, bad)
    assert loads_canonical_lines(b"".join(x + b"\n" for x in lines)) is None
    assert _per_line(lines) is None


def test_lines_accepted() -> None:
    block = b"".join(x + b"\n" for x in GOOD_LINES)
    assert repr(loads_canonical_lines(block)) == repr(_per_line(GOOD_LINES))
    assert loads_canonical_lines(b"") == []
    with pytest.raises(ValueError, match="ends with a newline"):
        loads_canonical_lines(b"{}\n{}")


@settings(max_examples=300, deadline=None)
@given(st.lists(values.map(dumps) | st.sampled_from(BAD_LINES + GOOD_LINES), min_size=1, max_size=8),
       st.integers(min_value=0, max_value=400), st.binary(max_size=3))
def test_lines_agree_with_loads_canonical(lines: list[bytes], at: int, junk: bytes) -> None:
    block = b"".join(x + b"\n" for x in lines)
    at = min(at, len(block) - 1)
    for data in (block, block[:at] + junk.replace(b"\n", b"") + block[at:]):
        got = loads_canonical_lines(data)
        assert repr(got) == repr(_per_line(data.split(b"\n")[:-1]))
