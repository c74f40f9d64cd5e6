"""Statement classification: what each statement of a SQL string does and which objects it names.

The policy engine never looks at SQL text itself; it looks at the :class:`Classification`
this module derives from PostgreSQL's own grammar (libpg_query, through pglast). One
Classification per statement of a (possibly multi-statement) string: its classes (read,
write, ddl, role_change, …), the relations, columns and functions it names, a short
command tag and the statement's own text.

Design points:

- **Fail closed.** Anything the parser rejects, and any surprise in walking its tree,
  yields a single UNPARSABLE classification — never an exception — and the policy blocks
  UNPARSABLE unless a rule explicitly allows it. Only a syntax error from the parser
  (command ``UNPARSABLE``) can be allowed that way: text that isn't what the server would
  parse (a NUL, invalid UTF-8), that is nested too deeply to walk, that surprised the
  walk, or that would change a setting Tollgate pins (:mod:`appliance.policy.pins`) is
  REFUSED (command ``REFUSED``), which no rule can allow.
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

This module is the public entry: :func:`classify`, its cache, and the fail-closed wrapper
around one parse and walk. The walk is in parts, each named for its role:

- ``classify_tree``: reading libpg_query's JSON parse tree;
- ``classify_kinds``: statement-kind rules (DDL/privilege/utility sets, command tags,
  object types);
- ``classify_names``: scopes and the resolution of relation, column and function names;
- ``classify_walk``: the visitor for expressions and queries (SELECT, DML, FROM, CTEs);
- ``classify_ddl``: DDL, privilege and utility statements and the objects they name;
- ``classify_statements``: the per-statement handlers and :class:`Walker`, the whole walk.
"""

from __future__ import annotations

import functools
import json
import sys
import threading

from pglast.parser import ParseError, parse_sql_json

from appliance.model.decision import Classification
from appliance.model.decision import StatementClass as C
from appliance.policy.classify_names import Scope
from appliance.policy.classify_statements import Walker
from appliance.policy.classify_tree import unwrap
from appliance.policy.pins import statement_problem

CACHE_SIZE = 4096
# Longer statements (bulk INSERTs with literal values) are classified every time: they are
# rarely repeated, and caching them would pin their text in memory.
CACHE_MAX_CHARS = 32 * 1024
# Deeply nested expressions (a+b+c+… with hundreds of terms) exceed Python's default
# recursion limit while decoding the parse tree; they are retried once under this limit.
_DEEP_RECURSION_LIMIT = 20000
_deep_lock = threading.Lock()


# ---- entry points -----------------------------------------------------------------------


def _unparsable(sql: str, error: str) -> tuple[Classification, ...]:
    """The one classification of text that can't be classified: the policy blocks it."""
    return (Classification(frozenset({C.UNPARSABLE}), command="UNPARSABLE", text=sql, error=error),)


REFUSED = "REFUSED"


def _refused(sql: str, error: str) -> tuple[Classification, ...]:
    """Text the policy must never let through, whatever its rules say (see the module doc)."""
    return (Classification(frozenset({C.UNPARSABLE}), command=REFUSED, text=sql, error=error),)


class _Refused(Exception):
    pass


def _parse_and_walk(sql: str) -> tuple[Classification, ...]:
    """Parse ``sql`` and walk each statement; raises on any surprise (the caller fails closed)."""
    tree_json = parse_sql_json(sql)
    tree = json.loads(tree_json)
    problem = statement_problem(tree_json, tree)
    if problem is not None:
        raise _Refused(problem)
    stmts = tree.get("stmts") or []
    if not stmts:
        return (Classification(frozenset({C.EMPTY}), text=sql),)
    raw = sql.encode("utf-8")  # statement offsets are byte offsets into the UTF-8 text
    out = []
    for raw_stmt in stmts:
        start = raw_stmt.get("stmt_location", 0)
        length = raw_stmt.get("stmt_len", 0)
        text = (raw[start:start + length] if length else raw[start:]).decode("utf-8").strip()
        kind, body = unwrap(raw_stmt.get("stmt"))
        if kind is None:
            raise ValueError("statement without a type")
        walker = Walker()
        walker.statement(kind, body, Scope(None))
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
            return _refused(sql, "the statement contains a NUL character")
        try:
            return _parse_and_walk(sql)
        except RecursionError:
            pass
        with _deep_lock:
            # Deep but legitimate expressions: retry once with room to recurse.
            old = sys.getrecursionlimit()
            sys.setrecursionlimit(max(old, _DEEP_RECURSION_LIMIT))
            try:
                return _parse_and_walk(sql)
            finally:
                sys.setrecursionlimit(old)
    except _Refused as exc:
        return _refused(sql, str(exc))
    except ParseError as exc:
        return _unparsable(sql, str(exc))
    except RecursionError:
        return _refused(sql, "the statement is nested too deeply to classify")
    except Exception as exc:  # noqa: BLE001 -- fail closed: a classifier surprise must not let SQL through
        return _refused(sql, f"could not classify the statement ({type(exc).__name__}: {exc})")


_classify_cached = functools.lru_cache(maxsize=CACHE_SIZE)(classify_uncached)


def classify(sql: str) -> tuple[Classification, ...]:
    """One :class:`Classification` per statement of ``sql`` (one EMPTY for blank text).

    Cached by text: a repeated statement costs a dictionary lookup.
    """
    if len(sql) > CACHE_MAX_CHARS:
        return classify_uncached(sql)
    return _classify_cached(sql)


def cache_clear() -> None:
    """Forget every cached classification (tests, and benchmarks of the uncached path)."""
    _classify_cached.cache_clear()
