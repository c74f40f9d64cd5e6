"""Statement classification: what each statement of a SQL string does and which objects it names.

The policy engine never looks at SQL text itself; it looks at the :class:`Classification`
this module derives from PostgreSQL's own grammar (libpg_query, through pglast). One
Classification per statement of a (possibly multi-statement) string: its classes (read,
write, ddl, role_change, …), the relations, columns and functions it names, a short
command tag and the statement's own text.

Design points:

- **Fail closed.** Anything the parser rejects, and any surprise in walking its tree,
  yields a single UNPARSABLE classification — never an exception — and the policy blocks
  UNPARSABLE unless a rule explicitly allows it.
- **Supersets, never guesses.** Where the SQL alone can't say which table a column
  belongs to, every table it could belong to is named (``t.col`` for each candidate), or
  ``?.col`` when nothing in the SQL tells. A trailing ``*`` part means "every column" (or,
  in ``schema.*`` / ``*.*``, "every relation"): ``SELECT *``, whole-row references,
  ``DELETE``, ``TRUNCATE``, ``DROP SCHEMA … CASCADE``, ``VACUUM`` without a table. Naming a
  superset makes block rules match more and allow rules cover less — both the safe side.
- **Fast.** libpg_query's JSON output is parsed with the C ``json`` module and walked as
  plain dicts, which is several times cheaper than building pglast's Python AST objects;
  results are cached by statement text (:func:`classify`).

Names are as written (``schema.name`` when qualified, else bare); parts that contain
characters with a meaning in names or patterns (``.``, ``*``, ``"``, …) are double-quoted
the way PostgreSQL would write them.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import threading
from collections.abc import Iterable
from typing import Any

import pglast.ast as _ast
from pglast.parser import ParseError, parse_sql_json

from appliance.model.decision import Classification
from appliance.model.decision import StatementClass as C
from appliance.policy.patterns import qualified, quote_part

Json = dict[str, Any]

CACHE_SIZE = 4096
# Longer statements (bulk INSERTs with literal values) are classified every time: they are
# rarely repeated, and caching them would pin their text in memory.
CACHE_MAX_CHARS = 32 * 1024
# Deeply nested expressions (a+b+c+… with hundreds of terms) exceed Python's default
# recursion limit while decoding the parse tree; they are retried once under this limit.
_DEEP_RECURSION_LIMIT = 20000
_deep_lock = threading.Lock()

EVERYTHING = "*.*"  # the relation named by statements that act on no particular relation, or all


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


_INLINE = _inline_fields()

def _strings(items: Any) -> list[str]:
    """The values of a list of String nodes (a qualified name)."""
    return [item["String"].get("sval", "") for item in items or () if isinstance(item, dict) and "String" in item]


def _unwrap(node: Any) -> tuple[str | None, Any]:
    if isinstance(node, dict) and len(node) == 1:
        ((kind, body),) = node.items()
        if kind[:1].isupper() and isinstance(body, dict):
            return kind, body
    return None, node


# ---- object types -----------------------------------------------------------------------

_RELATION_OBJECTS = frozenset({
    "OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW", "OBJECT_INDEX", "OBJECT_SEQUENCE",
    "OBJECT_FOREIGN_TABLE", "OBJECT_TYPE", "OBJECT_DOMAIN", "OBJECT_COLLATION", "OBJECT_CONVERSION",
    "OBJECT_STATISTIC_EXT", "OBJECT_TSCONFIGURATION", "OBJECT_TSDICTIONARY", "OBJECT_TSPARSER",
    "OBJECT_TSTEMPLATE",
})
_FUNCTION_OBJECTS = frozenset({"OBJECT_FUNCTION", "OBJECT_PROCEDURE", "OBJECT_ROUTINE", "OBJECT_AGGREGATE"})
# Objects named "[schema.]table.name": the table is what the policy cares about.
_TABLE_MEMBER_OBJECTS = frozenset({"OBJECT_TRIGGER", "OBJECT_RULE", "OBJECT_POLICY", "OBJECT_TABCONSTRAINT"})
_OBJECT_WORDS = {
    "MATVIEW": "MATERIALIZED VIEW", "FOREIGN_TABLE": "FOREIGN TABLE", "STATISTIC_EXT": "STATISTICS",
    "TSCONFIGURATION": "TEXT SEARCH CONFIGURATION", "TSDICTIONARY": "TEXT SEARCH DICTIONARY",
    "TSPARSER": "TEXT SEARCH PARSER", "TSTEMPLATE": "TEXT SEARCH TEMPLATE", "FDW": "FOREIGN DATA WRAPPER",
    "FOREIGN_SERVER": "SERVER", "EVENT_TRIGGER": "EVENT TRIGGER", "ACCESS_METHOD": "ACCESS METHOD",
    "TABCONSTRAINT": "TABLE", "LARGEOBJECT": "LARGE OBJECT", "OPCLASS": "OPERATOR CLASS",
    "OPFAMILY": "OPERATOR FAMILY", "USER_MAPPING": "USER MAPPING", "DEFACL": "DEFAULT PRIVILEGES",
}
# ALTER TABLE sub-commands whose ``name`` is a column.
_COLUMN_SUBCOMMANDS = frozenset({
    "AT_ColumnDefault", "AT_CookedColumnDefault", "AT_DropNotNull", "AT_SetNotNull", "AT_SetExpression",
    "AT_DropExpression", "AT_CheckNotNull", "AT_SetStatistics", "AT_SetOptions", "AT_ResetOptions",
    "AT_SetStorage", "AT_SetCompression", "AT_DropColumn", "AT_AlterColumnType",
    "AT_AlterColumnGenericOptions", "AT_AddIdentity", "AT_SetIdentity", "AT_DropIdentity",
})


def _object_word(objtype: str | None) -> str:
    word = (objtype or "OBJECT_").removeprefix("OBJECT_")
    return _OBJECT_WORDS.get(word, word.replace("_", " "))


def _camel_words(kind: str) -> str:
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", kind.removesuffix("Stmt")).upper()


_TRANSACTION_TAGS = {
    "TRANS_STMT_BEGIN": "BEGIN", "TRANS_STMT_START": "START TRANSACTION", "TRANS_STMT_COMMIT": "COMMIT",
    "TRANS_STMT_ROLLBACK": "ROLLBACK", "TRANS_STMT_SAVEPOINT": "SAVEPOINT", "TRANS_STMT_RELEASE": "RELEASE",
    "TRANS_STMT_ROLLBACK_TO": "ROLLBACK", "TRANS_STMT_PREPARE": "PREPARE TRANSACTION",
    "TRANS_STMT_COMMIT_PREPARED": "COMMIT PREPARED", "TRANS_STMT_ROLLBACK_PREPARED": "ROLLBACK PREPARED",
}

_PRIVILEGE_STMTS = frozenset({
    "GrantStmt", "GrantRoleStmt", "CreateRoleStmt", "AlterRoleStmt", "AlterRoleSetStmt", "DropRoleStmt",
    "AlterDefaultPrivilegesStmt", "ReassignOwnedStmt", "DropOwnedStmt", "AlterOwnerStmt",
})
# Statements that act on every object (or objects nobody named): relation "*.*".
_GLOBAL_STMTS = frozenset({"ReassignOwnedStmt", "DropOwnedStmt", "DropdbStmt"})
_DDL_PREFIXES = ("Create", "Alter", "Drop", "Define", "Comment", "Rename", "Import", "SecLabel", "Refresh")
_DDL_STMTS = frozenset({
    "IndexStmt", "ViewStmt", "RuleStmt", "CompositeTypeStmt", "CreatedbStmt", "DropdbStmt", "CommentStmt",
    "SecLabelStmt", "DefineStmt", "RenameStmt", "ImportForeignSchemaStmt", "AlterOwnerStmt",
})
_SIMPLE_TAGS = {
    "CreateStmt": "CREATE TABLE", "IndexStmt": "CREATE INDEX", "ViewStmt": "CREATE VIEW",
    "RuleStmt": "CREATE RULE", "CreateSchemaStmt": "CREATE SCHEMA", "CreateSeqStmt": "CREATE SEQUENCE",
    "AlterSeqStmt": "ALTER SEQUENCE", "CreatedbStmt": "CREATE DATABASE", "DropdbStmt": "DROP DATABASE",
    "CreateTrigStmt": "CREATE TRIGGER", "CommentStmt": "COMMENT", "SecLabelStmt": "SECURITY LABEL",
    "CreatePLangStmt": "CREATE LANGUAGE", "CreateEnumStmt": "CREATE TYPE", "CreateRangeStmt": "CREATE TYPE",
    "CompositeTypeStmt": "CREATE TYPE", "AlterEnumStmt": "ALTER TYPE", "CreateStatsStmt": "CREATE STATISTICS",
    "CreateEventTrigStmt": "CREATE EVENT TRIGGER", "AlterEventTrigStmt": "ALTER EVENT TRIGGER",
    "GrantRoleStmt": "GRANT ROLE", "CreateRoleStmt": "CREATE ROLE", "AlterRoleStmt": "ALTER ROLE",
    "AlterRoleSetStmt": "ALTER ROLE", "DropRoleStmt": "DROP ROLE",
    "AlterDefaultPrivilegesStmt": "ALTER DEFAULT PRIVILEGES", "ReassignOwnedStmt": "REASSIGN OWNED",
    "DropOwnedStmt": "DROP OWNED", "ClusterStmt": "CLUSTER", "ReindexStmt": "REINDEX",
    "CheckPointStmt": "CHECKPOINT", "LoadStmt": "LOAD", "RefreshMatViewStmt": "REFRESH MATERIALIZED VIEW",
    "TruncateStmt": "TRUNCATE TABLE", "LockStmt": "LOCK TABLE", "CopyStmt": "COPY", "DoStmt": "DO",
    "CallStmt": "CALL", "PrepareStmt": "PREPARE", "ExecuteStmt": "EXECUTE", "DeclareCursorStmt": "DECLARE CURSOR",
    "ClosePortalStmt": "CLOSE CURSOR", "ListenStmt": "LISTEN", "UnlistenStmt": "UNLISTEN", "NotifyStmt": "NOTIFY",
    "VariableShowStmt": "SHOW", "ConstraintsSetStmt": "SET CONSTRAINTS", "AlterSystemStmt": "ALTER SYSTEM",
    "AlterDomainStmt": "ALTER DOMAIN", "CreateDomainStmt": "CREATE DOMAIN",
    "CreateForeignTableStmt": "CREATE FOREIGN TABLE", "ImportForeignSchemaStmt": "IMPORT FOREIGN SCHEMA",
    "CreateExtensionStmt": "CREATE EXTENSION", "AlterExtensionStmt": "ALTER EXTENSION",
    "AlterExtensionContentsStmt": "ALTER EXTENSION", "CreatePolicyStmt": "CREATE POLICY",
    "AlterPolicyStmt": "ALTER POLICY", "InsertStmt": "INSERT", "UpdateStmt": "UPDATE", "DeleteStmt": "DELETE",
    "MergeStmt": "MERGE", "PLAssignStmt": "ASSIGN", "ReturnStmt": "RETURN",
}


# ---- scopes -----------------------------------------------------------------------------


class _Scope:
    """One query level: its FROM items (for column resolution) and the CTE names it sees.

    ``items`` maps a name the SQL may qualify columns with (alias or table name) to the
    relations behind it: one for a table, none for a subquery/CTE/function (their own
    columns were collected when their query was walked), several for an aliased join.
    """

    __slots__ = ("ctes", "executes", "items", "outputs", "parent")

    def __init__(self, parent: _Scope | None, executes: bool | None = None):
        self.parent = parent
        self.items: list[tuple[str, tuple[str, ...]]] = []
        self.ctes: set[str] = set()
        self.outputs: frozenset[str] = frozenset()
        self.executes = executes if executes is not None else (parent.executes if parent else True)

    def is_cte(self, name: str) -> bool:
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.ctes:
                return True
            scope = scope.parent
        return False

    def lookup(self, key: str) -> tuple[str, ...] | None:
        scope: _Scope | None = self
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
        scope: _Scope | None = self
        while scope is not None:
            for _, item_rels in scope.items:
                any_item = True
                rels.update(item_rels)
            scope = scope.parent
        return rels, any_item


# ---- the walker -------------------------------------------------------------------------


class _Walker:
    """Collects one statement's classes and object names from its parse tree (dicts)."""

    def __init__(self) -> None:
        self.classes: set[C] = set()
        self.relations: set[str] = set()
        self.columns: set[str] = set()
        self.functions: set[str] = set()
        self.command = ""
        self.prepared_name: str | None = None

    # -- helpers --

    def data(self, scope: _Scope, cls: C) -> None:
        """READ / WRITE / LOCK happen only where the SQL runs now, not in a view or rule body."""
        if scope.executes:
            self.classes.add(cls)

    def relation(self, rangevar: Json) -> str:
        parts = [rangevar[k] for k in ("schemaname", "relname") if rangevar.get(k)]
        name = qualified(parts)
        self.relations.add(name)
        return name

    def object_name(self, parts: list[str]) -> str:
        name = qualified(parts)
        self.relations.add(name)
        return name

    def column(self, rel: str, col: str | None) -> None:
        self.columns.add(f"{rel}.{quote_part(col) if col is not None else '*'}")

    # -- expressions (iterative: expression trees can be thousands of levels deep) --

    def expr(self, value: Any, scope: _Scope, kind: str | None = None) -> None:
        stack: list[tuple[str | None, Any]] = [(kind, value)]
        while stack:
            kind, value = stack.pop()
            if isinstance(value, list):
                stack.extend((None, v) for v in value)
                continue
            if not isinstance(value, dict):
                continue
            if kind is None:
                kind, value = _unwrap(value)
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
                elif kind in _QUERY_KINDS:
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
                    stack.append((_INLINE.get((kind, field)) if kind else None, child))

    def func_call(self, body: Json) -> None:
        parts = _strings(body.get("funcname"))
        if not parts:
            return
        self.functions.add(qualified(parts))
        self.classes.add(C.FUNCTION_CALL)
        if parts[-1] == "set_config":
            # set_config('role', …) is SET ROLE in function form. Anything but a literal
            # first argument could name 'role' at run time, so it counts as one too.
            args = body.get("args") or []
            first_kind, first = _unwrap(args[0]) if args else (None, None)
            setting = None
            if first_kind == "A_Const" and isinstance(first.get("sval"), dict):
                setting = first["sval"].get("sval", "").strip().lower()
            if setting is None or setting in ("role", "session_authorization"):
                self.classes.add(C.ROLE_CHANGE)

    def column_ref(self, body: Json, scope: _Scope) -> None:
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

    # -- queries --

    def query(self, node: Any, outer: _Scope, top: bool = False) -> None:
        kind, body = _unwrap(node)
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

    def with_clause(self, body: Json, scope: _Scope) -> None:
        wc = body.get("withClause")
        if not wc:
            return
        ctes = [b for k, b in (_unwrap(c) for c in wc.get("ctes") or ()) if k == "CommonTableExpr"]
        if wc.get("recursive"):
            scope.ctes.update(c.get("ctename", "") for c in ctes)
        for cte in ctes:
            # A non-recursive CTE sees only the ones before it: a later CTE's name inside
            # it still means the real table of that name.
            self.query(cte.get("ctequery"), scope)
            scope.ctes.add(cte.get("ctename", ""))

    def select(self, body: Json, outer: _Scope, top: bool) -> None:
        scope = _Scope(outer)
        self.with_clause(body, scope)
        if body.get("op", "SETOP_NONE") != "SETOP_NONE":
            for arm in ("larg", "rarg"):
                if body.get(arm):
                    self.select(body[arm], scope, top)
            tail = _Scope(scope)
            tail.outputs = _AnyName()  # ORDER BY of a UNION names output columns only
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
            ordering = _Scope(scope)
            ordering.outputs = outputs
        else:
            ordering = scope
        self.expr(body.get("sortClause"), ordering)

    def from_items(self, items: Iterable[Any], scope: _Scope) -> None:
        for item in items:
            self.from_item(item, scope)

    def from_item(self, node: Any, scope: _Scope) -> None:
        kind, body = _unwrap(node)
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
            for col in _strings(body.get("usingClause")):
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

    def target(self, rangevar: Json | None, scope: _Scope) -> str | None:
        """The table an INSERT/UPDATE/DELETE/MERGE writes, made a FROM item of ``scope``."""
        if not rangevar:
            return None
        rel = self.relation(rangevar)
        alias = (rangevar.get("alias") or {}).get("aliasname")
        scope.items.append((alias or rangevar.get("relname", ""), (rel,)))
        return rel

    def returning(self, body: Json, scope: _Scope) -> None:
        # RETURNING hands rows back: what a write returns is read.
        if body.get("returningList"):
            self.data(scope, C.READ)
            self.expr(body["returningList"], scope)

    def set_targets(self, targets: Iterable[Any], rel: str | None, scope: _Scope) -> None:
        for t in targets or ():
            kind, res = _unwrap(t)
            if kind != "ResTarget":
                continue
            if rel is not None and res.get("name"):
                self.column(rel, res["name"])
            self.expr(res.get("indirection"), scope)
            self.expr(res.get("val"), scope)

    def insert(self, body: Json, outer: _Scope) -> None:
        scope = _Scope(outer)
        self.with_clause(body, scope)
        self.data(scope, C.WRITE)
        if body.get("selectStmt"):
            self.query(body["selectStmt"], scope)  # the target is not visible to its source
        target = _Scope(scope)
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

    def update(self, body: Json, outer: _Scope) -> None:
        scope = _Scope(outer)
        self.with_clause(body, scope)
        self.data(scope, C.WRITE)
        rel = self.target(body.get("relation"), scope)
        if body.get("fromClause"):
            self.data(scope, C.READ)
            self.from_items(body["fromClause"], scope)
        self.set_targets(body.get("targetList"), rel, scope)
        self.expr(body.get("whereClause"), scope)
        self.returning(body, scope)

    def delete(self, body: Json, outer: _Scope) -> None:
        scope = _Scope(outer)
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

    def merge(self, body: Json, outer: _Scope) -> None:
        scope = _Scope(outer)
        self.with_clause(body, scope)
        self.data(scope, C.WRITE)
        self.data(scope, C.READ)  # MERGE always reads its source
        rel = self.target(body.get("relation"), scope)
        if body.get("sourceRelation"):
            self.from_item(body["sourceRelation"], scope)
        self.expr(body.get("joinCondition"), scope)
        for clause in body.get("mergeWhenClauses") or ():
            kind, when = _unwrap(clause)
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

    # -- statements --

    def statement(self, kind: str, body: Json, scope: _Scope) -> None:
        """Classify one top-level (or PREPAREd / EXPLAINed / DECLAREd) statement."""
        handler = _STATEMENTS.get(kind)
        self.command = _SIMPLE_TAGS.get(kind) or _camel_words(kind)
        if handler is not None:
            handler(self, body, scope)
        else:
            self.other(kind, body, scope)

    def st_select(self, body: Json, scope: _Scope) -> None:
        self.command = "SELECT INTO" if body.get("intoClause") else "SELECT"
        self.select(body, scope, top=True)

    def st_create_table_as(self, body: Json, scope: _Scope) -> None:
        objtype = body.get("objtype", "OBJECT_TABLE")
        if body.get("is_select_into"):
            self.command = "SELECT INTO"
        elif objtype == "OBJECT_TABLE":
            self.command = "CREATE TABLE AS"
        else:
            self.command = f"CREATE {_object_word(objtype)}"
        self.classes.update((C.WRITE, C.DDL))
        into = body.get("into") or {}
        if into.get("rel"):
            self.relation(into["rel"])
        self.query(body.get("query"), scope, top=True)

    def st_copy(self, body: Json, scope: _Scope) -> None:
        self.classes.add(C.COPY_IN if body.get("is_from") else C.COPY_OUT)
        inner = _Scope(scope)
        if body.get("relation"):
            rel = self.target(body["relation"], inner)
            cols = _strings(body.get("attlist"))
            for col in cols or [None]:  # type: ignore[list-item]
                self.column(rel or "?", col)
        if body.get("query"):
            self.query(body["query"], scope, top=True)
        self.expr(body.get("whereClause"), inner)

    def st_explain(self, body: Json, scope: _Scope) -> None:
        analyze = False
        for option in body.get("options") or ():
            kind, opt = _unwrap(option)
            if kind == "DefElem" and opt.get("defname") == "analyze":
                _, arg = _unwrap(opt.get("arg"))
                value = arg.get("sval", "true") if isinstance(arg, dict) else "true"
                # Anything but a recognisable "false" is taken as ANALYZE: it runs the statement.
                analyze = str(value).lower() not in ("false", "off", "0", "no")
        inner_kind, inner_body = _unwrap(body.get("query"))
        if inner_kind is None:
            self.command = "EXPLAIN"
            self.classes.add(C.READ)
            return
        if analyze:
            self.statement(inner_kind, inner_body, scope)
            self.command = "EXPLAIN ANALYZE"
        else:
            # Planning doesn't run the statement: its objects count, its classes don't
            # (except calls, which planning may evaluate).
            sub = _Walker()
            sub.statement(inner_kind, inner_body, _Scope(None, executes=False))
            self.relations |= sub.relations
            self.columns |= sub.columns
            self.functions |= sub.functions
            self.classes |= sub.classes & {C.FUNCTION_CALL, C.ROLE_CHANGE}
            self.command = "EXPLAIN"
        self.classes.add(C.READ)

    def st_prepare(self, body: Json, scope: _Scope) -> None:
        inner_kind, inner_body = _unwrap(body.get("query"))
        if inner_kind is not None:
            self.statement(inner_kind, inner_body, scope)
        self.classes.add(C.PREPARED)
        self.command = "PREPARE"
        self.prepared_name = body.get("name")

    def st_execute(self, body: Json, scope: _Scope) -> None:
        self.classes.add(C.PREPARED)
        self.command = "EXECUTE"
        self.prepared_name = body.get("name")
        self.expr(body.get("params"), scope)

    def st_deallocate(self, body: Json, scope: _Scope) -> None:
        self.classes.add(C.PREPARED)
        self.command = "DEALLOCATE ALL" if body.get("isall") or not body.get("name") else "DEALLOCATE"
        self.prepared_name = None if body.get("isall") else body.get("name")

    def st_declare(self, body: Json, scope: _Scope) -> None:
        self.query(body.get("query"), scope, top=True)
        self.classes.add(C.CURSOR)
        self.command = "DECLARE CURSOR"

    def st_fetch(self, body: Json, scope: _Scope) -> None:
        self.classes.add(C.CURSOR)
        self.command = "MOVE" if body.get("ismove") else "FETCH"

    def st_close(self, body: Json, scope: _Scope) -> None:
        self.classes.add(C.CURSOR)

    def st_transaction(self, body: Json, scope: _Scope) -> None:
        self.classes.add(C.TRANSACTION)
        self.command = _TRANSACTION_TAGS.get(body.get("kind", ""), "TRANSACTION")

    def st_set(self, body: Json, scope: _Scope) -> None:
        kind = body.get("kind", "")
        name = (body.get("name") or "").lower()
        self.command = "RESET" if kind.startswith("VAR_RESET") else "SET"
        if kind == "VAR_RESET_ALL":
            self.classes.update((C.SESSION, C.ROLE_CHANGE))  # RESET ALL resets role too
        elif name in ("role", "session_authorization"):
            self.classes.add(C.ROLE_CHANGE)
        elif name == "transaction":
            self.classes.add(C.TRANSACTION)
        else:
            self.classes.add(C.SESSION)
        self.expr(body.get("args"), scope)

    def st_discard(self, body: Json, scope: _Scope) -> None:
        target = body.get("target", "DISCARD_ALL")
        self.command = "DISCARD " + target.removeprefix("DISCARD_")
        self.classes.add(C.SESSION)
        if target == "DISCARD_ALL":
            self.classes.add(C.ROLE_CHANGE)  # DISCARD ALL includes SET SESSION AUTHORIZATION DEFAULT

    def st_session(self, body: Json, scope: _Scope) -> None:
        self.classes.add(C.SESSION)

    def st_do(self, body: Json, scope: _Scope) -> None:
        self.classes.add(C.DO_BLOCK)

    def st_call(self, body: Json, scope: _Scope) -> None:
        self.classes.add(C.FUNCTION_CALL)
        self.expr(body.get("funccall"), scope, "FuncCall")

    def st_truncate(self, body: Json, scope: _Scope) -> None:
        self.classes.add(C.TRUNCATE)
        for node in body.get("relations") or ():
            kind, rv = _unwrap(node)
            if kind == "RangeVar":
                self.column(self.relation(rv), None)

    def st_lock(self, body: Json, scope: _Scope) -> None:
        self.classes.add(C.LOCK)
        self.expr(body.get("relations"), scope)

    def st_maintenance(self, body: Json, scope: _Scope) -> None:
        self.classes.add(C.MAINTENANCE)
        if self.command == "VACUUM":
            self.command = "VACUUM" if body.get("is_vacuumcmd") else "ANALYZE"
            for node in body.get("rels") or ():
                kind, vr = _unwrap(node)
                if kind == "VacuumRelation" and vr.get("relation"):
                    rel = self.relation(vr["relation"])
                    for col in _strings(vr.get("va_cols")):
                        self.column(rel, col)
        elif body.get("relation"):  # CLUSTER t, REINDEX TABLE/INDEX x
            self.relation(body["relation"])
        elif body.get("kind") == "REINDEX_OBJECT_SCHEMA" and body.get("name"):
            self.relations.add(quote_part(body["name"]) + ".*")
        if not self.relations:  # VACUUM, CLUSTER, REINDEX DATABASE, CHECKPOINT: everything
            self.relations.add(EVERYTHING)

    def st_refresh(self, body: Json, scope: _Scope) -> None:
        self.classes.add(C.WRITE)
        if body.get("relation"):
            self.relation(body["relation"])

    def other(self, kind: str, body: Json, scope: _Scope) -> None:
        """DDL, privileges and whatever else: classes by statement type, objects by name."""
        if kind in _PRIVILEGE_STMTS:
            self.classes.add(C.PRIVILEGE)
            if kind in ("AlterOwnerStmt", "DropOwnedStmt", "ReassignOwnedStmt"):
                self.classes.add(C.DDL)
        elif kind in _DDL_STMTS or kind.startswith(_DDL_PREFIXES):
            self.classes.add(C.DDL)
        else:
            self.classes.add(C.UTILITY)
        self.objects(kind, body)
        # Bodies of views, rules, SQL functions, policies and defaults are stored, not run.
        self.expr({kind: body}, _Scope(None, executes=False))
        if kind in _GLOBAL_STMTS or (not self.relations and self.classes & {C.DDL, C.PRIVILEGE}):
            self.relations.add(EVERYTHING)

    def named_object(self, objtype: str | None, node: Any) -> None:
        """A DDL/COMMENT/GRANT object, by its object type: relation, column, function or schema."""
        kind, body = _unwrap(node)
        if kind == "ObjectWithArgs":
            parts = _strings(body.get("objname"))
            if parts and objtype in _FUNCTION_OBJECTS:
                self.functions.add(self.object_name(parts))
        elif kind == "TypeName":
            parts = _strings(body.get("names"))
            if parts:
                self.object_name(parts)
        elif kind == "List":
            parts = _strings(body.get("items"))
            if not parts:
                return
            if objtype in _TABLE_MEMBER_OBJECTS and len(parts) > 1:
                self.object_name(parts[:-1])
            elif objtype == "OBJECT_COLUMN" and len(parts) > 1:
                self.column(self.object_name(parts[:-1]), parts[-1])
            elif objtype in _RELATION_OBJECTS:
                self.object_name(parts)
        elif kind == "String" and objtype == "OBJECT_SCHEMA":
            self.relations.add(quote_part(body.get("sval", "")) + ".*")
        elif kind == "RangeVar":
            self.relation(body)

    def objects(self, kind: str, body: Json) -> None:
        if kind == "DropStmt":
            objtype = body.get("removeType")
            self.command = f"DROP {_object_word(objtype)}"
            for obj in body.get("objects") or ():
                self.named_object(objtype, obj)
        elif kind in ("CommentStmt", "SecLabelStmt"):
            self.named_object(body.get("objtype"), body.get("object"))
        elif kind in ("AlterOwnerStmt", "AlterObjectSchemaStmt", "RenameStmt", "AlterExtensionContentsStmt"):
            objtype = body.get("objectType") or body.get("renameType") or body.get("objtype")
            # relationType means something only when renaming a column or constraint of it.
            rel_type = body.get("relationType") if kind == "RenameStmt" and objtype in (
                "OBJECT_COLUMN", "OBJECT_TABCONSTRAINT") else None
            self.command = f"ALTER {_object_word(rel_type or objtype)}"
            if kind == "AlterExtensionContentsStmt":
                self.command = "ALTER EXTENSION"
            rel = self.relation(body["relation"]) if body.get("relation") else None
            if body.get("object") is not None:
                self.named_object(objtype, body["object"])
            if kind == "RenameStmt" and objtype == "OBJECT_SCHEMA":
                self.relations.add(quote_part(body.get("subname") or "") + ".*")
                self.relations.add(quote_part(body.get("newname") or "") + ".*")
            if kind == "RenameStmt" and rel is not None and objtype == "OBJECT_COLUMN" and body.get("subname"):
                self.column(rel, body["subname"])
                self.column(rel, body.get("newname"))
            if kind == "AlterObjectSchemaStmt" and body.get("newschema"):
                # Moving an object into another schema puts it there: name it there too.
                self.relations.add(quote_part(body["newschema"]) + ".*")
        elif kind == "AlterTableStmt":
            self.command = f"ALTER {_object_word(body.get('objtype', 'OBJECT_TABLE'))}"
            rel = self.relation(body["relation"]) if body.get("relation") else None
            if rel is not None:
                for cmd in body.get("cmds") or ():
                    ckind, c = _unwrap(cmd)
                    if ckind != "AlterTableCmd":
                        continue
                    if c.get("subtype") in _COLUMN_SUBCOMMANDS and c.get("name"):
                        self.column(rel, c["name"])
                    elif c.get("subtype") == "AT_AddColumn":
                        dkind, d = _unwrap(c.get("def"))
                        if dkind == "ColumnDef" and d.get("colname"):
                            self.column(rel, d["colname"])
        elif kind == "CreateFunctionStmt":
            self.command = "CREATE PROCEDURE" if body.get("is_procedure") else "CREATE FUNCTION"
            parts = _strings(body.get("funcname"))
            if parts:
                self.functions.add(self.object_name(parts))
        elif kind == "AlterFunctionStmt":
            objtype = body.get("objtype", "OBJECT_FUNCTION")
            self.command = f"ALTER {_object_word(objtype)}"
            self.named_object(objtype, body.get("func"))
        elif kind == "CreateTrigStmt":
            parts = _strings(body.get("funcname"))
            if parts:
                self.functions.add(qualified(parts))
        elif kind == "DefineStmt":
            self.command = f"CREATE {_object_word(body.get('kind'))}"
            parts = _strings(body.get("defnames"))
            if parts:
                self.object_name(parts)
        elif kind in ("CreateEnumStmt", "CreateRangeStmt", "AlterEnumStmt", "AlterDomainStmt"):
            parts = _strings(body.get("typeName"))
            if parts:
                self.object_name(parts)
        elif kind == "CreateDomainStmt":
            parts = _strings(body.get("domainname"))
            if parts:
                self.object_name(parts)
        elif kind == "CreateSchemaStmt" and body.get("schemaname"):
            self.relations.add(quote_part(body["schemaname"]) + ".*")
        elif kind == "ImportForeignSchemaStmt" and body.get("local_schema"):
            self.relations.add(quote_part(body["local_schema"]) + ".*")
        elif kind == "CreateExtensionStmt" or kind == "AlterExtensionStmt":
            for option in body.get("options") or ():
                okind, opt = _unwrap(option)
                if okind == "DefElem" and opt.get("defname") == "schema":
                    _, arg = _unwrap(opt.get("arg"))
                    if isinstance(arg, dict) and arg.get("sval"):
                        self.relations.add(quote_part(arg["sval"]) + ".*")
        elif kind == "GrantStmt":
            self.grant(body)
        elif kind == "AlterDefaultPrivilegesStmt":
            for option in body.get("options") or ():
                okind, opt = _unwrap(option)
                if okind == "DefElem" and opt.get("defname") == "schemas":
                    okind, arg = _unwrap(opt.get("arg"))
                    for schema in _strings(arg.get("items") if okind == "List" else [opt.get("arg")]):
                        self.relations.add(quote_part(schema) + ".*")

    def grant(self, body: Json) -> None:
        self.command = "GRANT" if body.get("is_grant") else "REVOKE"
        objtype = body.get("objtype")
        in_schema = body.get("targtype") == "ACL_TARGET_ALL_IN_SCHEMA"
        rels: list[str] = []
        for obj in body.get("objects") or ():
            kind, o = _unwrap(obj)
            if kind == "String" and (in_schema or objtype == "OBJECT_SCHEMA"):
                self.relations.add(quote_part(o.get("sval", "")) + ".*")
            elif kind == "RangeVar":
                rels.append(self.relation(o))
            else:
                self.named_object(objtype, obj)
        for priv in body.get("privileges") or ():
            kind, p = _unwrap(priv)
            if kind == "AccessPriv":
                for col in _strings(p.get("cols")):
                    for rel in rels:
                        self.column(rel, col)


class _AnyName(frozenset):  # type: ignore[type-arg]
    """An ``outputs`` set that contains every name: where only output columns are visible."""

    def __contains__(self, item: object) -> bool:
        return True


_QUERY_KINDS = frozenset({"SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})

_STATEMENTS = {
    "SelectStmt": _Walker.st_select,
    "InsertStmt": lambda w, body, scope: w.insert(body, scope),
    "UpdateStmt": lambda w, body, scope: w.update(body, scope),
    "DeleteStmt": lambda w, body, scope: w.delete(body, scope),
    "MergeStmt": lambda w, body, scope: w.merge(body, scope),
    "CreateTableAsStmt": _Walker.st_create_table_as,
    "CopyStmt": _Walker.st_copy,
    "ExplainStmt": _Walker.st_explain,
    "PrepareStmt": _Walker.st_prepare,
    "ExecuteStmt": _Walker.st_execute,
    "DeallocateStmt": _Walker.st_deallocate,
    "DeclareCursorStmt": _Walker.st_declare,
    "FetchStmt": _Walker.st_fetch,
    "ClosePortalStmt": _Walker.st_close,
    "TransactionStmt": _Walker.st_transaction,
    "VariableSetStmt": _Walker.st_set,
    "VariableShowStmt": _Walker.st_session,
    "DiscardStmt": _Walker.st_discard,
    "ListenStmt": _Walker.st_session,
    "UnlistenStmt": _Walker.st_session,
    "NotifyStmt": _Walker.st_session,
    "ConstraintsSetStmt": _Walker.st_transaction,
    "DoStmt": _Walker.st_do,
    "CallStmt": _Walker.st_call,
    "TruncateStmt": _Walker.st_truncate,
    "LockStmt": _Walker.st_lock,
    "VacuumStmt": _Walker.st_maintenance,
    "ClusterStmt": _Walker.st_maintenance,
    "ReindexStmt": _Walker.st_maintenance,
    "CheckPointStmt": _Walker.st_maintenance,
    "LoadStmt": _Walker.st_maintenance,
    "RefreshMatViewStmt": _Walker.st_refresh,
}


# ---- entry points -----------------------------------------------------------------------


def _unparsable(sql: str, error: str) -> tuple[Classification, ...]:
    return (Classification(frozenset({C.UNPARSABLE}), command="UNPARSABLE", text=sql, error=error),)


def _classify_tree(sql: str) -> tuple[Classification, ...]:
    tree = json.loads(parse_sql_json(sql))
    stmts = tree.get("stmts") or []
    if not stmts:
        return (Classification(frozenset({C.EMPTY}), text=sql),)
    raw = sql.encode("utf-8")  # statement offsets are byte offsets into the UTF-8 text
    out = []
    for raw_stmt in stmts:
        start = raw_stmt.get("stmt_location", 0)
        length = raw_stmt.get("stmt_len", 0)
        text = (raw[start:start + length] if length else raw[start:]).decode("utf-8").strip()
        kind, body = _unwrap(raw_stmt.get("stmt"))
        if kind is None:
            raise ValueError("statement without a type")
        walker = _Walker()
        walker.statement(kind, body, _Scope(None))
        if not walker.classes:
            walker.classes.add(C.UTILITY)
        out.append(Classification(
            classes=frozenset(walker.classes), relations=frozenset(walker.relations),
            columns=frozenset(walker.columns), functions=frozenset(walker.functions),
            command=walker.command, text=text, prepared_name=walker.prepared_name))
    return tuple(out)


def classify_uncached(sql: str) -> tuple[Classification, ...]:
    """Classify every statement of ``sql``; never raises (failures are UNPARSABLE)."""
    try:
        if "\x00" in sql:
            # The server reads a Query as a C string; text after a NUL is not what it runs.
            return _unparsable(sql, "the statement contains a NUL character")
        try:
            return _classify_tree(sql)
        except RecursionError:
            pass
        with _deep_lock:
            # Deep but legitimate expressions: retry once with room to recurse.
            old = sys.getrecursionlimit()
            sys.setrecursionlimit(max(old, _DEEP_RECURSION_LIMIT))
            try:
                return _classify_tree(sql)
            finally:
                sys.setrecursionlimit(old)
    except ParseError as exc:
        return _unparsable(sql, str(exc))
    except RecursionError:
        return _unparsable(sql, "the statement is nested too deeply to classify")
    except Exception as exc:  # noqa: BLE001 -- fail closed: a classifier surprise must not let SQL through
        return _unparsable(sql, f"could not classify the statement ({type(exc).__name__}: {exc})")


_classify_cached = functools.lru_cache(maxsize=CACHE_SIZE)(classify_uncached)


def classify(sql: str) -> tuple[Classification, ...]:
    """One :class:`Classification` per statement of ``sql`` (one EMPTY for blank text).

    Cached by text: a repeated statement costs a dictionary lookup.
    """
    if len(sql) > CACHE_MAX_CHARS:
        return classify_uncached(sql)
    return _classify_cached(sql)


def cache_clear() -> None:
    _classify_cached.cache_clear()
