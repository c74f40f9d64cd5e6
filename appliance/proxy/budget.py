"""How many bytes of incomplete client messages all sessions together may hold.

A client message is buffered whole before it is judged, so a connection that announces a
large message and sends it slowly (or never finishes it) makes the proxy hold memory. One
connection is capped by ``max_client_message``; all of them together by this budget
(``max_buffered_total``). A session reserves a message's announced length as soon as its
header arrives — not as the body trickles in — so a flood of huge partial messages is
refused on their headers, before any of their bodies is read.

Small pieces (a statement that happens to arrive across two reads) are always granted,
and counted: so ordinary clients keep working while the budget is taken, and the budget is
exceeded by at most :data:`ALWAYS_GRANTED` per connection (and connections are capped).
"""

from __future__ import annotations

ALWAYS_GRANTED = 64 * 1024


class BufferBudget:
    """Bytes reserved across sessions (sans-io: a counter the sessions share)."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    def take(self, n: int, holding: int) -> bool:
        """Reserve n more bytes for a session that would then hold ``holding`` in all;
        False (nothing reserved) if that would pass the limit."""
        if holding > ALWAYS_GRANTED and self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


UNLIMITED = 1 << 62
