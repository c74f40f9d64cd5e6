"""What the audit log raises: it cannot be used at all, or one record could not be kept.

Separate from :mod:`appliance.audit.store` so that the log's parts (segments, recovery,
group commit) raise the same errors the public :class:`~appliance.audit.store.AuditLog` does.
"""

from __future__ import annotations


class AuditError(Exception):
    """The audit log can't be opened or used (locked, corrupt, misconfigured)."""


class AuditUnavailable(AuditError):
    """A record could not be written or made durable: what depends on it must not proceed."""

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_
