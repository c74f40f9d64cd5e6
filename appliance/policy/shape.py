"""A statement's shape: its text with numeric literals replaced, for caching decisions; and
what a time-boxed grant binds (:func:`grant_keys`).

Agents using the simple protocol send the same statement with different numbers
(``… WHERE aid = 4711``); classifying each text afresh costs tens of microseconds. No
numeric literal changes what a statement does or touches, so statements that differ only
in them share one classification and one decision.

The scan is deliberately narrow, and gives up (returns None: cache by exact text) on any
text it can't read with certainty: dollar quoting, escape strings, backslashes, nested
comments, or more than one statement. String literals, quoted identifiers and comments are
kept as they are — a string can matter (``set_config('role', …)``), and ``"t 1"`` is a name.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

# One alternation, tried left to right at each position: whatever opens a quoted or
# commented span consumes it whole, so a digit inside one is never seen as a number.
_TOKENS = re.compile(r"""
      (?P<keep>'(?:[^']|'')*'            # standard string literal
              | "(?:[^"]|"")*"           # quoted identifier
              | --[^\n]*                 # line comment
              | /\*(?:(?!/\*)[\s\S])*?\*/  # block comment, not nested
              | [A-Za-z_][A-Za-z0-9_$]*  # identifier or keyword (digits inside stay)
      )
    | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    """, re.VERBOSE)
# Text with nothing quoted or commented needs no tokenizer: numbers are what stands alone.
_PLAIN_NUMBER = re.compile(r"(?<![\w$.])(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?(?![\w$])")
_QUOTED_OR_COMMENT = re.compile(r"['\"]|--|/\*")
_UNSURE = re.compile(r"[$\\]|(?<![\w'])[eEuUbBxXnN]'|/\*[^*]*/\*")


def shape(sql: str) -> str | None:
    """``sql`` with each numeric literal replaced by ``0``; None when the text can't be
    shaped safely (then it is cached by its exact text), or has no number to replace."""
    if _UNSURE.search(sql):
        return None
    if _QUOTED_OR_COMMENT.search(sql) is None:
        shaped, replaced_count = _PLAIN_NUMBER.subn("0", sql)
        if not replaced_count or ";" in shaped.rstrip().rstrip(";"):
            return None
        return shaped
    end = len(sql.rstrip().rstrip(";"))
    parts: list[str] = []
    pos = 0
    replaced = False
    for match in _TOKENS.finditer(sql):
        gap = sql[pos:match.start()]
        if "'" in gap or '"' in gap or (";" in gap and match.start() <= end):
            return None  # an unterminated quote, or a second statement
        if match.group("number") is None:
            parts.append(sql[pos:match.end()])
        else:
            parts.append(gap)
            parts.append("0")
            replaced = True
        pos = match.end()
    tail = sql[pos:]
    if "'" in tail or '"' in tail or ";" in tail[:max(0, end - pos)]:
        return None
    if not replaced:
        return None
    parts.append(tail)
    return "".join(parts)


# ---- what a grant binds ------------------------------------------------------------------------

# Shown to approvers: how many of a statement's free parts are listed before "… n more".
MAX_FREE_SHOWN = 50


@dataclass(frozen=True, slots=True)
class GrantKeys:
    """What an approval's grant may bind, for one statement.

    ``exact``: the statement as approved — its text lexed as PostgreSQL lexes it (comments
    and whitespace dropped, keywords and unquoted names in lower case), every constant as
    written, and the bound parameter values. ``shape``: the same with every constant and
    parameter free; the number of items of every list still counts (``IN (1)`` and
    ``IN (1, 2)`` are two shapes: pg_stat_statements folds them, a grant must not let one
    approved id become 1,200). ``free``: the parts a shape grant lets vary, as written.
    """

    exact: str
    shape: str
    free: tuple[str, ...]


def grant_keys(sql: str, params: Sequence[tuple[int, bytes | None]] | None = None,
               runs: Sequence[str] = ()) -> GrantKeys:
    """The grant keys of ``sql`` run with ``params`` (each Bind parameter's format code and
    value, None for NULL; None when it has no Bind). ``runs``: the text of each prepared
    statement it runs by SQL ``EXECUTE``, bound like its own text (``EXECUTE s1(5)`` is
    another statement when ``s1`` is)."""
    bound = b"" if params is None else b"".join(
        b"%d:%s;" % (fmt, b"N" if value is None else b"%d:%s" % (len(value), value)) for fmt, value in params)
    exact, shape_key = hashlib.sha256(), hashlib.sha256()
    free: list[str] = []
    lexable = True
    for index, text in enumerate((sql, *runs)):
        # A prepared statement's own $n are filled by the EXECUTE's arguments, listed already.
        lexed = _lexed(text, params_free=index == 0)
        if lexed is None:
            # Not lexable: no shape to speak of; only this exact text (and parameters) matches.
            lexable = False
            raw = text.encode("utf-8", "surrogateescape")
            exact.update(b"%d:%s" % (len(raw), raw))
            continue
        exact_parts, shape_parts, own_free = lexed
        exact.update(exact_parts)
        shape_key.update(shape_parts)
        free.extend(own_free)
    exact.update(b"\0" + bound)
    if not lexable:
        key = exact.hexdigest()
        return GrantKeys("exact:" + key, "text:" + key, ())
    if len(free) > MAX_FREE_SHOWN:
        free = [*free[:MAX_FREE_SHOWN], f"… {len(free) - MAX_FREE_SHOWN} more"]
    return GrantKeys("exact:" + exact.hexdigest(), "shape:" + shape_key.hexdigest(), tuple(free))


def _lexed(sql: str, params_free: bool = True) -> tuple[bytes, bytes, list[str]] | None:
    """``sql`` as PostgreSQL's lexer reads it (pglast), each token length-prefixed: with its
    constants, with them as ``?``, and the constants (and parameters, with ``params_free``)
    as written. None when it can't be lexed."""
    from pglast.parser import ParseError, scan
    try:
        tokens = scan(sql)
    except (ParseError, UnicodeError):
        return None
    exact_parts: list[str] = []
    shape_parts: list[str] = []
    free: list[str] = []
    for token in tokens:
        name = token.name
        if name in ("C_COMMENT", "SQL_COMMENT"):
            continue
        text = sql[token.start:token.end + 1]
        if name.endswith("CONST"):
            exact_parts.append(text)
            shape_parts.append("?")
            free.append(text)
            continue
        if name == "PARAM":
            if params_free:
                free.append(text)
        elif token.kind != "NO_KEYWORD" or (name == "IDENT" and not text.startswith('"')):
            text = text.lower()
        exact_parts.append(text)
        shape_parts.append(text)
    while exact_parts and exact_parts[-1] == ";":  # a trailing semicolon ends, it doesn't change
        exact_parts.pop()
        shape_parts.pop()
    return _prefixed(exact_parts), _prefixed(shape_parts), free


def _prefixed(parts: list[str]) -> bytes:
    """Tokens as one unambiguous byte string: each one's length, then itself; then a NUL."""
    out = bytearray()
    for part in parts:
        raw = part.encode("utf-8", "surrogateescape")
        out += b"%d:%s" % (len(raw), raw)
    return bytes(out) + b"\0"
