"""``tollgate enroll-server`` as a subprocess for tests, and the real CLI as a subprocess.

Used by the enrollment client tests and the approvals CLI tests through the fixtures in
``tests/conftest.py``. The server counts as started only once it has said where it listens
and a worker has answered ``/healthz``.
"""

from __future__ import annotations

import queue
import re
import subprocess
import sys
import threading
from pathlib import Path

from tests.identity.tls_helpers import https_request
from tests.webui import Appliance

REPO = Path(__file__).resolve().parents[2]
READY = re.compile(r"tollgate-enroll: ready on (https://127\.0\.0\.1:\d+)")
# Safety net: a server that works is waited for only as long as it takes to say so.
STARTUP_TIMEOUT = 60


def tollgate(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """The real ``tollgate`` CLI in a subprocess (60 s: a safety net against a hang)."""
    return subprocess.run([sys.executable, "-m", "appliance.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, **kwargs)  # type: ignore[call-overload]


class EnrollServer:
    """``tollgate enroll-server`` as a subprocess; its stderr is drained into ``log`` by a thread.

    Ready once it has said where it listens *and* a worker has answered ``/healthz``: gunicorn
    listens before its worker boots, and closes the socket if the worker fails to.
    """

    def __init__(self, appliance: Appliance, *, workers: int = 1) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli", "enroll-server", "-c", str(appliance.config_path),
             "--listen", "127.0.0.1:0", "--workers", str(workers)],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        self.url = self._wait_ready()
        self._wait_answer(appliance.state_dir / "ca" / "ca.crt")

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def _wait_ready(self) -> str:
        while True:
            try:
                line = self.lines.get(timeout=STARTUP_TIMEOUT)
            except queue.Empty:
                self.stop()
                log = "".join(self.log)
                raise AssertionError(f"enroll-server not ready after {STARTUP_TIMEOUT}s:\n{log}") from None
            if line is None:
                raise AssertionError(f"enroll-server exited ({self.process.wait()}):\n{''.join(self.log)}")
            match = READY.search(line)
            if match:
                return match.group(1)

    def _wait_answer(self, ca_file: Path) -> None:
        # One request: it waits in the listen backlog until the worker takes it.
        try:
            status, _, body = https_request(f"{self.url}/healthz", ca_file)
        except OSError as exc:
            self.stop()
            raise AssertionError(f"enroll-server did not answer ({exc}):\n{''.join(self.log)}") from None
        if status != 200:
            self.stop()
            raise AssertionError(f"enroll-server answered /healthz with {status} {body!r}:\n{''.join(self.log)}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
