"""The approvals database: held requests, approvers' votes and time-boxed grants, in SQLite.

Shared by two processes: the proxy opens requests and waits for their outcome, the web
service records votes. Both run the same migrations on open (whoever comes first creates
the file, ``<identity.state_dir>/approvals.db`` by default). This module only stores and
reads; the rules about who may decide what live in :mod:`appliance.holds.service`, which
makes its checks and writes inside one :meth:`ApprovalStore.write` transaction so two
approvers clicking at once can't both settle a request.

Every write bumps one counter, ``revision``: the proxy polls it (one indexed read) and
reads requests and grants again only when it moved.

Times are stored as integer milliseconds since the epoch (UTC) and handed out as aware
UTC datetimes. SQL and parameters arrive already PAN-scrubbed: the store never sees a
card number, so neither does anything reading it (PCI DSS 3.5.1).
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from appliance.state import open_database
from appliance.state.db import StateError

APPROVALS_FILE = "approvals.db"
Status = Literal["pending", "approved", "denied", "expired", "withdrawn"]
STATUSES: tuple[Status, ...] = ("pending", "approved", "denied", "expired", "withdrawn")
Verdict = Literal["approve", "deny"]

# Crockford's base32: no I, L, O or U, so an id read aloud or copied off a phone can't be
# mistyped into another valid one. Six characters are 2^30 ids: collisions are retried,
# and guessing one gets nobody anything (every API call is authenticated and checked).
ID_PREFIX = "apr-"
ID_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
ID_LENGTH = 6
_ID_CONFUSABLE = str.maketrans({"O": "0", "I": "1", "L": "1"})
_ID_ATTEMPTS = 16

MIGRATIONS = (
    (
        """CREATE TABLE requests (
            id TEXT PRIMARY KEY,
            created_at INTEGER NOT NULL,            -- ms since the epoch, UTC
            session_id TEXT,
            requester_subject TEXT NOT NULL,
            requester_display TEXT NOT NULL,
            requester_kind TEXT NOT NULL,
            requester_groups TEXT NOT NULL,         -- JSON array
            client TEXT NOT NULL DEFAULT '',        -- the agent's address:port
            role TEXT NOT NULL DEFAULT '',          -- the database role it asked for
            target TEXT NOT NULL,
            database TEXT NOT NULL,
            sql TEXT NOT NULL,                      -- PAN-scrubbed by the caller
            params TEXT,                            -- JSON array (scrubbed) or NULL: no parameters
            classification TEXT NOT NULL,           -- JSON array, one object per statement
            rule TEXT NOT NULL,
            rule_line INTEGER,
            message TEXT NOT NULL DEFAULT '',
            approver_groups TEXT NOT NULL,          -- JSON array
            min_approvals INTEGER NOT NULL CHECK (min_approvals >= 1),
            expires_at INTEGER NOT NULL,
            status TEXT NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'approved', 'denied', 'expired', 'withdrawn')),
            status_reason TEXT,                     -- why expired or withdrawn
            decided_at INTEGER,
            fingerprint TEXT NOT NULL               -- the statement's shape, for grants
        )""",
        "CREATE INDEX requests_status ON requests (status, expires_at)",
        "CREATE INDEX requests_created ON requests (created_at)",
        """CREATE TABLE decisions (
            id INTEGER PRIMARY KEY,
            request_id TEXT NOT NULL REFERENCES requests (id),
            approver_subject TEXT NOT NULL,
            approver_display TEXT NOT NULL,
            approver_kind TEXT NOT NULL,
            approver_groups TEXT NOT NULL,          -- JSON array, as the token said at the time
            verdict TEXT NOT NULL CHECK (verdict IN ('approve', 'deny')),
            reason TEXT NOT NULL,
            grant_minutes INTEGER,
            at INTEGER NOT NULL,
            UNIQUE (request_id, approver_subject)   -- one vote per approver, whatever the code does
        )""",
        """CREATE TABLE grants (
            id INTEGER PRIMARY KEY,
            subject TEXT NOT NULL,
            target TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            expires_at INTEGER NOT NULL,
            request_id TEXT NOT NULL UNIQUE REFERENCES requests (id)
        )""",
        "CREATE INDEX grants_lookup ON grants (subject, target, fingerprint, expires_at)",
        "CREATE TABLE revision (id INTEGER PRIMARY KEY CHECK (id = 1), value INTEGER NOT NULL)",
        "INSERT INTO revision VALUES (1, 0)",
    ),
    # 2: grants bind what was approved. ``requests.fingerprint`` now holds the exact
    # statement's key ("exact:…") and ``shape`` the key a shape grant would bind, with
    # ``free`` the parts it lets vary. A vote says which it grants; a grant records which
    # it is. Rows from before were shape grants (pglast fingerprints, no prefix): they keep
    # that scope and match no new key, so they lapse with the upgrade.
    (
        "ALTER TABLE requests ADD COLUMN shape TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE requests ADD COLUMN free TEXT",  # JSON array, or NULL: not known
        "ALTER TABLE decisions ADD COLUMN grant_scope TEXT CHECK (grant_scope IN ('exact', 'shape'))",
        "ALTER TABLE grants ADD COLUMN scope TEXT NOT NULL DEFAULT 'shape' CHECK (scope IN ('exact', 'shape'))",
    ),
)
GrantScope = Literal["exact", "shape"]
GRANT_SCOPES: tuple[GrantScope, ...] = ("exact", "shape")


class StoreError(Exception):
    """The approvals database can't be opened or used, phrased for the operator."""


# --- ids and times --------------------------------------------------------------------------

def new_request_id() -> str:
    return ID_PREFIX + "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_LENGTH))


def normalize_request_id(text: str) -> str | None:
    """The canonical id for what someone typed (any case, prefix optional, O/I/L read as 0/1),
    or None when it can't be an id at all."""
    raw = text.strip().upper()
    if raw.startswith(ID_PREFIX.upper()):
        raw = raw[len(ID_PREFIX):]
    raw = raw.translate(_ID_CONFUSABLE)
    if len(raw) != ID_LENGTH or any(c not in ID_ALPHABET for c in raw):
        return None
    return ID_PREFIX + raw


def utcnow() -> datetime:
    return datetime.now(UTC)


def to_ms(dt: datetime) -> int:
    if dt.tzinfo is None:
        raise ValueError("naive datetime: approval times are aware UTC datetimes")
    return round(dt.timestamp() * 1000)


def from_ms(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC)


def iso(dt: datetime | None) -> str | None:
    """``2025-01-31T02:14:07.123Z``: what the API and webhooks show."""
    if dt is None:
        return None
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- records ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Requester:
    """Who asked. Not an :class:`~appliance.model.identity.Identity`: in trust mode the proxy
    knows only an address (kind ``unidentified``), and that must still be shown."""

    subject: str
    display: str
    kind: str
    groups: tuple[str, ...] = ()

    @classmethod
    def from_identity(cls, identity: Any) -> Requester:
        return cls(identity.subject, identity.display, identity.kind, tuple(identity.groups))

    def to_json(self) -> dict[str, Any]:
        return {"subject": self.subject, "display": self.display, "kind": self.kind, "groups": list(self.groups)}


@dataclass(frozen=True, slots=True)
class Vote:
    """One approver's verdict on one request."""

    approver_subject: str
    approver_display: str
    approver_kind: str
    approver_groups: tuple[str, ...]
    verdict: Verdict
    reason: str
    at: datetime
    grant_minutes: int | None = None
    grant_scope: GrantScope | None = None  # set with grant_minutes: what the grant covers

    def to_json(self) -> dict[str, Any]:
        return {"approver": {"subject": self.approver_subject, "display": self.approver_display,
                             "kind": self.approver_kind, "groups": list(self.approver_groups)},
                "verdict": self.verdict, "reason": self.reason, "grant_minutes": self.grant_minutes,
                "grant_scope": self.grant_scope, "at": iso(self.at)}


@dataclass(frozen=True, slots=True)
class Grant:
    """"Allow this statement (``exact``: as approved, constants and parameters included) or
    this statement shape (``shape``: any constants) for this identity on this target until
    ``expires_at``". ``fingerprint`` is the key it binds."""

    subject: str
    target: str
    fingerprint: str
    created_at: datetime
    expires_at: datetime
    request_id: str
    scope: GrantScope = "exact"

    def to_json(self) -> dict[str, Any]:
        return {"subject": self.subject, "target": self.target, "fingerprint": self.fingerprint,
                "scope": self.scope, "created_at": iso(self.created_at), "expires_at": iso(self.expires_at),
                "request_id": self.request_id}


@dataclass(frozen=True, slots=True)
class ApprovalRequest:
    """One held statement and everything an approver needs to judge it."""

    id: str
    created_at: datetime
    requester: Requester
    target: str
    database: str
    sql: str
    params: tuple[str, ...] | None
    classification: tuple[dict[str, Any], ...]
    rule: str
    rule_line: int | None
    approver_groups: tuple[str, ...]
    min_approvals: int
    expires_at: datetime
    fingerprint: str  # the exact statement's grant key
    session_id: str | None = None
    client: str = ""
    role: str = ""
    message: str = ""
    status: Status = "pending"
    status_reason: str | None = None
    decided_at: datetime | None = None
    votes: tuple[Vote, ...] = field(default=())
    grant: Grant | None = None
    shape: str = ""  # the key a shape grant binds ("" for requests from before shape keys)
    free: tuple[str, ...] | None = None  # what a shape grant lets vary, as written (None: not known)

    @property
    def pending(self) -> bool:
        return self.status == "pending"

    @property
    def approvals(self) -> int:
        return sum(1 for v in self.votes if v.verdict == "approve")

    @property
    def denial(self) -> Vote | None:
        return next((v for v in self.votes if v.verdict == "deny"), None)

    @property
    def classes(self) -> list[str]:
        found: set[str] = set()
        for statement in self.classification:
            found.update(statement.get("classes", ()))
        return sorted(found)

    @property
    def timeout_seconds(self) -> float:
        return (self.expires_at - self.created_at).total_seconds()

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "status": self.status, "status_reason": self.status_reason,
            "created_at": iso(self.created_at), "expires_at": iso(self.expires_at),
            "decided_at": iso(self.decided_at),
            "requester": self.requester.to_json(), "session_id": self.session_id, "client": self.client,
            "role": self.role, "target": self.target, "database": self.database,
            "sql": self.sql, "params": None if self.params is None else list(self.params),
            "classes": self.classes, "statements": [dict(s) for s in self.classification],
            "rule": {"name": self.rule, "line": self.rule_line, "message": self.message},
            "approver_groups": list(self.approver_groups), "min_approvals": self.min_approvals,
            "approvals": self.approvals, "votes": [v.to_json() for v in self.votes],
            "fingerprint": self.fingerprint, "shape": self.shape or None,
            "free": None if self.free is None else list(self.free),
            "grant": None if self.grant is None else self.grant.to_json(),
        }


def _groups(text: str) -> tuple[str, ...]:
    return tuple(json.loads(text))


def _vote(row: sqlite3.Row) -> Vote:
    return Vote(row["approver_subject"], row["approver_display"], row["approver_kind"],
                _groups(row["approver_groups"]), row["verdict"], row["reason"], from_ms(row["at"]),  # type: ignore[arg-type]
                row["grant_minutes"], row["grant_scope"] or ("shape" if row["grant_minutes"] else None))


def _grant(row: sqlite3.Row) -> Grant:
    return Grant(row["subject"], row["target"], row["fingerprint"], from_ms(row["created_at"]),  # type: ignore[arg-type]
                 from_ms(row["expires_at"]), row["request_id"], row["scope"])  # type: ignore[arg-type]


def _request(row: sqlite3.Row, votes: Sequence[Vote], grant: Grant | None) -> ApprovalRequest:
    params = row["params"]
    return ApprovalRequest(
        id=row["id"], created_at=from_ms(row["created_at"]),  # type: ignore[arg-type]
        requester=Requester(row["requester_subject"], row["requester_display"], row["requester_kind"],
                            _groups(row["requester_groups"])),
        target=row["target"], database=row["database"], sql=row["sql"],
        params=None if params is None else tuple(json.loads(params)),
        classification=tuple(json.loads(row["classification"])), rule=row["rule"], rule_line=row["rule_line"],
        approver_groups=_groups(row["approver_groups"]), min_approvals=row["min_approvals"],
        expires_at=from_ms(row["expires_at"]), fingerprint=row["fingerprint"],  # type: ignore[arg-type]
        session_id=row["session_id"], client=row["client"], role=row["role"], message=row["message"],
        status=row["status"], status_reason=row["status_reason"], decided_at=from_ms(row["decided_at"]),
        votes=tuple(votes), grant=grant, shape=row["shape"],
        free=None if row["free"] is None else tuple(json.loads(row["free"])),
    )


def _load(conn: sqlite3.Connection, rows: Iterable[sqlite3.Row]) -> list[ApprovalRequest]:
    """Requests with their votes and grants (three queries however many requests)."""
    rows = list(rows)
    if not rows:
        return []
    ids = [r["id"] for r in rows]
    marks = ",".join("?" * len(ids))
    votes: dict[str, list[Vote]] = {}
    for v in conn.execute(f"SELECT * FROM decisions WHERE request_id IN ({marks}) ORDER BY at, id", ids):
        votes.setdefault(v["request_id"], []).append(_vote(v))
    grants = {g["request_id"]: _grant(g)
              for g in conn.execute(f"SELECT * FROM grants WHERE request_id IN ({marks})", ids)}
    return [_request(r, votes.get(r["id"], ()), grants.get(r["id"])) for r in rows]


# --- writing ------------------------------------------------------------------------------

class StoreTransaction:
    """The writes of one transaction (from :meth:`ApprovalStore.write`); the revision is
    bumped once, at the first write."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn
        self._bumped = False

    def _bump(self) -> None:
        if not self._bumped:
            self.conn.execute("UPDATE revision SET value = value + 1 WHERE id = 1")
            self._bumped = True

    def get(self, request_id: str) -> ApprovalRequest | None:
        found = _load(self.conn, self.conn.execute("SELECT * FROM requests WHERE id = ?", (request_id,)))
        return found[0] if found else None

    def insert_request(self, request: ApprovalRequest) -> ApprovalRequest:
        """Store a new request; a colliding id is replaced by a fresh one."""
        for _ in range(_ID_ATTEMPTS):
            if self.conn.execute("SELECT 1 FROM requests WHERE id = ?", (request.id,)).fetchone() is None:
                break
            request = replace(request, id=new_request_id())
        else:
            raise StoreError(f"could not find a free request id in {_ID_ATTEMPTS} attempts")
        r = request
        self._bump()
        self.conn.execute(
            "INSERT INTO requests (id, created_at, session_id, requester_subject, requester_display,"
            " requester_kind, requester_groups, client, role, target, database, sql, params, classification,"
            " rule, rule_line, message, approver_groups, min_approvals, expires_at, status, fingerprint, shape, free)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?)",
            (r.id, to_ms(r.created_at), r.session_id, r.requester.subject, r.requester.display, r.requester.kind,
             json.dumps(list(r.requester.groups)), r.client, r.role, r.target, r.database, r.sql,
             None if r.params is None else json.dumps(list(r.params)), json.dumps(list(r.classification)),
             r.rule, r.rule_line, r.message, json.dumps(list(r.approver_groups)), r.min_approvals,
             to_ms(r.expires_at), r.fingerprint, r.shape, None if r.free is None else json.dumps(list(r.free))),
        )
        return request

    def add_vote(self, request_id: str, vote: Vote) -> None:
        self._bump()
        self.conn.execute(
            "INSERT INTO decisions (request_id, approver_subject, approver_display, approver_kind, approver_groups,"
            " verdict, reason, grant_minutes, grant_scope, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (request_id, vote.approver_subject, vote.approver_display, vote.approver_kind,
             json.dumps(list(vote.approver_groups)), vote.verdict, vote.reason, vote.grant_minutes,
             vote.grant_scope, to_ms(vote.at)),
        )

    def settle(self, request_id: str, status: Status, at: datetime, reason: str | None = None) -> None:
        """Move a pending request to its final ``status``; a settled one is never changed."""
        if status == "pending":
            raise ValueError("a request is settled to approved, denied, expired or withdrawn")
        self._bump()
        changed = self.conn.execute(
            "UPDATE requests SET status = ?, status_reason = ?, decided_at = ? WHERE id = ? AND status = 'pending'",
            (status, reason, to_ms(at), request_id),
        ).rowcount
        if changed != 1:
            raise StoreError(f"request {request_id} is not pending")

    def add_grant(self, grant: Grant) -> None:
        self._bump()
        self.conn.execute(
            "INSERT INTO grants (subject, target, fingerprint, created_at, expires_at, request_id, scope)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (grant.subject, grant.target, grant.fingerprint, to_ms(grant.created_at), to_ms(grant.expires_at),
             grant.request_id, grant.scope),
        )

    def end_grant(self, request_id: str, at: datetime) -> bool:
        """End the grant ``request_id`` made, now (its expiry set to ``at``); False: no live one."""
        self._bump()
        return self.conn.execute("UPDATE grants SET expires_at = ? WHERE request_id = ? AND expires_at > ?",
                                 (to_ms(at), request_id, to_ms(at))).rowcount == 1

    def overdue(self, now: datetime) -> list[str]:
        """Ids of pending requests whose time is up."""
        rows = self.conn.execute("SELECT id FROM requests WHERE status = 'pending' AND expires_at <= ?"
                                 " ORDER BY expires_at", (to_ms(now),))
        return [r["id"] for r in rows]


# --- the store ----------------------------------------------------------------------------

class ApprovalStore:
    """Approval requests, votes and grants in ``path`` (a SQLite file shared by processes,
    or a ``postgresql://`` URL shared by appliances: appliance.state)."""

    def __init__(self, path: str | Path, *, create: bool = True):
        try:
            self.db = open_database(path, MIGRATIONS, name="approvals", create=create)
        except (StateError, sqlite3.Error) as exc:
            raise StoreError(f"approvals database: {exc}") from None
        self.path = self.db.path

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def write(self) -> Iterator[StoreTransaction]:
        """One write transaction (``BEGIN IMMEDIATE``: the writer lock is taken first, so
        checks made inside still hold when the writes commit)."""
        with self.db.transaction() as conn:
            yield StoreTransaction(conn)

    # --- reading ------------------------------------------------------------------------

    def revision(self) -> int:
        """A counter that changes whenever anything in the store did."""
        return self.db.connection().execute("SELECT value FROM revision WHERE id = 1").fetchone()[0]

    def get(self, request_id: str) -> ApprovalRequest | None:
        with self.db.transaction(write=False) as conn:
            found = _load(conn, conn.execute("SELECT * FROM requests WHERE id = ?", (request_id,)))
        return found[0] if found else None

    def get_many(self, request_ids: Iterable[str]) -> dict[str, ApprovalRequest]:
        ids = list(dict.fromkeys(request_ids))
        out: dict[str, ApprovalRequest] = {}
        # SQLite's default limit on bound parameters is 999 (older builds): stay below it.
        with self.db.transaction(write=False) as conn:
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                rows = conn.execute(f"SELECT * FROM requests WHERE id IN ({','.join('?' * len(chunk))})", chunk)
                out.update((r.id, r) for r in _load(conn, rows))
        return out

    def list(self, status: Status | None = None, limit: int = 100, *,
             visible_to: tuple[str, Sequence[str]] | None = None) -> list[ApprovalRequest]:
        """Newest first. ``visible_to=(subject, groups)``: only requests that ``subject`` made,
        or whose approver groups include one of ``groups`` (filtered before the limit)."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"unknown status {status!r} (one of {', '.join(STATUSES)})")
        where: list[str] = []
        params: list[Any] = []
        if status is not None:
            where.append("status = ?")
            params.append(status)
        if visible_to is not None:
            subject, groups = visible_to
            groups = list(dict.fromkeys(groups))[:500]  # below SQLite's bound-parameter limit
            seen = "requester_subject = ?"
            params.append(subject)
            if groups:
                # The same test in each dialect: one of the request's approver groups is ours.
                each = ("json_array_elements_text(requests.approver_groups::json) AS json_each(value)"
                        if self.db.dialect == "postgresql" else "json_each(requests.approver_groups)")
                seen += (f" OR EXISTS (SELECT 1 FROM {each}"
                         f" WHERE json_each.value IN ({','.join('?' * len(groups))}))")
                params.extend(groups)
            where.append(f"({seen})")
        sql = "SELECT * FROM requests" + (" WHERE " + " AND ".join(where) if where else "")
        with self.db.transaction(write=False) as conn:
            rows = conn.execute(sql + " ORDER BY created_at DESC, id LIMIT ?", [*params, int(limit)])
            return _load(conn, rows)

    def any_overdue(self, now: datetime) -> bool:
        """Whether some pending request's time is up (a read: no writer lock taken)."""
        return self.db.connection().execute(
            "SELECT 1 FROM requests WHERE status = 'pending' AND expires_at <= ? LIMIT 1", (to_ms(now),)
        ).fetchone() is not None

    def active_grants(self, now: datetime) -> list[Grant]:
        rows = self.db.connection().execute("SELECT * FROM grants WHERE expires_at > ? ORDER BY expires_at",
                                            (to_ms(now),))
        return [_grant(r) for r in rows]

    def active_grant(self, subject: str, target: str, fingerprint: str, now: datetime) -> Grant | None:
        """The longest-lasting live grant for exactly this identity, target and shape."""
        row = self.db.connection().execute(
            "SELECT * FROM grants WHERE subject = ? AND target = ? AND fingerprint = ? AND expires_at > ?"
            " ORDER BY expires_at DESC LIMIT 1", (subject, target, fingerprint, to_ms(now))).fetchone()
        return None if row is None else _grant(row)


__all__ = [
    "APPROVALS_FILE",
    "ID_PREFIX",
    "STATUSES",
    "ApprovalRequest",
    "ApprovalStore",
    "Grant",
    "Requester",
    "Status",
    "StoreError",
    "StoreTransaction",
    "Vote",
    "from_ms",
    "iso",
    "new_request_id",
    "normalize_request_id",
    "to_ms",
    "utcnow",
]
