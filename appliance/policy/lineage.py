"""Lineage: where a cardholder column's value goes in one statement an agent sends.

A card number must reach an agent only as the masked display of a plain column. The PAN
detector can't win against arbitrary encodings (``reverse(pan)``, ``to_hex(pan::bigint)``,
two substrings), and predicates, ordering and grouping turn a column into a digit oracle
(``where pan like '4111%'``). So for the groups a policy marks as agents, a statement that
uses a cardholder column in any other way is refused — built-in rule ``lineage``, decided
before any rule, SQLSTATE 42501 — with a message saying which column and where:

- **allowed**: a plain projection — ``select pan``, ``select c.pan as x``, ``*`` or
  ``c.*`` over a cardholder table, through subqueries, CTEs and LATERAL subqueries that
  pass the column on unchanged (each is masked as any result is);
- **refused** in a result: any expression, function, operator, cast, aggregate, window
  function, CASE, row or array constructor, whole-row reference (``c``, ``to_json(c)``,
  ``count(c.*)``), a subquery's value, UNION/INTERSECT/EXCEPT of one, RETURNING;
- **refused** as a predicate or ordering: WHERE, HAVING, JOIN ON/USING, a NATURAL join
  that could join on it, ORDER BY (names, aliases or positions), GROUP BY, DISTINCT and
  DISTINCT ON, window PARTITION/ORDER, LIMIT/OFFSET, function arguments in FROM;
- **refused** into a write: INSERT … SELECT/VALUES, UPDATE … SET, MERGE, SELECT INTO,
  CREATE TABLE/MATERIALIZED VIEW AS (and AS EXECUTE), writable CTEs — or held, for a plain
  copy into a table, where the policy's ``cardholder_writes`` says so (:class:`LineageWrite`)
  — and out: COPY (query) TO and COPY of the table, stored bodies (views, rules,
  SQL-standard function bodies) that read one, a foreign key referencing one;
- **refused, asking to qualify**: an unqualified name that could be a cardholder column
  or a column of a nearer table the policy knows nothing about;
- **refused** outright: reading the relations that hold other columns' values whatever
  the query asks (the planner's statistics, ``pg_stat_activity``'s statement texts).

The check needs no catalog: every cardholder column is declared by name, so a table's
unnamed columns are never cardholder columns, and a ``*`` over a cardholder table carries
exactly its declared ones. Bare table names are taken as cardholder tables if the table of
that name is one in any schema (``search_path`` can change in the session).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from pglast.parser import parse_sql_json

from appliance.policy.classify_kinds import QUERY_KINDS
from appliance.policy.classify_tree import Json, strings, unwrap
from appliance.policy.lineage_scope import Cardholders, Item, Level, LineageRefusal, Unclear

__all__ = ["Cardholders", "LineageRefusal", "LineageWrite", "Unclear", "check", "may_touch"]


class LineageWrite(LineageRefusal):
    """A cardholder column copied, unchanged, into a table (INSERT, UPDATE, MERGE, CREATE
    TABLE AS, SELECT INTO): refused, or held where the policy's ``cardholder_writes`` says
    so (:func:`check` with ``writes_allowed`` tells whether that is the only problem)."""

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

# Nodes whose value is a constant or a type: never a column's.
_LEAVES = frozenset({"A_Const", "ParamRef", "TypeName", "String", "Integer", "Float", "Boolean", "A_Star",
                     "SQLValueFunction", "SetToDefault"})


def may_touch(tree_json: str, cardholders: Cardholders) -> bool:
    """Whether a parse tree (libpg_query's JSON text) names any cardholder table or column.

    A tree that names none can't carry a cardholder value. libpg_query's JSON escapes
    only quotes, backslashes and control characters, so a name without those appears
    verbatim as a JSON string; a declared name with one of them disables the shortcut.
    """
    if '"ExecuteStmt"' in tree_json:
        return True  # CREATE TABLE … AS EXECUTE: see _Walk.statement
    for name in (*cardholders.names, *SAMPLED_VALUES):
        if any(ch in name for ch in '"\\') or any(ord(ch) < 0x20 for ch in name):
            return True
        if f'"{name}"' in tree_json:
            return True
    return False


def may_name(sql: str, cardholders: Cardholders) -> bool:
    """Whether ``sql``'s text could name a cardholder table or column (or a relation of
    sampled values) at all, before parsing it. An identifier is its text, case-folded, or a
    ``U&"…"`` escape; so a text without any of the names (compared in lower case, which
    only finds more) and without ``U&`` names none of them. (``EXECUTE`` is checked too:
    what a prepared statement returns can't be seen from here.)"""
    text = sql.lower()
    if "u&" in text or "execute" in text:  # U&"…" names; CREATE TABLE … AS EXECUTE (see statement())
        return True
    return any(name.lower() in text for name in (*cardholders.names, *SAMPLED_VALUES))


def check(sql: str, cardholders: Cardholders, writes_allowed: bool = False) -> None:
    """Raise :class:`LineageRefusal` if ``sql`` (one or more statements) uses a cardholder
    column other than as a plain projection (:class:`LineageWrite` if the first problem is
    a plain copy into a table; with ``writes_allowed`` those are let through)."""
    if not cardholders or not may_name(sql, cardholders):
        return
    tree_json = parse_sql_json(sql)
    if not may_touch(tree_json, cardholders):
        return
    tree = json.loads(tree_json)
    for raw in tree.get("stmts") or ():
        kind, body = unwrap(raw.get("stmt"))
        if kind is not None:
            _Walk(cardholders, writes_allowed).statement(kind, body, Level(None))


def _described(columns: Iterable[str]) -> str:
    return ", ".join(sorted(set(columns)))


class _Walk:
    """One statement's lineage walk."""

    def __init__(self, cardholders: Cardholders, writes_allowed: bool = False):
        self.cardholders = cardholders
        self.writes_allowed = writes_allowed
        self.copied = False  # a plain copy into a table was let through (writes_allowed)

    # ---- statements ---------------------------------------------------------------------

    def statement(self, kind: str, body: Json, level: Level) -> None:
        if kind == "SelectStmt":
            into = body.get("intoClause")
            outputs = self.select(body, level)
            if into:
                self.written(outputs, "into a new table (SELECT INTO)", table=True)
        elif kind in ("InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"):
            self.dml(kind, body, level)
        elif kind == "CreateTableAsStmt":
            inner_kind, inner = unwrap(body.get("query"))
            if inner_kind == "ExecuteStmt":
                raise LineageRefusal("CREATE TABLE … AS EXECUTE writes what a prepared statement returns, which "
                                     "this check can't see from here; write the query itself")
            self.written(self.query_outputs(inner_kind, inner, level),
                         "into a new table or materialized view (CREATE … AS)", table=True)
        elif kind == "CopyStmt":
            self.copy(body, level)
        elif kind in ("ExplainStmt", "PrepareStmt", "DeclareCursorStmt"):
            inner_kind, inner = unwrap(body.get("query"))
            if inner_kind is not None:
                self.statement(inner_kind, inner, level)
        elif kind == "CallStmt":
            self.use(body.get("funccall"), level, "a procedure's arguments (CALL)", "FuncCall")
        else:
            self.stored(body, level)

    def stored(self, body: Any, level: Level) -> None:
        """Any other statement: every query inside it (a view's, a rule's, an SQL-standard
        function body) is stored or run where this check can't follow its values, so none
        may read a cardholder column."""
        stack = [body]
        while stack:
            node = stack.pop()
            if isinstance(node, list):
                stack.extend(node)
                continue
            if not isinstance(node, dict):
                continue
            kind, inner = unwrap(node)
            if kind in QUERY_KINDS:
                outputs = self.query_outputs(kind, inner, level)
                self.written(outputs, "into a stored definition (a view, rule or function body)")
                continue
            if kind == "Constraint" and inner.get("contype") == "CONSTR_FOREIGN" and inner.get("pktable"):
                self.foreign_key(inner)
            stack.extend(v for v in node.values() if isinstance(v, (dict, list)))

    def foreign_key(self, constraint: Json) -> None:
        """A foreign key to a cardholder column is an existence oracle: each insert of a
        guessed card number succeeds or fails by whether a card has it."""
        table = constraint["pktable"]
        carried = self.cardholders.of_relation(table.get("schemaname"), table.get("relname", ""))
        referenced = strings(constraint.get("pk_attrs"))
        # Without a column list the key references the primary key, which may be one.
        hit = [carried[c] for c in referenced if c in carried] if referenced else list(carried.values())
        if hit:
            raise LineageRefusal(f"a foreign key to {_described(hit)} would tell which card numbers exist; "
                                 "reference another column")

    def query_outputs(self, kind: str | None, body: Any, level: Level) -> Item:
        """The output columns of a query of any kind (a write's: its RETURNING)."""
        if kind == "SelectStmt":
            return self.select(body, level)
        if kind in ("InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"):
            return self.dml(kind, body, level)
        if kind is not None:
            self.statement(kind, body, level)
        return Item("", {}, True)

    def written(self, outputs: Item, where: str, table: bool = False) -> None:
        """``outputs`` go somewhere other than the agent's result: ``table`` for a table."""
        carried = outputs.carried
        if carried:
            self.refuse_write(f"{_described(carried)} would be written {where}", table)

    def refuse_write(self, problem: str, table: bool) -> None:
        if not table:
            raise LineageRefusal(f"{problem}; a cardholder column may only be selected as it is, to be masked")
        if not self.writes_allowed:
            raise LineageWrite(f"{problem}; a cardholder column may only be selected as it is, to be masked")
        self.copied = True

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
                    raise LineageRefusal(f"{_described(arm.carried)} is combined by "
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
                    raise LineageRefusal(f"{_described(outputs.carried)} is compared by SELECT DISTINCT; a cardholder "
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
                                         f"{_described(outputs.carried)}; a cardholder column may not be sorted, "
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

    # ---- writes -------------------------------------------------------------------------

    def dml(self, kind: str, body: Json, outer: Level) -> Item:
        level = Level(outer)
        self.with_clause(body, level)
        target = self.relation(body["relation"], level) if body.get("relation") else Item("", {}, True)
        alias = ((body.get("relation") or {}).get("alias") or {}).get("aliasname")
        target = target.renamed(alias, [])
        table = body.get("relation", {}).get("relname", "the table")
        if kind == "InsertStmt":
            if body.get("selectStmt"):
                skind, sub = unwrap(body["selectStmt"])
                self.written(self.query_outputs(skind, sub, level), f"into {table} (INSERT)", table=True)
            level.items.extend((target, Item("excluded", {}, True)))
            conflict = body.get("onConflictClause") or {}
            self.assignments(conflict.get("targetList"), level, f"into {table} (ON CONFLICT DO UPDATE)")
            self.use(conflict.get("whereClause"), level, "a condition (ON CONFLICT … WHERE)")
        elif kind == "UpdateStmt":
            level.items.append(target)
            for item in body.get("fromClause") or ():
                self.from_item(item, level)
            self.assignments(body.get("targetList"), level, f"into {table} (UPDATE … SET)")
            self.use(body.get("whereClause"), level, "a condition (WHERE)")
        elif kind == "DeleteStmt":
            level.items.append(target)
            for item in body.get("usingClause") or ():
                self.from_item(item, level)
            self.use(body.get("whereClause"), level, "a condition (WHERE)")
        else:  # MERGE
            level.items.append(target)
            self.from_item(body.get("sourceRelation"), level)
            self.use(body.get("joinCondition"), level, "the join condition of MERGE (ON)")
            for clause in body.get("mergeWhenClauses") or ():
                ckind, when = unwrap(clause)
                if ckind != "MergeWhenClause":
                    continue
                self.use(when.get("condition"), level, "a condition (MERGE … WHEN … AND)")
                self.assignments(when.get("targetList"), level, f"into {table} (MERGE)")
                for value in when.get("values") or ():
                    taint = self.value(value, level, f"a value written into {table} (MERGE … INSERT)")
                    if taint is not None:
                        self.refuse_write(f"{taint} would be written into {table} (MERGE)", table=True)
        if self.copied and body.get("returningList"):
            # The rows it returns hold the copied card numbers under the table's own names.
            raise LineageRefusal("a statement that copies a cardholder column into a table may not return rows "
                                 "(RETURNING)")
        returned = Item("", {}, False)
        for node in body.get("returningList") or ():
            self.target(node, level, returned)
        if returned.carried:
            raise LineageRefusal(f"{_described(returned.carried)} is returned by RETURNING; select it afterwards "
                                 "instead")
        return returned

    def assignments(self, targets: Any, level: Level, where: str) -> None:
        for node in targets or ():
            kind, res = unwrap(node)
            if kind != "ResTarget":
                continue
            self.use(res.get("indirection"), level, where)
            taint = self.value(res.get("val"), level, where)
            if taint is not None:
                self.refuse_write(f"{taint} would be written {where}", table=True)

    def copy(self, body: Json, level: Level) -> None:
        if body.get("query"):
            kind, query = unwrap(body["query"])
            self.written(self.query_outputs(kind, query, level), "out by COPY (COPY results carry no column "
                                                                  "identity to mask by)")
            return
        if body.get("is_from") or not body.get("relation"):
            return
        carried = self.relation(body["relation"], level).carried
        columns = strings(body.get("attlist"))
        table = self.relation(body["relation"], level)
        if columns:
            carried = [t for c in columns if (t := table.columns.get(c)) is not None]
        if carried:
            raise LineageRefusal(f"COPY … TO would copy {_described(carried)} out (COPY results carry no column "
                                 "identity to mask by); select it instead")

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
                raise LineageRefusal(f"a whole row carrying {_described(carried)} is used in {where}; select the "
                                     "columns themselves")
            return None
        if len(names) == 1:
            taint = level.column(names[0])
            if taint is not None:
                return taint
            item = level.item(names[0])
            if item is not None and item.carried:
                raise LineageRefusal(f"{names[0]!r} is a whole row carrying {_described(item.carried)}, used in "
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
                    raise LineageRefusal(f"a subquery's value carrying {_described(outputs.carried)} is used in "
                                         f"{where}; select the column itself")
                stack.append((None, value.get("testexpr")))
                continue
            if kind in QUERY_KINDS:
                outputs = self.query_outputs(kind, value, level)
                if outputs.carried:
                    raise LineageRefusal(f"a query carrying {_described(outputs.carried)} is used in {where}")
                continue
            if kind == "RangeVar":
                continue
            stack.extend((None, v) for v in value.values() if isinstance(v, (dict, list)))
