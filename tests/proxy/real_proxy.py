"""A real ProxyServer on loopback, and a blocking client for it: the pieces the server-level
tests share (fuzzing, resource limits). The proxy dials a fake PostgreSQL on loopback
through an intercept method that only answers "where was this going"."""

from __future__ import annotations

import contextlib
import itertools
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.config import Config, Endpoint, parse_config
from appliance.intercept.base import InterceptMethod
from appliance.pgwire import BackendDecoder, ProtocolError
from appliance.pgwire import messages as m
from tests.proxy.fake_server import BACKEND_SECRET

if TYPE_CHECKING:
    from appliance.proxy.hooks import AddonManager
    from appliance.proxy.server import ProxyServer
    from tests.proxy.loop_thread import LoopThread

READ_TIMEOUT = 60.0  # a safety net only: a proxy that neither answers nor closes fails, never a measure
u32 = struct.Struct("!I")


class LoopbackIntercept(InterceptMethod):
    """Loopback has no NAT: every accepted connection 'was going to' the fake backend."""

    name = "loopback-test"

    def __init__(self, destination: Endpoint) -> None:
        self.destination = destination

    def is_supported(self) -> tuple[bool, str]:
        return True, "test double"

    def setup(self, config: Config) -> None:
        pass

    def teardown(self, config: Config) -> None:
        pass

    def prepare_listener(self, sock: socket.socket) -> None:
        pass

    def prepare_upstream(self, sock: socket.socket, config: Config) -> None:
        pass  # no SO_MARK: that needs CAP_NET_ADMIN and loopback needs no bypass

    def original_destination(self, sock: socket.socket) -> Endpoint:
        return self.destination


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.raw = bytearray()  # everything received
        self.mark = 0  # where the bytes after the login answer (or the last query) start
        self.eof = False

    def send(self, data: bytes, cuts: tuple[int, ...] = ()) -> bool:
        """Send data, in separate writes cut at ``cuts`` (how they arrive is up to TCP)."""
        bounds = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
        try:
            for start, end in itertools.pairwise(bounds):
                self.sock.sendall(data[start:end])
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False  # the proxy already hung up; what it said is still readable

    def half_close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()

    def _recv(self, deadline: float) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(self._hang_message(deadline))
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(1 << 16)
        except ConnectionResetError:
            data = b""  # a reset after the proxy's last words: they were read already
        except TimeoutError:
            raise AssertionError(self._hang_message(deadline)) from None
        if not data:
            self.eof = True
            return False
        self.raw += data
        return True

    def _hang_message(self, deadline: float) -> str:
        return (f"the proxy neither answered nor closed in time (deadline {deadline:.1f}); "
                f"last bytes received: {bytes(self.raw[-120:])!r}")

    def read_until_eof(self, timeout: float = READ_TIMEOUT) -> bytes:
        deadline = time.monotonic() + timeout
        while self._recv(deadline):
            pass
        return bytes(self.raw)

    def read_until_ready(self, timeout: float = READ_TIMEOUT) -> list[m.Message]:
        """Read through the next ReadyForQuery after ``mark``; returns the messages, moves mark."""
        deadline = time.monotonic() + timeout
        while True:
            found, _end = frames(self.raw, self.mark)
            for tag, _, stop in found:
                if tag == ord("Z"):
                    got = decode_clean(bytes(self.raw[self.mark:stop]))
                    self.mark = stop
                    return got
            if not self._recv(deadline):
                raise AssertionError(f"connection closed before ReadyForQuery: {decode_lenient(self.raw[self.mark:])}")

    def login(self, key: str = "", **params: str) -> list[m.Message]:
        self.send(startup_bytes(key, **params))
        got = self.read_until_ready()
        kinds = [type(x) for x in got]
        assert kinds[0] is m.AuthenticationOk and kinds[-1] is m.ReadyForQuery, got
        assert m.BackendKeyData in kinds, got
        key_data = got[kinds.index(m.BackendKeyData)]
        assert key_data.secret_key != BACKEND_SECRET, "the database's cancel key reached the client"
        return got

    def query(self, sql: str) -> list[m.Message]:
        self.send(m.Query(sql).encode())
        return self.read_until_ready()

    def after_login(self) -> bytes:
        return bytes(self.raw[self.mark:])


def startup_bytes(key: str = "", user: str = "app", **params: str) -> bytes:
    parameters = {"user": user, "database": "fakedb", **params}
    if key:
        parameters["application_name"] = key
    return m.StartupMessage(m.PROTOCOL_3_0, parameters).encode()


# ---- reading what was received ---------------------------------------------------------------

def frames(data: bytes | bytearray, pos: int = 0) -> tuple[list[tuple[int, int, int]], int]:
    """Complete typed frames from pos: (tag, start, end); and where framing stopped."""
    found = []
    while len(data) - pos >= 5:
        (length,) = u32.unpack_from(data, pos + 1)
        end = pos + 1 + length
        if length < 4 or end > len(data):
            break
        found.append((data[pos], pos, end))
        pos = end
    return found, pos


def decode_clean(data: bytes, ssl_answers: int = 0) -> list[m.Message]:
    """Decode backend bytes; they must be valid and whole (no partial message at the end)."""
    decoder = BackendDecoder()
    decoder.feed(data)
    got: list[m.Message] = []
    try:
        for _ in range(ssl_answers):
            decoder.expect_ssl_response()
            answer = decoder.next_message()
            assert answer == m.SSLResponse(False), f"expected the 'N' answer to an encryption request, got {answer!r}"
        got.extend(decoder)
    except ProtocolError as exc:
        raise AssertionError(f"the client received invalid protocol bytes ({exc}) after {got!r}: {data!r}") from None
    assert decoder.buffered_bytes == 0, (
        f"the client was left with a partial message: {data[-decoder.buffered_bytes:]!r}")
    return got


def decode_lenient(data: bytes | bytearray) -> list[Any]:
    decoder = BackendDecoder()
    decoder.feed(bytes(data))
    got: list[Any] = []
    try:
        got.extend(decoder)
    except ProtocolError as exc:
        got.append(exc)
    return got


def is_fatal(message: Any) -> bool:
    return isinstance(message, m.ErrorResponse) and message.severity == "FATAL"


def lone_fatal(data: bytes) -> m.ErrorResponse | None:
    """The one FATAL ErrorResponse data consists of, if it is exactly that."""
    decoder = BackendDecoder()
    decoder.feed(data)
    try:
        got = list(decoder)
    except ProtocolError:
        return None
    if decoder.buffered_bytes or len(got) != 1 or not is_fatal(got[0]):
        return None
    return got[0]


# ---- oracles ------------------------------------------------------------------------------------


def start_proxy(loop: LoopThread, config_for: Callable[[int], Config], destination: Endpoint,
                addons: AddonManager) -> tuple[ProxyServer, int]:
    """A ProxyServer started on ``loop`` at a free loopback port (``config_for(port)``),
    dialling ``destination``; another port if that one was taken in between."""
    from appliance.proxy.server import ProxyServer
    for _ in range(5):
        port = free_port()
        server = ProxyServer(config_for(port), LoopbackIntercept(destination), addons)
        try:
            loop.run(server.start())
        except OSError:
            continue
        return server, port
    raise RuntimeError("no free port for the proxy")


def postgres_proxy_config(listen_port: int, pg_port: int) -> Config:
    """A proxy on 127.0.0.1:listen_port protecting a real PostgreSQL that trusts local
    logins (tests/masking/conftest.py's): role ``agent`` logs in upstream as ``postgres``."""
    return parse_config(f"""
[proxy]
listen_port = {listen_port}
listen_addresses = ["127.0.0.1"]

[[targets]]
name = "pg"
addresses = ["127.0.0.1:{pg_port}"]
tls = "disable"

[targets.credentials.agent]
upstream_user = "postgres"
password = "unused (the cluster trusts local logins)"
""", Path("test.toml"))


def proxy_config(listen_port: int, backend_port: int, extra: str = "") -> Config:
    """A proxy on 127.0.0.1:listen_port protecting the fake PostgreSQL; ``extra`` goes in [proxy]."""
    return parse_config(f"""
[proxy]
listen_port = {listen_port}
listen_addresses = ["127.0.0.1"]
{extra}

[[targets]]
name = "fake"
addresses = ["127.0.0.1:{backend_port}"]
tls = "disable"
connect_timeout = 5

[targets.credentials.app]
upstream_user = "app_rw"
password = "pencil"
""", Path("test.toml"))
