"""What policy says about a statement: its classes, classification, rules and decisions.

Shared by the classifier (what a statement is), the rule engine (what policy says about
it), the enforcement addon (block / hold / allow in the data path), masking (which columns
to mask and how) and holds (what an approver is shown). Plain frozen data, no behaviour
beyond small helpers, so every layer can depend on it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class StatementClass(str, enum.Enum):
    """What a statement does. One statement may have several (a writable CTE is read + write)."""

    READ = "read"  # SELECT, TABLE, VALUES, SHOW, FETCH from a read cursor, EXPLAIN (no ANALYZE)
    WRITE = "write"  # INSERT, UPDATE, DELETE, MERGE, SELECT INTO, REFRESH MATERIALIZED VIEW
    TRUNCATE = "truncate"
    DDL = "ddl"  # CREATE / ALTER / DROP / COMMENT / RENAME of schema objects
    PRIVILEGE = "privilege"  # GRANT, REVOKE, CREATE/ALTER/DROP ROLE, ALTER DEFAULT PRIVILEGES
    COPY_OUT = "copy_out"  # COPY ... TO (STDOUT or a file)
    COPY_IN = "copy_in"  # COPY ... FROM (STDIN or a file)
    TRANSACTION = "transaction"  # BEGIN, COMMIT, ROLLBACK, SAVEPOINT, PREPARE TRANSACTION…
    SESSION = "session"  # SET / RESET / SHOW of ordinary settings, DISCARD, LISTEN, UNLISTEN, NOTIFY…
    ROLE_CHANGE = "role_change"  # SET ROLE, SET SESSION AUTHORIZATION, RESET ROLE, RESET ALL…
    FUNCTION_CALL = "function_call"  # CALL, the FunctionCall message, and functions used in a statement
    DO_BLOCK = "do_block"  # DO $$ … $$: arbitrary procedural code
    PREPARED = "prepared"  # PREPARE / EXECUTE / DEALLOCATE (PREPARE also carries its inner classes)
    CURSOR = "cursor"  # DECLARE / FETCH / MOVE / CLOSE
    LOCK = "lock"  # LOCK TABLE, SELECT … FOR UPDATE/SHARE
    MAINTENANCE = "maintenance"  # VACUUM, ANALYZE, CLUSTER, REINDEX, CHECKPOINT, LOAD
    UTILITY = "utility"  # anything else pglast parses
    EMPTY = "empty"  # nothing but whitespace and comments
    UNPARSABLE = "unparsable"  # pglast can't parse it: blocked unless a rule explicitly allows it


@dataclass(frozen=True, slots=True)
class Classification:
    """What one SQL statement (one element of a multi-statement Query) does and touches.

    Names are as written: ``schema.name`` when qualified, bare ``name`` when not (the
    search path decides at run time, so matching treats bare names carefully). Columns
    are ``table.column`` / ``schema.table.column`` where the SQL tells which table,
    otherwise ``?.column``.
    """

    classes: frozenset[StatementClass]
    relations: frozenset[str] = frozenset()
    columns: frozenset[str] = frozenset()
    functions: frozenset[str] = frozenset()
    command: str = ""  # e.g. "SELECT", "UPDATE", "DROP TABLE": for display and records
    text: str = ""  # this statement's own SQL
    prepared_name: str | None = None  # PREPARE name / EXECUTE name / DEALLOCATE name
    error: str | None = None  # why pglast could not parse it (UNPARSABLE)


_ONLY_READ = frozenset({StatementClass.READ})


class Action(str, enum.Enum):
    ALLOW = "allow"
    MASK = "mask"  # allow, and mask the listed columns in results
    HOLD = "hold"  # wait for approval
    BLOCK = "block"


class MaskMethod(str, enum.Enum):
    PAN = "pan"  # PCI display: at most the first six and last four digits shown
    LAST4 = "last4"  # only the last four characters shown
    FULL = "full"  # every character replaced (length kept where the type allows)
    NULL = "null"  # the value becomes NULL


@dataclass(frozen=True, slots=True)
class ColumnMask:
    column: str  # "schema.table.column"
    method: MaskMethod


@dataclass(frozen=True, slots=True)
class HoldSpec:
    approver_groups: tuple[str, ...]
    min_approvals: int = 1
    timeout_seconds: float = 900.0


@dataclass(frozen=True, slots=True)
class Decision:
    """Policy's answer for a whole request (all statements of a Query, or one Parse)."""

    action: Action
    rule: str  # the rule's name; "default" when none matched, "unparsable" for the built-in
    message: str = ""
    rule_line: int | None = None  # line of the rule in the policy file
    statements: tuple[Classification, ...] = ()
    hold: HoldSpec | None = None
    masks: tuple[ColumnMask, ...] = field(default=())

    @property
    def read_only(self) -> bool:
        """Allowed, and every statement of it only reads: a plain SELECT, TABLE, VALUES or
        EXPLAIN without ANALYZE that calls no function at all (``nextval``, ``set_config``,
        advisory locks, ``pg_notify``, ``dblink``… act through calls) and takes no row lock
        (FOR UPDATE/SHARE is ``lock``); SELECT INTO and data-modifying CTEs carry ``write``.
        Running such a statement changes nothing in the database."""
        if self.action not in (Action.ALLOW, Action.MASK) or not self.statements:
            return False
        return all(s.classes == _ONLY_READ and not s.functions and s.error is None for s in self.statements)

    @property
    def classes(self) -> frozenset[StatementClass]:
        out: frozenset[StatementClass] = frozenset()
        for s in self.statements:
            out |= s.classes
        return out
