"""``tollgate db provision``: the agent login roles' privileges, so PostgreSQL refuses itself.

Three steps, kept apart so each can be read and tested alone:

* :func:`read_snapshot` reads what the SQL depends on from the catalog: the tables that
  hold declared cardholder columns (their columns, types and owners), the agent roles'
  attributes and memberships, and which of the functions agents must not run exist here.
* :func:`plan` is a pure function of that snapshot: the SQL, every statement idempotent, so
  running it twice leaves the same privileges (``--apply`` runs it in one transaction).
* :func:`verify` asks the server, with ``has_*_privilege`` (which counts PUBLIC and
  inherited grants), whether an agent role can still read a cardholder column in clear,
  write a cardholder table, create where cardholder tables live, make temporary objects,
  run a listed function, or reach a cardholder column through a view or a SECURITY
  DEFINER function owned by a role that can. Anything it finds is a finding, and
  ``provision`` exits non-zero.

What an agent role gets (docs/dbadmin.md has the reasons):

* on a cardholder table: SELECT on its other columns only; no INSERT, UPDATE, DELETE,
  TRUNCATE, REFERENCES or TRIGGER (``writes = "refused"``), or, with ``writes = "held"``,
  INSERT and UPDATE of its other columns and DELETE, left to the proxy's holds;
* reads of a cardholder column through a view of the same name in ``tollgate_masked``,
  first on the role's search_path in that database: ``select pan from cards`` shows the
  masked display (BIN and last four at most, or last four), and ``public.cards.pan``
  itself is refused with 42501 — so functions, views, dynamic SQL and set_config the agent
  writes can only ever see the masked value. A column of a cardholder table that a policy
  ``mask`` rule masks otherwise (``full``, ``last4``, ``null``) is protected the same way
  and shown by that method: the proxy's column masks match a result column by its table's
  OID, and the view's columns carry the view's;
* no CREATE in the schemas holding cardholder tables nor on the database, no TEMPORARY;
* no EXECUTE on large-object writers, the XML functions that run SQL text, dblink, or
  pg_terminate/cancel_backend (revoked from PUBLIC in this database and granted back to
  the cardholder tables' owners, because PostgreSQL cannot take from one role what PUBLIC
  gives it).

It also creates ``tollgate_approved_writer`` (NOLOGIN) with the write privileges on the
cardholder tables, for approved statements; no agent role is made a member of it here
(see docs/dbadmin.md, "Approved writes").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from appliance.dbadmin.columns import ColumnName, by_table
from appliance.dbadmin.discover import quote_ident as q
from appliance.pan.detector import FORMATS, LAST4

Writes = Literal["refused", "held"]
WRITE_MODES: tuple[str, ...] = ("refused", "held")
MASKED_SCHEMA = "tollgate_masked"
WRITER_ROLE = "tollgate_approved_writer"
SEARCH_PATH_TAIL = '"$user", public'

# Functions agents must not run, by name (every overload present in the database):
# large-object writers store data outside any table, where no policy rule looks; the XML
# functions run SQL text the classifier never sees; dblink opens connections of its own;
# pg_terminate/cancel_backend reach the appliance's own connections of the same role.
DENIED_FUNCTIONS = (
    "lo_create", "lo_creat", "lo_from_bytea", "lo_put", "lo_import", "lowrite", "lo_truncate", "lo_truncate64",
    "query_to_xml", "query_to_xmlschema", "query_to_xml_and_xmlschema",
    "cursor_to_xml", "cursor_to_xmlschema",
    "table_to_xml", "table_to_xmlschema", "table_to_xml_and_xmlschema",
    "schema_to_xml", "schema_to_xmlschema", "schema_to_xml_and_xmlschema",
    "database_to_xml", "database_to_xmlschema", "database_to_xml_and_xmlschema",
    "pg_terminate_backend", "pg_cancel_backend",
)
DENIED_FUNCTION_PREFIXES = ("dblink",)
# Membership in these predefined roles would bypass everything below, or (the statistics
# roles) show other roles' statement texts, literals and all, in pg_stat_activity.
DANGEROUS_ROLES = ("pg_read_all_data", "pg_write_all_data", "pg_read_server_files", "pg_write_server_files",
                   "pg_execute_server_program", "pg_signal_backend", "pg_read_all_stats", "pg_monitor")

TEXT_TYPES = frozenset({"text", "varchar", "bpchar"})
NUMBER_TYPES = frozenset({"int8", "int4", "numeric"})


class ProvisionError(Exception):
    """The database can't be provisioned as asked: the reasons are listed."""

    def __init__(self, problems: Sequence[str]):
        super().__init__("; ".join(problems))
        self.problems = tuple(problems)


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type_sql: str  # format_type(): what a cast back to the column's type says
    type_name: str  # pg_type.typname


# How a protected column is shown through the masked view, strictest last: a column masked
# by several rules gets the strictest method.
METHODS = ("pan", "last4", "full", "null")


def strictest(a: str, b: str) -> str:
    return max(a, b, key=METHODS.index)


@dataclass(frozen=True, slots=True)
class Table:
    schema: str
    name: str
    owner: str
    columns: tuple[Column, ...]
    declared: frozenset[str]  # every protected column: declared cardholder and policy-masked
    methods: tuple[tuple[str, str], ...] = ()  # (column, method) for those not shown as "pan"

    def method(self, column: str) -> str:
        return dict(self.methods).get(column, "pan")

    @property
    def qualified(self) -> str:
        return f"{q(self.schema)}.{q(self.name)}"


@dataclass(frozen=True, slots=True)
class Role:
    name: str
    superuser: bool
    bypass_rls: bool
    replication: bool
    member_of: tuple[str, ...]  # owners, the database owner or DANGEROUS_ROLES it can act as


@dataclass(frozen=True, slots=True)
class Snapshot:
    database: str
    database_owner: str
    tables: tuple[Table, ...]
    roles: tuple[Role, ...]
    functions: tuple[str, ...]  # regprocedure text of the denied functions present
    missing_columns: tuple[ColumnName, ...] = ()
    missing_roles: tuple[str, ...] = ()
    not_tables: tuple[str, ...] = ()  # declared "tables" that are views or other relations


@dataclass(frozen=True, slots=True)
class Options:
    pan_format: str = "pci"
    writes: Writes = "refused"
    allow_temp: bool = False

    def __post_init__(self) -> None:
        if self.pan_format not in FORMATS:
            raise ValueError(f"pan_format must be one of {', '.join(FORMATS)}")
        if self.writes not in WRITE_MODES:
            raise ValueError(f"writes must be one of {', '.join(WRITE_MODES)}")


@dataclass(frozen=True, slots=True)
class Finding:
    role: str
    what: str

    def __str__(self) -> str:
        return f"{self.role}: {self.what}"


@dataclass(slots=True)
class Verification:
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings


# --- reading the catalog -------------------------------------------------------------------

_TABLES_QUERY = """
SELECT n.nspname, c.relname, c.relkind::text, pg_get_userbyid(c.relowner), a.attname,
       format_type(a.atttypid, a.atttypmod), t.typname
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
  JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
 WHERE n.nspname || '.' || c.relname = ANY(%s)
 ORDER BY n.nspname, c.relname, a.attnum
"""
_ROLES_QUERY = """
SELECT r.rolname, r.rolsuper, r.rolbypassrls, r.rolreplication,
       ARRAY(SELECT o.rolname FROM pg_catalog.pg_roles o
              WHERE o.rolname = ANY(%s) AND o.oid <> r.oid AND pg_has_role(r.oid, o.oid, 'MEMBER')
              ORDER BY 1)
  FROM pg_catalog.pg_roles r
 WHERE r.rolname = ANY(%s)
"""
_FUNCTIONS_QUERY = """
SELECT p.oid::regprocedure::text
  FROM pg_catalog.pg_proc p
 WHERE p.prokind = 'f'
   AND (p.proname = ANY(%s) OR p.proname LIKE ANY(%s))
 ORDER BY 1
"""


def read_snapshot(conn: Any, declared: Iterable[ColumnName], agents: Iterable[str],
                  masks: Mapping[ColumnName, str] | None = None) -> Snapshot:
    """What :func:`plan` needs, read over ``conn`` (psycopg) in one read-only transaction.

    ``masks`` are the policy's column masks (column → method); those on a cardholder
    table's columns are protected too, and shown by their method."""
    declared = tuple(sorted(set(declared)))
    masks = dict(masks or {})
    for method in masks.values():
        if method not in METHODS:
            raise ValueError(f"unknown mask method {method!r}")
    agents = tuple(sorted(set(agents)))
    tables_wanted = by_table(declared)
    with conn.transaction(force_rollback=True):
        conn.execute("SET TRANSACTION READ ONLY")
        database, database_owner = conn.execute(
            "SELECT current_database(), pg_get_userbyid(datdba) FROM pg_catalog.pg_database "
            "WHERE datname = current_database()").fetchone()
        rows = conn.execute(_TABLES_QUERY, (list(tables_wanted),)).fetchall()
        grouped: dict[str, list[tuple[Any, ...]]] = {}
        for row in rows:
            grouped.setdefault(f"{row[0]}.{row[1]}", []).append(row)
        tables: list[Table] = []
        not_tables: list[str] = []
        missing: list[ColumnName] = []
        for name, wanted in tables_wanted.items():
            found = grouped.get(name)
            if not found:
                missing.extend(wanted)
                continue
            schema, table, relkind, owner = found[0][:4]
            if relkind not in ("r", "p"):
                not_tables.append(name)
                continue
            columns = tuple(Column(r[4], r[5], r[6]) for r in found)
            names = {c.name for c in columns}
            missing.extend(c for c in wanted if c.column not in names)
            shown = {c.column: "pan" for c in wanted if c.column in names}
            for column, method in masks.items():
                if column.table_name == name and column.column in names:
                    shown[column.column] = strictest(shown.get(column.column, method), method)
            tables.append(Table(schema, table, owner, columns, frozenset(shown),
                                tuple(sorted((c, m) for c, m in shown.items() if m != "pan"))))
        owners = sorted({t.owner for t in tables} | {database_owner} | set(DANGEROUS_ROLES))
        roles = tuple(Role(r[0], bool(r[1]), bool(r[2]), bool(r[3]), tuple(r[4]))
                      for r in conn.execute(_ROLES_QUERY, (owners, list(agents))).fetchall())
        functions = tuple(r[0] for r in conn.execute(
            _FUNCTIONS_QUERY, (list(DENIED_FUNCTIONS), [p + "%" for p in DENIED_FUNCTION_PREFIXES])).fetchall())
    present = {r.name for r in roles}
    return Snapshot(database, database_owner, tuple(tables), tuple(sorted(roles, key=lambda r: r.name)), functions,
                    tuple(missing), tuple(a for a in agents if a not in present), tuple(not_tables))


def problems(snapshot: Snapshot) -> list[str]:
    """Why the database can't be provisioned as it is: what no GRANT or REVOKE can fix."""
    out = [f"declared column {c} is not in database {snapshot.database}" for c in snapshot.missing_columns]
    out += [f"declared table {t} is not a table (a view or other relation): declare the table it reads"
            for t in snapshot.not_tables]
    out += [f"agent role {r} does not exist in the cluster" for r in snapshot.missing_roles]
    owners = {t.owner for t in snapshot.tables}
    for role in snapshot.roles:
        if role.superuser:
            out.append(f"agent role {role.name} is a superuser: no privilege can be taken from it")
        if role.bypass_rls:
            out.append(f"agent role {role.name} has BYPASSRLS")
        if role.replication:
            out.append(f"agent role {role.name} has REPLICATION: logical decoding returns every column other "
                       f"sessions write (ALTER ROLE {role.name} NOREPLICATION)")
        if role.name in owners or role.name == snapshot.database_owner:
            out.append(f"agent role {role.name} owns a cardholder table or the database: give them to another role "
                       f"(ALTER TABLE … OWNER TO, ALTER DATABASE … OWNER TO)")
        for other in role.member_of:
            out.append(f"agent role {role.name} is a member of {other}, which "
                       + ("is a predefined role that bypasses table privileges or shows other roles' statements"
                          if other in DANGEROUS_ROLES
                          else "owns a cardholder table or the database") + f": REVOKE {other} FROM {role.name}")
    return out


# --- the SQL --------------------------------------------------------------------------------

def _roles(names: Iterable[str]) -> str:
    return ", ".join(q(n) for n in names)


def _masked_views(tables: Sequence[Table]) -> dict[Table, str]:
    """The view name for each table in the masked schema: the table's own name, or
    ``schema_table`` when two declared tables share a name."""
    counts: dict[str, int] = {}
    for t in tables:
        counts[t.name] = counts.get(t.name, 0) + 1
    return {t: t.name if counts[t.name] == 1 else f"{t.schema}_{t.name}" for t in tables}


def _display_functions(fmt: str) -> list[str]:
    if fmt == LAST4:
        text_shown = "repeat('*', length(d) - 4) || right(d, 4)"
        number_shown = "right(d, 4)::numeric"
    else:
        text_shown = "left(d, 6) || repeat('*', length(d) - 10) || right(d, 4)"
        number_shown = "(left(d, 6) || repeat('0', length(d) - 10) || right(d, 4))::numeric"
    schema = q(MASKED_SCHEMA)
    return [
        # A declared column's value is cardholder data whatever its shape: fewer than 13
        # digits shows nothing at all.
        (f"CREATE OR REPLACE FUNCTION {schema}.pan_display(value text) RETURNS text\n"
        f"  LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE\n"
        f"  AS $tollgate$ SELECT CASE WHEN length(d) >= 13 THEN {text_shown} ELSE repeat('*', length(value)) END\n"
        f"                  FROM (SELECT regexp_replace(value, '[^0-9]', '', 'g') AS d) AS digits $tollgate$"),
        (f"CREATE OR REPLACE FUNCTION {schema}.pan_display_number(value numeric) RETURNS numeric\n"
        f"  LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE\n"
        f"  AS $tollgate$ SELECT CASE WHEN length(d) >= 13 THEN {number_shown} ELSE 0 END\n"
        f"                  FROM (SELECT trunc(abs(value))::text AS d) AS digits $tollgate$"),
    ]


def _display_expression(column: Column, method: str = "pan") -> str:
    name, schema = q(column.name), q(MASKED_SCHEMA)
    text = column.type_name in TEXT_TYPES
    if method == "full" and text:
        return f"repeat('*', length({name}::text))::{column.type_sql} AS {name}"
    if method == "last4" and text:
        return (f"(repeat('*', greatest(length({name}::text) - 4, 0)) || right({name}::text, 4))"
                f"::{column.type_sql} AS {name}")
    if method != "pan":  # null, or a method with no display in this type: nothing shown
        return f"NULL::{column.type_sql} AS {name}"
    if text:
        return f"{schema}.pan_display({name}::text)::{column.type_sql} AS {name}"
    if column.type_name in NUMBER_TYPES:
        return f"{schema}.pan_display_number({name}::numeric)::{column.type_sql} AS {name}"
    # json, arrays and other types: no display keeps both the type and the promise.
    return f"NULL::{column.type_sql} AS {name}"


def plan(snapshot: Snapshot, options: Options = Options()) -> list[str]:
    """The statements that provision ``snapshot``'s agent roles; raises ProvisionError if
    :func:`problems` finds any. Each statement is idempotent."""
    found = problems(snapshot)
    if found:
        raise ProvisionError(found)
    agents = [r.name for r in snapshot.roles]
    if not agents or not snapshot.tables:
        raise ProvisionError(["nothing to provision: no agent roles" if not agents else
                              "nothing to provision: no cardholder columns declared"])
    everyone = "PUBLIC, " + _roles(agents)
    owners = sorted({t.owner for t in snapshot.tables})
    database = q(snapshot.database)
    out: list[str] = [
        "-- Tollgate: least privilege for the agent login roles " + _roles(agents)
        + f" in database {snapshot.database} (tollgate db provision)",
        ("DO $tollgate$ BEGIN\n"
        f"  IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = '{WRITER_ROLE}') THEN\n"
        f"    CREATE ROLE {q(WRITER_ROLE)} NOLOGIN;\n"
        "  END IF;\nEND $tollgate$"),
    ]

    out.append("-- cardholder tables: no clear reads of declared columns, no writes by agent roles")
    for table in snapshot.tables:
        others = [c.name for c in table.columns if c.name not in table.declared]
        out.append(f"REVOKE ALL ON TABLE {table.qualified} FROM {everyone}")
        if others:
            cols = ", ".join(q(c) for c in others)
            out.append(f"GRANT SELECT ({cols}) ON TABLE {table.qualified} TO {_roles(agents)}")
            if options.writes == "held":
                out.append(f"GRANT INSERT ({cols}), UPDATE ({cols}) ON TABLE {table.qualified} TO {_roles(agents)}")
        if options.writes == "held":
            out.append(f"GRANT DELETE ON TABLE {table.qualified} TO {_roles(agents)}")
        out.append(f"GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE {table.qualified} TO {q(WRITER_ROLE)}")
    out.extend(f"GRANT USAGE ON SCHEMA {q(schema)} TO {q(WRITER_ROLE)}"
               for schema in sorted({t.schema for t in snapshot.tables}))

    out.append("-- no new objects where cardholder tables live, nor anywhere in the database")
    out.extend(f"REVOKE CREATE ON SCHEMA {q(schema)} FROM {everyone}"
               for schema in sorted({t.schema for t in snapshot.tables}))
    out.append(f"REVOKE CREATE ON DATABASE {database} FROM {everyone}")
    if not options.allow_temp:
        out.append(f"REVOKE TEMPORARY ON DATABASE {database} FROM {everyone}")
        out.append(f"GRANT TEMPORARY ON DATABASE {database} TO {_roles(owners)}")

    if snapshot.functions:
        out.append("-- functions that store data outside tables, run SQL text or reach other sessions")
        for fn in snapshot.functions:
            out.append(f"REVOKE EXECUTE ON FUNCTION {fn} FROM {everyone}")
            out.append(f"GRANT EXECUTE ON FUNCTION {fn} TO {_roles(owners)}")

    masked = q(MASKED_SCHEMA)
    out.append("-- reads of a cardholder column show its masked display, through a view of the same name")
    out.append(f"CREATE SCHEMA IF NOT EXISTS {masked}")
    out.append(f"REVOKE ALL ON SCHEMA {masked} FROM PUBLIC")
    out.append(f"GRANT USAGE ON SCHEMA {masked} TO {_roles(agents)}")
    out.extend(_display_functions(options.pan_format))
    for table, view in _masked_views(snapshot.tables).items():
        select = ",\n       ".join(_display_expression(c, table.method(c.name)) if c.name in table.declared
                                   else q(c.name) for c in table.columns)
        name = f"{masked}.{q(view)}"
        out.append(f"CREATE OR REPLACE VIEW {name} WITH (security_barrier = true) AS\n"
                   f"SELECT {select}\n  FROM {table.qualified}")
        # The view reads the table with its owner's privileges: the table's owner.
        out.append(f"ALTER VIEW {name} OWNER TO {q(table.owner)}")
        out.append(f"REVOKE ALL ON TABLE {name} FROM {everyone}")
        out.append(f"GRANT SELECT ON TABLE {name} TO {_roles(agents)}")
        others = [c.name for c in table.columns if c.name not in table.declared]
        if options.writes == "held":
            # A bare `UPDATE cards …` resolves to the view: it writes the table's other
            # columns through it (an automatically updatable view, with its owner's
            # privileges), and a masked column is not updatable through it.
            if others:
                cols = ", ".join(q(c) for c in others)
                out.append(f"GRANT INSERT ({cols}), UPDATE ({cols}) ON TABLE {name} TO {_roles(agents)}")
            out.append(f"GRANT DELETE ON TABLE {name} TO {_roles(agents)}")
    out.extend(f"ALTER ROLE {q(agent)} IN DATABASE {database} SET search_path = {masked}, {SEARCH_PATH_TAIL}"
               for agent in agents)
    return out


def script(statements: Sequence[str]) -> str:
    """The statements as one psql-ready script, in one transaction."""
    body = "".join(s + "\n" if s.startswith("--") else s + ";\n" for s in statements)
    return "BEGIN;\n" + body + "COMMIT;\n"


def apply(conn: Any, statements: Sequence[str]) -> None:
    """Run the plan over ``conn`` (psycopg) in one transaction: all of it or none."""
    with conn.transaction():
        for statement in statements:
            if not statement.startswith("--"):
                conn.execute(statement)


# --- checking the result ----------------------------------------------------------------------

_COLUMN_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "REFERENCES")

_VIEWS_QUERY = """
SELECT DISTINCT v.oid::regclass::text
  FROM pg_catalog.pg_depend d
  JOIN pg_catalog.pg_rewrite w ON w.oid = d.objid
  JOIN pg_catalog.pg_class v ON v.oid = w.ev_class
  JOIN pg_catalog.pg_namespace n ON n.oid = v.relnamespace
 WHERE d.classid = 'pg_catalog.pg_rewrite'::regclass AND d.refclassid = 'pg_catalog.pg_class'::regclass
   AND d.refobjid = %s::regclass
   AND d.refobjsubid = (SELECT attnum FROM pg_catalog.pg_attribute WHERE attrelid = %s::regclass AND attname = %s)
   AND v.oid <> %s::regclass AND n.nspname <> %s
   AND has_table_privilege(%s, v.oid, 'SELECT')
"""
_DEFINER_QUERY = """
SELECT p.oid::regprocedure::text
  FROM pg_catalog.pg_proc p
 WHERE p.prosecdef AND has_function_privilege(%s, p.oid, 'EXECUTE')
   AND (has_table_privilege(p.proowner, %s::regclass, 'INSERT, UPDATE, DELETE, TRUNCATE')
        OR has_column_privilege(p.proowner, %s::regclass, %s, 'SELECT'))
 ORDER BY 1
"""


def _table_checks(options: Options) -> list[tuple[str, str]]:
    """(has_*_privilege function, privilege) that must be false on a cardholder table. A
    table-level check ignores column grants; an any-column check counts them."""
    checks = [("has_table_privilege", "TRUNCATE"), ("has_table_privilege", "TRIGGER"),
              ("has_any_column_privilege", "REFERENCES")]
    if options.writes == "held":
        # Column-level INSERT and UPDATE of the other columns, and DELETE, are granted; the
        # protected columns are checked one by one.
        checks += [("has_table_privilege", "INSERT"), ("has_table_privilege", "UPDATE")]
    else:
        checks += [("has_any_column_privilege", "INSERT"), ("has_any_column_privilege", "UPDATE"),
                   ("has_table_privilege", "DELETE")]
    return checks


def verify(conn: Any, snapshot: Snapshot, options: Options = Options()) -> Verification:
    """What each agent role can still do that it should not, asked of the server."""
    findings = [Finding("-", p) for p in problems(snapshot)]

    def true(sql: str, *args: object) -> bool:
        return bool(conn.execute(sql, args).fetchone()[0])

    with conn.transaction(force_rollback=True):
        for role in (r.name for r in snapshot.roles):
            for table in snapshot.tables:
                rel, name = table.qualified, f"{table.schema}.{table.name}"
                findings += [Finding(role, f"{privilege} on {name}") for check, privilege in _table_checks(options)
                             if true(f"SELECT {check}(%s, %s, %s)", role, rel, privilege)]
                for column in sorted(table.declared):
                    findings += [Finding(role, f"{privilege} on cardholder column {name}.{column}")
                                 for privilege in _COLUMN_PRIVILEGES
                                 if true("SELECT has_column_privilege(%s, %s, %s, %s)", role, rel, column, privilege)]
                    findings += [Finding(role, f"SELECT on view {view}, which reads {name}.{column} "
                                               f"with its owner's privileges")
                                 for (view,) in conn.execute(_VIEWS_QUERY, (rel, rel, column, rel, MASKED_SCHEMA,
                                                                           role)).fetchall()]
                    findings += [Finding(role, f"EXECUTE on SECURITY DEFINER function {fn}, whose owner can read "
                                               f"or write {name}")
                                 for (fn,) in conn.execute(_DEFINER_QUERY, (role, rel, rel, column)).fetchall()]
            findings += [Finding(role, f"CREATE on schema {schema}")
                         for schema in sorted({t.schema for t in snapshot.tables})
                         if true("SELECT has_schema_privilege(%s, %s, 'CREATE')", role, schema)]
            if true("SELECT has_database_privilege(%s, current_database(), 'CREATE')", role):
                findings.append(Finding(role, f"CREATE on database {snapshot.database}"))
            if not options.allow_temp and true("SELECT has_database_privilege(%s, current_database(), 'TEMP')", role):
                findings.append(Finding(role, f"TEMPORARY on database {snapshot.database}"))
            findings += [Finding(role, f"EXECUTE on {fn}") for fn in snapshot.functions
                         if true("SELECT has_function_privilege(%s, %s, 'EXECUTE')", role, fn)]
    # A view or function found through several protected columns is one finding.
    return Verification(list(dict.fromkeys(findings)))
