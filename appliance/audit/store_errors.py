"""What the audit log raises: it cannot be used at all, or one record could not be kept.

Separate from :mod:`appliance.audit.store` so that the log's parts (segments, recovery,
group commit) raise the same errors the public :class:`~appliance.audit.store.AuditLog` does.
"""

from __future__ import annotations


class AuditError(Exception):
    """The audit log can't be opened or used (locked, corrupt, misconfigured)."""


DISK_FULL_ERRNOS = frozenset({28, 122})  # ENOSPC, EDQUOT


class AuditUnavailable(AuditError):
    """A record could not be written or made durable: what depends on it must not proceed.

    ``sqlstate`` and ``hint`` are what a statement refused for it gets (the session reads
    them off the error a durability future fails with): 53100 when the disk is full."""

    hint = ("Nothing reaches the database unrecorded. The appliance operator must make the audit directory "
            "writable again; statements run again as soon as it is.")

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_

    @property
    def sqlstate(self) -> str:
        return "53100" if self.errno in DISK_FULL_ERRNOS else "58030"
