"""Reading libpg_query's parse tree: the classifier's view of PostgreSQL's grammar.

The classifier asks libpg_query (through pglast) for the parse tree as JSON and walks it
as plain dicts, which is several times cheaper than building pglast's Python AST objects.
This module holds what every part of the walk needs to read that JSON: the node-wrapping
convention (:func:`unwrap`), qualified names (:func:`strings`), and which fields hold a
struct written without its type (:data:`INLINE`).
"""

from __future__ import annotations

from typing import Any

import pglast.ast as _ast

# A parse-tree node as libpg_query's JSON writes it: field name → value.
Json = dict[str, Any]


def _inline_fields() -> dict[tuple[str, str], str]:
    """(node type, field) → struct type, for fields holding an unwrapped struct.

    libpg_query's JSON wraps a field typed ``Node*`` as ``{"Type": {...}}`` but writes a
    field of a specific struct type (``RangeVar *relation``) bare; the walker needs the
    type to recognise e.g. an INSERT's target relation. pglast's slot metadata knows it.
    """
    out: dict[tuple[str, str], str] = {}
    for name in dir(_ast):
        cls = getattr(_ast, name)
        slots = getattr(cls, "__slots__", None)
        if not isinstance(cls, type) or not isinstance(slots, dict):
            continue
        for field, info in slots.items():
            ctype = str(getattr(info, "c_type", "")).rstrip("*").strip()
            if ctype in ("Node", "List", "Expr", "char", "Bitmapset"):
                continue
            target = getattr(_ast, ctype, None)
            if isinstance(target, type) and issubclass(target, _ast.Node):
                out[(name, field.rstrip("_"))] = ctype
    return out


# Computed once at import, from the pglast version installed: the grammar moves with it.
INLINE = _inline_fields()


def strings(items: Any) -> list[str]:
    """The values of a list of String nodes (a qualified name)."""
    return [item["String"].get("sval", "") for item in items or () if isinstance(item, dict) and "String" in item]


def unwrap(node: Any) -> tuple[str | None, Any]:
    """``{"Type": {...}}`` → ``("Type", {...})``; anything else → ``(None, node)``."""
    if isinstance(node, dict) and len(node) == 1:
        ((kind, body),) = node.items()
        if kind[:1].isupper() and isinstance(body, dict):
            return kind, body
    return None, node
