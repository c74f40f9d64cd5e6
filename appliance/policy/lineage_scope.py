"""Lineage scopes: which cardholder column a name in a query can mean.

The lineage check (:mod:`appliance.policy.lineage`) follows where a cardholder column's
value goes. This module holds its view of a query's names:

- :class:`Cardholders` — the declared columns, looked up by relation as the SQL writes it
  (a bare table name could be in any schema: the session's ``search_path`` can change, so
  a bare ``cards`` is a cardholder table if any schema's ``cards`` is one);
- :class:`Item` — one FROM item (table, subquery, CTE, function, join alias): the columns
  it is known to have, each with the cardholder column it carries *unchanged* (or None),
  and whether it may have columns nobody named (a table's other columns, which never
  carry card numbers: every cardholder column is declared by name);
- :class:`Level` — one query level: its FROM items, the CTEs it sees, its parent, and how
  many of the parent's FROM items it may see (a LATERAL subquery sees the items before
  it; a plain one none).

Resolution is to the safe side. A column name is *certainly* a cardholder column, or
*certainly not*; when the SQL alone can't say (an unqualified name that a nearer table
might or might not have), :class:`Unclear` is raised and the statement is refused with a
message that says how to qualify the name.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


class LineageRefusal(Exception):
    """A statement an agent may not run: a cardholder column used other than as a plain,
    masked projection. The message says what and where."""


class Unclear(LineageRefusal):
    """A name that may or may not be a cardholder column: refused, asking to qualify it."""


class Cardholders:
    """The declared cardholder columns, by table."""

    def __init__(self, parts: Iterable[tuple[str, str, str]]):
        # table name -> schema -> {column: "schema.table.column"}
        self._tables: dict[str, dict[str, dict[str, str]]] = {}
        names: set[str] = set()
        for schema, table, column in parts:
            full = f"{schema}.{table}.{column}"
            self._tables.setdefault(table, {}).setdefault(schema, {})[column] = full
            names.update((table, column))
        self.names = frozenset(names)

    def __bool__(self) -> bool:
        return bool(self._tables)

    def of_relation(self, schema: str | None, table: str) -> dict[str, str]:
        """The cardholder columns of the relation ``[schema.]table`` names; a bare name
        could be the table of that name in any schema."""
        schemas = self._tables.get(table)
        if not schemas:
            return {}
        if schema is not None:
            return dict(schemas.get(schema, {}))
        out: dict[str, str] = {}
        for columns in schemas.values():
            for column, full in columns.items():
                # Two schemas' tables of one name: the column could be either; name both.
                out[column] = f"{out[column]} or {full}" if column in out and out[column] != full else full
        return out


@dataclass(slots=True)
class Item:
    """One FROM item: its known columns (name -> cardholder column carried unchanged, or
    None) and whether it may have other, unnamed columns (never cardholder ones)."""

    name: str
    columns: dict[str, str | None] = field(default_factory=dict)
    open: bool = True
    # Two columns of one name were merged: positions no longer match ``columns``.
    merged: bool = False

    def add(self, name: str, taint: str | None) -> None:
        """Add an output column. Two of one name: the server refuses a reference to it as
        ambiguous, but a set operation, DISTINCT or a write takes both, so the cardholder
        one is kept."""
        if name in self.columns:
            self.merged = True
        self.columns[name] = self.columns.get(name) or taint

    @property
    def carried(self) -> list[str]:
        """The cardholder columns this item's rows carry."""
        return [c for c in self.columns.values() if c is not None]

    def renamed(self, alias: str | None, column_aliases: list[str]) -> Item:
        """The item under ``AS alias (a, b, …)``: the listed columns renamed in order."""
        columns = dict(self.columns)
        if column_aliases:
            if self.open or self.merged:
                # The column order is unknown: any listed name may now be any column, and
                # a column past the list keeps its own name.
                carried = " or ".join(sorted({c for c in self.columns.values() if c is not None}))
                for new in column_aliases:
                    columns[new] = carried or None
            else:
                old = list(self.columns.items())
                columns = {}
                for i, (name, taint) in enumerate(old):
                    columns[column_aliases[i] if i < len(column_aliases) else name] = taint
        return Item(alias or self.name, columns, self.open, self.merged)


class Level:
    """One query level: FROM items, visible CTEs, the enclosing level."""

    __slots__ = ("ctes", "items", "parent", "parent_visible")

    def __init__(self, parent: Level | None, parent_visible: int | None = None):
        self.parent = parent
        # How many of the parent's FROM items this level sees (None: all of them).
        self.parent_visible = parent_visible
        self.items: list[Item] = []
        self.ctes: dict[str, Item] = {}

    def cte(self, name: str) -> Item | None:
        level: Level | None = self
        while level is not None:
            if name in level.ctes:
                return level.ctes[name]
            level = level.parent
        return None

    def _levels(self) -> Iterable[list[Item]]:
        """The FROM items visible at each level, innermost first."""
        yield self.items
        child, level = self, self.parent
        while level is not None:
            yield level.items if child.parent_visible is None else level.items[:child.parent_visible]
            child, level = level, level.parent

    def item(self, name: str) -> Item | None:
        """The FROM item a qualifier names (innermost first)."""
        for items in self._levels():
            for item in reversed(items):
                if item.name == name:
                    return item
        return None

    def column(self, name: str) -> str | None:
        """The cardholder column an unqualified ``name`` carries unchanged, or None.

        Raises :class:`Unclear` when a nearer FROM item may have the column (so it is not
        the cardholder one) but may also lack it (so it is).
        """
        maybe: list[str] = []
        for items in self._levels():
            found = [item for item in items if name in item.columns]
            if found:
                taints = sorted({t for item in found if (t := item.columns[name]) is not None})
                if not taints:
                    return None
                if maybe:
                    raise Unclear(
                        f"column {name!r} could be {' or '.join(taints)} or a column of {', '.join(maybe)}: "
                        f"qualify it with its table or alias ({maybe[0]}.{name})")
                return " or ".join(taints)
            maybe.extend(item.name or "a subquery" for item in items if item.open)
        # Not a known column anywhere: a column of some table with unnamed columns (never
        # a cardholder one), or a whole-row reference (which the caller checks first).
        return None
