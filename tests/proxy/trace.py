"""A recording SessionIO and helpers to drive a Session through traces, with no sockets."""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from appliance.config import Credential, Endpoint, Target
from appliance.pgwire import BackendDecoder, FrontendDecoder
from appliance.pgwire import messages as m
from appliance.proxy.hooks import AddonManager, Addon, SessionInfo
from appliance.proxy.session import CancelRegistry, Session

DB = Endpoint.parse("198.18.2.10:5432")
AGENT = Endpoint.parse("198.18.1.10:40000")
UPSTREAM_KEY = (4242, b"\x01\x02\x03\x04")


def make_target(tls: str = "disable", **kw: Any) -> Target:
    creds = {"app": Credential("app_rw", "pencil")}
    return Target("payments", (DB,), creds, tls=tls, **kw)  # type: ignore[arg-type]


class RecordingIO:
    """Implements SessionIO by recording: bytes per direction, and every other effect."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.to_client = bytearray()
        self.to_server = bytearray()
        self.waits: list[tuple[Awaitable[Any], Callable[[Any, BaseException | None], None]]] = []
        self.closed = False
        self.client_paused = False
        self._server_decoder = FrontendDecoder()
        self._client_decoder = BackendDecoder()

    def send_client(self, data: bytes | memoryview) -> None:
        self.to_client += data

    def send_server(self, data: bytes | memoryview) -> None:
        self.to_server += data

    def open_upstream(self, target: Target, endpoint: Endpoint) -> None:
        self.events.append(("open_upstream", target.name, str(endpoint)))

    def start_upstream_tls(self, target: Target) -> None:
        self.events.append(("start_tls", target.name))

    def start_client_tls(self, context: Any) -> None:
        self.events.append(("start_client_tls", context))

    def pause_client(self) -> None:
        self.client_paused = True

    def resume_client(self) -> None:
        self.client_paused = False

    def wait(self, awaitable: Awaitable[Any], done: Callable[[Any, BaseException | None], None]) -> Callable[[], None]:
        self.waits.append((awaitable, done))
        return lambda: self.events.append(("hold_cancelled",))

    def cancel_upstream(self, endpoint: Endpoint, process_id: int, secret_key: bytes) -> None:
        self.events.append(("cancel_upstream", str(endpoint), process_id, secret_key))

    def close(self) -> None:
        self.closed = True

    # -- reading what was sent --

    def client_got(self) -> list[Any]:
        """Messages sent to the client since the last call (SSL answers as raw bytes)."""
        data = bytes(self.to_client)
        self.to_client.clear()
        if data in (b"N", b"S"):
            return [data]
        self._client_decoder.feed(data)
        return list(self._client_decoder)

    def server_got(self) -> list[Any]:
        data = bytes(self.to_server)
        self.to_server.clear()
        self._server_decoder.feed(data)
        return list(self._server_decoder)


def new_session(addons: list[Addon] | None = None, target: Target | None = None,
                cancels: CancelRegistry | None = None, stream_threshold: int = 1 << 20,
                no_target: bool = False, authenticator: Any = None) -> tuple[Session, RecordingIO]:
    io = RecordingIO()
    session = Session(io, SessionInfo(client=AGENT, destination=DB),
                      None if no_target else (target or make_target()),
                      AddonManager(addons or []), cancels if cancels is not None else CancelRegistry(),
                      max_client_message=1 << 24, stream_threshold=stream_threshold,
                      authenticator=authenticator)
    return session, io


def startup(user: str = "app", database: str = "payments", **params: str) -> bytes:
    return m.StartupMessage(196608, {"user": user, "database": database, **params}).encode()


def ready_session(addons: list[Addon] | None = None, **kw: Any) -> tuple[Session, RecordingIO]:
    """A session through startup and md5 login, with the client's view drained."""
    session, io = new_session(addons, **kw)
    session.client_data(startup())
    session.upstream_connected()
    io.server_got()
    session.server_data(m.AuthenticationMD5Password(b"salt").encode())
    io.server_got()
    session.server_data(
        m.AuthenticationOk().encode() + m.ParameterStatus("server_version", "15.0").encode()
        + m.BackendKeyData(*UPSTREAM_KEY).encode() + m.ReadyForQuery(b"I").encode())
    io.client_got()
    return session, io


def backend(*messages: Any) -> bytes:
    return b"".join(msg.encode() for msg in messages)


def frontend(*messages: Any) -> bytes:
    return b"".join(msg.encode() for msg in messages)
