"""Waiting until a lab service really serves, and saying why when it never does.

A service the lab starts counts as up only when it has shown it, in two steps:

1. its *ready line* in its log — the child's own word that it listens (``tollgate: ready``
   once the proxy listens and its ruleset is in place; gunicorn's when-ready for the
   enrollment service; the dev issuer once bound);
2. for an HTTPS service, an *answer*: one request from inside the lab namespace that will
   use it (the lab's addresses are routed nowhere else), which only a worker that has
   loaded the app can give — gunicorn listens before its workers boot, and stops listening
   altogether if one fails to.

Either wait ends early, with the last lines of the service's log, when the service exits;
:data:`READY_TIMEOUT` is only a safety net for a service that neither answers nor exits.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

# Generous on purpose: a loaded machine makes starting slow, never wrong; a working service
# is waited for only as long as it takes.
READY_TIMEOUT = 60.0
# Between two reads of a log that has not shown its ready line yet (an exit wakes us at once).
LOG_POLL_SECONDS = 0.05

# One HTTPS request, run in a lab namespace: exit 0 on a 2xx answer, else exit with why.
_HTTPS_PROBE = """\
import ssl, sys, urllib.error, urllib.request
url, ca_file, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
try:
    with urllib.request.urlopen(url, context=ssl.create_default_context(cafile=ca_file), timeout=timeout):
        pass
except urllib.error.HTTPError as exc:
    sys.exit(f"{url} answered HTTP {exc.code}")
except OSError as exc:
    sys.exit(f"{url}: {getattr(exc, 'reason', exc)}")
"""


class NotReady(Exception):
    """A service exited before it was ready, or was not ready in time; the message says which,
    with the end of its log."""


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of ``path``, for an error message."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc.strerror})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def _exited(proc: subprocess.Popen[bytes], what: str, log_path: Path) -> NotReady:
    return NotReady(f"{what} exited (status {proc.returncode}) before it was ready; "
                    f"last lines of {log_path}:\n{tail(log_path)}")


def wait_for_line(proc: subprocess.Popen[bytes], log_path: Path, ready_line: str, what: str, *,
                  offset: int = 0, timeout: float = READY_TIMEOUT) -> None:
    """Until ``proc`` logs ``ready_line`` to ``log_path`` after ``offset`` (a log appended to
    across restarts); :class:`NotReady` at once if it exits, or after ``timeout``."""
    deadline = time.monotonic() + timeout
    pidfd = os.pidfd_open(proc.pid)
    try:
        while True:
            with open(log_path, "rb") as fh:
                fh.seek(offset)
                chunk = fh.read()
            if ready_line.encode() in chunk:
                return
            # Keep the last partial line in view so a ready line split across reads matches.
            offset += max(0, chunk.rfind(b"\n") + 1)
            if proc.poll() is not None:
                raise _exited(proc, what, log_path)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NotReady(f"{what} was not ready after {timeout:.0f}s (no {ready_line!r} line); "
                               f"last lines of {log_path}:\n{tail(log_path)}")
            # Readable once the process has exited: wakes at once then.
            select.select([pidfd], [], [], min(LOG_POLL_SECONDS, remaining))
    finally:
        os.close(pidfd)


def https_probe_argv(url: str, ca_file: Path, timeout: float = READY_TIMEOUT) -> list[str]:
    """A command that GETs ``url`` once, trusting ``ca_file``, and exits 0 on a 2xx answer;
    prefix it to run inside the namespace that will use the service."""
    return [sys.executable, "-c", _HTTPS_PROBE, url, str(ca_file), str(timeout)]


def wait_for_answer(proc: subprocess.Popen[bytes], log_path: Path, what: str, probe: Sequence[str], *,
                    env: Mapping[str, str] | None = None, timeout: float = READY_TIMEOUT) -> None:
    """Run ``probe`` (a command asking the service, e.g. :func:`https_probe_argv` in a
    namespace) until it exits; :class:`NotReady` if it fails, if ``proc`` exits first, or
    after ``timeout``."""
    prober = subprocess.Popen(list(probe), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, env=None if env is None else dict(env))
    service_fd, prober_fd = os.pidfd_open(proc.pid), os.pidfd_open(prober.pid)
    try:
        # Readable once the process has exited: whichever of the two ends first wakes us.
        select.select([service_fd, prober_fd], [], [], timeout)
        if proc.poll() is not None:
            raise _exited(proc, what, log_path)
        if prober.poll() is None:
            raise NotReady(f"{what} did not answer within {timeout:.0f}s; last lines of {log_path}:\n"
                           f"{tail(log_path)}")
        said = prober.communicate()[0].decode(errors="replace").strip()
        if prober.returncode != 0:
            raise NotReady(f"{what} is running but did not answer: {said or f'probe status {prober.returncode}'}; "
                           f"last lines of {log_path}:\n{tail(log_path)}")
    finally:
        if prober.poll() is None:
            prober.kill()
            prober.wait()
        if prober.stdout is not None:
            prober.stdout.close()
        os.close(service_fd)
        os.close(prober_fd)


__all__ = ["READY_TIMEOUT", "NotReady", "https_probe_argv", "tail", "wait_for_answer", "wait_for_line"]
