"""A message channel between the proxy's processes: the primary and each of its workers.

One stream socket (a socketpair end, inherited by the worker) carries length-prefixed
messages, each a tuple ``(kind, *args)`` of plain values encoded with :mod:`marshal`:
both ends are the same Tollgate, so no schema is needed, and marshal is the fastest
stdlib codec that can't run code while decoding. Handlers are registered by kind; one
that raises is logged, and the channel goes on.

Messages sent within one event-loop iteration leave in one write (an audit record per
statement would otherwise be a syscall each). When the other end goes away
``on_lost`` is called once: a worker whose primary died stops (nothing may run without
its audit writer), the primary starts a new worker.
"""

from __future__ import annotations

import asyncio
import logging
import marshal
import socket
import struct
from collections.abc import Callable
from typing import Any

log = logging.getLogger("tollgate.channel")

_HEADER = struct.Struct("!I")
MAX_MESSAGE = 1 << 30
Handler = Callable[..., None]


def encode(kind: str, *args: Any) -> bytes:
    return marshal.dumps((kind, *args))


class Channel(asyncio.Protocol):
    """One end of a primary ↔ worker channel."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.handlers: dict[str, Handler] = {}
        self.on_lost: Callable[[], None] | None = None
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._outgoing: list[bytes] = []
        self._flush_scheduled = False
        self.lost = False

    @classmethod
    async def connect(cls, sock: socket.socket, name: str) -> Channel:
        """Drive ``sock`` (a connected stream socket) with a new channel on the running loop."""
        loop = asyncio.get_running_loop()
        channel = cls(name)
        sock.setblocking(False)
        await loop.connect_accepted_socket(lambda: channel, sock=sock)
        return channel

    def on(self, kind: str, handler: Handler) -> None:
        self.handlers[kind] = handler

    # -- sending --

    def send(self, kind: str, *args: Any) -> None:
        """Queue one message; it leaves at the end of this loop iteration, in order."""
        self.send_encoded(encode(kind, *args))

    def send_encoded(self, data: bytes) -> None:
        """Queue a message :func:`encode` made (the caller looked at its bytes first)."""
        if self.lost:
            raise ConnectionError(f"the channel to {self.name} is closed")
        self._outgoing.append(_HEADER.pack(len(data)))
        self._outgoing.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        if self._outgoing and self.transport is not None and not self.lost:
            self.transport.write(b"".join(self._outgoing))
        self._outgoing.clear()

    def close(self) -> None:
        self.flush()
        if self.transport is not None:
            self.transport.close()

    # -- receiving --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        end = len(buffer)
        while end - start >= 4:
            (length,) = _HEADER.unpack_from(buffer, start)
            if length > MAX_MESSAGE:
                log.error("channel %s: a message of %d bytes; closing", self.name, length)
                self.close()
                return
            if end - start - 4 < length:
                break
            message = marshal.loads(memoryview(buffer)[start + 4:start + 4 + length])
            start += 4 + length
            self._dispatch(message)
        del buffer[:start]

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        handler = self.handlers.get(message[0])
        if handler is None:
            log.error("channel %s: no handler for %r", self.name, message[0])
            return
        try:
            handler(*message[1:])
        except Exception:
            log.exception("channel %s: handling %r failed", self.name, message[0])

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
        self.transport = None
        if self.on_lost is not None:
            self.on_lost()
