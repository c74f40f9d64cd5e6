"""Reaching the lab's web console from the host: a CONNECT proxy that dials inside the lab.

The lab's addresses (198.18.0.0/15) are not routed in the root namespace, and a lab client
must never send lab traffic out of the host's own routes. :class:`LabConnectProxy` listens
on a loopback port of the root namespace and, for each ``CONNECT host:port`` a browser sends
it (``--proxy-server=http://127.0.0.1:PORT``), opens the connection from inside the lab's
gateway namespace — only to the console and the dev issuer, nothing else. The browser then
speaks TLS end to end with the real lab URLs, so the certificates, the OIDC redirect URI and
the cookies are the ones the lab really uses. ``tollgate lab console`` runs it; the browser
tests use it too.

How: a socket belongs to the network namespace of the thread that creates it. The listening
socket is made here, in the root namespace; one dialer thread moves itself into the lab's
namespace (``setns``, which changes only the calling thread) and makes every outgoing socket.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import queue
import select
import socket
import threading
from collections.abc import Iterable
from concurrent.futures import Future

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
MAX_HEADER = 8192
DIAL_TIMEOUT = 10.0


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


class LabConnectProxy:
    """An HTTP CONNECT proxy on ``listen`` (loopback) dialling ``allowed`` (host, port) pairs
    from inside the network namespace ``netns`` (a name under /run/netns)."""

    def __init__(self, netns: str, allowed: Iterable[tuple[str, int]], listen: tuple[str, int] = ("127.0.0.1", 0)):
        self.netns_path = f"/run/netns/{netns}"
        if not os.path.exists(self.netns_path):
            raise OSError(f"no network namespace {netns} ({self.netns_path} is missing): is the lab up?")
        self.allowed = {(h, int(p)) for h, p in allowed}
        self.sock = socket.create_server(listen)
        self.address = self.sock.getsockname()[:2]
        self._dials: queue.Queue[tuple[tuple[str, int], Future[socket.socket]] | None] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        ready: Future[None] = Future()
        self._start(self._dialer, ready)
        ready.result(timeout=DIAL_TIMEOUT)  # the dialer is inside the namespace, or the error is raised here
        self._start(self._accept)

    @property
    def url(self) -> str:
        return f"http://{self.address[0]}:{self.address[1]}"

    def _start(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name=f"lab-console-{target.__name__}")
        self._threads.append(thread)
        thread.start()

    def _dialer(self, ready: Future[None]) -> None:
        try:
            _setns(self.netns_path)
        except OSError as exc:
            ready.set_exception(exc)
            return
        ready.set_result(None)
        while (item := self._dials.get()) is not None:
            where, answer = item
            try:
                answer.set_result(socket.create_connection(where, timeout=DIAL_TIMEOUT))
            except OSError as exc:
                answer.set_exception(exc)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self._start(self._serve, client)

    def _serve(self, client: socket.socket) -> None:
        with contextlib.closing(client):
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(1024)
                if not chunk or len(head) > MAX_HEADER:
                    return
                head += chunk
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            method, _, rest = request_line.partition(" ")
            target = rest.split(" ", 1)[0]
            host, _, port = target.rpartition(":")
            host = host.strip("[]")
            if method != "CONNECT" or not port.isdigit() or (host, int(port)) not in self.allowed:
                client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                return
            answer: Future[socket.socket] = Future()
            self._dials.put(((host, int(port)), answer))
            try:
                upstream = answer.result(timeout=DIAL_TIMEOUT + 1)
            except (OSError, TimeoutError) as exc:
                client.sendall(f"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nX-Error: {exc}\r\n\r\n".encode())
                return
            with contextlib.closing(upstream):
                upstream.settimeout(None)
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                rest_bytes = head.split(b"\r\n\r\n", 1)[1]
                if rest_bytes:
                    upstream.sendall(rest_bytes)
                self._pump(client, upstream)

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        while not self._stop.is_set():
            readable, _, _ = select.select(list(peers), [], [], 0.5)
            for sock in readable:
                data = sock.recv(65536)
                if not data:
                    return
                peers[sock].sendall(data)

    def close(self) -> None:
        self._stop.set()
        self._dials.put(None)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def __enter__(self) -> LabConnectProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def console_targets() -> list[tuple[str, int]]:
    """What a browser needs to reach in the lab: the web service (console) and the dev issuer."""
    from appliance.lab import identity as lab_identity
    from appliance.lab import topology
    return [(topology.GW_AGENT_V4, lab_identity.ENROLL_PORT), (topology.GW_AGENT_V4, lab_identity.ISSUER_PORT)]


__all__ = ["LabConnectProxy", "console_targets"]
