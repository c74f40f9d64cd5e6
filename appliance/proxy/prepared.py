"""What SQL does to the session's prepared-statement namespace.

PostgreSQL keeps one namespace of prepared statements per session: a protocol Parse named
``s1`` can be run by SQL ``EXECUTE s1``, and SQL ``PREPARE s2`` can be bound by a protocol
Bind. The session core keeps that namespace (``RequestState.statements``); this module reads
the SQL side of it: which statements of a request ``PREPARE`` a name (and with what text),
``EXECUTE`` one — also under ``EXPLAIN ANALYZE`` or ``CREATE TABLE … AS EXECUTE`` —,
``DEALLOCATE`` one, or drop them all (``DEALLOCATE ALL``, ``DISCARD ALL``).

Both PREPARE and DEALLOCATE take effect when they run and are not undone when the
transaction rolls back (PostgreSQL stores prepared statements outside transactions); a
statement that fails has no effect. What the core can't be sure of it forgets, so a later
use of the name is refused: a name Tollgate doesn't know is never run unchecked.

The text is read with pglast, the same parser policy decides with. Most requests name none
of these commands (as words, in any case): a substring check on the lower-cased text keeps
them off the parser.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

# A request can only touch the namespace through one of these words; most never say them.
# (Keywords are ASCII; lower() and ``in`` take a tenth of a case-blind regex's time.)

OpKind = Literal["prepare", "execute", "deallocate", "deallocate_all"]


@dataclass(frozen=True, slots=True)
class NamespaceOp:
    """One statement's effect on the namespace. ``index`` is the statement's position in
    its request (the server completes statements in order, so ``index`` tells which had
    run when an error came); ``text`` is a PREPARE's statement, as written."""

    kind: OpKind
    name: str
    index: int
    text: str = ""


class UnreadableSql(Exception):
    """The request may touch prepared statements and pglast can't read it."""


def sql_effects(text: str) -> tuple[NamespaceOp, ...]:
    """The namespace effects of ``text`` (one request: a Query, or a Parse's statement), in
    the order the server would apply them. Raises :class:`UnreadableSql` when the text names
    one of the commands but can't be parsed: the caller must not guess."""
    lowered = text.lower()
    if "prepare" not in lowered and "execute" not in lowered and "deallocate" not in lowered \
            and "discard" not in lowered:
        return ()
    raw = text.encode("utf-8", "surrogateescape")
    from pglast.parser import ParseError, parse_sql_json
    try:
        tree = json.loads(parse_sql_json(text))
    except (ParseError, UnicodeError, ValueError) as exc:
        raise UnreadableSql(str(exc)) from exc
    ops: list[NamespaceOp] = []
    for index, raw_stmt in enumerate(tree.get("stmts", ())):
        stmt = raw_stmt.get("stmt") or {}
        start = raw_stmt.get("stmt_location", 0)
        length = raw_stmt.get("stmt_len", 0)
        own = raw[start:start + length] if length else raw[start:]
        _collect(stmt, index, own, ops)
    return tuple(ops)


def _collect(node: Any, index: int, own: bytes, ops: list[NamespaceOp]) -> None:
    """Every namespace command inside ``node``, depth first in source order."""
    if isinstance(node, list):
        for item in node:
            _collect(item, index, own, ops)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key == "PrepareStmt":
            ops.append(NamespaceOp("prepare", value.get("name", ""), index, prepared_text(own)))
        elif key == "ExecuteStmt":
            ops.append(NamespaceOp("execute", value.get("name", ""), index))
            _collect(value.get("params"), index, own, ops)
        elif key == "DeallocateStmt":
            if value.get("isall") or not value.get("name"):
                ops.append(NamespaceOp("deallocate_all", "", index))
            else:
                ops.append(NamespaceOp("deallocate", value["name"], index))
        elif key == "DiscardStmt":
            if value.get("target", "DISCARD_ALL") == "DISCARD_ALL":
                ops.append(NamespaceOp("deallocate_all", "", index))
        else:
            _collect(value, index, own, ops)


def prepared_text(statement: bytes) -> str:
    """The statement a ``PREPARE name [(types)] AS statement`` prepares: everything after
    the first ``AS`` outside parentheses, found with PostgreSQL's own lexer (pglast, whose
    token offsets count characters; statement locations count bytes)."""
    from pglast.parser import scan
    text = statement.decode("utf-8", "surrogateescape")
    depth = 0
    for token in scan(text):
        if token.name == "ASCII_40":
            depth += 1
        elif token.name == "ASCII_41":
            depth -= 1
        elif token.name == "AS" and depth == 0:
            return text[token.end + 1:].strip().rstrip(";").strip()
    raise UnreadableSql("a PREPARE without AS")
