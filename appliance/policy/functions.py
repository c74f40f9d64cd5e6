"""Function rules for agents: which calls run code the policy can see the effects of.

A call to a user-defined function or procedure runs a body the policy never reads: it can
update a cardholder table (``select scratch.f()`` where ``f`` runs ``update public.cards``),
read one into a result, or run SQL given as text. For the groups a policy marks as agents,
a call is therefore allowed only to

- a built-in function: qualified with ``pg_catalog``, or a bare name that is one of the
  functions PostgreSQL ships (:data:`~appliance.policy.builtin_functions.PG_CATALOG_FUNCTIONS`)
  — except the built-ins that run SQL given as text (``query_to_xml``, ``table_to_xml``,
  ``ts_stat``, …), which are as opaque as a user function;
- a function the policy's ``trusted_functions`` globs cover (a bare name is covered only by
  a pattern that matches it in any schema, as the session's ``search_path`` decides).

Anything else — a user-defined function, a FunctionCall protocol message (which names its
function only by OID) — is refused by the built-in rule ``untrusted-function``, as is a DO
block (the engine checks that one by class). Refusing
rather than holding keeps an approver from being asked to judge code they are not shown.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from pglast.parser import parse_sql_json

from appliance.policy.builtin_functions import PG_CATALOG_FUNCTIONS
from appliance.policy.patterns import Pattern, covers, split_name, unquote

# Built-ins that run SQL passed to them as text (or read whole tables by name): their
# effects are as invisible to the policy as a user function's body.
RUNS_SQL = frozenset({
    "query_to_xml", "query_to_xmlschema", "query_to_xml_and_xmlschema",
    "cursor_to_xml", "cursor_to_xmlschema",
    "table_to_xml", "table_to_xmlschema", "table_to_xml_and_xmlschema",
    "schema_to_xml", "schema_to_xmlschema", "schema_to_xml_and_xmlschema",
    "database_to_xml", "database_to_xmlschema", "database_to_xml_and_xmlschema",
    "ts_stat", "ts_rewrite",
})
# Built-ins that return other sessions' statement texts, which can carry card numbers.
# pg_stat_get_backend_activity is pg_stat_activity.query for one backend:
# ``select reverse(pg_stat_get_backend_activity(s)) from pg_stat_get_backend_idset() s``.
READS_QUERIES = frozenset({"pg_stat_get_activity", "pg_stat_get_backend_activity", "pg_stat_statements"})
# Built-ins that return the rows other sessions wrote, every column's value in clear
# (logical decoding: only for roles with REPLICATION, but an agent never needs them).
READS_CHANGES = frozenset({
    "pg_logical_slot_get_changes", "pg_logical_slot_peek_changes", "pg_logical_slot_get_binary_changes",
    "pg_logical_slot_peek_binary_changes",
})


def untrusted_function(names: Iterable[str], trusted: tuple[Pattern, ...]) -> str | None:
    """The first function in ``names`` (as a classification writes them) an agent may not
    call, with the reason, or None."""
    for name in sorted(names):
        if name.startswith("oid:"):
            if any(covers(p, name, "function") for p in trusted):
                continue
            return (f"a FunctionCall message names its function only by OID ({name}), so Tollgate can't tell "
                    "what it runs; it is refused for agents")
        parts = split_name(name)
        written = name if len(parts) > 1 else f"*.{name}"
        if any(covers(p, written, "function") for p in trusted):
            continue
        function = unquote(parts[-1])
        schema = unquote(parts[-2]) if len(parts) > 1 else None
        if function in RUNS_SQL and schema in (None, "pg_catalog"):
            return (f"{name} runs SQL given as text, which Tollgate can't check; it is refused for agents "
                    "(list it in trusted_functions to allow it)")
        if function in READS_QUERIES and schema in (None, "pg_catalog", "public"):
            return (f"{name} returns other sessions' statement texts, which can carry card numbers; it is refused "
                    "for agents")
        if function in READS_CHANGES and schema in (None, "pg_catalog"):
            return (f"{name} returns the rows other sessions wrote, every column in clear; it is refused for "
                    "agents")
        if schema == "pg_catalog" or (schema is None and function in PG_CATALOG_FUNCTIONS):
            continue
        return (f"{name} is not a built-in function: its body is not visible to the policy (it could read or "
                "change cardholder data), so calls are refused for agents unless the policy lists it in "
                "trusted_functions")
    return None


def server_side_copy(sql: str) -> str | None:
    """Why an agent may not run the COPY statement ``sql``, or None: ``COPY … TO/FROM
    PROGRAM`` runs a command on the database server, and ``COPY … TO/FROM 'file'`` moves
    rows to or from the server's files — both out of the proxy's sight (nothing it masks,
    nothing it can decide), and an agent has STDIN and STDOUT for what COPY is for."""
    tree = json.loads(parse_sql_json(sql))
    for raw in tree.get("stmts") or ():
        copy = (raw.get("stmt") or {}).get("CopyStmt")
        if copy is None:
            continue
        if copy.get("is_program"):
            return ("COPY … PROGRAM runs a command on the database server, which Tollgate can't see; it is refused "
                    "for agents (use COPY … TO STDOUT or FROM STDIN)")
        if copy.get("filename") is not None:
            return ("COPY to or from a file on the database server moves rows where Tollgate can't see them; it is "
                    "refused for agents (use COPY … TO STDOUT or FROM STDIN)")
    return None
