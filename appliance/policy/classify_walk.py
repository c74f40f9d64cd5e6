"""The tree walk: expressions and queries, visited with the scopes their names resolve in.

:class:`QueryWalker` visits what can appear inside any statement: expressions (walked
iteratively, since they can be thousands of levels deep), and the query statements —
SELECT with its CTEs, set operations, FROM items and joins; INSERT, UPDATE, DELETE and
MERGE with their targets and RETURNING — each in a new :class:`Scope`, recording names
through :class:`NameCollector`. A statement met inside a query (a CTE, a subquery, a
function body) goes to :meth:`QueryWalker.statement`, which the full walker in
:mod:`appliance.policy.classify_statements` implements.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from appliance.model.decision import StatementClass as C
from appliance.policy.classify_kinds import QUERY_KINDS
from appliance.policy.classify_names import AnyName, NameCollector, Scope
from appliance.policy.classify_tree import INLINE, Json, strings, unwrap

# Bound once, for the loop in QueryWalker.expr that looks up every field it descends into:
# Python 3.11 compiles NAME.get(...) on a NAME bound by an import as a module-attribute
# load (a generic getattr and a new bound method per call), not as a method call.
_inline_type = INLINE.get


class QueryWalker(NameCollector):
    """Visits expressions and queries, recording their classes and names."""

    def statement(self, kind: str, body: Json, scope: Scope) -> None:
        """Classify a statement of any kind: the full walker's dispatch (classify_statements)."""
        raise NotImplementedError

    # -- expressions (iterative: expression trees can be thousands of levels deep) --

    def expr(self, value: Any, scope: Scope, kind: str | None = None) -> None:
        """Every name in ``value`` (a node, a list, or a bare struct of type ``kind``)."""
        stack: list[tuple[str | None, Any]] = [(kind, value)]
        while stack:
            kind, value = stack.pop()
            if isinstance(value, list):
                stack.extend((None, v) for v in value)
                continue
            if not isinstance(value, dict):
                continue
            if kind is None:
                kind, value = unwrap(value)
            if kind is not None:
                if kind == "ColumnRef":
                    self.column_ref(value, scope)
                    continue
                if kind == "FuncCall":
                    self.func_call(value)
                elif kind == "SubLink":
                    self.query(value.get("subselect"), scope)
                    stack.append((None, value.get("testexpr")))
                    continue
                elif kind in QUERY_KINDS:
                    self.query({kind: value}, scope)
                    continue
                elif kind == "RangeVar":
                    self.relation(value)
                    continue
                elif kind == "LockingClause":
                    self.data(scope, C.LOCK)
                    continue  # lockedRels name FROM items, not new relations
                elif kind in ("TypeName", "A_Const", "String", "Integer", "Float", "Boolean", "ParamRef"):
                    continue
            for field, child in value.items():
                if isinstance(child, (dict, list)):
                    stack.append((_inline_type((kind, field)) if kind else None, child))

    # -- queries --

    def query(self, node: Any, outer: Scope, top: bool = False) -> None:
        """A query (or other statement) nested in ``outer``: a CTE, subquery or statement body."""
        kind, body = unwrap(node)
        if kind == "SelectStmt":
            self.select(body, outer, top)
        elif kind == "InsertStmt":
            self.insert(body, outer)
        elif kind == "UpdateStmt":
            self.update(body, outer)
        elif kind == "DeleteStmt":
            self.delete(body, outer)
        elif kind == "MergeStmt":
            self.merge(body, outer)
        elif kind is not None:
            self.statement(kind, body, outer)

    def with_clause(self, body: Json, scope: Scope) -> None:
        wc = body.get("withClause")
        if not wc:
            return
        ctes = [b for k, b in (unwrap(c) for c in wc.get("ctes") or ()) if k == "CommonTableExpr"]
        if wc.get("recursive"):
            scope.ctes.update(c.get("ctename", "") for c in ctes)
        for cte in ctes:
            # A non-recursive CTE sees only the ones before it: a later CTE's name inside
            # it still means the real table of that name.
            self.query(cte.get("ctequery"), scope)
            scope.ctes.add(cte.get("ctename", ""))

    def select(self, body: Json, outer: Scope, top: bool) -> None:
        scope = Scope(outer)
        self.with_clause(body, scope)
        if body.get("op", "SETOP_NONE") != "SETOP_NONE":
            for arm in ("larg", "rarg"):
                if body.get(arm):
                    self.select(body[arm], scope, top)
            tail = Scope(scope)
            tail.outputs = AnyName()  # ORDER BY of a UNION names output columns only
            self.expr([body.get(k) for k in ("sortClause", "limitCount", "limitOffset")], tail)
            if body.get("lockingClause"):
                self.data(scope, C.LOCK)
            return
        into = body.get("intoClause")
        if into and scope.executes:
            self.classes.update((C.WRITE, C.DDL))
            if into.get("rel"):
                self.relation(into["rel"])
        from_clause = body.get("fromClause")
        if top or from_clause:
            self.data(scope, C.READ)
        if from_clause:
            self.from_items(from_clause, scope)
        if body.get("lockingClause"):
            self.data(scope, C.LOCK)
        self.expr([body.get(k) for k in ("targetList", "whereClause", "groupClause", "havingClause", "valuesLists",
                                          "distinctClause", "limitCount", "limitOffset", "windowClause")],
                  scope)
        # ORDER BY prefers output names (GROUP BY prefers input columns, so it isn't here).
        outputs = frozenset(
            t["ResTarget"]["name"] for t in body.get("targetList") or ()
            if "ResTarget" in t and t["ResTarget"].get("name"))
        if outputs:
            ordering = Scope(scope)
            ordering.outputs = outputs
        else:
            ordering = scope
        self.expr(body.get("sortClause"), ordering)

    def from_items(self, items: Iterable[Any], scope: Scope) -> None:
        for item in items:
            self.from_item(item, scope)

    def from_item(self, node: Any, scope: Scope) -> None:
        kind, body = unwrap(node)
        alias = ((body.get("alias") or {}).get("aliasname")) if isinstance(body, dict) else None
        if kind == "RangeVar":
            relname = body.get("relname", "")
            if not body.get("schemaname") and scope.is_cte(relname):
                scope.items.append((alias or relname, ()))
            else:
                scope.items.append((alias or relname, (self.relation(body),)))
        elif kind == "RangeSubselect":
            self.query(body.get("subquery"), scope)
            scope.items.append((alias or "", ()))
        elif kind == "JoinExpr":
            start = len(scope.items)
            self.from_item(body.get("larg"), scope)
            middle = len(scope.items)
            self.from_item(body.get("rarg"), scope)
            sides = (scope.items[start:middle], scope.items[middle:])
            for col in strings(body.get("usingClause")):
                for side in sides:
                    for _, rels in side:
                        for rel in rels:
                            self.column(rel, col)
            self.expr(body.get("quals"), scope)
            if alias:
                joined = tuple(rel for _, rels in scope.items[start:] for rel in rels)
                scope.items.append((alias, joined))
        elif kind == "RangeTableSample":
            self.from_item(body.get("relation"), scope)
            self.expr(body.get("args"), scope)
            self.expr(body.get("repeatable"), scope)
        elif kind is not None:  # functions in FROM, XMLTABLE, JSON_TABLE, …
            self.expr({kind: body}, scope)
            scope.items.append((alias or "", ()))

    def target(self, rangevar: Json | None, scope: Scope) -> str | None:
        """The table an INSERT/UPDATE/DELETE/MERGE writes, made a FROM item of ``scope``."""
        if not rangevar:
            return None
        rel = self.relation(rangevar)
        alias = (rangevar.get("alias") or {}).get("aliasname")
        scope.items.append((alias or rangevar.get("relname", ""), (rel,)))
        return rel

    def returning(self, body: Json, scope: Scope) -> None:
        # RETURNING hands rows back: what a write returns is read.
        if body.get("returningList"):
            self.data(scope, C.READ)
            self.expr(body["returningList"], scope)

    def set_targets(self, targets: Iterable[Any], rel: str | None, scope: Scope) -> None:
        for t in targets or ():
            kind, res = unwrap(t)
            if kind != "ResTarget":
                continue
            if rel is not None and res.get("name"):
                self.column(rel, res["name"])
            self.expr(res.get("indirection"), scope)
            self.expr(res.get("val"), scope)

    def insert(self, body: Json, outer: Scope) -> None:
        scope = Scope(outer)
        self.with_clause(body, scope)
        self.data(scope, C.WRITE)
        if body.get("selectStmt"):
            self.query(body["selectStmt"], scope)  # the target is not visible to its source
        target = Scope(scope)
        rel = self.target(body.get("relation"), target)
        if rel is not None:
            target.items.append(("excluded", (rel,)))
            if body.get("cols"):
                self.set_targets(body["cols"], rel, target)
            else:
                self.column(rel, None)
        conflict = body.get("onConflictClause")
        if conflict:
            self.expr(conflict.get("infer"), target, "InferClause")
            self.set_targets(conflict.get("targetList"), rel, target)
            self.expr(conflict.get("whereClause"), target)
        self.returning(body, target)

    def update(self, body: Json, outer: Scope) -> None:
        scope = Scope(outer)
        self.with_clause(body, scope)
        self.data(scope, C.WRITE)
        rel = self.target(body.get("relation"), scope)
        if body.get("fromClause"):
            self.data(scope, C.READ)
            self.from_items(body["fromClause"], scope)
        self.set_targets(body.get("targetList"), rel, scope)
        self.expr(body.get("whereClause"), scope)
        self.returning(body, scope)

    def delete(self, body: Json, outer: Scope) -> None:
        scope = Scope(outer)
        self.with_clause(body, scope)
        self.data(scope, C.WRITE)
        rel = self.target(body.get("relation"), scope)
        if rel is not None:
            self.column(rel, None)  # a deleted row loses every column
        if body.get("usingClause"):
            self.data(scope, C.READ)
            self.from_items(body["usingClause"], scope)
        self.expr(body.get("whereClause"), scope)
        self.returning(body, scope)

    def merge(self, body: Json, outer: Scope) -> None:
        scope = Scope(outer)
        self.with_clause(body, scope)
        self.data(scope, C.WRITE)
        self.data(scope, C.READ)  # MERGE always reads its source
        rel = self.target(body.get("relation"), scope)
        if body.get("sourceRelation"):
            self.from_item(body["sourceRelation"], scope)
        self.expr(body.get("joinCondition"), scope)
        for clause in body.get("mergeWhenClauses") or ():
            kind, when = unwrap(clause)
            if kind != "MergeWhenClause":
                continue
            self.expr(when.get("condition"), scope)
            command = when.get("commandType")
            # DELETE takes every column; INSERT without a column list writes every column.
            if rel is not None and (command == "CMD_DELETE"
                                    or (command == "CMD_INSERT" and not when.get("targetList"))):
                self.column(rel, None)
            self.set_targets(when.get("targetList"), rel, scope)
            self.expr(when.get("values"), scope)
        self.returning(body, scope)
