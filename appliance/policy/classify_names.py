"""Name resolution: which relations, columns and functions a statement names.

A :class:`Scope` is one query level: the FROM items a column may belong to and the CTE
names that hide real tables. :class:`NameCollector` is the state of one statement's walk
(its classes and the names found so far) with the rules that turn what the SQL wrote into
names: ``schema.table`` for relations, ``table.column`` for columns — every candidate table
when the SQL doesn't say which, ``?.column`` when nothing tells, ``.*`` for every column —
and ``schema.function`` for calls (``set_config('role', …)`` counting as SET ROLE).
The tree walk itself (:mod:`appliance.policy.classify_walk`) builds on this class.
"""

from __future__ import annotations

from appliance.model.decision import StatementClass as C
from appliance.policy.classify_tree import Json, strings, unwrap
from appliance.policy.patterns import qualified, quote_part

# ---- scopes -----------------------------------------------------------------------------


class Scope:
    """One query level: its FROM items (for column resolution) and the CTE names it sees.

    ``items`` maps a name the SQL may qualify columns with (alias or table name) to the
    relations behind it: one for a table, none for a subquery/CTE/function (their own
    columns were collected when their query was walked), several for an aliased join.
    ``executes`` is false inside bodies that are stored rather than run (views, rules,
    function bodies, plain EXPLAIN): their objects count, their reads and writes don't.
    """

    __slots__ = ("ctes", "executes", "items", "outputs", "parent")

    def __init__(self, parent: Scope | None, executes: bool | None = None):
        self.parent = parent
        self.items: list[tuple[str, tuple[str, ...]]] = []
        self.ctes: set[str] = set()
        self.outputs: frozenset[str] = frozenset()
        self.executes = executes if executes is not None else (parent.executes if parent else True)

    def is_cte(self, name: str) -> bool:
        """Whether an unqualified ``name`` means a CTE here rather than a table."""
        scope: Scope | None = self
        while scope is not None:
            if name in scope.ctes:
                return True
            scope = scope.parent
        return False

    def lookup(self, key: str) -> tuple[str, ...] | None:
        """The relations behind the FROM item a column qualifier names (innermost first)."""
        scope: Scope | None = self
        while scope is not None:
            for name, rels in reversed(scope.items):
                if name == key:
                    return rels
            scope = scope.parent
        return None

    def candidates(self) -> tuple[set[str], bool]:
        """Every relation an unqualified column could come from, and whether any FROM item exists."""
        rels: set[str] = set()
        any_item = False
        scope: Scope | None = self
        while scope is not None:
            for _, item_rels in scope.items:
                any_item = True
                rels.update(item_rels)
            scope = scope.parent
        return rels, any_item


class AnyName(frozenset):  # type: ignore[type-arg]
    """An ``outputs`` set that contains every name: where only output columns are visible."""

    def __contains__(self, item: object) -> bool:
        return True


# ---- the collected names ----------------------------------------------------------------


class NameCollector:
    """One statement's classes and the names it uses, and the rules for resolving names.

    The base of the walker: the walk (:mod:`appliance.policy.classify_walk`) and the
    statement handlers call these methods wherever the tree names something.
    """

    def __init__(self) -> None:
        self.classes: set[C] = set()
        self.relations: set[str] = set()
        self.columns: set[str] = set()
        self.functions: set[str] = set()
        self.command = ""
        self.prepared_name: str | None = None

    # -- recording names --

    def data(self, scope: Scope, cls: C) -> None:
        """READ / WRITE / LOCK happen only where the SQL runs now, not in a view or rule body."""
        if scope.executes:
            self.classes.add(cls)

    def relation(self, rangevar: Json) -> str:
        """A RangeVar's relation, recorded and returned as ``schema.name`` or ``name``."""
        parts = [rangevar[k] for k in ("schemaname", "relname") if rangevar.get(k)]
        name = qualified(parts)
        self.relations.add(name)
        return name

    def object_name(self, parts: list[str]) -> str:
        """A relation-like object (type, index, sequence, …) named by a qualified name."""
        name = qualified(parts)
        self.relations.add(name)
        return name

    def column(self, rel: str, col: str | None) -> None:
        """``rel.col``; ``col`` None means every column of ``rel``."""
        self.columns.add(f"{rel}.{quote_part(col) if col is not None else '*'}")

    # -- calls and column references --

    def func_call(self, body: Json) -> None:
        """A function call: its name, FUNCTION_CALL, and ROLE_CHANGE for set_config('role', …)."""
        parts = strings(body.get("funcname"))
        if not parts:
            return
        self.functions.add(qualified(parts))
        self.classes.add(C.FUNCTION_CALL)
        if parts[-1] == "set_config":
            # set_config('role', …) is SET ROLE in function form. Anything but a literal
            # first argument could name 'role' at run time, so it counts as one too.
            args = body.get("args") or []
            first_kind, first = unwrap(args[0]) if args else (None, None)
            setting = None
            if first_kind == "A_Const" and isinstance(first.get("sval"), dict):
                setting = first["sval"].get("sval", "").strip().lower()
            if setting is None or setting in ("role", "session_authorization"):
                self.classes.add(C.ROLE_CHANGE)

    def column_ref(self, body: Json, scope: Scope) -> None:
        """A column reference, resolved against ``scope``'s FROM items (a superset when unsure)."""
        names: list[str | None] = []
        for field in body.get("fields") or ():
            if "String" in field:
                names.append(field["String"].get("sval", ""))
            elif "A_Star" in field:
                names.append(None)
        if not names:
            return
        head = names[0]
        if head is None:  # SELECT *: every FROM item of this query level
            for _, rels in scope.items:
                for rel in rels:
                    self.column(rel, None)
            return
        item = scope.lookup(head)
        if len(names) == 1:
            if head in scope.outputs:
                return  # ORDER BY / GROUP BY naming an output column
            if item is not None:  # a whole-row reference: every column of that item
                for rel in item:
                    self.column(rel, None)
                return
            rels, any_item = scope.candidates()
            if rels:
                for rel in rels:
                    self.column(rel, head)
            elif not any_item:
                self.columns.add(f"?.{quote_part(head)}")
            return
        if item is not None:  # table.column (further parts are fields of a composite)
            for rel in item:
                self.column(rel, names[1])
            return
        if len(names) == 2:
            self.column(quote_part(head), names[1])
        elif len(names) >= 3:
            # schema.table.column (a leading database name is dropped, as PostgreSQL does)
            schema, table, col = (names[-3], names[-2], names[-1]) if len(names) == 4 else names[:3]
            if schema is not None and table is not None:
                self.column(qualified([schema, table]), col)
