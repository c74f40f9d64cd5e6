"""The errors that end a session: each becomes a FATAL ErrorResponse with its SQLSTATE."""

from __future__ import annotations


class SessionError(Exception):
    """Ends the session with a FATAL ErrorResponse to the client."""

    def __init__(self, sqlstate: str, message: str, detail: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.sqlstate, self.message, self.detail, self.hint = sqlstate, message, detail, hint


class AddonFailed(SessionError):
    """An addon's hook raised on data or on the session's life: the session ends, fail closed."""
