"""Streaming decoders: fed a connection's bytes, they hand back whole messages.

``FrontendDecoder`` (client → server: startup packets first, then typed messages) and
``BackendDecoder`` (server → client, including the one-byte answer to an SSLRequest) frame
with ``framing`` and decode with ``decoder``, returning None while a message is
incomplete. Untrusted input can only ever produce :class:`ProtocolError`; a decoder that
has raised it stays failed. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Iterator

from . import messages as m
from .decoder import BACKEND_DECODERS, FRONTEND_DECODERS, Decoder, decode_startup
from .errors import ProtocolError
from .framing import (
    BACKEND_BOUNDS,
    DEFAULT_MAX_MESSAGE_SIZE,
    FRONTEND_BOUNDS,
    MAX_STARTUP_PACKET_LENGTH,
    Bounds,
    frame_end,
    show_tag,
    startup_packet_end,
)

# Compacting the buffer only once this much has been consumed keeps the cost of
# consumption amortized O(1) per byte.
_COMPACT_AFTER = 1 << 16


class _StreamDecoder:
    """Buffering and failure handling shared by both directions."""

    def __init__(self, max_message_size: int) -> None:
        if max_message_size < 5:
            raise ValueError("max_message_size must be at least 5")
        self.max_message_size = max_message_size
        self._buf = bytearray()
        self._pos = 0
        self._error: ProtocolError | None = None

    @property
    def buffered_bytes(self) -> int:
        """Bytes fed but not yet returned as messages.

        After an SSLRequest is answered 'S' (or an SSLResponse 'S' is read), this must be
        zero: bytes that precede the TLS handshake are a protocol violation (the
        CVE-2021-23222 class of injection), not part of the encrypted stream.
        """
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._check_alive()
        self._buf += data

    def take_rest(self) -> bytes:
        """Hand the bytes fed but not yet returned to another reader (a relay taking over
        once a login is done); the decoder is empty afterwards."""
        with memoryview(self._buf) as view:
            rest = bytes(view[self._pos:])
        self._buf.clear()
        self._pos = 0
        return rest

    def next_message(self) -> m.Message | None:
        """The next complete message, or None if more bytes are needed."""
        self._check_alive()
        try:
            return self._next()
        except ProtocolError as exc:
            self._error = exc
            raise

    def __iter__(self) -> Iterator[m.Message]:
        while (message := self.next_message()) is not None:
            yield message

    def _next(self) -> m.Message | None:
        raise NotImplementedError

    def _check_alive(self) -> None:
        if self._error is not None:
            raise ProtocolError(f"decoder has already failed: {self._error}")

    def _take(self, start: int, end: int) -> bytes:
        """Copy buf[start:end] out once and consume the buffer up to ``end``."""
        with memoryview(self._buf) as view:
            body = bytes(view[start:end])
        self._consume(end)
        return body

    def _consume(self, end: int) -> None:
        if end == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif end >= _COMPACT_AFTER and end * 2 >= len(self._buf):
            del self._buf[:end]
            self._pos = 0
        else:
            self._pos = end

    def _typed(self, table: dict[int, Decoder], bounds: dict[int, Bounds], side: str) -> m.Message | None:
        buf, pos = self._buf, self._pos
        if len(buf) - pos < 5:
            return None
        end = frame_end(buf, pos, bounds, self.max_message_size, side)
        if len(buf) < end:
            return None
        return table[buf[pos]](self._take(pos + 5, end))


class FrontendDecoder(_StreamDecoder):
    """Decodes what a client sends: startup packets first, then typed messages."""

    def __init__(
        self,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_startup_size: int = MAX_STARTUP_PACKET_LENGTH,
    ) -> None:
        super().__init__(max_message_size)
        self.max_startup_size = max_startup_size
        self._phase = "startup"  # → "typed" after StartupMessage, "cancelled" after CancelRequest

    @property
    def in_startup_phase(self) -> bool:
        return self._phase == "startup"

    def _next(self) -> m.Message | None:
        if self._phase == "typed":
            return self._typed(FRONTEND_DECODERS, FRONTEND_BOUNDS, "frontend")
        if self._phase == "cancelled":
            if self.buffered_bytes:
                raise ProtocolError(
                    f"{self.buffered_bytes} unexpected bytes after a CancelRequest, "
                    "which must be the last thing on its connection"
                )
            return None
        return self._startup()

    def _startup(self) -> m.Message | None:
        buf, pos = self._buf, self._pos
        if len(buf) - pos < 4:
            return None
        end = startup_packet_end(buf, pos, self.max_startup_size)
        if len(buf) < end:
            return None
        packet = decode_startup(self._take(pos + 4, end))
        if isinstance(packet, m.StartupMessage):
            self._phase = "typed"
        elif isinstance(packet, m.CancelRequest):
            self._phase = "cancelled"
        return packet


class BackendDecoder(_StreamDecoder):
    """Decodes what a server sends: typed messages, or the single-byte answer to an
    SSLRequest/GSSENCRequest when told to expect one."""

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        super().__init__(max_message_size)
        self._expect: str | None = None

    def expect_ssl_response(self) -> None:
        """The next byte answers an SSLRequest: b"S" or b"N"."""
        self._check_alive()
        self._expect = "SSLRequest"

    def expect_gssenc_response(self) -> None:
        """The next byte answers a GSSENCRequest: b"G" or b"N"."""
        self._check_alive()
        self._expect = "GSSENCRequest"

    def _next(self) -> m.Message | None:
        if self._expect is None:
            return self._typed(BACKEND_DECODERS, BACKEND_BOUNDS, "backend")
        if self.buffered_bytes == 0:
            return None
        byte = self._buf[self._pos]
        request, self._expect = self._expect, None
        self._consume(self._pos + 1)
        if request == "SSLRequest" and byte in b"SN":
            return m.SSLResponse(byte == ord("S"))
        if request == "GSSENCRequest" and byte in b"GN":
            return m.GSSENCResponse(byte == ord("G"))
        accepted = "'S' or 'N'" if request == "SSLRequest" else "'G' or 'N'"
        # Like libpq, an 'E' here is not read further: it comes from an unauthenticated
        # server and may use the long-gone protocol 2 layout.
        raise ProtocolError(
            f"server answered {request} with {show_tag(byte)} instead of {accepted}"
        )
