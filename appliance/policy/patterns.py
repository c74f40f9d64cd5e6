"""Glob patterns in policy rules, and how they meet the names a classification carries.

A pattern is a dotted name whose parts are shell-style globs: ``*`` (any run of
characters within the part), ``?`` (one character), ``[abc]`` / ``[a-z]`` / ``[!abc]``
(one character of a set). Globs never cross a dot, so ``lo_*`` is "a function whose name
starts with lo_", never "anything in a schema called lo_x". A pattern with fewer parts
than a name matches the name's rightmost parts: a pattern without a schema means "in any
schema" (``pg_read_file`` matches ``pg_catalog.pg_read_file``; ``cards.pan`` matches
``payments.cards.pan``).

Names are not always fully known. Two questions are asked of a pattern, and unknown
parts (a ``*`` part, the ``?`` table of ``?.col``, a missing schema) are treated
differently by each — always to the safe side:

- :func:`hits` — *could* the name match? (block and hold rules). An unknown part could
  be anything, so ``cards`` (bare) hits ``payments.cards``, and ``payments.*`` (every
  relation of a schema, as DROP SCHEMA names it) hits ``payments.cards``.
- :func:`covers` — does the pattern match the name *whatever* it turns out to be?
  (allow and mask rules). An unknown part is covered only by a part that is all ``*``; a
  bare name must match in every schema it could resolve to (the policy's
  ``search_path``, plus ``pg_catalog`` for a relation named ``pg_*``; functions resolve
  to ``pg_catalog``, which PostgreSQL searches first).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Kind = Literal["relation", "column", "function"]
FULL_PARTS: dict[str, int] = {"relation": 2, "function": 2, "column": 3}
# Unknown parts become this in coverage checks: no literal, ``?`` or character set of a
# compiled part accepts it, so only a part made of ``*`` matches it — and such a part
# matches anything.
PROBE = "\x00"


class PatternError(ValueError):
    """A pattern that is not a valid glob."""


@dataclass(frozen=True, slots=True)
class Pattern:
    text: str
    parts: tuple[re.Pattern[str], ...]

    def __str__(self) -> str:
        return self.text


Parts = tuple[str | None, ...]  # None: a part that could be anything


def _split(text: str, *, brackets: bool) -> list[str]:
    """Split on dots outside double quotes (and, for patterns, outside ``[...]``)."""
    parts: list[str] = []
    current: list[str] = []
    quoted = in_set = False
    set_start = 0  # where the current [...] set's members begin in ``current``
    for ch in text:
        if ch == '"' and not in_set:
            quoted = not quoted  # a doubled "" toggles twice: still inside
        elif brackets and not quoted:
            if ch == "[" and not in_set:
                in_set, set_start = True, len(current) + 1
            elif in_set and ch in "!^" and len(current) == set_start:
                set_start += 1  # negation, not a member
            elif ch == "]" and in_set and len(current) > set_start:  # "[]…]": the first ] is a member
                in_set = False
        if ch == "." and not quoted and not in_set:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _part_regex(text: str, part: str) -> re.Pattern[str]:
    if not part:
        raise PatternError(f"pattern {text!r} has an empty part (between dots, or at an end)")
    out: list[str] = []
    i, n = 0, len(part)
    while i < n:
        ch = part[i]
        if ch == "*":
            out.append(".*")
            while i < n and part[i] == "*":
                i += 1
            continue
        if ch == "?":
            out.append("[^\\x00]")
        elif ch == "[":
            j = i + 1
            negated = j < n and part[j] in "!^"
            if negated:
                j += 1
            ranges: list[str] = []
            first = True
            while j < n and (part[j] != "]" or first):
                lo = part[j]
                if j + 2 < n and part[j + 1] == "-" and part[j + 2] != "]":
                    hi = part[j + 2]
                    if hi < lo:
                        raise PatternError(f"pattern {text!r}: range {lo}-{hi} is backwards")
                    ranges.append(f"{re.escape(lo)}-{re.escape(hi)}")
                    j += 3
                else:
                    ranges.append(re.escape(lo))
                    j += 1
                first = False
            if j >= n:
                raise PatternError(f"pattern {text!r}: unterminated '[' character set")
            out.append(f"(?!\\x00)[{'^' if negated else ''}{''.join(ranges)}]")
            i = j
        elif ch == "]":
            raise PatternError(f"pattern {text!r}: ']' without a matching '['")
        else:
            out.append(re.escape(ch))
        i += 1
    return re.compile("".join(out), re.DOTALL)


@functools.lru_cache(maxsize=4096)
def compile_pattern(text: str) -> Pattern:
    if not text:
        raise PatternError("empty pattern")
    if PROBE in text:
        raise PatternError(f"pattern {text!r} contains a NUL character")
    if text.count('"') % 2:
        raise PatternError(f"pattern {text!r}: unbalanced double quote")
    return Pattern(text, tuple(_part_regex(text, part) for part in _split(text, brackets=True)))


# ---- names ------------------------------------------------------------------------------

_NEEDS_QUOTES = re.compile(r'[.*?\[\]"\s\x00]')


def quote_part(part: str) -> str:
    """One name part, double-quoted (as PostgreSQL would) when it holds a character with a
    meaning in names or patterns, so a quoted ``"a.b"`` can't pose as schema ``a``."""
    if part and not _NEEDS_QUOTES.search(part):
        return part
    return '"' + part.replace('"', '""') + '"'


def qualified(parts: Iterable[str]) -> str:
    return ".".join(quote_part(p) for p in parts)


def unquote(part: str | None) -> str:
    """A name part as PostgreSQL stores it: ``"a.b"`` becomes ``a.b``, and a doubled quote inside one."""
    if part is None:
        return "*"
    if len(part) >= 2 and part[0] == part[-1] == '"':
        return part[1:-1].replace('""', '"')
    return part


@functools.lru_cache(maxsize=16384)
def split_name(name: str) -> Parts:
    """``a."b.c".*`` → ("a", '"b.c"', None). Quoted parts keep their quotes; an unquoted
    ``*`` or ``?`` part is unknown."""
    return tuple(None if p in ("*", "?") else p for p in _split(name, brackets=False))


def _aligned(pattern: Pattern, parts: Parts) -> Iterable[tuple[re.Pattern[str], str | None]]:
    """Pattern parts against the name's rightmost parts; a name shorter than the pattern
    has unknown leading parts."""
    if len(parts) < len(pattern.parts):
        parts = (None,) * (len(pattern.parts) - len(parts)) + parts
    return zip(pattern.parts, parts[len(parts) - len(pattern.parts):], strict=True)


def _is_oid_function(name: str) -> bool:
    return name.startswith("oid:")


@functools.lru_cache(maxsize=65536)
def _hits(pattern: Pattern, name: str) -> bool:
    return all(part is None or regex.fullmatch(part) is not None
               for regex, part in _aligned(pattern, split_name(name)))


def hits(pattern: Pattern, name: str, kind: Kind) -> bool:
    """Could ``name`` (as a classification writes it) be something ``pattern`` matches?"""
    if kind == "function" and _is_oid_function(name):
        return True  # a FunctionCall by OID could be any function
    return _hits(pattern, name)


def resolution_schemas(parts: Parts, kind: Kind, search_path: tuple[str, ...]) -> tuple[str, ...]:
    """The schemas a bare name might resolve to."""
    if kind == "function":
        return ("pg_catalog",)
    relname = parts[0] or ""
    extra = ("pg_catalog",) if relname.startswith("pg_") and "pg_catalog" not in search_path else ()
    return extra + search_path


def _covers_parts(pattern: Pattern, parts: Parts) -> bool:
    return all(regex.fullmatch(PROBE if part is None else part) is not None
               for regex, part in _aligned(pattern, parts))


@functools.lru_cache(maxsize=65536)
def _covers(pattern: Pattern, name: str, kind: Kind, search_path: tuple[str, ...]) -> bool:
    if kind == "function" and _is_oid_function(name):
        # Any function at all, or this very OID written as the pattern.
        return _covers_parts(pattern, (None, None)) or (len(pattern.parts) == 1
                                                        and pattern.parts[0].fullmatch(name) is not None)
    parts = split_name(name)
    missing = FULL_PARTS[kind] - len(parts)
    if missing <= 0 or parts[0] is None:  # qualified, or "?.col" (no table, so no schema either)
        return _covers_parts(pattern, parts)
    return all(_covers_parts(pattern, (quote_part(schema),) + (None,) * (missing - 1) + parts)
               for schema in resolution_schemas(parts, kind, search_path))


def covers(pattern: Pattern, name: str, kind: Kind, search_path: Iterable[str] = ("public",)) -> bool:
    """Does ``pattern`` match ``name`` whatever its unknown parts turn out to be?"""
    return _covers(pattern, name, kind, tuple(search_path))
