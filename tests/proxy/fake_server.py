"""A scripted fake PostgreSQL backend for socket-level proxy tests (127.0.0.1 only).

It logs anyone in (AuthenticationOk, ParameterStatus, BackendKeyData, ReadyForQuery) and
then follows the :class:`Script` registered under the connection's ``application_name``
(the proxy passes startup parameters through, so a test picks the script per connection):

* ``normal`` — a tiny, strict server: answers Query with one row, the extended protocol
  with its completions, and a frontend message its codec rejects with FATAL 08P01, as
  PostgreSQL would;
* ``garbage`` — after the first client bytes, sends ``garbage`` verbatim, then closes or
  keeps the connection open until the proxy closes it;
* ``login-garbage`` — sends ``garbage`` instead of the login answers, then closes;
* ``hold`` — never answers the startup; waits for the proxy to go away;
* ``stream`` — answers the first Query with ``rows`` DataRows of ``row_size`` bytes,
  honouring back-pressure (``drain``), and records what it sent.

Everything a test waits on is a ``threading.Event``: the backend runs on the harness's
event loop thread, tests run on the main thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import secrets
import threading
from dataclasses import dataclass

from appliance.pgwire import FrontendDecoder, ProtocolError
from appliance.pgwire import messages as m

BACKEND_PID = 4242
BACKEND_SECRET = b"\x01\x02\x03\x04"
LOGIN = b"".join(msg.encode() for msg in (
    m.AuthenticationOk(),
    m.ParameterStatus("server_version", "15.0 (fake)"),
    m.ParameterStatus("client_encoding", "UTF8"),
    m.BackendKeyData(BACKEND_PID, BACKEND_SECRET),
    m.ReadyForQuery(b"I"),
))
ONE_ROW = b"".join(msg.encode() for msg in (
    m.RowDescription((m.FieldDescription("?column?", 0, 0, 23, 4, -1, 0),)),
    m.DataRow((b"1",)),
    m.CommandComplete("SELECT 1"),
    m.ReadyForQuery(b"I"),
))
STREAM_HIGH_WATER = 256 * 1024


@dataclass
class Script:
    kind: str = "normal"  # normal | garbage | login-garbage | hold | stream
    garbage: bytes = b""
    close_after: bool = True  # garbage: close right after sending, or wait for the proxy
    cuts: tuple[int, ...] = ()  # garbage: write it in pieces, cut at these offsets
    rows: int = 0
    row_size: int = 0
    linger: float = 30.0  # longest a kept-open connection waits for the proxy to close


class BackendConn:
    """What one upstream connection did, for the test thread to inspect."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.key: str | None = None
        self.startup: m.StartupMessage | None = None
        self.cancel: m.CancelRequest | None = None
        self.received = bytearray()  # every byte the proxy sent, startup included
        self.startup_seen = threading.Event()
        self.eof = threading.Event()  # the proxy closed (or reset) its side
        self.finished = threading.Event()  # this connection's handler is done
        self.blocked = threading.Event()  # stream: the proxy stopped reading from us
        self.stream_done = threading.Event()
        self.sent = 0  # stream: bytes written after login
        self.digest: str | None = None  # stream: md5 of everything written after login


class FakeBackend:
    def __init__(self) -> None:
        self.scripts: dict[str, Script] = {}
        self.connections: list[BackendConn] = []  # every connection ever accepted, in order
        self._by_key: dict[str, list[BackendConn]] = {}
        self._open: set[BackendConn] = set()
        self._numbers = itertools.count(1)
        self._keys = itertools.count(1)
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()

    # -- test-thread API (plain dict/list operations, safe under the GIL) --

    def script(self, script: Script) -> str:
        """Register a script; returns the application_name that selects it."""
        key = f"fuzz-{next(self._keys)}-{secrets.token_hex(4)}"
        self.scripts[key] = script
        return key

    def connections_for(self, key: str) -> list[BackendConn]:
        return list(self._by_key.get(key, ()))

    def open_connections(self) -> list[BackendConn]:
        return [c for c in list(self._open) if not c.finished.is_set()]

    # -- the server --

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = BackendConn(next(self._numbers))
        self.connections.append(conn)
        self._open.add(conn)
        self._writers.add(writer)
        decoder = FrontendDecoder()
        try:
            packet = await self._next(reader, decoder, conn)
            if isinstance(packet, m.CancelRequest):
                conn.cancel = packet
                return
            if not isinstance(packet, m.StartupMessage):
                return
            conn.startup = packet
            conn.key = packet.parameters.get("application_name", "")
            self._by_key.setdefault(conn.key, []).append(conn)
            script = self.scripts.get(conn.key, Script())
            conn.startup_seen.set()
            if script.kind == "hold":
                await self._until_eof(reader, conn, script.linger)
                return
            if script.kind == "login-garbage":
                await self._write_pieces(writer, script)
                return
            writer.write(LOGIN)
            if script.kind == "garbage":
                await self._garbage(reader, writer, conn, script)
            elif script.kind == "stream":
                await self._stream(reader, writer, decoder, conn, script)
            else:
                await self._serve(reader, writer, decoder, conn)
        except ConnectionError:
            conn.eof.set()
        except ProtocolError:
            pass  # a startup packet the codec refuses: just hang up
        except TimeoutError:
            pass  # the proxy never closed: conn.eof stays clear for the test to see
        finally:
            self._writers.discard(writer)
            writer.close()
            conn.finished.set()
            self._open.discard(conn)

    async def _read(self, reader: asyncio.StreamReader, conn: BackendConn) -> bytes:
        data = await reader.read(1 << 16)
        if not data:
            conn.eof.set()
        conn.received += data
        return data

    async def _next(self, reader: asyncio.StreamReader, decoder: FrontendDecoder,
                    conn: BackendConn) -> m.Message | None:
        while (message := decoder.next_message()) is None:
            data = await self._read(reader, conn)
            if not data:
                return None
            decoder.feed(data)
        return message

    async def _until_eof(self, reader: asyncio.StreamReader, conn: BackendConn, timeout: float) -> None:
        async def drain() -> None:
            while await self._read(reader, conn):
                pass
        await asyncio.wait_for(drain(), timeout)

    async def _garbage(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: BackendConn,
                       script: Script) -> None:
        if await self._read(reader, conn):  # the client's first request, whatever it is
            await self._write_pieces(writer, script)
            if not script.close_after:
                await self._until_eof(reader, conn, script.linger)

    @staticmethod
    async def _write_pieces(writer: asyncio.StreamWriter, script: Script) -> None:
        bounds = [0, *sorted(c for c in script.cuts if 0 < c < len(script.garbage)), len(script.garbage)]
        for start, end in itertools.pairwise(bounds):
            writer.write(script.garbage[start:end])
            await writer.drain()
            # Let the proxy's read run before the next piece, so pieces tend to arrive apart.
            await asyncio.sleep(0)
            await asyncio.sleep(0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, decoder: FrontendDecoder,
                     conn: BackendConn) -> None:
        while True:
            try:
                message = await self._next(reader, decoder, conn)
            except ProtocolError as exc:
                writer.write(m.ErrorResponse.build("FATAL", "08P01",
                                                   f"fake backend: invalid frontend message: {exc}").encode())
                return
            if message is None or isinstance(message, m.Terminate):
                return
            if isinstance(message, m.PasswordMessage):
                writer.write(m.ErrorResponse.build("FATAL", "08P01",
                                                   "fake backend: unexpected password message").encode())
                return
            writer.write(answer(message))
            await writer.drain()

    async def _stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, decoder: FrontendDecoder,
                      conn: BackendConn, script: Script) -> None:
        message = await self._next(reader, decoder, conn)
        if not isinstance(message, m.Query):
            return
        transport = writer.transport
        transport.set_write_buffer_limits(STREAM_HIGH_WATER, STREAM_HIGH_WATER // 4)
        digest = hashlib.md5()
        head = m.RowDescription((m.FieldDescription("blob", 0, 0, 17, -1, -1, 0),)).encode()
        value = bytes(range(256)) * (script.row_size // 256) + b"x" * (script.row_size % 256)
        row = m.DataRow((value,)).encode()
        tail = m.CommandComplete(f"SELECT {script.rows}").encode() + m.ReadyForQuery(b"I").encode()
        for chunk in (head, *itertools.repeat(row, script.rows), tail):
            writer.write(chunk)
            digest.update(chunk)
            conn.sent += len(chunk)
            if transport.get_write_buffer_size() > STREAM_HIGH_WATER:
                conn.blocked.set()  # the proxy has stopped taking our bytes
            await writer.drain()
        conn.digest = digest.hexdigest()
        conn.stream_done.set()
        await self._serve(reader, writer, decoder, conn)


def answer(message: m.Message) -> bytes:
    """What the tiny server says to one (valid) frontend message."""
    if isinstance(message, m.Query):
        return ONE_ROW
    if isinstance(message, m.Parse):
        return m.ParseComplete().encode()
    if isinstance(message, m.Bind):
        return m.BindComplete().encode()
    if isinstance(message, m.Describe):
        if message.kind == b"S":
            return m.ParameterDescription(()).encode() + m.NoData().encode()
        return m.NoData().encode()
    if isinstance(message, m.Execute):
        return m.CommandComplete("SELECT 0").encode()
    if isinstance(message, m.Close):
        return m.CloseComplete().encode()
    if isinstance(message, m.Sync):
        return m.ReadyForQuery(b"I").encode()
    if isinstance(message, m.FunctionCall):
        return (m.ErrorResponse.build("ERROR", "42883", f"function {message.function_oid} does not exist").encode()
                + m.ReadyForQuery(b"I").encode())
    return b""  # Flush; CopyData/CopyDone/CopyFail outside COPY are ignored, as PostgreSQL does
