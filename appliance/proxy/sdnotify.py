"""The service manager's notify protocol (sd_notify), spoken by the asyncio shell.

systemd runs the proxy as ``Type=notify``: it is "started" only when the proxy says
``READY=1`` — after the audit log is open, the listener answers and the intercept ruleset
is applied — so units ordered after it never see a gateway that diverts to nothing.
``STATUS=`` lines show in ``systemctl status``; ``STOPPING=1`` marks a clean shutdown.

The watchdog (``WatchdogSec=`` in the unit, passed as ``WATCHDOG_USEC``) is fed by a timer
*on the event loop*, never from a thread: a loop wedged by a runaway callback stops
feeding it, and systemd kills and restarts the proxy — which is the point.

The protocol is one datagram of ``KEY=VALUE`` lines to the AF_UNIX socket named by
``NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract namespace). Without that variable
every call is a no-op, so ``tollgate run`` behaves the same outside systemd. A send that
fails is logged once and otherwise ignored: the manager going away must not stop the proxy.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping

log = logging.getLogger("tollgate.sdnotify")


class Notifier:
    """Sends notify messages to the service manager, if there is one."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if path.startswith("@"):
            self.address = "\0" + path[1:]  # the abstract namespace
        elif path.startswith("/"):
            self.address = path
        self._sock: socket.socket | None = None
        self._warned = False
        self.watchdog_interval = _watchdog_interval(env)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """One message: ``send(READY=1, STATUS="…")``. True if it was delivered."""
        if self.address is None:
            return False
        # A newline in a value would start another field: a STATUS text is one line.
        text = "\n".join(f"{key}={str(value).replace(chr(10), ' ')}" for key, value in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(text.encode(), self.address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("could not notify the service manager at %s: %s", self.address.lstrip("\0"), exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send(READY=1, STATUS=status)

    def status(self, status: str) -> bool:
        return self.send(STATUS=status)

    def stopping(self, status: str = "shutting down") -> bool:
        return self.send(STOPPING=1, STATUS=status)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between keep-alives (half the manager's timeout, as sd_watchdog_enabled
    advises), or None when no watchdog is asked of this process."""
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (we were forked or exec'd from it)
    return int(usec) / 2_000_000


class Watchdog:
    """Sends ``WATCHDOG=1`` from a loop timer every ``interval`` seconds until stopped.

    ``status`` (optional) is asked for a one-line status at each keep-alive, and sent with
    it when it changed, so ``systemctl status`` shows e.g. the live session count.
    """

    def __init__(self, notifier: Notifier, interval: float, status: Callable[[], str] | None = None) -> None:
        self.notifier = notifier
        self.interval = interval
        self.status = status
        self._last_status: str | None = None
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._feed()

    def _feed(self) -> None:
        fields: dict[str, str | int] = {"WATCHDOG": 1}
        if self.status is not None:
            text = self.status()
            if text != self._last_status:
                fields["STATUS"] = self._last_status = text
        self.notifier.send(**fields)
        self._handle = asyncio.get_running_loop().call_later(self.interval, self._feed)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
