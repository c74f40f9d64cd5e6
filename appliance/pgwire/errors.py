"""The one exception the pgwire codec raises for bytes or messages that break protocol 3.x.

A proxy turns it into a FATAL ErrorResponse and closes the connection, so its text is
written for the person reading that error: it names the message, the field and the
offending value.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Bytes on the wire (or a message to be encoded) violate the protocol."""

    # PostgreSQL reports framing and layout errors with protocol_violation; a proxy that
    # builds an ErrorResponse from this exception should use the same code.
    sqlstate: str = "08P01"

    @property
    def message(self) -> str:
        return str(self)
