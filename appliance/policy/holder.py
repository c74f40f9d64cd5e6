"""The proxy's current policy, reloaded when its file changes or on SIGHUP.

An edited policy takes effect without a restart, and a broken edit never takes effect: a
reload that fails is logged with its ``FILE:LINE: reason``, remembered in ``last_error``,
and the previous policy stays in force. Only the first load may fail loudly —
:class:`PolicyHolder` raises :class:`PolicyError` then, because the proxy must not start
without a valid policy.

Changes are noticed by polling the file's (mtime, size, inode, device) every
``reload_seconds``: that catches in-place writes and the rename-over that editors and
config management do, with no inotify dependency. A change whose content is identical
(``touch``) reloads nothing and calls no callbacks.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from appliance.policy.engine import Policy
from appliance.policy.rules import PolicyError, parse_rules_bytes

log = logging.getLogger("tollgate.policy")

ReloadCallback = Callable[[Policy], None]
Signature = tuple[int, int, int, int]


def _signature(path: Path) -> Signature | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


class PolicyHolder:
    """Holds the policy in force; sessions read :attr:`current` for every decision."""

    def __init__(self, path: str | Path, reload_seconds: float = 1.0):
        self.path = Path(path)
        self.reload_seconds = float(reload_seconds)
        self.last_error: str | None = None
        self.loaded_at: float = 0.0
        self.generation = 0  # bumped at every policy change
        self._callbacks: list[ReloadCallback] = []
        self._failure_callbacks: list[Callable[[str], None]] = []
        self._signature = _signature(self.path)
        policy, digest = self._load()  # raises PolicyError: no valid policy, no proxy
        self._current = policy
        self._digest = digest
        self.loaded_at = time.time()
        log.info("policy %s loaded: %d rules, default %s", self.path, len(policy.rules),
                 policy.ruleset.default.value)

    @property
    def current(self) -> Policy:
        return self._current

    @property
    def digest(self) -> str:
        """SHA-256 (hex) of the policy file in force, for status output and records."""
        return self._digest

    def on_reload(self, fn: ReloadCallback) -> ReloadCallback:
        """Call ``fn(new_policy)`` after each successful change of policy (usable as a decorator)."""
        self._callbacks.append(fn)
        return fn

    def on_failure(self, fn: Callable[[str], None]) -> Callable[[str], None]:
        """Call ``fn(error)`` when a reload fails with a new error (the old policy stays)."""
        self._failure_callbacks.append(fn)
        return fn

    def _failed(self, error: str) -> None:
        if error == self.last_error:
            return  # the same broken file, polled again
        self.last_error = error
        for fn in list(self._failure_callbacks):
            try:
                fn(error)
            except Exception:
                log.exception("policy failure callback %r failed", fn)

    def _load(self) -> tuple[Policy, str]:
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            raise PolicyError(f"{self.path}: cannot read: {exc.strerror or exc}") from None
        digest = hashlib.sha256(raw).hexdigest()
        return Policy(parse_rules_bytes(raw, self.path)), digest

    def reload(self) -> bool:
        """Load the file again. True if the policy in force changed; on error the old one stays."""
        signature = _signature(self.path)  # taken before reading: a write racing the read shows next poll
        try:
            policy, digest = self._load()
        except PolicyError as exc:
            self._signature = signature
            if str(exc) != self.last_error:
                log.error("policy reload failed, keeping the previous policy: %s", exc)
            self._failed(str(exc))
            return False
        except Exception as exc:  # never let a reload take the proxy down
            self._signature = signature
            log.exception("policy reload failed, keeping the previous policy")
            self._failed(f"{self.path}: {type(exc).__name__}: {exc}")
            return False
        self._signature = signature
        self.last_error = None
        if digest == self._digest:
            return False
        self._current, self._digest = policy, digest
        self.loaded_at = time.time()
        self.generation += 1
        log.info("policy %s reloaded: %d rules, default %s", self.path, len(policy.rules),
                 policy.ruleset.default.value)
        for fn in list(self._callbacks):
            try:
                fn(policy)
            except Exception:
                log.exception("policy reload callback %r failed", fn)
        return True

    def changed(self) -> bool:
        """Has the file changed (by its stat signature) since it was last read?"""
        return _signature(self.path) != self._signature

    def check(self) -> bool:
        """Reload if the file changed; True if the policy in force changed."""
        if not self.changed():
            return False
        if _signature(self.path) is None:
            if self.last_error is None or "missing" not in self.last_error:
                log.error("policy file %s is missing; keeping the previous policy", self.path)
            self._failed(f"{self.path}: missing; the previous policy stays in force")
            self._signature = None
            return False
        return self.reload()

    async def watch(self) -> None:
        """Poll the file every ``reload_seconds`` and reload on change; run it as a task."""
        while True:
            await asyncio.sleep(self.reload_seconds)
            self.check()

    def status(self) -> dict[str, object]:
        """What ``tollgate`` shows of the policy in force (the proxy's control socket)."""
        return {"file": str(self.path), "sha256": self.digest, "generation": self.generation,
                "loaded_at": self.loaded_at, "last_error": self.last_error, "rules": len(self.current.rules)}

    def install_sighup(self, loop: asyncio.AbstractEventLoop) -> None:
        """Reload at once on SIGHUP (the conventional "re-read your config")."""
        loop.add_signal_handler(signal.SIGHUP, self._sighup)

    def _sighup(self) -> None:
        log.info("SIGHUP: reloading policy %s", self.path)
        self.reload()
