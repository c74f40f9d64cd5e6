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

This module is the entry (:func:`check`) and the statements and writes;
:mod:`appliance.policy.lineage_query` follows queries and expressions, and
:mod:`appliance.policy.lineage_scope` resolves names.
"""

from __future__ import annotations

import json
from typing import Any

from pglast.parser import parse_sql_json

from appliance.policy.classify_kinds import QUERY_KINDS
from appliance.policy.classify_tree import Json, strings, unwrap
from appliance.policy.lineage_query import SAMPLED_VALUES, QueryLineage, described
from appliance.policy.lineage_scope import Cardholders, Item, Level, LineageRefusal, Unclear

__all__ = ["Cardholders", "LineageRefusal", "LineageWrite", "Unclear", "check", "may_touch"]


class LineageWrite(LineageRefusal):
    """A cardholder column copied, unchanged, into a table (INSERT, UPDATE, MERGE, CREATE
    TABLE AS, SELECT INTO): refused, or held where the policy's ``cardholder_writes`` says
    so (:func:`check` with ``writes_allowed`` tells whether that is the only problem)."""


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


class _Walk(QueryLineage):
    """One statement's lineage walk: statements and writes, on the query walk."""

    def __init__(self, cardholders: Cardholders, writes_allowed: bool = False):
        super().__init__(cardholders)
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
            raise LineageRefusal(f"a foreign key to {described(hit)} would tell which card numbers exist; "
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
            self.refuse_write(f"{described(carried)} would be written {where}", table)

    def refuse_write(self, problem: str, table: bool) -> None:
        if not table:
            raise LineageRefusal(f"{problem}; a cardholder column may only be selected as it is, to be masked")
        if not self.writes_allowed:
            raise LineageWrite(f"{problem}; a cardholder column may only be selected as it is, to be masked")
        self.copied = True

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
            raise LineageRefusal(f"{described(returned.carried)} is returned by RETURNING; select it afterwards "
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
        table = self.relation(body["relation"], level)
        columns = strings(body.get("attlist"))
        carried = [t for c in columns if (t := table.columns.get(c)) is not None] if columns else table.carried
        if carried:
            raise LineageRefusal(f"COPY … TO would copy {described(carried)} out (COPY results carry no column "
                                 "identity to mask by); select it instead")

