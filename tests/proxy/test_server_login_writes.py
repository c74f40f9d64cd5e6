"""The shell corks the login: what the server sends in one read before the session is
ready reaches the agent as one write, in order; a close while corked still delivers it."""

from __future__ import annotations

from appliance.proxy.server import ClientConnection


class Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True


class Session:
    """Relays each server message on its own, as the login does."""

    def __init__(self, conn: ClientConnection, ready: bool, then_close: bool = False) -> None:
        self.conn, self.ready, self.then_close = conn, ready, then_close

    def server_data(self, data: bytes) -> None:
        buffer = bytearray(data)
        for i in range(len(buffer)):
            self.conn.send_client(memoryview(buffer)[i:i + 1])
            buffer[i] = 0x21  # the relay's buffer is reused: what was sent must not change
        if self.then_close:
            self.conn.send_client(b"FATAL")
            self.conn.close()


def connection(ready: bool, then_close: bool = False) -> tuple[ClientConnection, Transport]:
    conn = ClientConnection(server=None)  # type: ignore[arg-type]
    transport = Transport()
    conn.transport = transport  # type: ignore[assignment]
    conn.session = Session(conn, ready, then_close)  # type: ignore[assignment]
    return conn, transport


def test_the_login_burst_is_one_write() -> None:
    conn, transport = connection(ready=False)
    conn.upstream.data_received(b"RSSSKZ")
    assert transport.writes == [b"RSSSKZ"]
    conn.upstream.data_received(b"NZ")  # the next read: its own write
    assert transport.writes == [b"RSSSKZ", b"NZ"]


def test_a_close_while_corked_delivers_what_was_sent_first() -> None:
    conn, transport = connection(ready=False, then_close=True)
    conn.upstream.data_received(b"RSS")
    assert transport.writes == [b"RSSFATAL"]
    assert transport.closed


def test_a_ready_session_is_not_corked() -> None:
    conn, transport = connection(ready=True)
    conn.upstream.data_received(b"DDC")
    assert transport.writes == [b"D", b"D", b"C"]
