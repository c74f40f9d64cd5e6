"""DDL, privilege and utility statements: classes by statement type, objects by name.

Statements without a handler of their own in :mod:`appliance.policy.classify_statements`
(CREATE/ALTER/DROP of anything, COMMENT, SECURITY LABEL, GRANT/REVOKE, role and owner
changes, …) are classified by the tables in :mod:`appliance.policy.classify_kinds`, and
the objects they name are found here: relations, columns, functions and whole schemas
(``schema.*``), as their object type says. Bodies they store (views, rules, SQL
functions, policies, defaults) are walked for names but don't run now.
"""

from __future__ import annotations

from typing import Any

from appliance.model.decision import StatementClass as C
from appliance.policy.classify_kinds import (
    COLUMN_SUBCOMMANDS,
    DDL_PREFIXES,
    DDL_STMTS,
    EVERYTHING,
    FUNCTION_OBJECTS,
    GLOBAL_STMTS,
    PRIVILEGE_STMTS,
    RELATION_OBJECTS,
    TABLE_MEMBER_OBJECTS,
    object_word,
)
from appliance.policy.classify_names import Scope
from appliance.policy.classify_tree import Json, strings, unwrap
from appliance.policy.classify_walk import QueryWalker
from appliance.policy.patterns import qualified, quote_part


class DdlWalker(QueryWalker):
    """Adds the classification of DDL, privilege and utility statements to the walk."""

    def other(self, kind: str, body: Json, scope: Scope) -> None:
        """DDL, privileges and whatever else: classes by statement type, objects by name."""
        if kind in PRIVILEGE_STMTS:
            self.classes.add(C.PRIVILEGE)
            if kind in ("AlterOwnerStmt", "DropOwnedStmt", "ReassignOwnedStmt"):
                self.classes.add(C.DDL)
        elif kind in DDL_STMTS or kind.startswith(DDL_PREFIXES):
            self.classes.add(C.DDL)
        else:
            self.classes.add(C.UTILITY)
        self.objects(kind, body)
        # Bodies of views, rules, SQL functions, policies and defaults are stored, not run.
        self.expr({kind: body}, Scope(None, executes=False))
        if kind in GLOBAL_STMTS or (not self.relations and self.classes & {C.DDL, C.PRIVILEGE}):
            self.relations.add(EVERYTHING)

    def named_object(self, objtype: str | None, node: Any) -> None:
        """A DDL/COMMENT/GRANT object, by its object type: relation, column, function or schema."""
        kind, body = unwrap(node)
        if kind == "ObjectWithArgs":
            parts = strings(body.get("objname"))
            if parts and objtype in FUNCTION_OBJECTS:
                self.functions.add(self.object_name(parts))
        elif kind == "TypeName":
            parts = strings(body.get("names"))
            if parts:
                self.object_name(parts)
        elif kind == "List":
            parts = strings(body.get("items"))
            if not parts:
                return
            if objtype in TABLE_MEMBER_OBJECTS and len(parts) > 1:
                self.object_name(parts[:-1])
            elif objtype == "OBJECT_COLUMN" and len(parts) > 1:
                self.column(self.object_name(parts[:-1]), parts[-1])
            elif objtype in RELATION_OBJECTS:
                self.object_name(parts)
        elif kind == "String" and objtype == "OBJECT_SCHEMA":
            self.relations.add(quote_part(body.get("sval", "")) + ".*")
        elif kind == "RangeVar":
            self.relation(body)

    def objects(self, kind: str, body: Json) -> None:
        """The objects a DDL/privilege statement of type ``kind`` names, and its exact tag."""
        if kind == "DropStmt":
            objtype = body.get("removeType")
            self.command = f"DROP {object_word(objtype)}"
            for obj in body.get("objects") or ():
                self.named_object(objtype, obj)
        elif kind in ("CommentStmt", "SecLabelStmt"):
            self.named_object(body.get("objtype"), body.get("object"))
        elif kind in ("AlterOwnerStmt", "AlterObjectSchemaStmt", "RenameStmt", "AlterExtensionContentsStmt"):
            objtype = body.get("objectType") or body.get("renameType") or body.get("objtype")
            # relationType means something only when renaming a column or constraint of it.
            rel_type = body.get("relationType") if kind == "RenameStmt" and objtype in (
                "OBJECT_COLUMN", "OBJECT_TABCONSTRAINT") else None
            self.command = f"ALTER {object_word(rel_type or objtype)}"
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
            self.command = f"ALTER {object_word(body.get('objtype', 'OBJECT_TABLE'))}"
            rel = self.relation(body["relation"]) if body.get("relation") else None
            if rel is not None:
                for cmd in body.get("cmds") or ():
                    ckind, c = unwrap(cmd)
                    if ckind != "AlterTableCmd":
                        continue
                    if c.get("subtype") in COLUMN_SUBCOMMANDS and c.get("name"):
                        self.column(rel, c["name"])
                    elif c.get("subtype") == "AT_AddColumn":
                        dkind, d = unwrap(c.get("def"))
                        if dkind == "ColumnDef" and d.get("colname"):
                            self.column(rel, d["colname"])
        elif kind == "CreateFunctionStmt":
            self.command = "CREATE PROCEDURE" if body.get("is_procedure") else "CREATE FUNCTION"
            parts = strings(body.get("funcname"))
            if parts:
                self.functions.add(self.object_name(parts))
        elif kind == "AlterFunctionStmt":
            objtype = body.get("objtype", "OBJECT_FUNCTION")
            self.command = f"ALTER {object_word(objtype)}"
            self.named_object(objtype, body.get("func"))
        elif kind == "CreateTrigStmt":
            parts = strings(body.get("funcname"))
            if parts:
                self.functions.add(qualified(parts))
        elif kind == "DefineStmt":
            self.command = f"CREATE {object_word(body.get('kind'))}"
            parts = strings(body.get("defnames"))
            if parts:
                self.object_name(parts)
        elif kind in ("CreateEnumStmt", "CreateRangeStmt", "AlterEnumStmt", "AlterDomainStmt"):
            parts = strings(body.get("typeName"))
            if parts:
                self.object_name(parts)
        elif kind == "CreateDomainStmt":
            parts = strings(body.get("domainname"))
            if parts:
                self.object_name(parts)
        elif kind == "CreateSchemaStmt" and body.get("schemaname"):
            self.relations.add(quote_part(body["schemaname"]) + ".*")
        elif kind == "ImportForeignSchemaStmt" and body.get("local_schema"):
            self.relations.add(quote_part(body["local_schema"]) + ".*")
        elif kind == "CreateExtensionStmt" or kind == "AlterExtensionStmt":
            for option in body.get("options") or ():
                okind, opt = unwrap(option)
                if okind == "DefElem" and opt.get("defname") == "schema":
                    _, arg = unwrap(opt.get("arg"))
                    if isinstance(arg, dict) and arg.get("sval"):
                        self.relations.add(quote_part(arg["sval"]) + ".*")
        elif kind == "GrantStmt":
            self.grant(body)
        elif kind == "AlterDefaultPrivilegesStmt":
            for option in body.get("options") or ():
                okind, opt = unwrap(option)
                if okind == "DefElem" and opt.get("defname") == "schemas":
                    okind, arg = unwrap(opt.get("arg"))
                    for schema in strings(arg.get("items") if okind == "List" else [opt.get("arg")]):
                        self.relations.add(quote_part(schema) + ".*")

    def grant(self, body: Json) -> None:
        """GRANT/REVOKE on objects: the objects, whole schemas, and any column privileges."""
        self.command = "GRANT" if body.get("is_grant") else "REVOKE"
        objtype = body.get("objtype")
        in_schema = body.get("targtype") == "ACL_TARGET_ALL_IN_SCHEMA"
        rels: list[str] = []
        for obj in body.get("objects") or ():
            kind, o = unwrap(obj)
            if kind == "String" and (in_schema or objtype == "OBJECT_SCHEMA"):
                self.relations.add(quote_part(o.get("sval", "")) + ".*")
            elif kind == "RangeVar":
                rels.append(self.relation(o))
            else:
                self.named_object(objtype, obj)
        for priv in body.get("privileges") or ():
            kind, p = unwrap(priv)
            if kind == "AccessPriv":
                for col in strings(p.get("cols")):
                    for rel in rels:
                        self.column(rel, col)
