"""Calling addons' hooks, so that whatever an addon raises fails closed.

A hook that decides a request (``statement``, ``execute``, ``forward``) and raises refuses
that request: the client gets an ErrorResponse, the server never sees the statement. Any
other hook that raises — on data flowing to the agent, or on the session's life — ends the
session: :class:`AddonFailed` carries the SQLSTATE (the exception's own ``sqlstate`` when
it has one, as masking's errors do, else XX000) up to the session, which sends a FATAL and
closes. Either way the failure is logged with its traceback and named in what the session
reports, so the audit log records it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from appliance.proxy.errors import AddonFailed
from appliance.proxy.hooks import Forward, Reject, SessionInfo, Statement, Verdict

log = logging.getLogger("tollgate.session")

INTERNAL_ERROR = "XX000"


def hook_name(hook: Callable[..., Any]) -> str:
    owner = getattr(hook, "__self__", None)
    return f"{getattr(owner, 'name', type(owner).__name__)}.{getattr(hook, '__name__', 'hook')}"


def failed(hook: Callable[..., Any], exc: Exception) -> AddonFailed:
    """The session-ending form of an exception a hook raised."""
    sqlstate = getattr(exc, "sqlstate", None)
    if not isinstance(sqlstate, str):
        sqlstate = INTERNAL_ERROR
    message = getattr(exc, "message", None)
    if isinstance(message, str):
        # An addon's own fail-closed error (masking's) says what it refused and why.
        return AddonFailed(sqlstate, message, hint=getattr(exc, "hint", None))
    log.error("hook %s failed", hook_name(hook), exc_info=exc)
    return AddonFailed(sqlstate, f"Tollgate failed closed: {hook_name(hook)} raised {type(exc).__name__}: {exc}")


def rewrite(hooks: list[Callable[..., bytes | None]], info: SessionInfo, message: memoryview,
            *args: Any) -> bytes | None:
    """Run rewriting hooks in turn, each seeing the previous one's output."""
    new: bytes | None = None
    for hook in hooks:
        try:
            out = hook(info, *args, message if new is None else memoryview(new))
        except Exception as exc:
            raise failed(hook, exc) from exc
        if out is not None:
            new = out
    return new


def notify(hooks: list[Callable[..., None]], *args: Any) -> None:
    """Run hooks that only observe."""
    for hook in hooks:
        try:
            hook(*args)
        except Exception as exc:
            raise failed(hook, exc) from exc


def notify_ending(hooks: list[Callable[..., None]], *args: Any) -> None:
    """Run hooks on a session that is over: a failure is logged, and the closing goes on."""
    for hook in hooks:
        try:
            hook(*args)
        except Exception:
            log.exception("hook %s failed while the session ended", hook_name(hook))


def _refusal(hook: Callable[..., Any], what: str) -> Reject:
    log.exception("hook %s failed", hook_name(hook))
    return Reject(INTERNAL_ERROR, f"Tollgate could not {what}, so it did not run "
                                  f"({hook_name(hook)} failed)")


def decide(hooks: list[Callable[[SessionInfo, Statement], Verdict]], info: SessionInfo,
           statement: Statement) -> Verdict:
    """The first verdict a ``statement`` hook gives; one that raises refuses the statement."""
    for hook in hooks:
        try:
            verdict = hook(info, statement)
        except Exception:  # noqa: BLE001 - fail closed: the statement is refused (logged there)
            return _refusal(hook, "evaluate the statement")
        if verdict is not None:
            return verdict
    return None


def decide_execute(hooks: list[Callable[[SessionInfo, Statement, bytes | None], Verdict]], info: SessionInfo,
                   statement: Statement, bind: bytes | None) -> Verdict:
    """The first verdict an ``execute`` hook gives; one that raises refuses the execution."""
    for hook in hooks:
        try:
            verdict = hook(info, statement, bind)
        except Exception:  # noqa: BLE001 - fail closed: the execution is refused (logged there)
            return _refusal(hook, "evaluate the statement")
        if verdict is not None:
            return verdict
    return None


def forward(hooks: list[Callable[[SessionInfo, Forward], Any]], info: SessionInfo,
            request: Forward) -> Awaitable[Any] | None:
    """Put a request whose verdict is final to the ``forward`` hooks. Returns what it must
    wait for before going upstream, or None; sets ``request.reject`` when one refuses it (or
    raises). A request already refused is only shown to them."""
    wait: Any = None
    for hook in hooks:
        try:
            out = hook(info, request)
        except Exception:  # noqa: BLE001 - fail closed: the request is refused (logged there)
            out = _refusal(hook, "prepare the statement to run")
        if out is None or request.reject is not None:
            continue
        if type(out) is Reject:
            request.reject = out
            return None
        wait = out if wait is None else _all_of(wait, out)
    return wait


async def _all_of(*waits: Any) -> None:
    for wait in waits:
        await wait


def all_of(waits: list[Any]) -> Awaitable[Any]:
    return waits[0] if len(waits) == 1 else _all_of(*waits)
