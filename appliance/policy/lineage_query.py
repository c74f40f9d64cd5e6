"""Lineage through queries: SELECT, its FROM items and expressions, and where values go.

The query half of the lineage walk (:mod:`appliance.policy.lineage` has the entry, the
statements and the writes): :class:`QueryLineage` follows a SELECT (with its CTEs, set
operations, VALUES, FROM items, joins, LATERAL) and works out what each output column
carries (a cardholder column unchanged, or nothing), refusing — with
:class:`~appliance.policy.lineage_scope.LineageRefusal` — any other use of a cardholder
column it meets: in an expression, a predicate, an ordering or grouping, a whole row, a
subquery's value. Names resolve through :mod:`appliance.policy.lineage_scope`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from appliance.policy.classify_kinds import QUERY_KINDS
from appliance.policy.classify_tree import Json, strings, unwrap
from appliance.policy.lineage_scope import Cardholders, Item, Level, LineageRefusal

# Relations that hold other columns' values, card numbers included, whatever the query asks
# of them: the planner's statistics sample every column (most common values, histogram
# bounds), and other sessions' statement texts carry their literals. Agents may not read
# them at all (a plain read of a statistics row is no plain read of the column).
SAMPLED_VALUES = {
    "pg_stats": "the planner's statistics hold sampled column values, card numbers included",
    "pg_stats_ext": "the planner's statistics hold sampled column values, card numbers included",
    "pg_stats_ext_exprs": "the planner's statistics hold sampled column values, card numbers included",
    "pg_statistic": "the planner's statistics hold sampled column values, card numbers included",
    "pg_statistic_ext_data": "the planner's statistics hold sampled column values, card numbers included",
    "pg_stat_activity": "other sessions' statement texts can carry card numbers",
    "pg_stat_statements": "other sessions' statement texts can carry card numbers",
}

# Functions and aggregates that take one argument of any row type, so that ``t.f`` —
# attribute notation, which PostgreSQL reads as ``f(t)`` when ``t`` has no column ``f`` —
# is a whole-row call (``select reverse(c.to_jsonb->>'pan') from cards c``; ``c.json_agg``
# aggregates every row). Generated from PostgreSQL 15's catalog (pg_catalog functions and
# aggregates callable with one argument of type record, anyelement, "any", anycompatible,
# anynonarray or anycompatiblenonarray; window functions need OVER, which this notation
# can't give), plus the hstore extension's ``hstore(record)``. On a subquery or CTE, whose
# columns are all known, any other name is such a call too.
ROW_FUNCTIONS = frozenset({
    "any_out", "anycompatible_out", "anycompatiblenonarray_out", "anyelement_out", "anynonarray_out", "array_agg",
    "concat", "count", "hash_record", "json_agg", "json_build_array", "json_build_object", "jsonb_agg",
    "jsonb_build_array", "jsonb_build_object", "num_nonnulls", "num_nulls", "pg_collation_for",
    "pg_column_compression", "pg_column_size", "pg_typeof", "quote_literal", "quote_nullable", "record_out",
    "record_send", "row_to_json", "to_json", "to_jsonb", "hstore",
})

# Nodes whose value is a constant or a type: never a column's.
_LEAVES = frozenset({"A_Const", "ParamRef", "TypeName", "String", "Integer", "Float", "Boolean", "A_Star",
                     "SQLValueFunction", "SetToDefault"})



def described(columns: Iterable[str]) -> str:
    """Cardholder columns named in a message: each once, in order."""
    return ", ".join(sorted(set(columns)))


class QueryLineage:
    """Follows cardholder columns through queries and expressions."""

    def __init__(self, cardholders: Cardholders):
        self.cardholders = cardholders

    def query_outputs(self, kind: str | None, body: Any, level: Level) -> Item:
        """The output columns of a query of any kind (the full walk in lineage.py)."""
        raise NotImplementedError

    # ---- SELECT -------------------------------------------------------------------------

    def with_clause(self, body: Json, level: Level) -> None:
        wc = body.get("withClause")
        if not wc:
            return
        ctes = [c for k, c in (unwrap(n) for n in wc.get("ctes") or ()) if k == "CommonTableExpr"]
        if not wc.get("recursive"):
            # Each CTE sees only those before it: a later CTE's name means the real table.
            for cte in ctes:
                level.ctes[cte.get("ctename", "")] = self.cte(cte, level)
            return
        # WITH RECURSIVE: every CTE sees every other (and itself). Start from "no
        # columns known" and walk them all until what each carries stops changing, so a
        # CTE that filters one defined after it sees that one's cardholder columns.
        for cte in ctes:
            level.ctes[cte.get("ctename", "")] = Item(cte.get("ctename", ""), {}, True)
        for _ in range(len(ctes) + 1):
            walked = {cte.get("ctename", ""): self.cte(cte, level) for cte in ctes}
            if walked == level.ctes:
                return
            level.ctes.update(walked)
        raise LineageRefusal("the CTEs of this WITH RECURSIVE could not be followed; split the query")

    def cte(self, cte: Json, level: Level) -> Item:
        kind, query = unwrap(cte.get("ctequery"))
        outputs = self.query_outputs(kind, query, level)
        return outputs.renamed(cte.get("ctename", ""), strings(cte.get("aliascolnames")))

    def select(self, body: Json, outer: Level) -> Item:
        """A SELECT (or VALUES, or set operation) nested in ``outer``: its output columns."""
        level = Level(outer)
        self.with_clause(body, level)
        if body.get("op", "SETOP_NONE") != "SETOP_NONE":
            arms = [self.select(body[arm], level) for arm in ("larg", "rarg") if body.get(arm)]
            for arm in arms:
                if arm.carried:
                    raise LineageRefusal(f"{described(arm.carried)} is combined by "
                                         f"{body['op'].removeprefix('SETOP_')}; a cardholder column may only be "
                                         "selected as it is")
            self.use([body.get(k) for k in ("sortClause", "limitCount", "limitOffset")], level,
                     "the ORDER BY or LIMIT of a set operation")
            return arms[0] if arms else Item("", {}, True)
        for item in body.get("fromClause") or ():
            self.from_item(item, level)
        outputs = Item("", {}, False)
        for row in body.get("valuesLists") or ():
            _, items = unwrap(row)
            for i, value in enumerate(items.get("items") or () if isinstance(items, dict) else ()):
                outputs.add(f"column{i + 1}", self.value(value, level, "a VALUES list"))
        for target in body.get("targetList") or ():
            self.target(target, level, outputs)
        self.use(body.get("whereClause"), level, "a condition (WHERE)")
        self.use(body.get("havingClause"), level, "a condition (HAVING)")
        self.ordering(body.get("groupClause"), level, outputs, "GROUP BY", prefer_outputs=False)
        self.ordering([s.get("SortBy", {}).get("node") for s in body.get("sortClause") or ()], level, outputs,
                      "ORDER BY", prefer_outputs=True)
        distinct = body.get("distinctClause")
        if distinct:
            if distinct == [{}]:
                if outputs.carried:
                    raise LineageRefusal(f"{described(outputs.carried)} is compared by SELECT DISTINCT; a cardholder "
                                         "column may only be selected as it is")
            else:
                self.ordering(distinct, level, outputs, "DISTINCT ON", prefer_outputs=True)
        self.use(body.get("windowClause"), level, "a window definition (PARTITION BY / ORDER BY)")
        self.use([body.get("limitCount"), body.get("limitOffset")], level, "LIMIT or OFFSET")
        return outputs

    def target(self, node: Any, level: Level, outputs: Item) -> None:
        kind, res = unwrap(node)
        if kind != "ResTarget":
            return
        value = res.get("val")
        vkind, ref = unwrap(value)
        if vkind == "ColumnRef":
            fields = ref.get("fields") or []
            if fields and "A_Star" in fields[-1]:
                # * or t.*: each column of the item(s), unchanged.
                names = strings(fields[:-1])
                items = [level.item(names[-1])] if names else level.items
                for item in items:
                    if item is None:
                        continue
                    for column, taint in item.columns.items():
                        outputs.add(column, taint)
                    outputs.open = outputs.open or item.open
                return
        taint = self.value(value, level, "the select list")
        name = res.get("name")
        if not name and vkind == "ColumnRef":
            parts = strings((ref.get("fields") or [])[-1:])
            name = parts[0] if parts else None
        outputs.add(name or f"?column{len(outputs.columns)}?", taint)

    def ordering(self, items: Any, level: Level, outputs: Item, clause: str, prefer_outputs: bool) -> None:
        """GROUP BY / ORDER BY / DISTINCT ON: positions and output names mean output columns."""
        for node in items or ():
            kind, body = unwrap(node)
            if kind == "A_Const" and "ival" in body:
                # A position. Statements are cached by shape (numbers replaced), so every
                # position is taken as possibly any output column.
                if outputs.carried:
                    raise LineageRefusal(f"{clause} by position could sort or group by "
                                         f"{described(outputs.carried)}; a cardholder column may not be sorted, "
                                         "grouped or compared")
                continue
            if kind == "ColumnRef":
                names = strings(body.get("fields"))
                if len(names) == 1 and len(body.get("fields") or ()) == 1 and names[0] in outputs.columns:
                    taint = outputs.columns[names[0]]
                    if taint is not None:
                        raise LineageRefusal(f"{taint} is used in {clause}; a cardholder column may not be sorted, "
                                             "grouped or compared")
                    if prefer_outputs:
                        continue
            self.use(node, level, clause)

    # ---- FROM ---------------------------------------------------------------------------

    def from_item(self, node: Any, level: Level) -> None:
        kind, body = unwrap(node)
        if not isinstance(body, dict):
            return
        alias_node = body.get("alias") or {}
        alias = alias_node.get("aliasname")
        column_aliases = strings(alias_node.get("colnames"))
        if kind == "RangeVar":
            level.items.append(self.relation(body, level).renamed(alias, column_aliases))
        elif kind == "RangeSubselect":
            # A LATERAL subquery sees the FROM items before it; a plain one sees none of
            # this level's (but every enclosing level's).
            inner = Level(level, None if body.get("lateral") else 0)
            inner.ctes = {}
            skind, sub = unwrap(body.get("subquery"))
            outputs = self.query_outputs(skind, sub, inner)
            level.items.append(outputs.renamed(alias or "", column_aliases))
        elif kind == "JoinExpr":
            start = len(level.items)
            self.from_item(body.get("larg"), level)
            middle = len(level.items)
            self.from_item(body.get("rarg"), level)
            left, right = level.items[start:middle], level.items[middle:]
            for column in strings(body.get("usingClause")):
                for item in left + right:
                    taint = item.columns.get(column)
                    if taint is not None:
                        raise LineageRefusal(f"{taint} is used in a join (USING); a cardholder column may not be "
                                             "compared")
            if body.get("isNatural"):
                self.natural(left, right)
            self.use(body.get("quals"), level, "a join condition (ON)")
            if alias:
                merged = Item(alias, {}, False)
                for item in level.items[start:]:
                    for name, taint in item.columns.items():
                        merged.add(name, taint)
                    merged.open = merged.open or item.open
                level.items.append(merged.renamed(alias, column_aliases))
        elif kind == "RangeTableSample":
            self.from_item(body.get("relation"), level)
            self.use([body.get("args"), body.get("repeatable")], level, "TABLESAMPLE")
        else:
            # Functions in FROM (and XMLTABLE, JSON_TABLE): their arguments see the items
            # before them, and decide which rows exist.
            self.use({kind: body}, level, "a function in FROM")
            level.items.append(Item(alias or "", {}, True))

    def relation(self, rangevar: Json, level: Level) -> Item:
        name = rangevar.get("relname", "")
        schema = rangevar.get("schemaname")
        if name in SAMPLED_VALUES and (schema in (None, "pg_catalog") or name == "pg_stat_statements") \
                and (schema is not None or level.cte(name) is None):
            raise LineageRefusal(f"{name} is not readable by agents: {SAMPLED_VALUES[name]}")
        if not schema:
            cte = level.cte(name)
            if cte is not None:
                return Item(name, dict(cte.columns), cte.open)
        columns: dict[str, str | None] = dict(self.cardholders.of_relation(schema, name))
        return Item(name, columns, True)

    @staticmethod
    def natural(left: list[Item], right: list[Item]) -> None:
        for one, other in ((left, right), (right, left)):
            for item in one:
                for column, taint in item.columns.items():
                    if taint is None:
                        continue
                    if any(column in o.columns or o.open for o in other):
                        raise LineageRefusal(f"a NATURAL join could compare {taint}; write the join condition "
                                             "(ON or USING) with other columns")

    # ---- expressions --------------------------------------------------------------------

    def value(self, node: Any, level: Level, where: str) -> str | None:
        """The cardholder column ``node`` is, unchanged (a plain column reference), or None;
        raises if it is any other use of one."""
        kind, body = unwrap(node)
        if kind == "ColumnRef":
            return self.column_ref(body, level, where)
        self.use(node, level, f"an expression in {where}")
        return None

    def column_ref(self, body: Json, level: Level, where: str) -> str | None:
        fields = body.get("fields") or []
        star = bool(fields) and "A_Star" in fields[-1]
        names = strings(fields)
        if star:
            items = [level.item(names[-1])] if names else list(level.items)
            carried = [c for item in items if item is not None for c in item.carried]
            if carried:
                raise LineageRefusal(f"a whole row carrying {described(carried)} is used in {where}; select the "
                                     "columns themselves")
            return None
        if len(names) == 1:
            taint = level.column(names[0])
            if taint is not None:
                return taint
            item = level.item(names[0])
            if item is not None and item.carried:
                raise LineageRefusal(f"{names[0]!r} is a whole row carrying {described(item.carried)}, used in "
                                     f"{where}; select the columns themselves (if {names[0]!r} is a column, "
                                     "qualify it with its table)")
            return None
        # table.column, schema.table.column, db.schema.table.column: the item is named by
        # its table (or alias); any further parts are fields of a composite column.
        for qualifier_at in (len(names) - 2, 0):
            if qualifier_at < 0:
                continue
            item = level.item(names[qualifier_at])
            if item is not None:
                column = names[qualifier_at + 1] if qualifier_at + 1 < len(names) else None
                taint = item.columns.get(column) if column is not None else None
                if column is not None and column not in item.columns and item.carried \
                        and (not item.open or column in ROW_FUNCTIONS):
                    raise LineageRefusal(
                        f"{names[qualifier_at]}.{column} calls {column}() on a whole row carrying "
                        f"{described(item.carried)} (attribute notation), used in {where}; select the columns "
                        f"themselves (if {column!r} is a column of {names[qualifier_at]}, name it without the "
                        "qualifier)")
                if taint is not None and qualifier_at + 2 < len(names):
                    raise LineageRefusal(f"a field of {taint} is used in {where}")
                return taint
        # (composite).field of an unqualified column: the column's taint, as a derived value.
        taint = level.column(names[0])
        if taint is not None:
            raise LineageRefusal(f"{taint} is used in {where}; a cardholder column may only be selected as it is")
        return None

    def use(self, node: Any, level: Level, where: str, kind: str | None = None) -> None:
        """Walk an expression in which no cardholder column may appear at all."""
        stack: list[tuple[str | None, Any]] = [(kind, node)]
        while stack:
            kind, value = stack.pop()
            if isinstance(value, list):
                stack.extend((None, v) for v in value)
                continue
            if not isinstance(value, dict):
                continue
            if kind is None:
                kind, value = unwrap(value)
                if kind is None:
                    stack.extend((None, v) for v in value.values() if isinstance(v, (dict, list)))
                    continue
            if kind in _LEAVES:
                continue
            if kind == "ColumnRef":
                taint = self.column_ref(value, level, where)
                if taint is not None:
                    raise LineageRefusal(f"{taint} is used in {where}; a cardholder column may only be selected "
                                         "as it is, to be masked")
                continue
            if kind == "SubLink":
                sub_kind, sub = unwrap(value.get("subselect"))
                outputs = self.query_outputs(sub_kind, sub, level)
                if outputs.carried and value.get("subLinkType") != "EXISTS_SUBLINK":
                    raise LineageRefusal(f"a subquery's value carrying {described(outputs.carried)} is used in "
                                         f"{where}; select the column itself")
                stack.append((None, value.get("testexpr")))
                continue
            if kind in QUERY_KINDS:
                outputs = self.query_outputs(kind, value, level)
                if outputs.carried:
                    raise LineageRefusal(f"a query carrying {described(outputs.carried)} is used in {where}")
                continue
            if kind == "RangeVar":
                continue
            stack.extend((None, v) for v in value.values() if isinstance(v, (dict, list)))
