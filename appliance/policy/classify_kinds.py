"""Statement-kind rules: the tables that say what each kind of statement is and is called.

Which parse-tree statement types are DDL, privilege changes or act on everything; the
command tag each one reports; the object types a DROP/COMMENT/GRANT/ALTER can name and
how each is spelled in a tag; the ALTER TABLE sub-commands that name a column. The walker
(:mod:`appliance.policy.classify_statements`, :mod:`appliance.policy.classify_ddl`) reads
these; supporting a new PostgreSQL statement usually starts here.
"""

from __future__ import annotations

import re

EVERYTHING = "*.*"  # the relation named by statements that act on no particular relation, or all

# The statement types that are queries in their own right, wherever they appear (a CTE,
# a subquery, INSERT … SELECT): the walker gives each its own scope.
QUERY_KINDS = frozenset({"SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})

# ---- object types -----------------------------------------------------------------------

RELATION_OBJECTS = frozenset({
    "OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW", "OBJECT_INDEX", "OBJECT_SEQUENCE",
    "OBJECT_FOREIGN_TABLE", "OBJECT_TYPE", "OBJECT_DOMAIN", "OBJECT_COLLATION", "OBJECT_CONVERSION",
    "OBJECT_STATISTIC_EXT", "OBJECT_TSCONFIGURATION", "OBJECT_TSDICTIONARY", "OBJECT_TSPARSER",
    "OBJECT_TSTEMPLATE",
})
FUNCTION_OBJECTS = frozenset({"OBJECT_FUNCTION", "OBJECT_PROCEDURE", "OBJECT_ROUTINE", "OBJECT_AGGREGATE"})
# Objects named "[schema.]table.name": the table is what the policy cares about.
TABLE_MEMBER_OBJECTS = frozenset({"OBJECT_TRIGGER", "OBJECT_RULE", "OBJECT_POLICY", "OBJECT_TABCONSTRAINT"})
OBJECT_WORDS = {
    "MATVIEW": "MATERIALIZED VIEW", "FOREIGN_TABLE": "FOREIGN TABLE", "STATISTIC_EXT": "STATISTICS",
    "TSCONFIGURATION": "TEXT SEARCH CONFIGURATION", "TSDICTIONARY": "TEXT SEARCH DICTIONARY",
    "TSPARSER": "TEXT SEARCH PARSER", "TSTEMPLATE": "TEXT SEARCH TEMPLATE", "FDW": "FOREIGN DATA WRAPPER",
    "FOREIGN_SERVER": "SERVER", "EVENT_TRIGGER": "EVENT TRIGGER", "ACCESS_METHOD": "ACCESS METHOD",
    "TABCONSTRAINT": "TABLE", "LARGEOBJECT": "LARGE OBJECT", "OPCLASS": "OPERATOR CLASS",
    "OPFAMILY": "OPERATOR FAMILY", "USER_MAPPING": "USER MAPPING", "DEFACL": "DEFAULT PRIVILEGES",
}
# ALTER TABLE sub-commands whose ``name`` is a column.
COLUMN_SUBCOMMANDS = frozenset({
    "AT_ColumnDefault", "AT_CookedColumnDefault", "AT_DropNotNull", "AT_SetNotNull", "AT_SetExpression",
    "AT_DropExpression", "AT_CheckNotNull", "AT_SetStatistics", "AT_SetOptions", "AT_ResetOptions",
    "AT_SetStorage", "AT_SetCompression", "AT_DropColumn", "AT_AlterColumnType",
    "AT_AlterColumnGenericOptions", "AT_AddIdentity", "AT_SetIdentity", "AT_DropIdentity",
})


def object_word(objtype: str | None) -> str:
    """``OBJECT_MATVIEW`` → ``MATERIALIZED VIEW``: an object type as a command tag spells it."""
    word = (objtype or "OBJECT_").removeprefix("OBJECT_")
    return OBJECT_WORDS.get(word, word.replace("_", " "))


def camel_words(kind: str) -> str:
    """``AlterCollationStmt`` → ``ALTER COLLATION``: the tag of a statement with none in SIMPLE_TAGS."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", kind.removesuffix("Stmt")).upper()


# ---- statement kinds ---------------------------------------------------------------------

TRANSACTION_TAGS = {
    "TRANS_STMT_BEGIN": "BEGIN", "TRANS_STMT_START": "START TRANSACTION", "TRANS_STMT_COMMIT": "COMMIT",
    "TRANS_STMT_ROLLBACK": "ROLLBACK", "TRANS_STMT_SAVEPOINT": "SAVEPOINT", "TRANS_STMT_RELEASE": "RELEASE",
    "TRANS_STMT_ROLLBACK_TO": "ROLLBACK", "TRANS_STMT_PREPARE": "PREPARE TRANSACTION",
    "TRANS_STMT_COMMIT_PREPARED": "COMMIT PREPARED", "TRANS_STMT_ROLLBACK_PREPARED": "ROLLBACK PREPARED",
}

PRIVILEGE_STMTS = frozenset({
    "GrantStmt", "GrantRoleStmt", "CreateRoleStmt", "AlterRoleStmt", "AlterRoleSetStmt", "DropRoleStmt",
    "AlterDefaultPrivilegesStmt", "ReassignOwnedStmt", "DropOwnedStmt", "AlterOwnerStmt",
})
# Statements that act on every object (or objects nobody named): relation "*.*".
GLOBAL_STMTS = frozenset({"ReassignOwnedStmt", "DropOwnedStmt", "DropdbStmt"})
# DDL: every statement type starting with one of DDL_PREFIXES, and those in DDL_STMTS.
DDL_PREFIXES = ("Create", "Alter", "Drop", "Define", "Comment", "Rename", "Import", "SecLabel", "Refresh")
DDL_STMTS = frozenset({
    "IndexStmt", "ViewStmt", "RuleStmt", "CompositeTypeStmt", "CreatedbStmt", "DropdbStmt", "CommentStmt",
    "SecLabelStmt", "DefineStmt", "RenameStmt", "ImportForeignSchemaStmt", "AlterOwnerStmt",
})
# Command tags as PostgreSQL reports them. A kind missing here is tagged by camel_words;
# the walker refines some (DROP <object>, ALTER <object>, EXPLAIN ANALYZE, FETCH/MOVE, …).
SIMPLE_TAGS = {
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
