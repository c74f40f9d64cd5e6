"""The proxy's side of holds in a real asyncio loop, with a real store shared with "another process".

Decisions are made the way the web service makes them: through a second ApprovalService on
the same SQLite file, from another thread.

Nothing here waits on the clock: deadlines are set through a ``call_later`` the tests fire by
hand (:class:`Deadlines`), "nothing happened yet" is checked after :meth:`HoldBroker.refresh`
read the store, and a cancellation's withdrawal is awaited with :meth:`HoldBroker.drain`.
Every await has a generous safety net (:data:`SAFETY`) that only a hang ever reaches.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from appliance.config import load_config
from appliance.holds.broker import HoldBroker, verdict_for
from appliance.holds.service import ApprovalError, ApprovalService
from appliance.holds.store import ApprovalRequest, ApprovalStore
from appliance.proxy.hooks import Reject
from tests.holds import AGENT, CARD_UPDATE, DBA1, DBA2, PAYMENT_DELETE, Clock, decision

POLL = 0.02
# Only a hang reaches these: a test that works never waits for them, however loaded the machine.
SAFETY = 60.0
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 4 * SAFETY))


async def settled(awaitable: Awaitable[T]) -> T:
    """``awaitable``'s result, failing (not hanging) if it never comes."""
    return await asyncio.wait_for(awaitable, SAFETY)


@dataclass(eq=False)
class _Deadline:
    delay: float
    callback: Callable[..., None]
    args: tuple[Any, ...]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class Deadlines:
    """The broker's ``call_later``: records each deadline; the test fires them when it chooses."""

    def __init__(self) -> None:
        self.set: list[_Deadline] = []

    def __call__(self, delay: float, callback: Callable[..., None], *args: Any) -> _Deadline:
        deadline = _Deadline(delay, callback, args)
        self.set.append(deadline)
        return deadline

    @property
    def pending(self) -> list[float]:
        """The delays of the deadlines not yet fired nor cancelled."""
        return [d.delay for d in self.set if not d.cancelled]

    def fire(self) -> None:
        """Every pending deadline runs out now."""
        for deadline in self.set:
            if not deadline.cancelled:
                deadline.cancelled = True
                deadline.callback(*deadline.args)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "approvals.db"


@pytest.fixture
def web(path: Path) -> Iterator[ApprovalService]:
    """The web service's view of the same database."""
    service = ApprovalService(ApprovalStore(path), max_grant_minutes=60)
    yield service
    service.close()


def make_broker(path: Path, poll: float = POLL, clock: Clock | None = None,
                deadlines: Deadlines | None = None) -> HoldBroker:
    """A broker on ``path``; its deadlines only run out when the test fires them."""
    kwargs = {} if clock is None else {"clock": clock}
    return HoldBroker(ApprovalService(ApprovalStore(path), max_grant_minutes=60, **kwargs), poll, owns_service=True,
                      call_later=deadlines if deadlines is not None else Deadlines())


def open_hold(broker: HoldBroker, sql: str = CARD_UPDATE, fingerprint: str = "fp-card",
              **kwargs: Any) -> ApprovalRequest:
    return broker.open(requester=AGENT, target="payments", database="payments", sql=sql, params=["blocked", "42"],
                       decision=decision(sql), fingerprint=fingerprint, session_id=3, **kwargs)


def in_thread(fn: Callable[[], Any]) -> Awaitable[Any]:
    """Run ``fn`` on a thread of its own, as the web service's worker would."""
    done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    loop = asyncio.get_running_loop()

    def target() -> None:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting test, which re-raises it
            loop.call_soon_threadsafe(done.set_exception, exc)
        else:
            loop.call_soon_threadsafe(done.set_result, result)
    threading.Thread(target=target).start()
    return done


async def cancelled(future: asyncio.Future[Any], broker: HoldBroker) -> None:
    """After ``future`` was cancelled: until the broker has seen it (its done-callback, added
    before ours, has run) and recorded whatever withdrawal that started."""
    await asyncio.wait([future])
    await asyncio.wait_for(broker.drain(), SAFETY)


async def until(condition: Callable[[], Any], what: str, timeout: float = SAFETY) -> Any:
    """Wait for a state only the poller produces, failing with ``what`` if it never comes."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = condition()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# --- outcomes --------------------------------------------------------------------------------

def test_approval_from_another_thread_lets_the_statement_go(path: Path, web: ApprovalService) -> None:
    async def main() -> None:
        broker = make_broker(path)
        await broker.start()
        request = open_hold(broker)
        outcome = broker.decision(request)
        await broker.refresh()  # what a poll does: the request is read, and still pending
        assert not outcome.done() and broker.waiting == 1
        await in_thread(lambda: web.decide(request.id, DBA1, True, "CHG-7"))
        assert await settled(outcome) is None  # the poller saw the approval
        assert broker.waiting == 0
        await broker.close()
    run(main())


def test_denial_becomes_a_42501_naming_the_approver_and_reason(path: Path, web: ApprovalService) -> None:
    async def main() -> Reject | None:
        broker = make_broker(path)
        await broker.start()
        request = open_hold(broker)
        outcome = broker.decision(request)
        await in_thread(lambda: web.decide(request.id, DBA1, False, "not during the freeze"))
        verdict = await settled(outcome)
        await broker.close()
        assert verdict == Reject("42501", f"approval {request.id} was denied by dba1@example.test: not during the "
                                          "freeze",
                                 detail="policy rule 'card-changes-need-a-dba' (line 3) holds this statement for "
                                        "approval by payments-dbas")
        return verdict
    run(main())


def test_no_decision_in_time_is_a_42501_and_the_request_expires(path: Path, web: ApprovalService) -> None:
    async def main() -> None:
        deadlines = Deadlines()
        broker = make_broker(path, deadlines=deadlines)
        await broker.start()
        request = open_hold(broker)
        outcome = broker.decision(request, timeout=0.3)
        assert deadlines.pending == [0.3]
        await broker.refresh()
        assert not outcome.done()  # only its deadline ends the wait
        deadlines.fire()
        verdict = await settled(outcome)
        assert verdict.sqlstate == "42501"
        assert verdict.message == f"approval {request.id} timed out after 0.3s without a decision"
        assert verdict.detail == ("policy rule 'card-changes-need-a-dba' (line 3); 0 of 1 approval(s) from "
                                  "payments-dbas")
        stored = web.get(request.id)
        assert stored.status == "expired" and stored.status_reason == "no decision within 0.3 s"
        with pytest.raises(ApprovalError, match="expired"):
            web.decide(request.id, DBA1, True, "late")
        await broker.close()
    run(main())


def test_default_timeout_is_the_requests_own(path: Path, web: ApprovalService) -> None:
    async def main() -> None:
        clock, deadlines = Clock(), Deadlines()
        broker = make_broker(path, clock=clock, deadlines=deadlines)
        request = open_hold(broker, timeout_seconds=0.25)
        clock.advance(0.1)  # the statement starts waiting a moment after its request was opened
        outcome = broker.decision(request)
        assert deadlines.pending == [pytest.approx(0.15)]  # the time the request has left …
        deadlines.fire()
        verdict = await settled(outcome)
        # … but what ran out is the request's own timeout, and that is what the agent is told.
        assert verdict.message == f"approval {request.id} timed out after 0.25s without a decision"
        assert web.get(request.id).status_reason == "no decision within 0.25 s"
        await broker.close()
    run(main())


def test_an_approval_that_lands_just_before_the_deadline_wins(path: Path, web: ApprovalService) -> None:
    async def main() -> None:
        deadlines = Deadlines()
        broker = make_broker(path, poll=3600, deadlines=deadlines)  # no poll: only the deadline's check can see it
        await broker.start()
        request = open_hold(broker)
        outcome = broker.decision(request, timeout=0.3)
        await in_thread(lambda: web.decide(request.id, DBA1, True, "just in time"))
        assert not outcome.done()
        deadlines.fire()
        assert await settled(outcome) is None
        assert web.get(request.id).status == "approved"
        await broker.close()
    run(main())


def test_withdrawn_elsewhere_is_refused(path: Path, web: ApprovalService) -> None:
    async def main() -> None:
        broker = make_broker(path)
        request = open_hold(broker)
        outcome = broker.decision(request)
        await in_thread(lambda: web.withdraw(request.id, "operator cleared the queue"))
        verdict = await settled(outcome)
        assert verdict.message == f"approval {request.id} was withdrawn: operator cleared the queue"
        await broker.close()
    run(main())


# --- cancellation ----------------------------------------------------------------------------

def test_cancelling_the_wait_withdraws_the_request(path: Path, web: ApprovalService) -> None:
    async def main() -> None:
        broker = make_broker(path)
        await broker.start()
        request = open_hold(broker)
        # As the session does: wrapped by ensure_future, cancelled when the client cancels.
        waiting = asyncio.ensure_future(broker.decision(request))
        await broker.refresh()
        waiting.cancel()
        await cancelled(waiting, broker)
        stored = web.get(request.id)
        assert stored.status == "withdrawn"
        assert stored.status_reason == "the client cancelled the statement or disconnected"
        assert broker.waiting == 0
        await broker.close()
    run(main())


def test_cancelling_a_task_awaiting_it_withdraws_too(path: Path, web: ApprovalService) -> None:
    async def main() -> None:
        broker = make_broker(path)
        request = open_hold(broker)

        awaiting = asyncio.Event()

        async def session() -> Reject | None:
            outcome = broker.decision(request)
            awaiting.set()  # and, in the same step, the task parks on the outcome
            return await outcome
        task = asyncio.get_running_loop().create_task(session())
        await awaiting.wait()
        task.cancel()
        await cancelled(task, broker)
        assert web.get(request.id).status == "withdrawn"
        await broker.close()
    run(main())


def test_cancelled_before_anything_ran_still_withdraws(path: Path, web: ApprovalService) -> None:
    async def main() -> None:
        broker = make_broker(path)
        request = open_hold(broker)
        outcome = broker.decision(request)
        outcome.cancel()
        await cancelled(outcome, broker)
        assert web.get(request.id).status == "withdrawn"
        await broker.close()
    run(main())


def test_another_waiter_keeps_the_request_alive(path: Path, web: ApprovalService) -> None:
    async def main() -> None:
        broker = make_broker(path)
        request = open_hold(broker)
        first, second = broker.decision(request), broker.decision(request)
        first.cancel()
        await cancelled(first, broker)
        assert web.get(request.id).pending and broker.waiting == 1
        await in_thread(lambda: web.decide(request.id, DBA1, True, "ok"))
        assert await settled(second) is None
        await broker.close()
    run(main())


# --- grants ----------------------------------------------------------------------------------

def test_grant_is_seen_from_the_cache_without_blocking(path: Path, web: ApprovalService) -> None:
    async def main() -> None:
        broker = make_broker(path)
        await broker.start()
        assert not broker.grant_allows("agent-ci", "payments", "fp-card")
        request = open_hold(broker)
        outcome = broker.decision(request)
        await in_thread(lambda: web.decide(request.id, DBA1, True, "batch fix", grant_minutes=5))
        assert await settled(outcome) is None
        # Released by the read that also loaded the grant: the next statement of that shape passes.
        assert broker.grant_allows("agent-ci", "payments", "fp-card")
        assert not broker.grant_allows("agent-ci", "payments", "fp-other-shape")
        assert not broker.grant_allows("agent-ci", "billing", "fp-card")
        assert not broker.grant_allows("someone-else", "payments", "fp-card")
        await broker.close()
    run(main())


def test_grant_made_while_nobody_waits_is_picked_up_by_the_poller(path: Path, web: ApprovalService) -> None:
    async def main() -> None:
        broker = make_broker(path)
        await broker.start()
        request = open_hold(broker)  # its session went away; an approver still grants the shape
        await in_thread(lambda: web.decide(request.id, DBA1, True, "recurring job", grant_minutes=10))
        await until(lambda: broker.grant_allows("agent-ci", "payments", "fp-card"), "the grant in the cache")
        await broker.close()
    run(main())


def test_grant_stops_allowing_when_it_expires(path: Path, web: ApprovalService) -> None:
    async def main() -> None:
        clock = Clock()
        broker = make_broker(path, clock=clock)
        await broker.start()
        request = open_hold(broker)
        # Decided with the same (settable) time, so the grant's window is the clock's.
        ApprovalService(web.store, max_grant_minutes=60, clock=clock).decide(request.id, DBA1, True, "ok",
                                                                             grant_minutes=1)
        await broker.refresh()
        assert broker.grant_allows("agent-ci", "payments", "fp-card")
        clock.advance(59)
        assert broker.grant_allows("agent-ci", "payments", "fp-card")
        clock.advance(1)
        assert not broker.grant_allows("agent-ci", "payments", "fp-card")  # no poll needed
        await broker.close()
    run(main())


# --- polling, failures, shutdown ---------------------------------------------------------------

def test_one_poller_serves_every_waiter(path: Path, web: ApprovalService) -> None:
    async def main() -> None:
        broker = make_broker(path)
        await broker.start()
        requests = [open_hold(broker) for _ in range(25)]
        outcomes = [broker.decision(r) for r in requests]
        pollers = [t for t in asyncio.all_tasks() if t.get_name() == "approvals-poller"]
        assert len(pollers) == 1
        for r in requests:
            await in_thread(lambda r=r: web.decide(r.id, DBA2, True, "bulk review"))
        assert await settled(asyncio.gather(*outcomes)) == [None] * 25
        await broker.close()
        assert not [t for t in asyncio.all_tasks() if t.get_name() == "approvals-poller"]
    run(main())


def test_a_failing_store_refuses_waiters_and_grants_then_recovers(path: Path, web: ApprovalService) -> None:
    async def main() -> None:
        broker = make_broker(path)
        await broker.start()
        granted = open_hold(broker, fingerprint="fp-granted")
        web.decide(granted.id, DBA1, True, "ok", grant_minutes=30)
        await broker.refresh()
        assert broker.grant_allows("agent-ci", "payments", "fp-granted")
        request = open_hold(broker)
        outcome = broker.decision(request)
        breaker = sqlite3.connect(path)
        breaker.execute("ALTER TABLE revision RENAME TO revision_gone")  # a real failure, not a stub
        breaker.commit()
        verdict = await settled(outcome)  # the poller hit the failure
        assert verdict.sqlstate == "58000"
        assert verdict.message.startswith(f"approval {request.id} could not be checked: no such table: revision")
        assert not broker.grant_allows("agent-ci", "payments", "fp-granted")  # fail closed
        breaker.execute("ALTER TABLE revision_gone RENAME TO revision")
        breaker.commit()
        breaker.close()
        await until(lambda: broker.grant_allows("agent-ci", "payments", "fp-granted"), "the poller's recovery")
        await broker.close()
    run(main())


def test_close_refuses_waiters_and_withdraws_their_requests(path: Path, web: ApprovalService) -> None:
    async def main() -> None:
        broker = make_broker(path)
        await broker.start()
        request = open_hold(broker)
        outcome = broker.decision(request)
        await broker.close()
        verdict = outcome.result()
        assert verdict.sqlstate == "57P01" and request.id in verdict.message
        stored = web.get(request.id)
        assert stored.status == "withdrawn"
        assert stored.status_reason == "the appliance proxy shut down while the statement waited"
        with pytest.raises(RuntimeError, match="shutting down"):
            open_hold(broker)
    run(main())


def test_close_waits_for_a_store_call_still_running_in_a_thread(path: Path) -> None:
    """Cancelling the poller does not stop the thread it awaits; closing the store under that
    thread crashed SQLite (a segfault in CI). close() waits for the thread first."""
    async def main() -> None:
        broker = make_broker(path)
        await broker.start()
        store = broker.service.store
        entered, release = threading.Event(), threading.Event()
        revision, close = store.revision, broker.service.close
        closed_while_in_use: list[bool] = []

        def gated_revision() -> int:
            entered.set()
            release.wait(SAFETY)
            return revision()

        def recording_close() -> None:
            closed_while_in_use.append(not release.is_set())
            release.set()  # so a broken close() cannot hang the test
            close()

        store.revision = gated_revision  # type: ignore[method-assign]
        broker.service.close = recording_close  # type: ignore[method-assign]
        await settled(in_thread(lambda: entered.wait(SAFETY)))
        poller = broker._task
        assert poller is not None
        closing = asyncio.get_running_loop().create_task(broker.close())
        await settled(asyncio.wait([poller]))
        release.set()
        await settled(closing)
        assert closed_while_in_use == [False]
    run(main())


def test_start_expires_requests_left_pending_by_an_earlier_run(path: Path) -> None:
    async def main() -> None:
        clock = Clock()
        earlier = ApprovalService(ApprovalStore(path), clock=clock)
        from tests.holds import open_request
        left = open_request(earlier, timeout_seconds=60)
        clock.advance(120)
        broker = make_broker(path, clock=clock)
        await broker.start()
        assert earlier.get(left.id).status == "expired"
        earlier.close()
        await broker.close()
    run(main())


# --- the addon's entry points ----------------------------------------------------------------------

def test_hold_takes_the_enforcement_addons_request(path: Path, web: ApprovalService) -> None:
    async def main() -> None:
        broker = make_broker(path)
        await broker.start()
        request = {"requester_subject": "agent-ci", "requester_display": "agent-ci", "requester_kind": "agent",
                   "requester_groups": ["payments-agents"], "session_id": 12, "client": "10.0.0.2:5000",
                   "target": "payments", "database": "payments", "role": "app", "sql": PAYMENT_DELETE,
                   "params": None, "fingerprint": "fp-delete"}
        held, outcome = broker.hold(request, decision(PAYMENT_DELETE))
        (opened,) = web.list("pending")
        assert held.id == opened.id
        assert (opened.requester.subject, opened.session_id, opened.client, opened.role, opened.sql,
                opened.params, opened.fingerprint, opened.min_approvals) == (
            "agent-ci", "12", "10.0.0.2:5000", "app", PAYMENT_DELETE, None, "fp-delete", 2)
        await in_thread(lambda: web.decide(opened.id, DBA1, True, "one"))
        await broker.refresh()
        assert not outcome.done()  # two approvals needed
        await in_thread(lambda: web.decide(opened.id, DBA2, True, "two"))
        assert await settled(outcome) is None
        await broker.close()
    run(main())


def test_wait_for_by_id(path: Path, web: ApprovalService) -> None:
    async def main() -> None:
        broker = make_broker(path)
        decided = open_hold(broker)
        web.decide(decided.id, DBA1, False, "no")
        verdict = await broker.wait_for(decided.id, SAFETY)
        assert verdict.message.endswith("was denied by dba1@example.test: no")
        pending = open_hold(broker)
        waiting = asyncio.ensure_future(broker.wait_for(pending.id, SAFETY))
        await in_thread(lambda: web.decide(pending.id, DBA1, True, "ok"))
        assert await settled(waiting) is None
        with pytest.raises(ApprovalError, match="there is no approval request apr-000000"):
            await broker.wait_for("apr-000000", SAFETY)
        await broker.close()
    run(main())


def test_verdict_for_refuses_a_pending_request(path: Path, web: ApprovalService) -> None:
    from tests.holds import open_request
    with pytest.raises(ValueError, match="still pending"):
        verdict_for(open_request(web))


def test_from_config(tmp_path: Path) -> None:
    config_path = tmp_path / "tollgate.toml"
    config_path.write_text('[identity]\nstate_dir = "state"\n\n[approvals]\npoll_seconds = 0.5\n'
                           'max_grant_minutes = 15\n')

    async def main() -> None:
        broker = HoldBroker.from_config(load_config(config_path))
        assert broker.poll_seconds == 0.5
        assert broker.service.max_grant_minutes == 15
        assert broker.service.store.path == tmp_path / "state" / "approvals.db"
        await broker.start()
        await broker.close()
    run(main())


def test_the_enforcement_addon_holds_through_the_broker(path: Path, web: ApprovalService, tmp_path: Path) -> None:
    """The contract with the real enforcement addon: a Hold whose decision is ours, and grants."""
    addon_module = pytest.importorskip("appliance.policy.addon")
    from appliance.config import Endpoint, Target
    from appliance.policy.holder import PolicyHolder
    from appliance.policy.shape import grant_keys
    from appliance.proxy.hooks import Hold, SessionInfo, Statement, StatementKind
    from tests.holds import POLICY_TEXT

    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(POLICY_TEXT)
    database = Endpoint.parse("10.0.1.5:5432")
    session = SessionInfo(client=Endpoint.parse("10.0.0.2:50123"), destination=database,
                          target=Target("payments", (database,), {}), user="app", database="payments",
                          identity=AGENT, identity_source="certificate")
    sql = "UPDATE public.cards SET status = 'blocked' WHERE id = 42"

    async def main() -> None:
        broker = make_broker(path)
        await broker.start()
        addon = addon_module.EnforcementAddon(PolicyHolder(policy_file), broker)
        verdict = addon.statement(session, Statement(StatementKind.QUERY, sql))
        assert isinstance(verdict, Hold)
        assert verdict.approval is not None and verdict.notice is not None
        (opened,) = web.list("pending")
        keys = grant_keys(sql)
        assert (opened.requester.subject, opened.requester.kind, opened.target, opened.role, opened.sql,
                opened.session_id, opened.fingerprint, opened.shape, opened.free) == (
            "agent-ci", "agent", "payments", "app", sql, session.key, keys.exact, keys.shape, ("'blocked'", "42"))
        await in_thread(lambda: web.decide(opened.id, DBA1, True, "nightly fix", grant_minutes=10))
        assert await settled(verdict.decision) is None
        # The grant covers exactly the statement: the same one again passes without asking…
        assert broker.grant_allows("agent-ci", "payments", keys.exact)
        assert addon.statement(session, Statement(StatementKind.QUERY, sql.lower())) is None
        # … other constants are a new request, which a shape grant then covers.
        again = "UPDATE public.cards SET status = 'active' WHERE id = 7"
        held = addon.statement(session, Statement(StatementKind.QUERY, again))
        assert isinstance(held, Hold)
        second = next(r for r in web.list("pending") if r.sql == again)
        await in_thread(lambda: web.decide(second.id, DBA1, True, "any card", grant_minutes=10, grant_scope="shape"))
        assert await settled(held.decision) is None
        third = "UPDATE public.cards SET status = 'lost' WHERE id = 8"
        assert addon.statement(session, Statement(StatementKind.QUERY, third)) is None
        # … but not a list of another length.
        wider = "UPDATE public.cards SET status = 'lost' WHERE id IN (8, 9)"
        assert isinstance(addon.statement(session, Statement(StatementKind.QUERY, wider)), Hold)
        assert len(web.list()) == 3
        await broker.close()
    run(main())
