"""The registry of issued client certificates, their revocations, revoked identities and used tokens.

Every revocation bumps one counter, ``revision``, and stamps the revoked rows with it. The
proxy calls :meth:`CertificateRegistry.is_revoked` on each new connection — one indexed
read of the counter plus a set lookup, and a revocation written by another process (the
CLI) counts from the next call — and polls :meth:`revision` every second or so, fetching
only what changed (:meth:`revoked_serials`) to close live sessions of revoked certificates.

Revoking an identity (:meth:`CertificateRegistry.revoke_subject`) also blocks the subject:
enrollment refuses it until an operator reinstates it (:meth:`reinstate_subject`). Both acts
are kept, in order, in ``subject_events`` (who, when, why); the last one says whether the
subject is blocked now. Each enrollment token's ``jti`` is remembered in ``used_tokens``
until the token expires, so one token enrolls one certificate whichever worker process
sees it: :meth:`record_enrollment` checks the block, claims the ``jti`` and records the
certificate in one transaction, so neither a revocation nor a second request with the
same token can slip in between the check and the write.
"""

from __future__ import annotations

import json
import string
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from appliance.identity.certs import (
    certificate_pem,
    fingerprint,
    identity_from_certificate,
    not_valid_after,
    not_valid_before,
    utc,
    utcnow,
)
from appliance.model.identity import Identity
from appliance.state import open_database
from appliance.state.db import StateError

REGISTRY_FILE = "certificates.db"

MIGRATIONS = (
    (
        """CREATE TABLE certificates (
            serial TEXT PRIMARY KEY,        -- lowercase hex: 128-bit serials overflow SQLite integers
            subject TEXT NOT NULL,
            kind TEXT NOT NULL,
            groups TEXT NOT NULL,           -- JSON array
            email TEXT,
            issuer TEXT,
            fingerprint TEXT NOT NULL UNIQUE,
            not_before INTEGER NOT NULL,    -- Unix seconds
            not_after INTEGER NOT NULL,
            issued_at INTEGER NOT NULL,
            pem TEXT NOT NULL,
            revoked_at INTEGER,
            revoked_reason TEXT,
            revoked_by TEXT,
            revoked_revision INTEGER
        )""",
        "CREATE INDEX certificates_subject ON certificates (subject)",
        (
            "CREATE INDEX certificates_revoked_revision ON certificates (revoked_revision) "
            "WHERE revoked_revision IS NOT NULL"
        ),
        "CREATE TABLE revision (id INTEGER PRIMARY KEY CHECK (id = 1), value INTEGER NOT NULL)",
        "INSERT INTO revision VALUES (1, 0)",
    ),
    (
        # Revocations and reinstatements of whole identities, in order; the last one per
        # subject says whether it may enroll.
        """CREATE TABLE subject_events (
            id INTEGER PRIMARY KEY,
            subject TEXT NOT NULL,
            action TEXT NOT NULL CHECK (action IN ('revoke', 'reinstate')),
            at INTEGER NOT NULL,            -- Unix seconds
            reason TEXT NOT NULL,
            "by" TEXT NOT NULL              -- quoted: a reserved word in PostgreSQL
        )""",
        "CREATE INDEX subject_events_subject ON subject_events (subject, id)",
        # Enrollment tokens already used, kept until they expire (then useless anyway).
        """CREATE TABLE used_tokens (
            issuer TEXT NOT NULL,
            jti TEXT NOT NULL,
            subject TEXT NOT NULL,
            used_at INTEGER NOT NULL,       -- Unix seconds
            expires_at INTEGER NOT NULL,    -- the token's exp plus the validator's leeway
            serial TEXT,                    -- the certificate it enrolled
            PRIMARY KEY (issuer, jti)
        )""",
        "CREATE INDEX used_tokens_expires ON used_tokens (expires_at)",
    ),
)


class RegistryError(Exception):
    """A registry request that can't be done: an unknown serial, a missing reason, …"""


class SubjectRevoked(RegistryError):
    """Enrollment refused: the identity was revoked and not reinstated since."""

    def __init__(self, event: SubjectEvent):
        self.event = event
        super().__init__(
            f"identity {event.subject!r} was revoked at {event.at:%Y-%m-%d %H:%M:%S} UTC by {event.by}: "
            f"{event.reason}; it cannot enroll until an operator reinstates it "
            f"(tollgate certs reinstate --subject {event.subject})")


class TokenAlreadyUsed(RegistryError):
    """Enrollment refused: this token (its ``jti``) already enrolled a certificate."""

    def __init__(self, jti: str, used_at: datetime):
        self.jti, self.used_at = jti, used_at
        super().__init__(f"this token (jti {jti!r}) was already used to enroll a certificate, at "
                         f"{used_at:%Y-%m-%d %H:%M:%S} UTC; a token enrolls one certificate only: "
                         "get a new token from the identity provider")


def format_serial(serial: int) -> str:
    """Upper-case hex as ``openssl x509 -serial`` prints it, padded to 128 bits."""
    return f"{serial:032X}"


def serial_candidates(text: str) -> list[int]:
    """What ``text`` may mean as a serial: hex (with or without colons, or 0x) or decimal.

    An all-digit string is both; the registry picks whichever exists.
    """
    raw = text.strip().lower()
    if raw.startswith("0x"):
        raw, forms = raw[2:], ("hex",)
    elif ":" in raw:
        parts = raw.split(":")
        if not all(len(p) in (1, 2) for p in parts):
            raise RegistryError(f"{text!r} is not a serial number (colon-separated hex needs byte pairs)")
        raw, forms = "".join(parts), ("hex",)
    elif raw.isdigit():
        forms = ("hex", "dec")
    else:
        forms = ("hex",)
    if not raw or not all(c in string.hexdigits for c in raw):
        raise RegistryError(f"{text!r} is not a serial number (hex, with or without colons, or decimal)")
    candidates = [int(raw, 16)] + ([int(raw, 10)] if "dec" in forms else [])
    return sorted(set(candidates), key=candidates.index)


def _epoch(dt: datetime) -> int:
    return int(utc(dt).timestamp())


def _from_epoch(value: int | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


@dataclass(frozen=True, slots=True)
class CertRecord:
    """One issued certificate as the registry knows it."""

    serial: int
    identity: Identity
    fingerprint: str
    not_before: datetime
    not_after: datetime
    issued_at: datetime
    revoked_at: datetime | None = None
    revoked_reason: str | None = None
    revoked_by: str | None = None
    revoked_revision: int | None = None

    @property
    def subject(self) -> str:
        return self.identity.subject

    @property
    def serial_hex(self) -> str:
        return format_serial(self.serial)

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def status(self, now: datetime | None = None) -> str:
        """``revoked``, ``expired`` or ``valid`` (revoked wins: it's the operator's act)."""
        if self.revoked:
            return "revoked"
        return "expired" if (utcnow() if now is None else utc(now)) >= self.not_after else "valid"

    def to_json(self, now: datetime | None = None) -> dict[str, Any]:
        def iso(dt: datetime | None) -> str | None:
            return None if dt is None else dt.isoformat().replace("+00:00", "Z")

        return {
            "serial": self.serial_hex, "subject": self.subject, "kind": self.identity.kind,
            "groups": list(self.identity.groups), "email": self.identity.email, "issuer": self.identity.issuer,
            "fingerprint_sha256": self.fingerprint, "not_before": iso(self.not_before),
            "not_after": iso(self.not_after), "issued_at": iso(self.issued_at), "status": self.status(now),
            "revoked_at": iso(self.revoked_at), "revoked_reason": self.revoked_reason, "revoked_by": self.revoked_by,
        }


@dataclass(frozen=True, slots=True)
class SubjectEvent:
    """An operator revoking or reinstating a whole identity (by subject)."""

    subject: str
    action: str  # "revoke" or "reinstate"
    at: datetime
    reason: str
    by: str

    def to_json(self) -> dict[str, Any]:
        return {"subject": self.subject, "action": self.action,
                "at": self.at.isoformat().replace("+00:00", "Z"), "reason": self.reason, "by": self.by}


def _event(row: Any) -> SubjectEvent:
    return SubjectEvent(row["subject"], row["action"], _from_epoch(row["at"]), row["reason"],  # type: ignore[arg-type]
                        row["by"])


def _record(row: Any) -> CertRecord:
    identity = Identity(row["subject"], row["kind"], tuple(json.loads(row["groups"])), row["email"], row["issuer"])
    return CertRecord(
        serial=int(row["serial"], 16), identity=identity, fingerprint=row["fingerprint"],
        not_before=_from_epoch(row["not_before"]), not_after=_from_epoch(row["not_after"]),  # type: ignore[arg-type]
        issued_at=_from_epoch(row["issued_at"]), revoked_at=_from_epoch(row["revoked_at"]),  # type: ignore[arg-type]
        revoked_reason=row["revoked_reason"], revoked_by=row["revoked_by"], revoked_revision=row["revoked_revision"],
    )


def _required(what: str, value: str, act: str = "a revocation") -> str:
    value = (value or "").strip()
    if not value:
        raise RegistryError(f"{act} needs {what}")
    return value


class CertificateRegistry:
    """Issued client certificates and revocations in ``path`` (a SQLite file shared by
    processes, or a ``postgresql://`` URL shared by appliances: appliance.state)."""

    def __init__(self, path: str | Path, *, create: bool = True):
        try:
            self.db = open_database(path, MIGRATIONS, name="certificates", create=create)
        except StateError as exc:
            raise RegistryError(f"certificate registry: {exc}") from None
        self.path = self.db.path
        # The proxy's view of revocations: serials revoked up to _known_revision.
        self._revoked: set[int] = set()
        self._known_revision = -1
        self._refresh_lock = threading.Lock()

    def close(self) -> None:
        self.db.close()

    # --- writing ------------------------------------------------------------------------

    def record_issued(self, cert: x509.Certificate, identity: Identity, *, now: datetime | None = None) -> CertRecord:
        """Remember a client certificate the CA just issued for ``identity`` (refused, like an
        enrollment, while the subject is revoked: :class:`SubjectRevoked`)."""
        issued = _epoch(utcnow() if now is None else now)
        with self.db.transaction() as conn:
            block = self._block(conn, identity.subject)
            if block is not None:
                raise SubjectRevoked(block)
            self._insert(conn, cert, identity, issued)
        return self._get(f"{cert.serial_number:x}")  # type: ignore[return-value]

    @staticmethod
    def _insert(conn: Any, cert: x509.Certificate, identity: Identity, issued: int) -> None:
        carried = identity_from_certificate(cert)
        if carried != identity:
            raise RegistryError(f"certificate {format_serial(cert.serial_number)} carries {carried.uri}, "
                                f"not {identity.uri}")
        if conn.execute("SELECT 1 FROM certificates WHERE serial = ?", (f"{cert.serial_number:x}",)).fetchone():
            raise RegistryError(f"a certificate with serial {format_serial(cert.serial_number)} is already recorded")
        conn.execute(
            "INSERT INTO certificates (serial, subject, kind, groups, email, issuer, fingerprint, not_before,"
            " not_after, issued_at, pem) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (f"{cert.serial_number:x}", identity.subject, identity.kind, json.dumps(list(identity.groups)),
             identity.email, identity.issuer, fingerprint(cert), _epoch(not_valid_before(cert)),
             _epoch(not_valid_after(cert)), issued, certificate_pem(cert).decode()),
        )

    def revoke(self, serial: int, reason: str, by: str, *, now: datetime | None = None) -> CertRecord:
        """Revoke one certificate. Revoking a revoked one changes nothing and returns it as it was."""
        reason, by = _required("a reason", reason), _required("who revokes it (by)", by)
        key = f"{serial:x}"
        with self.db.transaction() as conn:
            row = conn.execute("SELECT revoked_at FROM certificates WHERE serial = ?", (key,)).fetchone()
            if row is None:
                raise RegistryError(f"no certificate with serial {format_serial(serial)} in {self.path}")
            if row["revoked_at"] is None:
                revision = self._bump(conn)
                conn.execute(
                    "UPDATE certificates SET revoked_at = ?, revoked_reason = ?, revoked_by = ?, revoked_revision = ?"
                    " WHERE serial = ?",
                    (_epoch(utcnow() if now is None else now), reason, by, revision, key),
                )
        return self._get(key)  # type: ignore[return-value]

    def revoke_subject(self, subject: str, reason: str, by: str, *, now: datetime | None = None) -> list[CertRecord]:
        """Revoke every not-yet-revoked certificate of ``subject`` and block the subject from
        enrolling until :meth:`reinstate_subject`; returns the certificates revoked now.

        One transaction: an enrollment either committed before (and its certificate is
        revoked here) or sees the block (see :meth:`record_enrollment`). A subject already
        blocked stays blocked as it was (its first revocation is the one on record).
        """
        reason, by = _required("a reason", reason), _required("who revokes it (by)", by)
        subject = _required("a subject", subject)
        at = _epoch(utcnow() if now is None else now)
        with self.db.transaction() as conn:
            keys = [r["serial"] for r in conn.execute(
                "SELECT serial FROM certificates WHERE subject = ? AND revoked_at IS NULL", (subject,))]
            if keys:
                revision = self._bump(conn)
                conn.execute(
                    "UPDATE certificates SET revoked_at = ?, revoked_reason = ?, revoked_by = ?, revoked_revision = ?"
                    " WHERE subject = ? AND revoked_at IS NULL",
                    (at, reason, by, revision, subject),
                )
            if self._block(conn, subject) is None:
                conn.execute('INSERT INTO subject_events (subject, action, at, reason, "by")'
                             " VALUES (?, 'revoke', ?, ?, ?)", (subject, at, reason, by))
        return [self._get(k) for k in keys]  # type: ignore[misc]

    def reinstate_subject(self, subject: str, reason: str, by: str, *,
                          now: datetime | None = None) -> SubjectEvent | None:
        """Let a revoked subject enroll again; returns the revocation lifted, or None when the
        subject was not revoked (nothing is recorded then). Its revoked certificates stay
        revoked: it enrolls anew."""
        reason = _required("a reason", reason, "a reinstatement")
        by = _required("who reinstates it (by)", by, "a reinstatement")
        subject = _required("a subject", subject, "a reinstatement")
        with self.db.transaction() as conn:
            block = self._block(conn, subject)
            if block is not None:
                conn.execute('INSERT INTO subject_events (subject, action, at, reason, "by")'
                             " VALUES (?, 'reinstate', ?, ?, ?)",
                             (subject, _epoch(utcnow() if now is None else now), reason, by))
        return block

    def record_enrollment(self, cert: x509.Certificate, identity: Identity, *, issuer: str, jti: str,
                          token_expires: datetime, now: datetime | None = None) -> CertRecord:
        """Record a certificate issued to an enrolling ``identity`` on the strength of the token
        ``(issuer, jti)``, valid until ``token_expires`` — unless the subject is revoked
        (:class:`SubjectRevoked`) or the token already enrolled one (:class:`TokenAlreadyUsed`).

        The checks and the writes are one transaction; a refused certificate is not recorded
        and must not be handed out.
        """
        jti = (jti or "").strip()
        if not jti:
            raise RegistryError("an enrollment token needs a jti to be remembered by")
        moment = utcnow() if now is None else utc(now)
        at = _epoch(moment)
        with self.db.transaction() as conn:
            block = self._block(conn, identity.subject)
            if block is not None:
                raise SubjectRevoked(block)
            # Forget tokens that have expired: they can't be presented again anyway.
            conn.execute("DELETE FROM used_tokens WHERE expires_at <= ?", (at,))
            used = conn.execute("SELECT used_at FROM used_tokens WHERE issuer = ? AND jti = ?",
                                (issuer, jti)).fetchone()
            if used is not None:
                raise TokenAlreadyUsed(jti, _from_epoch(used["used_at"]))  # type: ignore[arg-type]
            conn.execute("INSERT INTO used_tokens (issuer, jti, subject, used_at, expires_at, serial)"
                         " VALUES (?, ?, ?, ?, ?, ?)",
                         (issuer, jti, identity.subject, at, _epoch(token_expires), f"{cert.serial_number:x}"))
            self._insert(conn, cert, identity, at)
        return self._get(f"{cert.serial_number:x}")  # type: ignore[return-value]

    @staticmethod
    def _block(conn: Any, subject: str) -> SubjectEvent | None:
        row = conn.execute("SELECT * FROM subject_events WHERE subject = ? ORDER BY id DESC LIMIT 1",
                           (subject,)).fetchone()
        return _event(row) if row is not None and row["action"] == "revoke" else None

    @staticmethod
    def _bump(conn: Any) -> int:
        return conn.execute("UPDATE revision SET value = value + 1 WHERE id = 1 RETURNING value").fetchone()[0]

    # --- reading ------------------------------------------------------------------------

    def _get(self, key: str) -> CertRecord | None:
        row = self.db.connection().execute("SELECT * FROM certificates WHERE serial = ?", (key,)).fetchone()
        return None if row is None else _record(row)

    def get(self, serial: int) -> CertRecord | None:
        return self._get(f"{serial:x}")

    def resolve_serial(self, text: str) -> int:
        """The serial an operator typed, however written; RegistryError if none or ambiguous."""
        found = [s for s in serial_candidates(text) if self.get(s) is not None]
        if not found:
            raise RegistryError(f"no certificate with serial {text.strip()} in {self.path}")
        if len(found) > 1:
            raise RegistryError(f"serial {text.strip()} is ambiguous: both {format_serial(found[0])} (hex) and "
                                f"{format_serial(found[1])} (decimal {found[1]}) exist; write it with 0x or colons")
        return found[0]

    def list(self, include_expired: bool = False, *, now: datetime | None = None) -> list[CertRecord]:
        """Certificates oldest first; without ``include_expired`` only those not yet expired."""
        sql, params = "SELECT * FROM certificates", ()
        if not include_expired:
            sql, params = sql + " WHERE not_after > ?", (_epoch(utcnow() if now is None else now),)
        rows = self.db.connection().execute(sql + " ORDER BY issued_at, serial", params).fetchall()
        return [_record(r) for r in rows]

    def revoked_subject(self, subject: str) -> SubjectEvent | None:
        """The revocation that blocks ``subject`` from enrolling now, or None."""
        return self._block(self.db.connection(), subject)

    def revoked_subjects(self) -> list[SubjectEvent]:
        """Every subject blocked now, by the revocation that blocked it, oldest first."""
        rows = self.db.connection().execute(
            "SELECT e.* FROM subject_events e WHERE e.action = 'revoke' AND e.id ="
            " (SELECT max(id) FROM subject_events WHERE subject = e.subject) ORDER BY e.id").fetchall()
        return [_event(r) for r in rows]

    def subject_history(self, subject: str) -> list[SubjectEvent]:
        """Every revocation and reinstatement of ``subject``, in order."""
        rows = self.db.connection().execute("SELECT * FROM subject_events WHERE subject = ? ORDER BY id",
                                            (subject,)).fetchall()
        return [_event(r) for r in rows]

    def token_used(self, issuer: str, jti: str, *, now: datetime | None = None) -> datetime | None:
        """When the token ``(issuer, jti)`` enrolled a certificate, if it did and has not expired."""
        row = self.db.connection().execute(
            "SELECT used_at FROM used_tokens WHERE issuer = ? AND jti = ? AND expires_at > ?",
            (issuer, jti, _epoch(utcnow() if now is None else now))).fetchone()
        return None if row is None else _from_epoch(row["used_at"])

    def revision(self) -> int:
        """The revocation counter: it changes exactly when something was revoked."""
        return self.db.connection().execute("SELECT value FROM revision WHERE id = 1").fetchone()[0]

    def revoked_serials(self, since_revision: int = 0) -> tuple[int, frozenset[int]]:
        """(current revision, serials revoked after ``since_revision``), from one snapshot."""
        with self.db.transaction(write=False) as conn:
            revision = conn.execute("SELECT value FROM revision WHERE id = 1").fetchone()[0]
            rows = conn.execute("SELECT serial FROM certificates WHERE revoked_revision > ?", (since_revision,))
            serials = frozenset(int(r["serial"], 16) for r in rows)
        return revision, serials

    def is_revoked(self, serial: int) -> bool:
        """Whether ``serial`` is revoked, as of now (a serial never recorded is not revoked)."""
        current = self.revision()
        if current != self._known_revision:
            with self._refresh_lock:
                if current != self._known_revision:
                    # Revisions only grow; one that went back means a new database: start over.
                    since = self._known_revision if 0 <= self._known_revision <= current else 0
                    revision, serials = self.revoked_serials(since)
                    # A new set, swapped in whole: readers outside the lock never see it
                    # half-built.
                    self._revoked = (self._revoked if since else set()) | serials
                    self._known_revision = revision
        return serial in self._revoked


__all__ = [
    "REGISTRY_FILE",
    "CertRecord",
    "CertificateRegistry",
    "RegistryError",
    "SubjectEvent",
    "SubjectRevoked",
    "TokenAlreadyUsed",
    "format_serial",
    "serial_candidates",
]
