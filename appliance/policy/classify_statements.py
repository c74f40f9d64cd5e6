"""The statement walker: one handler per kind of statement, and the dispatch between them.

:class:`Walker` is the whole classifier walk for one statement: :meth:`Walker.statement`
sets the command tag from :mod:`appliance.policy.classify_kinds` and hands the statement
to its handler in :data:`STATEMENTS` (queries, COPY, EXPLAIN, PREPARE/EXECUTE, cursors,
transactions, SET, maintenance, …) or, for every kind without one, to the DDL and
privilege rules of :class:`~appliance.policy.classify_ddl.DdlWalker`. Queries and
expressions are walked by :class:`~appliance.policy.classify_walk.QueryWalker`; names
are resolved by :class:`~appliance.policy.classify_names.NameCollector`.
"""

from __future__ import annotations

from collections.abc import Callable

from appliance.model.decision import StatementClass as C
from appliance.policy.classify_ddl import DdlWalker
from appliance.policy.classify_kinds import EVERYTHING, SIMPLE_TAGS, TRANSACTION_TAGS, camel_words, object_word
from appliance.policy.classify_names import Scope
from appliance.policy.classify_tree import Json, strings, unwrap
from appliance.policy.patterns import quote_part

# Bound once: Python 3.11 compiles NAME.get(...) on a NAME bound by an import as a
# module-attribute load (a generic getattr and a new bound method per call), and
# Walker.statement looks a tag up for every statement.
_simple_tag = SIMPLE_TAGS.get
_transaction_tag = TRANSACTION_TAGS.get


class Walker(DdlWalker):
    """Collects one statement's classes and object names from its parse tree (dicts)."""

    def statement(self, kind: str, body: Json, scope: Scope) -> None:
        """Classify one top-level (or PREPAREd / EXPLAINed / DECLAREd) statement."""
        handler = STATEMENTS.get(kind)
        self.command = _simple_tag(kind) or camel_words(kind)
        if handler is not None:
            handler(self, body, scope)
        else:
            self.other(kind, body, scope)

    def st_select(self, body: Json, scope: Scope) -> None:
        self.command = "SELECT INTO" if body.get("intoClause") else "SELECT"
        self.select(body, scope, top=True)

    def st_create_table_as(self, body: Json, scope: Scope) -> None:
        objtype = body.get("objtype", "OBJECT_TABLE")
        if body.get("is_select_into"):
            self.command = "SELECT INTO"
        elif objtype == "OBJECT_TABLE":
            self.command = "CREATE TABLE AS"
        else:
            self.command = f"CREATE {object_word(objtype)}"
        self.classes.update((C.WRITE, C.DDL))
        into = body.get("into") or {}
        if into.get("rel"):
            self.relation(into["rel"])
        self.query(body.get("query"), scope, top=True)

    def st_copy(self, body: Json, scope: Scope) -> None:
        self.classes.add(C.COPY_IN if body.get("is_from") else C.COPY_OUT)
        inner = Scope(scope)
        if body.get("relation"):
            rel = self.target(body["relation"], inner)
            cols = strings(body.get("attlist"))
            for col in cols or [None]:  # type: ignore[list-item]
                self.column(rel or "?", col)
        if body.get("query"):
            self.query(body["query"], scope, top=True)
        self.expr(body.get("whereClause"), inner)

    def st_explain(self, body: Json, scope: Scope) -> None:
        analyze = False
        for option in body.get("options") or ():
            kind, opt = unwrap(option)
            if kind == "DefElem" and opt.get("defname") == "analyze":
                _, arg = unwrap(opt.get("arg"))
                value = arg.get("sval", "true") if isinstance(arg, dict) else "true"
                # Anything but a recognisable "false" is taken as ANALYZE: it runs the statement.
                analyze = str(value).lower() not in ("false", "off", "0", "no")
        inner_kind, inner_body = unwrap(body.get("query"))
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
            sub = Walker()
            sub.statement(inner_kind, inner_body, Scope(None, executes=False))
            self.relations |= sub.relations
            self.columns |= sub.columns
            self.functions |= sub.functions
            self.classes |= sub.classes & {C.FUNCTION_CALL, C.ROLE_CHANGE}
            self.command = "EXPLAIN"
        self.classes.add(C.READ)

    def st_prepare(self, body: Json, scope: Scope) -> None:
        inner_kind, inner_body = unwrap(body.get("query"))
        if inner_kind is not None:
            self.statement(inner_kind, inner_body, scope)
        self.classes.add(C.PREPARED)
        self.command = "PREPARE"
        self.prepared_name = body.get("name")

    def st_execute(self, body: Json, scope: Scope) -> None:
        self.classes.add(C.PREPARED)
        self.command = "EXECUTE"
        self.prepared_name = body.get("name")
        self.expr(body.get("params"), scope)

    def st_deallocate(self, body: Json, scope: Scope) -> None:
        self.classes.add(C.PREPARED)
        self.command = "DEALLOCATE ALL" if body.get("isall") or not body.get("name") else "DEALLOCATE"
        self.prepared_name = None if body.get("isall") else body.get("name")

    def st_declare(self, body: Json, scope: Scope) -> None:
        self.query(body.get("query"), scope, top=True)
        self.classes.add(C.CURSOR)
        self.command = "DECLARE CURSOR"

    def st_fetch(self, body: Json, scope: Scope) -> None:
        self.classes.add(C.CURSOR)
        self.command = "MOVE" if body.get("ismove") else "FETCH"

    def st_close(self, body: Json, scope: Scope) -> None:
        self.classes.add(C.CURSOR)

    def st_transaction(self, body: Json, scope: Scope) -> None:
        self.classes.add(C.TRANSACTION)
        self.command = _transaction_tag(body.get("kind", ""), "TRANSACTION")

    def st_set(self, body: Json, scope: Scope) -> None:
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

    def st_discard(self, body: Json, scope: Scope) -> None:
        target = body.get("target", "DISCARD_ALL")
        self.command = "DISCARD " + target.removeprefix("DISCARD_")
        self.classes.add(C.SESSION)
        if target == "DISCARD_ALL":
            self.classes.add(C.ROLE_CHANGE)  # DISCARD ALL includes SET SESSION AUTHORIZATION DEFAULT

    def st_session(self, body: Json, scope: Scope) -> None:
        self.classes.add(C.SESSION)

    def st_do(self, body: Json, scope: Scope) -> None:
        self.classes.add(C.DO_BLOCK)

    def st_call(self, body: Json, scope: Scope) -> None:
        self.classes.add(C.FUNCTION_CALL)
        self.expr(body.get("funccall"), scope, "FuncCall")

    def st_truncate(self, body: Json, scope: Scope) -> None:
        self.classes.add(C.TRUNCATE)
        for node in body.get("relations") or ():
            kind, rv = unwrap(node)
            if kind == "RangeVar":
                self.column(self.relation(rv), None)

    def st_lock(self, body: Json, scope: Scope) -> None:
        self.classes.add(C.LOCK)
        self.expr(body.get("relations"), scope)

    def st_maintenance(self, body: Json, scope: Scope) -> None:
        self.classes.add(C.MAINTENANCE)
        if self.command == "VACUUM":
            self.command = "VACUUM" if body.get("is_vacuumcmd") else "ANALYZE"
            for node in body.get("rels") or ():
                kind, vr = unwrap(node)
                if kind == "VacuumRelation" and vr.get("relation"):
                    rel = self.relation(vr["relation"])
                    for col in strings(vr.get("va_cols")):
                        self.column(rel, col)
        elif body.get("relation"):  # CLUSTER t, REINDEX TABLE/INDEX x
            self.relation(body["relation"])
        elif body.get("kind") == "REINDEX_OBJECT_SCHEMA" and body.get("name"):
            self.relations.add(quote_part(body["name"]) + ".*")
        if not self.relations:  # VACUUM, CLUSTER, REINDEX DATABASE, CHECKPOINT: everything
            self.relations.add(EVERYTHING)

    def st_refresh(self, body: Json, scope: Scope) -> None:
        self.classes.add(C.WRITE)
        if body.get("relation"):
            self.relation(body["relation"])


# How each statement type is walked; a type not here is DDL, privilege or utility (DdlWalker.other).
STATEMENTS: dict[str, Callable[[Walker, Json, Scope], None]] = {
    "SelectStmt": Walker.st_select,
    "InsertStmt": lambda w, body, scope: w.insert(body, scope),
    "UpdateStmt": lambda w, body, scope: w.update(body, scope),
    "DeleteStmt": lambda w, body, scope: w.delete(body, scope),
    "MergeStmt": lambda w, body, scope: w.merge(body, scope),
    "CreateTableAsStmt": Walker.st_create_table_as,
    "CopyStmt": Walker.st_copy,
    "ExplainStmt": Walker.st_explain,
    "PrepareStmt": Walker.st_prepare,
    "ExecuteStmt": Walker.st_execute,
    "DeallocateStmt": Walker.st_deallocate,
    "DeclareCursorStmt": Walker.st_declare,
    "FetchStmt": Walker.st_fetch,
    "ClosePortalStmt": Walker.st_close,
    "TransactionStmt": Walker.st_transaction,
    "VariableSetStmt": Walker.st_set,
    "VariableShowStmt": Walker.st_session,
    "DiscardStmt": Walker.st_discard,
    "ListenStmt": Walker.st_session,
    "UnlistenStmt": Walker.st_session,
    "NotifyStmt": Walker.st_session,
    "ConstraintsSetStmt": Walker.st_transaction,
    "DoStmt": Walker.st_do,
    "CallStmt": Walker.st_call,
    "TruncateStmt": Walker.st_truncate,
    "LockStmt": Walker.st_lock,
    "VacuumStmt": Walker.st_maintenance,
    "ClusterStmt": Walker.st_maintenance,
    "ReindexStmt": Walker.st_maintenance,
    "CheckPointStmt": Walker.st_maintenance,
    "LoadStmt": Walker.st_maintenance,
    "RefreshMatViewStmt": Walker.st_refresh,
}
