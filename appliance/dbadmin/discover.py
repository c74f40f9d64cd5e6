"""``tollgate db discover``: which columns of a database hold card numbers, by sampling.

Columns of the types a card number is stored in (text, varchar, char, int8, numeric, json,
jsonb; domains over them and arrays of them) are sampled — at most ``sample_rows``
non-null values each, by ``TABLESAMPLE SYSTEM`` on a large table, a plain ``LIMIT`` on a
small one or when the sample came back short — and every value is run through the PAN
detector (issuer prefix and length, Luhn, digit boundaries). A column is a candidate when
at least ``min_ratio`` of its sampled values hold a card number: a column of random
16-digit ids passes Luhn about one time in ten, a PAN column every time.

The report compares the candidates with the policy's declaration: declared and found,
undeclared candidates, declared but not found. It carries counts and brands, never a
value. It sees what the connecting role may read: a column the role has no SELECT on is
listed as unreadable, which after ``tollgate db provision`` is what the agent role's
cardholder columns should be.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from appliance.dbadmin.columns import ColumnName
from appliance.pan.detector import brand, find_pans

SAMPLED_TYPES = ("text", "varchar", "bpchar", "int8", "numeric", "json", "jsonb")
DEFAULT_SAMPLE_ROWS = 1000
DEFAULT_MIN_RATIO = 0.5
# Per sample query: a busy production table must not make discovery wait on a lock or scan
# for ever. A column that runs out of time is named as not sampled, never as clean.
DEFAULT_TIMEOUT_SECONDS = 30.0
# Values longer than this are cut before the detector sees them: a sample, not a scan.
MAX_VALUE_BYTES = 64 * 1024

_COLUMNS_QUERY = """
SELECT n.nspname, c.relname, a.attname, format_type(a.atttypid, a.atttypmod), c.reltuples::float8,
       has_column_privilege(c.oid, a.attnum, 'SELECT') AS readable
  FROM pg_catalog.pg_attribute a
  JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
  -- a domain's base type, then an array's element type
  LEFT JOIN pg_catalog.pg_type b ON b.oid = t.typbasetype
  LEFT JOIN pg_catalog.pg_type e ON e.oid = COALESCE(b.typelem, t.typelem) AND e.oid <> 0
 WHERE a.attnum > 0 AND NOT a.attisdropped
   AND c.relkind IN ('r', 'p', 'm')
   AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
   AND n.nspname NOT LIKE 'pg_temp_%%' AND n.nspname NOT LIKE 'pg_toast_temp_%%'
   AND (t.typname = ANY(%s) OR b.typname = ANY(%s)
        OR (COALESCE(b.typcategory, t.typcategory) = 'A' AND e.typname = ANY(%s)))
 ORDER BY n.nspname, c.relname, a.attnum
"""
_DECLARED_QUERY = """
SELECT n.nspname || '.' || c.relname || '.' || a.attname
  FROM pg_catalog.pg_attribute a
  JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE a.attnum > 0 AND NOT a.attisdropped
   AND n.nspname || '.' || c.relname || '.' || a.attname = ANY(%s)
"""


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True, slots=True)
class ColumnSample:
    """What sampling one column found: counts and brands only."""

    column: ColumnName
    type_name: str
    readable: bool
    sampled: int = 0
    with_pan: int = 0
    brands: tuple[tuple[str, int], ...] = ()
    not_sampled: str | None = None  # why a readable column could not be sampled (a timeout)

    @property
    def ratio(self) -> float:
        return self.with_pan / self.sampled if self.sampled else 0.0

    def as_json(self) -> dict[str, Any]:
        out = {"column": str(self.column), "type": self.type_name, "readable": self.readable,
               "sampled": self.sampled, "with_pan": self.with_pan, "ratio": round(self.ratio, 4),
               "brands": dict(self.brands)}
        if self.not_sampled:
            out["not_sampled"] = self.not_sampled
        return out


@dataclass(frozen=True, slots=True)
class Report:
    """Sampled columns against the declaration."""

    database: str
    role: str
    min_ratio: float
    declared: tuple[ColumnName, ...]
    samples: tuple[ColumnSample, ...]
    missing: tuple[ColumnName, ...] = field(default=())  # declared, not in the catalog

    def candidates(self) -> tuple[ColumnSample, ...]:
        return tuple(s for s in self.samples if s.sampled and s.ratio >= self.min_ratio)

    def undeclared(self) -> tuple[ColumnSample, ...]:
        declared = set(self.declared)
        return tuple(s for s in self.candidates() if s.column not in declared)

    def declared_found(self) -> tuple[ColumnSample, ...]:
        declared = set(self.declared)
        return tuple(s for s in self.candidates() if s.column in declared)

    def declared_not_found(self) -> tuple[ColumnName, ...]:
        """Declared columns the sample did not show as holding card numbers (empty, too
        few, unreadable by this role, or not in the catalog)."""
        found = {s.column for s in self.candidates()}
        return tuple(c for c in self.declared if c not in found)

    def unreadable(self) -> tuple[ColumnSample, ...]:
        return tuple(s for s in self.samples if not s.readable)

    def not_sampled(self) -> tuple[ColumnSample, ...]:
        """Readable columns the sample could not read in time: unknown, so not clean."""
        return tuple(s for s in self.samples if s.not_sampled)

    @property
    def clean(self) -> bool:
        """No undeclared candidate, and every readable column sampled."""
        return not self.undeclared() and not self.not_sampled()

    def below_threshold(self) -> tuple[ColumnSample, ...]:
        return tuple(s for s in self.samples if s.with_pan and s.ratio < self.min_ratio)

    def as_json(self) -> dict[str, Any]:
        by_column = {s.column: s for s in self.samples}
        return {
            "database": self.database, "role": self.role, "min_ratio": self.min_ratio,
            "declared": [by_column[c].as_json() if c in by_column else {"column": str(c), "in_catalog": False}
                         for c in self.declared],
            "undeclared_candidates": [s.as_json() for s in self.undeclared()],
            "declared_not_found": [str(c) for c in self.declared_not_found()],
            "not_in_catalog": [str(c) for c in self.missing],
            "unreadable": [str(s.column) for s in self.unreadable()],
            "not_sampled": [s.as_json() for s in self.not_sampled()],
            "below_threshold": [s.as_json() for s in self.below_threshold()],
            "columns_sampled": sum(1 for s in self.samples if s.readable),
        }


def pan_count(values: Iterable[str | None]) -> tuple[int, int, Counter[str]]:
    """(non-null values, values holding a card number, brands seen) for sampled values."""
    sampled = with_pan = 0
    brands: Counter[str] = Counter()
    for value in values:
        if value is None:
            continue
        sampled += 1
        data = value.encode("utf-8", "replace")[:MAX_VALUE_BYTES]
        spans = find_pans(data)
        if spans:
            with_pan += 1
            s, e = spans[0]
            digits = bytes(b for b in data[s:e] if 0x30 <= b <= 0x39)
            brands[brand(digits) or "unknown"] += 1
    return sampled, with_pan, brands


def sample_sql(column: ColumnName, reltuples: float, sample_rows: int, *, tablesample: bool = True) -> str:
    """A bounded sample of one column's non-null values as text."""
    table = f"{quote_ident(column.schema)}.{quote_ident(column.table)}"
    col = quote_ident(column.column)
    if tablesample and reltuples > 10 * sample_rows:
        # Enough pages for about four times the rows wanted, so NULLs rarely starve it.
        percent = min(100.0, 400.0 * sample_rows / reltuples)
        source = f"{table} TABLESAMPLE SYSTEM ({percent:.6f})"
    else:
        source = table
    return f"SELECT {col}::text FROM {source} WHERE {col} IS NOT NULL LIMIT {int(sample_rows)}"


def _sample(conn: Any, column: ColumnName, reltuples: float, sample_rows: int) -> list[str | None]:
    values = [row[0] for row in conn.execute(sample_sql(column, reltuples, sample_rows))]
    if len(values) < sample_rows:
        # SYSTEM sampling picks whole pages and may miss a small or sparse table.
        values = [row[0] for row in conn.execute(sample_sql(column, reltuples, sample_rows, tablesample=False))]
    return values


def discover(conn: Any, declared: Iterable[ColumnName], *, sample_rows: int = DEFAULT_SAMPLE_ROWS,
             min_ratio: float = DEFAULT_MIN_RATIO, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> Report:
    """Sample every readable column of the sampled types over ``conn`` (a psycopg
    connection), in one read-only transaction that is rolled back; each column's queries
    get ``timeout`` seconds (statement and lock timeouts), in a savepoint of their own."""
    from psycopg import errors

    if sample_rows < 1:
        raise ValueError("sample_rows must be at least 1")
    if not 0.0 < min_ratio <= 1.0:
        raise ValueError("min_ratio must be in (0, 1]")
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    declared = tuple(sorted(set(declared)))
    samples: list[ColumnSample] = []
    with conn.transaction(force_rollback=True):
        conn.execute("SET TRANSACTION READ ONLY")
        milliseconds = max(1, int(timeout * 1000))
        conn.execute(f"SET LOCAL statement_timeout = {milliseconds}")
        conn.execute(f"SET LOCAL lock_timeout = {milliseconds}")
        present = {row[0] for row in conn.execute(_DECLARED_QUERY, ([str(c) for c in declared],))}
        for schema, table, name, typname, reltuples, readable in conn.execute(
                _COLUMNS_QUERY, (list(SAMPLED_TYPES),) * 3).fetchall():
            column = ColumnName(schema, table, name)
            if not readable:
                samples.append(ColumnSample(column, typname, readable=False))
                continue
            try:
                with conn.transaction():
                    values = _sample(conn, column, float(reltuples), sample_rows)
            except (errors.QueryCanceled, errors.LockNotAvailable) as exc:
                samples.append(ColumnSample(column, typname, True, not_sampled=exc.diag.message_primary or "timeout"))
                continue
            sampled, with_pan, brands = pan_count(values)
            samples.append(ColumnSample(column, typname, True, sampled, with_pan, tuple(sorted(brands.items()))))
        info = conn.execute("SELECT current_database(), current_user").fetchone()
    missing = tuple(c for c in declared if str(c) not in present)
    return Report(info[0], info[1], min_ratio, declared, tuple(samples), missing)


def render(report: Report) -> str:
    """The human report: counts and brands per column, never a value."""
    def line(s: ColumnSample) -> str:
        brands = ", ".join(f"{b} {n}" for b, n in s.brands)
        return (f"  {s.column} ({s.type_name}): {s.with_pan} of {s.sampled} sampled values hold a card number"
                + (f" [{brands}]" if brands else ""))

    out = [(f"database {report.database} as {report.role}: "
           f"{sum(1 for s in report.samples if s.readable)} columns sampled, "
           f"candidate when at least {report.min_ratio:.0%} of a column's values hold a card number")]
    sections = (
        ("declared cardholder columns found", [line(s) for s in report.declared_found()]),
        ("UNDECLARED candidates (declare them in the policy's cardholder_columns)",
         [line(s) for s in report.undeclared()]),
        ("declared but not found by sampling",
         [f"  {c}" + (" (not in the catalog)" if c in report.missing else
                      " (not readable by this role)" if c in {s.column for s in report.unreadable()} else "")
          for c in report.declared_not_found()]),
        ("below the threshold (likely ids or chance Luhn matches)", [line(s) for s in report.below_threshold()]),
        ("not readable by this role", [f"  {s.column}" for s in report.unreadable()]),
        ("NOT SAMPLED in time (unknown: run again, or with a longer --timeout)",
         [f"  {s.column}: {s.not_sampled}" for s in report.not_sampled()]),
    )
    for title, lines in sections:
        out.append(f"{title}: {'none' if not lines else len(lines)}")
        out.extend(lines)
    return "\n".join(out) + "\n"
