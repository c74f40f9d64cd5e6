"""Masking's refusal: a value it must not pass on and cannot make safe.

The session turns any hook's exception into a FATAL; this one carries the SQLSTATE, the
message and the hint the agent is shown (a card number in an int8 column: select it cast
to text), so the refusal says what to do about it.
"""

from __future__ import annotations


class MaskingError(Exception):
    """Raised when data can't be masked in its type or read to be checked: fail closed."""

    def __init__(self, sqlstate: str, message: str, hint: str | None = None):
        super().__init__(message)
        self.sqlstate, self.message, self.hint = sqlstate, message, hint
