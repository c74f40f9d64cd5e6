"""A statement's shape: its text with numeric literals replaced, for caching decisions.

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

import re

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
