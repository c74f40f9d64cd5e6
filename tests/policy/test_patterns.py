"""Globs against names: "could it match" (block/hold) and "does it match whatever it is" (allow/mask)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.policy.patterns import (
    PatternError,
    compile_pattern,
    covers,
    hits,
    split_name,
)


def p(text: str):  # type: ignore[no-untyped-def]
    return compile_pattern(text)


@pytest.mark.parametrize("bad", ["", "a[b", "[z-a]", "a]b", "x\x00", "payments.", ".x", "a..b", '"a.b'])
def test_bad_globs(bad: str) -> None:
    with pytest.raises(PatternError):
        compile_pattern(bad)


def test_split_name_keeps_quoted_parts() -> None:
    assert split_name('a."b.c".*') == ("a", '"b.c"', None)
    assert split_name("?.pan") == (None, "pan")
    assert split_name('"a""b".c') == ('"a""b"', "c")


@pytest.mark.parametrize("pattern, name, kind, expected", [
    ("payments.cards", "payments.cards", "relation", True),
    ("payments.*", "payments.cards", "relation", True),
    ("payments.*", "public.cards", "relation", False),
    ("cards", "payments.cards", "relation", True),  # no schema in the pattern: any schema
    ("payments.cards", "cards", "relation", True),  # bare name: could be in payments
    ("payments.cards", "payments.*", "relation", True),  # DROP SCHEMA payments touches cards
    ("payments.cards", "*.*", "relation", True),
    ("payments.cards", "public.*", "relation", False),
    ("pg_read_file", "pg_catalog.pg_read_file", "function", True),
    ("lo_*", "lo_import", "function", True),
    ("lo_*", "pg_catalog.lo_export", "function", True),
    ("lo_*", "oid:764", "function", True),  # FunctionCall by OID: could be any function
    ("payments.cards.pan", "payments.cards.*", "column", True),
    ("payments.cards.pan", "cards.pan", "column", True),
    ("payments.cards.pan", "?.pan", "column", True),
    ("payments.cards.pan", "?.cvv", "column", False),
    ("payments.cards.[pc]*", "cards.cvv", "column", True),
    ("payments.cards.[!p]*", "cards.pan", "column", False),
    ("payments.cards", '"payments.cards"', "relation", False),  # a quoted name is one part
    ('"payments.cards"', '"payments.cards"', "relation", True),
    ("lo_*", "count", "function", False),  # globs never cross a dot: not "a schema named lo_x"
    ("pg_ls_*", "pg_catalog.count", "function", False),
    ("payments.*", "payments.cards.pan", "column", False),  # columns are schema.table.column
    ("payments.*.*", "payments.cards.pan", "column", True),
    ("cards.*", "payments.cards.pan", "column", True),
    ("a[.]b", "a.b", "relation", False),
    ("x.[]a]", "x.]", "relation", True),
    ("x.[!]a]", "x.b", "relation", True),
    ("x.[!]a]", "x.]", "relation", False),
])
def test_hits(pattern: str, name: str, kind: str, expected: bool) -> None:
    assert hits(p(pattern), name, kind) is expected  # type: ignore[arg-type]


@pytest.mark.parametrize("pattern, name, kind, search_path, expected", [
    ("payments.cards", "payments.cards", "relation", ("public",), True),
    ("public.*", "cards", "relation", ("public",), True),
    ("public.*", "cards", "relation", ("public", "payments"), False),  # might resolve to payments
    ("payments.cards", "cards", "relation", ("public",), False),
    ("public.*", "pg_authid", "relation", ("public",), False),  # pg_catalog is searched first
    ("pg_catalog.*", "pg_class", "relation", ("public",), False),  # …but so is public
    ("*", "pg_class", "relation", ("public",), True),
    ("payments.*", "payments.*", "relation", ("public",), True),
    ("payments.cards", "payments.*", "relation", ("public",), False),
    ("scratch.*", "*.*", "relation", ("public",), False),
    ("*", "*.*", "relation", ("public",), True),
    ("pg_catalog.*", "count", "function", ("public",), True),
    ("count", "count", "function", ("public",), True),
    ("count", "pg_catalog.count", "function", ("public",), True),
    ("public.*", "count", "function", ("public",), False),
    ("lo_*", "oid:764", "function", ("public",), False),
    ("*", "oid:764", "function", ("public",), True),
    ("oid:764", "oid:764", "function", ("public",), True),
    ("payments.cards.*", "payments.cards.*", "column", ("public",), True),
    ("payments.cards.pan", "payments.cards.*", "column", ("public",), False),
    ("public.cards.*", "cards.pan", "column", ("public",), True),
    ("pan", "?.pan", "column", ("public",), True),
    ("*.pan", "?.pan", "column", ("public",), True),
    ("cards.pan", "?.pan", "column", ("public",), False),
    ("?.cards.pan", "cards.pan", "column", ("public",), False),  # "?" is one character, not a schema
    ("[!x]*.cards.pan", "cards.pan", "column", ("public",), True),
])
def test_covers(pattern: str, name: str, kind: str, search_path: tuple[str, ...], expected: bool) -> None:
    assert covers(p(pattern), name, kind, search_path) is expected  # type: ignore[arg-type]


_ident = st.text(alphabet="abcxyz_.*?[]!", min_size=1, max_size=8)


@settings(max_examples=300, deadline=None)
@given(_ident, st.lists(st.text(alphabet="abcxyz_", min_size=1, max_size=4), min_size=1, max_size=3))
def test_covering_a_known_name_implies_hitting_it(pattern: str, parts: list[str]) -> None:
    try:
        pat = compile_pattern(pattern)
    except PatternError:
        return
    name = ".".join(parts)
    if covers(pat, name, "relation", ("public",)):
        assert hits(pat, name, "relation")
