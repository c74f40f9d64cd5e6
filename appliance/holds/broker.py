"""The proxy's side of holds: open an approval request, await its outcome as a session verdict.

The enforcement addon calls, in the event loop, from a statement hook::

    request = broker.open(requester=..., target=..., database=..., sql=scrubbed, params=scrubbed,
                          decision=decision, fingerprint=exact_key, shape=shape_key, free=free_parts,
                          session_id=session.id)
    return Hold(broker.decision(request), ...)

or, the same in one call with the addon's request dict, ``request, outcome = broker.hold(request, decision)``.
:meth:`HoldBroker.open` is a quick synchronous SQLite insert (it raises if the request can't
be recorded: the addon refuses the statement, failing closed). :meth:`HoldBroker.decision`
returns an :class:`asyncio.Future` resolving to:

==========================================  ====================================================
``None``                                     approved: the statement goes through
``Reject("42501", "approval apr-… was        denied (42501 insufficient_privilege: what the
denied by <approver>: <reason>")``           server says when a GRANT is missing)
``Reject("42501", "approval apr-… timed      no decision in time; the request is marked expired.
out after <n>s without a decision")``        Not 57014 (query_canceled), which drivers may treat
                                             as a retryable statement timeout. ``<n>`` is the
                                             request's own timeout (or the waiter's shorter one),
                                             never a measured time
``Reject("42501", "approval apr-… was        withdrawn by someone else
withdrawn: …")``
``Reject("58000", "approval apr-… could      the approvals database failed (58000 system_error):
not be checked: …")``                        fail closed, the statement does not run
``Reject("57P01", "… shutting down …")``     the proxy is stopping (57P01 admin_shutdown)
==========================================  ====================================================

A future rather than a coroutine, so that cancelling it works even before anything ran:
when the session cancels it (the client sent a CancelRequest or disconnected) the request is
withdrawn, unless another waiter still waits for it.

No per-request polling: one poller task reads the store's revision counter every
``poll_seconds`` (in a thread — SQLite blocks) and, only when it moved or a waiter was
added, reads the waited-for requests and the live grants in one go. Each waiter has one
timer for its deadline, set through ``call_later`` (the event loop's by default; tests pass
one they fire by hand, so a deadline is an event, not a race against the clock).
:meth:`HoldBroker.grant_allows` answers from the grants cached by the poller and never
touches the database; the cache is emptied when the store fails, so grants fail closed too.
:meth:`HoldBroker.refresh` reads the store at once, as a poll does; :meth:`HoldBroker.drain`
waits for the withdrawals and expiries already under way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from appliance.holds.service import ApprovalError, ApprovalService
from appliance.holds.store import ApprovalRequest, Grant, Requester
from appliance.proxy.hooks import Reject

log = logging.getLogger("tollgate.approvals.broker")

DENIED_SQLSTATE = "42501"  # insufficient_privilege
TIMED_OUT_SQLSTATE = "42501"
WITHDRAWN_SQLSTATE = "42501"
UNAVAILABLE_SQLSTATE = "58000"  # system_error: something outside the database failed
SHUTDOWN_SQLSTATE = "57P01"  # admin_shutdown
# Pending requests left behind (a proxy killed mid-hold) are expired this often.
SWEEP_SECONDS = 30.0
CANCELLED_WHY = "the client cancelled the statement or disconnected"
SHUTDOWN_WHY = "the appliance proxy shut down while the statement waited"
STORE_FAILED_WHY = "the approvals database failed while the statement waited"


def _seconds(value: float) -> str:
    return f"{round(value)}" if value >= 1 else f"{value:.2g}"


def _votes_so_far(request: ApprovalRequest) -> str:
    return f"{request.approvals} of {request.min_approvals} approval(s) from {', '.join(request.approver_groups)}"


def verdict_for(request: ApprovalRequest, waited: float | None = None) -> Reject | None:
    """The session verdict a settled request means (``None``: go ahead); ``waited`` is the
    timeout a waiter set itself, shorter than the request's own, to name in a timeout."""
    rule = f"policy rule {request.rule!r}" + (f" (line {request.rule_line})" if request.rule_line else "")
    if request.status == "approved":
        return None
    if request.status == "denied":
        vote = request.denial
        who, why = (vote.approver_display, vote.reason) if vote is not None else ("an approver", "no reason recorded")
        return Reject(DENIED_SQLSTATE, f"approval {request.id} was denied by {who}: {why}",
                      detail=f"{rule} holds this statement for approval by {', '.join(request.approver_groups)}")
    if request.status == "expired":
        seconds = request.timeout_seconds if waited is None else waited
        return Reject(TIMED_OUT_SQLSTATE, f"approval {request.id} timed out after {_seconds(seconds)}s without a "
                                          "decision",
                      detail=f"{rule}; {_votes_so_far(request)}",
                      hint=f"ask a member of {', '.join(request.approver_groups)} to decide, then run it again")
    if request.status == "withdrawn":
        return Reject(WITHDRAWN_SQLSTATE, f"approval {request.id} was withdrawn: "
                                          f"{request.status_reason or 'no reason recorded'}", detail=rule)
    raise ValueError(f"request {request.id} is still {request.status}")


def _unavailable(request_id: str, exc: BaseException) -> Reject:
    return Reject(UNAVAILABLE_SQLSTATE, f"approval {request_id} could not be checked: {exc}; the statement was "
                                        "not run", hint="the appliance's approvals database needs attention")


class Timer(Protocol):
    """What ``call_later`` returns: a pending call that can be called off."""

    def cancel(self) -> None: ...


# ``loop.call_later``'s shape: (delay in seconds, callback, *args) -> a cancellable handle.
CallLater = Callable[..., Timer]


@dataclass(eq=False)
class _Waiter:
    request: ApprovalRequest
    future: asyncio.Future[Reject | None]
    # The timeout the caller chose, or None: the request's own (its time left is the delay).
    # Messages name this, never a delay computed from the clock a moment after opening.
    timeout: float | None
    timer: Timer | None = None
    expiring: bool = False

    @property
    def expiry_reason(self) -> str | None:
        """Why the request expires, for the store (None: the service names its own timeout)."""
        return None if self.timeout is None else f"no decision within {_seconds(self.timeout)} s"


@dataclass
class _GrantCache:
    revision: int | None = None
    # (subject, target, fingerprint) -> latest expiry, seconds since the epoch
    expiry: dict[tuple[str, str, str], float] = field(default_factory=dict)


class HoldBroker:
    """Approval requests for held statements, and their outcomes as session verdicts."""

    def __init__(self, service: ApprovalService, poll_seconds: float = 0.2, *, owns_service: bool = False,
                 sweep_seconds: float = SWEEP_SECONDS, call_later: CallLater | None = None):
        self.service = service
        self.poll_seconds = poll_seconds
        self.sweep_seconds = sweep_seconds
        self._call_later = call_later  # None: the running loop's
        self._owns_service = owns_service
        self._waiters: dict[str, list[_Waiter]] = {}
        self._grants = _GrantCache()
        self._dirty = True  # a waiter was added since the last read: read even if the revision is unchanged
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        # Store calls running in a thread. Cancelling the task that awaits one does not stop
        # the thread, and closing the store under it crashes SQLite: close() waits for these.
        self._in_threads: set[asyncio.Future[Any]] = set()
        self._closing = False
        self._failing: str | None = None  # why the store failed, until it works again
        self._last_sweep = 0.0
        # Told of each request opened here and of its outcome: ("request" | "decision", request).
        self.listeners: list[Callable[[str, ApprovalRequest], None]] = []

    @classmethod
    def from_config(cls, config: Any) -> HoldBroker:
        """The broker for an appliance config: its approvals database, webhook and poll interval."""
        return cls(ApprovalService.from_config(config), config.approvals.poll_seconds, owns_service=True)

    # --- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Expire what earlier runs left pending, load the grants and start the poller."""
        try:
            await self._offload(self.service.expire_overdue)
            await self._refresh(force=True)
        except Exception as exc:  # noqa: BLE001 - a broken store refuses holds and grants; the proxy still runs
            self._store_failed(exc)
        self._ensure_poller()

    async def close(self) -> None:
        """Stop polling; every waiting statement is refused and its request withdrawn."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            # The poller logs its own failures; here it only has to be gone.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        waiting = [w for ws in self._waiters.values() for w in ws]
        ids = list(self._waiters)
        for waiter in waiting:
            self._resolve(waiter, Reject(SHUTDOWN_SQLSTATE, f"the appliance is shutting down; approval "
                                                            f"{waiter.request.id} was withdrawn"))
        for request_id in ids:
            self._spawn(self._withdraw(request_id, SHUTDOWN_WHY))
        await self.drain(timeout=10)
        if self._in_threads:
            await asyncio.wait(list(self._in_threads))
        if self._owns_service:
            await asyncio.to_thread(self.service.close)

    @property
    def waiting(self) -> int:
        """How many statements wait for a decision right now."""
        return sum(len(ws) for ws in self._waiters.values())

    async def refresh(self) -> None:
        """Read the store now, as each poll does: settled requests resolve their waiters and
        the grant cache is reloaded. A failing store fails closed, as in the poller."""
        try:
            await self._refresh(force=True)
        except Exception as exc:  # noqa: BLE001 - any store failure fails closed, as in the poller
            self._store_failed(exc)

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until the withdrawals and expiries already started (by cancelled waiters,
        deadlines or a failing store) are recorded, or ``timeout`` seconds pass."""
        while self._background:
            # Work may start more work (an expiry's verdict can cancel a waiter): loop until none.
            _, pending = await asyncio.wait(list(self._background), timeout=timeout)
            if pending:
                return

    # --- the addon's side ---------------------------------------------------------------------

    def open(self, *, requester: Requester | Any, target: str, database: str, sql: str,
             params: Sequence[str] | None, decision: Any, fingerprint: str, session_id: str | int | None = None,
             client: str = "", role: str = "", timeout_seconds: float | None = None, shape: str = "",
             free: Sequence[str] | None = None) -> ApprovalRequest:
        """Record a request (synchronous, one SQLite insert). Raises when it can't be recorded:
        ApprovalError (e.g. a hold with no approvers), StoreError/sqlite3.Error, or RuntimeError
        when shutting down."""
        if self._closing:
            raise RuntimeError("the appliance is shutting down")
        request = self.service.request(requester=requester, target=target, database=database, sql=sql,
                                       params=params, decision=decision, fingerprint=fingerprint,
                                       session_id=session_id, client=client, role=role,
                                       timeout_seconds=timeout_seconds, shape=shape, free=free)
        self._notify("request", request)
        return request

    def decision(self, request: ApprovalRequest, timeout: float | None = None) -> asyncio.Future[Reject | None]:
        """A future for ``request``'s outcome (see the module docstring); cancel it to withdraw.

        ``timeout`` (seconds) defaults to the time left until the request expires; a shorter
        one expires the request when it runs out. Call in the event loop.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reject | None] = loop.create_future()
        delay = timeout if timeout is not None else max(0.0, (request.expires_at - self.service.now())
                                                        .total_seconds())
        waiter = _Waiter(request, future, timeout)
        if self._closing:
            self._resolve(waiter, Reject(SHUTDOWN_SQLSTATE, "the appliance is shutting down"))
            return future
        self._waiters.setdefault(request.id, []).append(waiter)
        waiter.timer = (self._call_later or loop.call_later)(delay, self._deadline, waiter)
        future.add_done_callback(lambda f: self._finished(waiter))
        self._dirty = True
        self._ensure_poller()
        return future

    def hold(self, request: Mapping[str, Any], decision: Any) -> tuple[ApprovalRequest, asyncio.Future[Reject | None]]:
        """:meth:`open` + :meth:`decision` for the enforcement addon's request dict
        (``requester_subject``/``_display``/``_kind``/``_groups``, ``session_id``, ``client``,
        ``target``, ``database``, ``role``, ``sql``, ``params``, ``fingerprint``, ``shape``, ``free``):
        the request opened (its id is what the held client is told) and its outcome."""
        requester = Requester(str(request["requester_subject"]),
                              str(request.get("requester_display") or request["requester_subject"]),
                              str(request.get("requester_kind") or "unidentified"),
                              tuple(request.get("requester_groups") or ()))
        opened = self.open(requester=requester, target=str(request.get("target") or ""),
                           database=str(request.get("database") or ""), sql=str(request["sql"]),
                           params=request.get("params"), decision=decision, fingerprint=str(request["fingerprint"]),
                           session_id=request.get("session_id"), client=str(request.get("client") or ""),
                           role=str(request.get("role") or ""), shape=str(request.get("shape") or ""),
                           free=request.get("free"))
        return opened, self.decision(opened)

    async def wait_for(self, request_id: str, timeout_seconds: float | None = None) -> Reject | None:
        """Wait for an existing request by id (``None``: approved). Cancelling withdraws it."""
        try:
            request = await self._offload(self.service.get, request_id)
        except ApprovalError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever broke the store, fail closed
            return _unavailable(request_id, exc)
        if not request.pending:
            return verdict_for(request)
        return await self.decision(request, timeout_seconds)

    def grant_allows(self, subject: str, target: str, fingerprint: str) -> bool:
        """Whether a live grant for the key ``fingerprint`` (an exact statement's, or a shape's)
        lets ``subject`` run it on ``target``; from the cache, never blocking (a grant made a
        moment ago shows from the next poll)."""
        expiry = self._grants.expiry.get((subject, target, fingerprint))
        return expiry is not None and expiry > self.service.now().timestamp()

    # --- resolving ----------------------------------------------------------------------------

    def _resolve(self, waiter: _Waiter, verdict: Reject | None) -> None:
        if not waiter.future.done():
            waiter.future.set_result(verdict)

    def _notify(self, event: str, request: ApprovalRequest) -> None:
        if event == "decision":
            # tollgate.log tells a request's end as well as its opening.
            last = request.votes[-1] if request.votes else None
            who = f" by {last.approver_display}" if last is not None and request.status in ("approved", "denied") \
                else ""
            log.info("approval %s (session %s) %s%s: %s", request.id, request.session_id or "-", request.status, who,
                     request.status_reason or (last.reason if last is not None else "-"))
        for listener in self.listeners:
            try:
                listener(event, request)
            except Exception:  # a listener's failure is its own (the audit reports its own)
                log.exception("approval listener %r failed on %s %s", listener, event, request.id)

    def _resolve_all(self, request: ApprovalRequest) -> None:
        self._notify("decision", request)
        for waiter in list(self._waiters.get(request.id, ())):
            self._resolve(waiter, verdict_for(request, waiter.timeout if request.status == "expired" else None))

    def _finished(self, waiter: _Waiter) -> None:
        """The waiter's future is done, however: forget it; if it was cancelled, withdraw."""
        if waiter.timer is not None:
            waiter.timer.cancel()
        waiters = self._waiters.get(waiter.request.id, [])
        if waiter in waiters:
            waiters.remove(waiter)
        if not waiters:
            self._waiters.pop(waiter.request.id, None)
        if waiter.future.cancelled() and not waiters and not self._closing:
            log.info("approval %s: %s; withdrawing it", waiter.request.id, CANCELLED_WHY)
            self._spawn(self._withdraw(waiter.request.id, CANCELLED_WHY))

    def _deadline(self, waiter: _Waiter) -> None:
        waiter.timer = None
        if not waiter.future.done() and not waiter.expiring:
            waiter.expiring = True
            self._spawn(self._expire(waiter))

    async def _expire(self, waiter: _Waiter) -> None:
        request_id = waiter.request.id
        try:
            # Settled atomically in the store: an approval that landed just before wins.
            request = await self._offload(self.service.expire, request_id, waiter.expiry_reason)
        except Exception as exc:  # noqa: BLE001 - whatever broke the store, fail closed
            log.error("approval %s: could not record its expiry: %s", request_id, exc)
            self._resolve(waiter, _unavailable(request_id, exc))
            return
        if request.status == "expired":
            log.info("approval %s timed out: %s", request_id, request.status_reason)
        if not request.pending:
            self._notify("decision", request)
        self._resolve(waiter, verdict_for(request, waiter.timeout if request.status == "expired" else None))

    async def _withdraw(self, request_id: str, why: str) -> None:
        try:
            request = await self._offload(self.service.withdraw, request_id, why)
        except Exception as exc:  # noqa: BLE001 - the statement is already refused; log and move on
            log.error("approval %s: could not withdraw it (%s): %s", request_id, why, exc)
            return
        if request.status == "withdrawn":
            self._notify("decision", request)
        else:
            log.info("approval %s was already %s when its statement stopped waiting", request_id, request.status)

    async def _offload(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)`` in a thread (SQLite blocks), tracked until the thread is done."""
        future = asyncio.get_running_loop().run_in_executor(None, function, *args)
        self._in_threads.add(future)
        future.add_done_callback(self._in_threads.discard)
        # Shielded: a cancelled caller leaves the future to finish, so close() can wait for it.
        return await asyncio.shield(future)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- polling ------------------------------------------------------------------------------

    def _ensure_poller(self) -> None:
        if self._task is None and not self._closing:
            self._task = asyncio.get_running_loop().create_task(self._poll_loop(), name="approvals-poller")

    async def _poll_loop(self) -> None:
        while True:
            # A poll every poll_seconds, the first one poll_seconds after starting: start() and
            # a waiter's arrival (which marks the broker dirty) are read by the next poll anyway.
            await asyncio.sleep(self.poll_seconds)
            try:
                await self._refresh()
                if self._failing is not None:
                    log.warning("approvals database works again")
                    self._failing = None
                loop_time = asyncio.get_running_loop().time()
                if loop_time - self._last_sweep >= self.sweep_seconds:
                    self._last_sweep = loop_time
                    # Any expiry bumps the revision: our next read picks it up.
                    await self._offload(self.service.expire_overdue)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any store failure fails closed, and polling goes on
                self._store_failed(exc)

    async def _refresh(self, force: bool = False) -> None:
        revision = await self._offload(self.service.store.revision)
        if not force and not self._dirty and revision == self._grants.revision:
            return
        # Cleared before reading: a waiter added while we read sets it again.
        self._dirty = False
        ids = list(self._waiters)
        grants, requests = await self._offload(self._read, ids)
        self._grants = _GrantCache(revision, self._expiries(grants))
        for request in requests.values():
            if not request.pending:
                self._resolve_all(request)

    def _read(self, ids: list[str]) -> tuple[list[Grant], dict[str, ApprovalRequest]]:
        # Requests first, grants second: an approval with a grant commits both at once, so
        # whenever its waiter is released here, the grant it made is already in the cache
        # (the other order could release the statement a poll before its grant shows).
        requests = self.service.store.get_many(ids) if ids else {}
        return self.service.active_grants(), requests

    @staticmethod
    def _expiries(grants: Sequence[Grant]) -> dict[tuple[str, str, str], float]:
        expiry: dict[tuple[str, str, str], float] = {}
        for g in grants:
            key = (g.subject, g.target, g.fingerprint)
            expiry[key] = max(expiry.get(key, 0.0), g.expires_at.timestamp())
        return expiry

    def _store_failed(self, exc: BaseException) -> None:
        """Fail closed: no grants, every waiting statement refused (and withdrawn if possible)."""
        reason = f"{type(exc).__name__}: {exc}"
        if self._failing != reason:
            log.error("approvals database failed; held statements are refused and grants ignored: %s", reason)
        self._failing = reason
        self._grants = _GrantCache()
        self._dirty = True
        for request_id, waiters in list(self._waiters.items()):
            for waiter in list(waiters):
                self._resolve(waiter, _unavailable(request_id, exc))
            self._spawn(self._withdraw(request_id, STORE_FAILED_WHY))


__all__ = [
    "DENIED_SQLSTATE",
    "SHUTDOWN_SQLSTATE",
    "TIMED_OUT_SQLSTATE",
    "UNAVAILABLE_SQLSTATE",
    "WITHDRAWN_SQLSTATE",
    "HoldBroker",
    "verdict_for",
]
