"""The asyncio shell: sockets, connects, TLS, timers — the only I/O in the proxy.

Each accepted connection gets a :class:`ClientConnection` (an ``asyncio.Protocol``, no
coroutine per message) that implements the session's :class:`SessionIO` and feeds it
events. Back-pressure is end to end: when one side's write buffer fills, reading from the
other side pauses, so a slow client never makes the proxy hold a whole result.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from appliance.config import Config, Endpoint, Target, normalize_address
from appliance.intercept.base import InterceptError, InterceptMethod
from appliance.pgwire import messages as m
from appliance.proxy.agent_auth import AgentAuthenticator, TrustAuthenticator
from appliance.proxy.budget import BufferBudget
from appliance.proxy.cancel import CancelRegistry
from appliance.proxy.control import ControlOps, start_control_server
from appliance.proxy.hooks import AddonManager, SessionInfo
from appliance.proxy.results import error_bytes
from appliance.proxy.session import Session

log = logging.getLogger("tollgate.server")

# Write-buffer marks: large enough to keep a fast link busy, small enough that a stalled
# client holds at most this much of a result in the proxy.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
# libuv reads a busy socket up to 32 times per loop turn: after this many bytes from one
# side, let the loop run once, so the other direction (a server's early error) and other
# sessions are not kept waiting behind one burst.
BURST = 256 * 1024
TLS_HANDSHAKE_TIMEOUT = 15.0


class BurstYield:
    """Pauses reading for one loop turn after every BURST bytes read.

    Takes functions, not a transport: after start_tls the transport to pause is a new one.
    """

    __slots__ = ("count", "pause", "paused", "resume")

    def __init__(self, pause: Callable[[], None], resume: Callable[[], None]):
        self.pause, self.resume = pause, resume
        self.count = 0
        self.paused = False

    def read(self, size: int) -> None:
        self.count += size
        if self.count >= BURST and not self.paused:
            self.paused = True
            self.pause()
            asyncio.get_running_loop().call_soon(self._end)

    def _end(self) -> None:
        self.count = 0
        self.paused = False
        self.resume()


def _ignore(data: bytes) -> None:
    pass


def endpoint_of(sockaddr: Any) -> Endpoint:
    return Endpoint(normalize_address(ipaddress.ip_address(sockaddr[0].split("%")[0])), sockaddr[1])


class UpstreamConnection(asyncio.Protocol):
    """The database side of one session; forwards events to the client side's session."""

    def __init__(self, owner: ClientConnection):
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.paused_by_client = False
        self.paused_by_session = False  # output withheld past its high-water mark
        self.burst = BurstYield(self._pause, self._resume_after_burst)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        session = owner.session
        if session.ready:
            session.server_data(data)
        else:
            # The login: what the server sends at once (AuthenticationOk, a dozen
            # ParameterStatus, BackendKeyData, ReadyForQuery) is relayed message by message;
            # corked, it reaches the agent as one TLS record and one write, as PostgreSQL
            # sends it, not one each (each a syscall through the network stack).
            owner.cork()
            try:
                session.server_data(data)
            finally:
                owner.uncork()
        self.burst.read(len(data))

    def _pause(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def _resume_after_burst(self) -> None:
        if self.transport is not None and not self.paused_by_client and not self.paused_by_session:
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.owner.session.server_closed()

    def pause_writing(self) -> None:
        self.owner.pause_reading_client()

    def resume_writing(self) -> None:
        self.owner.resume_reading_client()


class ClientConnection(asyncio.Protocol):
    """The agent side of one session, and the session's SessionIO."""

    def __init__(self, server: ProxyServer):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.upstream = UpstreamConnection(self)
        self.session: Session = None  # type: ignore[assignment]
        self._client_paused_by_session = False
        self._client_paused_by_upstream = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self.burst = BurstYield(self._apply_client_reading, self._apply_client_reading)
        self.tls: AgentTLS | None = None
        self.source: Any = None  # the client's address while it counts against the limits
        self._corked: list[bytes] | None = None  # what send_client holds back until uncork

    # -- asyncio.Protocol (client side) --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)  # type: ignore[attr-defined]
        client = endpoint_of(transport.get_extra_info("peername"))
        refusal = self.server.admit(client.address)
        if refusal is not None:
            # Refused at accept, before any session exists: the FATAL is all it gets.
            log.warning("connection from %s refused: %s", client, refusal)
            transport.write(error_bytes("FATAL", "53300", refusal))  # type: ignore[attr-defined]
            transport.close()
            self.transport = None
            self.data_received = _ignore  # type: ignore[method-assign]  # nothing it says is read
            return
        self.source = client.address
        sock = transport.get_extra_info("socket")
        try:
            destination = self.server.method.original_destination(sock)
        except (InterceptError, OSError):
            # Not diverted by our ruleset (someone dialled the proxy port itself): the
            # destination is then the proxy, which no target protects, so it is refused.
            destination = endpoint_of(transport.get_extra_info("sockname"))
        target = self.server.config.target_for(destination)
        info = SessionInfo(client=client, destination=destination)
        proxy = self.server.config.proxy
        self.session = Session(self, info, target, self.server.addons, self.server.cancels,
                               max_client_message=proxy.max_client_message,
                               stream_threshold=proxy.stream_threshold,
                               authenticator=self.server.authenticator, budget=self.server.budget,
                               startup_timeout=proxy.startup_timeout,
                               max_pending_requests=proxy.max_pending_requests)
        self.server.sessions[info.id] = self.session
        # Every phase before the session is ready shares one deadline; the session cancels
        # it once ready (or closed).
        self.session.cancel_deadline = asyncio.get_running_loop().call_later(
            proxy.startup_timeout, self.session.startup_timed_out).cancel
        log.debug("session %d: %s → %s (%s)", info.id, client, destination, target.name if target else "unprotected")

    def data_received(self, data: bytes) -> None:
        if self.tls is None:
            self.session.client_data(data)
        else:
            self.tls.received(data)
        self.burst.read(len(data))

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.source is not None:
            self.server.release(self.source)
            self.source = None
        if self.session is None:
            return
        self.session.client_closed()
        self.server.sessions.pop(self.session.info.id, None)

    def pause_writing(self) -> None:
        self.upstream.paused_by_client = True
        if self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        self.upstream.paused_by_client = False
        self._apply_upstream_reading()

    def _apply_upstream_reading(self) -> None:
        upstream = self.upstream
        if upstream.transport is not None and not upstream.burst.paused:
            if upstream.paused_by_client or upstream.paused_by_session:
                upstream.transport.pause_reading()
            else:
                upstream.transport.resume_reading()

    # -- flow control from the upstream side and from the session --

    def pause_reading_client(self) -> None:
        self._client_paused_by_upstream = True
        self._apply_client_reading()

    def resume_reading_client(self) -> None:
        self._client_paused_by_upstream = False
        self._apply_client_reading()

    def _apply_client_reading(self) -> None:
        if self.transport is None:
            return
        if self._client_paused_by_upstream or self._client_paused_by_session or self.burst.paused:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    # -- SessionIO --

    def cork(self) -> None:
        """Hold what is sent to the client until :meth:`uncork`, to send it as one write."""
        if self._corked is None:
            self._corked = []

    def uncork(self) -> None:
        pending, self._corked = self._corked, None
        if pending:
            self.send_client(pending[0] if len(pending) == 1 else b"".join(pending))

    def send_client(self, data: bytes | memoryview) -> None:
        if self.transport is not None:
            if self._corked is not None:
                self._corked.append(bytes(data))  # a view's buffer may change before uncork
                return
            if self.tls is None:
                self.transport.write(data)
            else:
                self.tls.send(data)

    def send_server(self, data: bytes | memoryview) -> None:
        if self.upstream.transport is not None:
            self.upstream.transport.write(data)

    def pause_client(self) -> None:
        self._client_paused_by_session = True
        self._apply_client_reading()

    def resume_client(self) -> None:
        self._client_paused_by_session = False
        self._apply_client_reading()

    def pause_server(self) -> None:
        self.upstream.paused_by_session = True
        self._apply_upstream_reading()

    def resume_server(self) -> None:
        self.upstream.paused_by_session = False
        self._apply_upstream_reading()

    def open_upstream(self, target: Target, endpoint: Endpoint) -> None:
        self._spawn(self._connect_upstream(target, endpoint))

    def start_upstream_tls(self, target: Target) -> None:
        self._spawn(self._start_tls(target))

    def start_client_tls(self, context: ssl.SSLContext) -> None:
        self.tls = AgentTLS(self, context)

    def wait(self, awaitable: Awaitable[Any], done: Callable[[Any, BaseException | None], None]) -> Callable[[], None]:
        future = asyncio.ensure_future(awaitable)

        def finished(f: asyncio.Future[Any]) -> None:
            if f.cancelled():
                return
            exc = f.exception()
            done(None if exc else f.result(), exc)

        future.add_done_callback(finished)
        return future.cancel

    def cancel_upstream(self, endpoint: Endpoint, process_id: int, secret_key: bytes) -> None:
        async def deliver() -> None:
            await self.server.send_cancel(endpoint, process_id, secret_key)
            self.session.cancel_delivered()

        self._spawn(deliver())

    def close(self) -> None:
        # transport.close() flushes what is buffered first, so a final FATAL still arrives.
        self.uncork()
        if self.transport is not None:
            self.transport.close()
        if self.upstream.transport is not None:
            self.upstream.transport.close()
        if self.tls is not None:
            self.tls.deadline.cancel()
        for task in self._tasks:
            task.cancel()

    # -- helpers --

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect_upstream(self, target: Target, endpoint: Endpoint) -> None:
        loop = asyncio.get_running_loop()
        try:
            sock = await self.server.open_upstream_socket(endpoint, target.connect_timeout)
            await loop.create_connection(lambda: self.upstream, sock=sock)
        except (TimeoutError, OSError) as exc:
            self.session.upstream_failed(str(exc) or type(exc).__name__)
            return
        if self.transport is None:  # the agent left while we were connecting
            self.close()
            return
        self.session.upstream_connected()

    async def _start_tls(self, target: Target) -> None:
        loop = asyncio.get_running_loop()
        assert self.upstream.transport is not None
        try:
            context = self.server.upstream_contexts.get(target)
        except (OSError, ssl.SSLError) as exc:
            self.session.upstream_tls_failed(f"cannot load {target.tls_ca_file}: {exc}")
            return
        server_name = target.tls_server_name or (str(self.session.info.destination.address)
                                                 if target.tls == "verify-full" else None)
        try:
            transport = await loop.start_tls(self.upstream.transport, self.upstream, context,
                                             server_hostname=server_name)
        except (OSError, ssl.SSLError, ConnectionError) as exc:
            self.session.upstream_tls_failed(str(exc))
            return
        self.upstream.transport = transport  # type: ignore[assignment]
        ssl_object = transport.get_extra_info("ssl_object")
        self.session.upstream_tls_ready(ssl_object.version() if ssl_object else "TLS")




class AgentTLS:
    """TLS towards the agent, driven through memory BIOs.

    Not loop.start_tls: when OpenSSL refuses the agent's certificate during the handshake
    it writes an alert ("unknown ca"), and only a handshake we drive ourselves can send
    that alert before closing, so the agent's driver reports why instead of a bare EOF.
    """

    __slots__ = ("conn", "deadline", "handshaking", "incoming", "outgoing", "sslobj")

    def __init__(self, conn: ClientConnection, context: ssl.SSLContext):
        self.conn = conn
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.sslobj = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.handshaking = True
        # A client that asks for TLS and then stalls must not hold a connection forever.
        self.deadline = asyncio.get_running_loop().call_later(TLS_HANDSHAKE_TIMEOUT, self._too_slow)

    def _too_slow(self) -> None:
        if self.handshaking:
            self.conn.session.client_tls_failed(f"no TLS handshake within {TLS_HANDSHAKE_TIMEOUT:.0f}s")

    def received(self, data: bytes) -> None:
        self.incoming.write(data)
        session = self.conn.session
        if self.handshaking:
            try:
                self.sslobj.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                return
            except ssl.SSLError as exc:
                self._flush()  # the alert saying why, before the close
                session.client_tls_failed(str(exc))
                return
            self.handshaking = False
            self.deadline.cancel()
            self._flush()
            session.client_tls_ready(self.sslobj.version() or "TLS", self.sslobj.getpeercert(binary_form=True))
        chunks = []
        while True:
            try:
                chunk = self.sslobj.read(1 << 16)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                break  # close_notify: the TCP close follows
            except ssl.SSLError as exc:
                session.client_tls_failed(str(exc))
                return
            if not chunk:
                break  # end of the TLS stream (a suppressed ragged EOF reads as b"")
            chunks.append(chunk)
            if not self.incoming.pending and not self.sslobj.pending():
                break  # all read: asking again would only raise SSLWantReadError
        if chunks:
            session.client_data(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def send(self, data: bytes | memoryview) -> None:
        self.sslobj.write(data)
        self._flush()

    def _flush(self) -> None:
        pending = self.outgoing.read()
        if pending and self.conn.transport is not None:
            self.conn.transport.write(pending)


class UpstreamContexts:
    """One client context per TLS setting, shared by every upstream connection.

    Building an SSLContext costs about 0.2 ms with OpenSSL 3 (more with a CA file to
    load), once per agent connection otherwise. A context is reused only while its CA file
    is the one it loaded (same inode, size and mtime, checked on every connection), so a
    rotated CA takes effect at the next connection, as it did when each built its own.
    """

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        self._cache: dict[tuple[Any, ...], ssl.SSLContext] = {}

    def get(self, target: Target) -> ssl.SSLContext:
        key: tuple[Any, ...] = (target.tls, target.tls_ca_file)
        if target.tls in ("verify-ca", "verify-full"):
            # An unreadable file raises here, as load_verify_locations would have.
            st = os.stat(str(target.tls_ca_file))
            key += (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        context = self._cache.get(key)
        if context is None:
            # Only the newest version of each setting is kept: rotations don't accumulate.
            for stale in [k for k in self._cache if k[:2] == key[:2]]:
                del self._cache[stale]
            context = self._cache[key] = upstream_tls_context(target)
        return context


def upstream_tls_context(target: Target) -> ssl.SSLContext:
    """TLS towards the database, with libpq's sslmode semantics."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if target.tls in ("verify-ca", "verify-full"):
        context.load_verify_locations(cafile=str(target.tls_ca_file))
        context.check_hostname = target.tls == "verify-full"
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        # prefer/require: encrypted but unauthenticated, exactly as libpq's sslmode=require.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def source_of(address: Any, prefix_v6: int) -> str:
    """Whom a connection is counted against: its IPv4 address, or its IPv6 address's
    ``prefix_v6``-bit prefix (an IPv4-mapped one as IPv4). Anything else, as it is."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return str(address)
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/{prefix_v6}", strict=False))
    return str(ip)


class ProxyServer:
    """Listening sockets, the live sessions, and what they share."""

    def __init__(self, config: Config, method: InterceptMethod, addons: AddonManager | None = None,
                 authenticator: AgentAuthenticator | None = None, *, worker: bool = False):
        """``worker``: one of several processes sharing the port (SO_REUSEPORT); its
        primary serves the control socket."""
        self.config = config
        self.worker = worker
        self.method = method
        self.addons = addons or AddonManager()
        # What the control socket answers; addons register theirs when they start.
        self.control = ControlOps()
        self.control.register("ping", lambda request: {})
        self.control.register("sessions", lambda request: {"sessions": self.snapshot()})
        self.authenticator = authenticator or TrustAuthenticator()
        self.cancels = CancelRegistry()
        self.upstream_contexts = UpstreamContexts()
        self.sessions: dict[int, Session] = {}
        proxy = config.proxy
        # Bytes of incomplete client messages across all sessions (max_buffered_total).
        self.budget = BufferBudget(proxy.max_buffered_total)
        # Open client connections, in all and per source address (max_connections…).
        self.connections = 0
        self.per_source: dict[Any, int] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self._watcher: asyncio.Future[None] | None = None
        self.background: set[asyncio.Future[Any]] = set()  # tasks kept referenced until done

    def admit(self, address: Any) -> str | None:
        """Count a new client connection, or say why it is refused (53300)."""
        proxy = self.config.proxy
        if self.connections >= proxy.max_connections:
            return (f"sorry, too many clients already: Tollgate accepts at most {proxy.max_connections} "
                    f"connections at once")
        source = source_of(address, proxy.source_prefix_v6)
        count = self.per_source.get(source, 0)
        if count >= proxy.max_connections_per_source:
            return (f"sorry, too many connections from {source}: Tollgate accepts at most "
                    f"{proxy.max_connections_per_source} at once from one source")
        self.per_source[source] = count + 1
        self.connections += 1
        return None

    def release(self, address: Any) -> None:
        self.connections -= 1
        source = source_of(address, self.config.proxy.source_prefix_v6)
        count = self.per_source[source] - 1
        if count:
            self.per_source[source] = count
        else:
            del self.per_source[source]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        port = self.config.proxy.listen_port
        for address in self.config.proxy.listen_addresses:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if self.worker:
                    # The kernel spreads connections over the workers' sockets by flow hash;
                    # nftables' redirect and tproxy both land in the same reuseport group.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                self.method.prepare_listener(sock)
                sock.bind((address, port))
                sock.listen(1024)
                sock.setblocking(False)
            except OSError:
                sock.close()
                raise
            self._servers.append(await loop.create_server(lambda: ClientConnection(self), sock=sock))
        if self.config.proxy.control_socket is not None and not self.worker:
            self._servers.append(await start_control_server(self.control, self.config.proxy.control_socket))
        if hasattr(self.authenticator, "revocations"):
            self._watcher = asyncio.ensure_future(self._watch_revocations())

    async def _watch_revocations(self, interval: float = 1.0) -> None:
        """Close live sessions whose certificate gets revoked, within about ``interval``."""
        revision, _ = self.authenticator.revocations(0)  # type: ignore[attr-defined]
        while True:
            await asyncio.sleep(interval)
            try:
                revision, serials = self.authenticator.revocations(revision)  # type: ignore[attr-defined]
            except Exception:
                log.exception("could not read revocations; will retry")
                continue
            if not serials:
                continue
            for session in list(self.sessions.values()):
                serial = session.info.certificate_serial
                if serial in serials:
                    session.terminate("28000", self.authenticator.revoked_message(serial))  # type: ignore[attr-defined]

    async def open_upstream_socket(self, endpoint: Endpoint, timeout: float) -> socket.socket:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if endpoint.address.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            self.method.prepare_upstream(sock, self.config)
            await asyncio.wait_for(loop.sock_connect(sock, (str(endpoint.address), endpoint.port)), timeout)
        except BaseException:
            sock.close()
            raise
        return sock

    async def send_cancel(self, endpoint: Endpoint, process_id: int, secret_key: bytes) -> None:
        """Deliver a CancelRequest to the database on a fresh connection, as libpq does."""
        loop = asyncio.get_running_loop()
        try:
            sock = await self.open_upstream_socket(endpoint, 10.0)
        except (TimeoutError, OSError) as exc:
            log.warning("could not deliver a cancel request to %s: %s", endpoint, exc)
            return
        try:
            await loop.sock_sendall(sock, m.CancelRequest(process_id, secret_key).encode())
            # The server closes without answering once it has acted on the request.
            await asyncio.wait_for(loop.sock_recv(sock, 1), 10.0)
        except (TimeoutError, OSError):
            pass
        finally:
            sock.close()

    def cancel_from_elsewhere(self, process_id: int, secret_key: bytes) -> tuple[str, int, int, bytes] | None:
        """A cancel key another worker received: where to send the CancelRequest if the
        session is here (address, port, real pid, real secret), else None. The receiving
        worker sends it, and closes its agent's cancel connection once it is delivered."""
        session = self.cancels.find(process_id, secret_key)
        if session is None:
            return None
        self.cancels.from_elsewhere += 1
        target = session.cancel_target()  # a held statement is withdrawn here instead
        if target is None:
            return None
        endpoint, pid, secret = target
        return str(endpoint.address), endpoint.port, pid, secret

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        for server in self._servers:
            server.close()
        for session in list(self.sessions.values()):
            session.terminate("57P01", "terminating connection: Tollgate is shutting down")
        for server in self._servers:
            await server.wait_closed()

    def snapshot(self) -> list[dict[str, Any]]:
        return [s.describe() for s in self.sessions.values()]
