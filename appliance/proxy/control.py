"""The control socket: how local commands ask the running proxy, both ends and the format.

A root-only Unix socket (``proxy.control_socket``) takes one JSON object per line, each with
an ``op``, and answers each with one JSON object per line: ``{"ok": true, …}`` or
``{"ok": false, "error": "…"}``. The proxy answers ``ping`` and ``sessions`` itself; an
addon registers its own operations when it starts (the audit log's ``audit.*``, the
policy's ``policy``) on the :class:`ControlOps` it is handed. :func:`control_request` is
the client the CLI, the tests and the bench use; :func:`record_admin` the one every process
that acts as an administrator (the enrollment service, ``tollgate certs``) records through,
so the proxy stays the audit log's only writer.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from appliance.config import Config, ConfigError

log = logging.getLogger("tollgate.control")

Request = dict[str, Any]
Reply = dict[str, Any]
Handler = Callable[[Request], Reply | Awaitable[Reply]]


class ControlOps:
    """The operations the control socket answers, by name. A handler may return an
    awaitable (the primary of several workers asks them); ``fallback`` answers the ops no
    handler is registered for (the primary passes them on to its workers)."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        self.fallback: Handler | None = None

    def register(self, op: str, handler: Handler) -> None:
        if op in self._handlers:
            raise ValueError(f"control operation {op!r} is registered twice")
        self._handlers[op] = handler

    def answer(self, line: bytes) -> Reply | Awaitable[Reply]:
        """The reply to one request line (or an awaitable of it, from an awaitable
        handler); a handler's exception is the client's error."""
        try:
            request = json.loads(line)
        except ValueError:
            request = None
        op = request.get("op") if isinstance(request, dict) else None
        handler = self._handlers.get(op) if isinstance(op, str) else None
        if handler is None and isinstance(op, str):
            handler = self.fallback
        if handler is None:
            return {"ok": False, "error": f"unknown request; known ops: {', '.join(sorted(self._handlers))}"}
        try:
            reply = handler(request)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - the asking command reports it; the proxy goes on
            return _failed(op, exc)
        if inspect.isawaitable(reply):
            return _awaited(op, reply)
        return {"ok": True, **reply}

    async def answer_async(self, line: bytes) -> Reply:
        reply = self.answer(line)
        return reply if isinstance(reply, dict) else await reply


async def _awaited(op: str, reply: Awaitable[Reply]) -> Reply:
    try:
        return {"ok": True, **await reply}
    except Exception as exc:  # noqa: BLE001 - as in answer()
        return _failed(op, exc)


def _failed(op: Any, exc: Exception) -> Reply:
    log.warning("control request %r failed: %s", op, exc)
    return {"ok": False, "error": str(exc)}


async def start_control_server(ops: ControlOps, path: Path) -> asyncio.AbstractServer:
    """Listen on ``path`` (created owner-only) and answer each request line with ``ops``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                writer.write(json.dumps(await ops.answer_async(line)).encode() + b"\n")
                await writer.drain()
        finally:
            writer.close()

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    old_umask = os.umask(0o077)
    try:
        return await asyncio.start_unix_server(handle, path=str(path))
    finally:
        os.umask(old_umask)


def control_request(config: Config, request: Request) -> Reply:
    """Ask the proxy ``config`` describes; one request, one reply."""
    path = config.proxy.control_socket
    if path is None:
        raise ConfigError(f"{config.path}: proxy.control_socket: is not set, so the proxy can't be asked")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError as exc:
            raise ConfigError(f"{config.path}: proxy.control_socket: cannot reach {path}: {exc.strerror} "
                              "(is tollgate running?)") from None
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


class AdminUnrecorded(Exception):
    """An admin action could not be recorded in the audit log (the message says why)."""


# Who appends an admin record when no proxy answers on the control socket: the audit
# package's direct writer (it takes the log's exclusive lock, so it can't write beside a
# running proxy). This layer can't import appliance.audit; the entry point installs it.
_direct_writer: Callable[[Config, dict[str, Any]], int] | None = None


def install_direct_writer(writer: Callable[[Config, dict[str, Any]], int] | None) -> None:
    """Let :func:`record_admin` open the log itself when the proxy isn't running."""
    global _direct_writer
    _direct_writer = writer


def record_admin(config: Config, record: dict[str, Any]) -> int | None:
    """Append an ``admin`` record through the running proxy; its sequence number.

    ``None`` when the configuration has no ``[audit]``: there is no log to record in.
    With one, the action must be recorded: a proxy that is down, unreachable or refusing
    raises :class:`AdminUnrecorded`, and the caller decides what failing closed means.
    """
    if config.audit is None:
        return None
    try:
        reply = control_request(config, {"op": "audit.append", "record": {"type": "admin", **record}})
    except (ConfigError, OSError, ValueError) as exc:
        if _direct_writer is None:
            raise AdminUnrecorded(f"the audit log can't record {record.get('action')!r}: {exc}") from None
        try:  # no proxy answers: this process writes the log (refused if a proxy holds it)
            return _direct_writer(config, record)
        except Exception as direct:  # noqa: BLE001 - whatever stops it, the action is unrecorded
            raise AdminUnrecorded(f"the audit log can't record {record.get('action')!r}: {exc}; "
                                  f"and writing it directly failed: {direct}") from None
    if not reply.get("ok"):
        reason = reply.get("error", "no reason given")
        raise AdminUnrecorded(f"the audit log refused {record.get('action')!r}: {reason}")
    return int(reply["seq"])
