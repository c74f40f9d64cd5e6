"""Webhook delivery against a real HTTP server on 127.0.0.1: bodies, HMAC signatures, retries.

A slow receiver is one the test holds shut (:meth:`Receiver.hold`) and releases when it
chooses, never one that sleeps: whether the caller waited is seen from what had happened
when it returned, not from a stopwatch.
"""

from __future__ import annotations

import hmac
import http.server
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from appliance.config import ConfigError, load_config
from appliance.holds.service import ApprovalService, NullNotifier
from appliance.holds.store import ApprovalStore
from appliance.holds.webhook import WebhookNotifier, notifier_from_config, sign, verify
from tests.holds import DBA1, DBA2, PAYMENT_DELETE, Clock, open_request

SECRET = b"webhook-shared-secret"
# Only a hang reaches this: a test that works never waits for it, however loaded the machine.
SAFETY = 60.0


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """An HTTP server that records what it gets and answers with scripted statuses."""

    statuses: list[int] = field(default_factory=list)  # consumed one per request; then 204
    received: list[Received] = field(default_factory=list)  # requests answered
    arrived: int = 0  # requests read, answered or not
    got: threading.Condition = field(default_factory=threading.Condition)
    # Set: requests are answered at once; cleared by hold(), they wait for release().
    open: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.open.set()

    def hold(self) -> None:
        """Take requests but answer none of them until :meth:`release`."""
        self.open.clear()

    def release(self) -> None:
        self.open.set()

    def start(self) -> Receiver:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.got:
                    receiver.arrived += 1
                    receiver.got.notify_all()
                receiver.open.wait(SAFETY)
                status = receiver.statuses.pop(0) if receiver.statuses else 204
                with receiver.got:
                    receiver.received.append(Received(self.path, dict(self.headers), body))
                    receiver.got.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/tollgate"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def wait(self, count: int, timeout: float = SAFETY) -> list[Received]:
        """Until ``count`` requests were answered."""
        with self.got:
            assert self.got.wait_for(lambda: len(self.received) >= count, timeout), \
                f"got {len(self.received)} of {count} webhook calls"
            return list(self.received)

    def wait_arrived(self, count: int, timeout: float = SAFETY) -> None:
        """Until ``count`` requests were read (answered or held)."""
        with self.got:
            assert self.got.wait_for(lambda: self.arrived >= count, timeout), \
                f"{self.arrived} of {count} webhook calls arrived"

    def stop(self) -> None:
        self.release()  # held handlers finish, rather than wait out their safety net
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def service_with(notifier: Any, tmp_path: Path, clock: Clock) -> ApprovalService:
    return ApprovalService(ApprovalStore(tmp_path / "approvals.db"), notifier=notifier, clock=clock)


def test_each_event_is_posted_signed(receiver: Receiver, tmp_path: Path, clock: Clock) -> None:
    notifier = WebhookNotifier(receiver.url, SECRET, clock=clock)
    service = service_with(notifier, tmp_path, clock)
    two = open_request(service, PAYMENT_DELETE)
    service.decide(two.id, DBA1, True, "first")
    service.decide(two.id, DBA2, True, "second")
    denied = open_request(service)
    service.decide(denied.id, DBA1, False, "no")
    service.expire(open_request(service).id)
    service.withdraw(open_request(service).id, "client left")
    calls = receiver.wait(9)
    assert [c.json["event"] for c in calls] == [
        "approval.requested", "approval.voted", "approval.decided",
        "approval.requested", "approval.decided",
        "approval.requested", "approval.expired",
        "approval.requested", "approval.withdrawn"]
    for call in calls:
        assert call.path == "/hooks/tollgate"
        assert call.headers["Content-Type"] == "application/json"
        assert call.headers["X-Tollgate-Event"] == call.json["event"]
        assert call.headers["X-Tollgate-Delivery"] == call.json["id"]
        assert call.headers["X-Tollgate-Signature"] == "sha256=" + hmac.new(SECRET, call.body, "sha256").hexdigest()
        assert verify(SECRET, call.body, call.headers["X-Tollgate-Signature"])
        assert list(call.json) == ["event", "id", "request", "sent_at"]
        assert call.json["sent_at"] == "2025-03-01T02:00:00.000Z"
    first = calls[0].json["request"]
    assert first["id"] == two.id and first["status"] == "pending" and first["sql"] == PAYMENT_DELETE
    assert first["requester"]["subject"] == "agent-ci" and first["approver_groups"] == ["payments-dbas", "security"]
    assert calls[1].json["request"]["approvals"] == 1
    assert calls[2].json["request"]["status"] == "approved"
    assert calls[4].json["request"]["votes"][0]["reason"] == "no"
    notifier.close()
    service.close()


def test_a_tampered_body_does_not_verify() -> None:
    body = b'{"event":"approval.decided"}'
    assert verify(SECRET, body, sign(SECRET, body))
    assert not verify(SECRET, body.replace(b"decided", b"requested"), sign(SECRET, body))
    assert not verify(b"other-secret", body, sign(SECRET, body))
    assert not verify(SECRET, body, None)


def test_without_a_secret_there_is_no_signature(receiver: Receiver, tmp_path: Path, clock: Clock) -> None:
    notifier = WebhookNotifier(receiver.url, None)
    service = service_with(notifier, tmp_path, clock)
    open_request(service)
    (call,) = receiver.wait(1)
    assert "X-Tollgate-Signature" not in call.headers
    notifier.close()
    service.close()


def test_the_caller_never_waits_for_delivery(receiver: Receiver, tmp_path: Path, clock: Clock) -> None:
    receiver.hold()  # no delivery can complete until the test says so
    notifier = WebhookNotifier(receiver.url, SECRET, timeout=SAFETY)
    service = service_with(notifier, tmp_path, clock)
    caller = threading.Thread(target=lambda: [open_request(service) for _ in range(3)])
    caller.start()
    caller.join(SAFETY)
    # Returned while not one delivery had been answered: a caller waiting for delivery
    # would still be stuck here.
    assert not caller.is_alive()
    assert receiver.received == []
    receiver.release()
    assert notifier.flush(SAFETY)
    assert len(receiver.received) == 3
    notifier.close()
    service.close()


def test_server_errors_are_retried_with_the_same_delivery(receiver: Receiver, tmp_path: Path, clock: Clock) -> None:
    receiver.statuses = [500, 503, 429]
    notifier = WebhookNotifier(receiver.url, SECRET, backoff=0.05)
    service = service_with(notifier, tmp_path, clock)
    open_request(service)
    assert notifier.flush(SAFETY)
    calls = receiver.received
    assert len(calls) == 4
    assert len({c.headers["X-Tollgate-Delivery"] for c in calls}) == 1
    assert len({c.body for c in calls}) == 1
    assert (notifier.delivered, notifier.failed) == (1, 0)
    notifier.close()
    service.close()


def test_gives_up_after_three_retries_and_logs(receiver: Receiver, tmp_path: Path, clock: Clock,
                                              caplog: pytest.LogCaptureFixture) -> None:
    receiver.statuses = [500] * 10
    notifier = WebhookNotifier(receiver.url, SECRET, backoff=0.02)
    service = service_with(notifier, tmp_path, clock)
    opened = open_request(service)
    assert notifier.flush(SAFETY)
    assert len(receiver.received) == 4  # one try and three retries
    assert (notifier.delivered, notifier.failed) == (0, 1)
    assert "could not deliver approval.requested" in caplog.text and "HTTP 500" in caplog.text
    assert "gave up after 4 attempt(s)" in caplog.text
    assert service.get(opened.id).pending  # the request itself is unaffected
    notifier.close()
    service.close()


def test_a_client_error_is_not_retried(receiver: Receiver, tmp_path: Path, clock: Clock,
                                       caplog: pytest.LogCaptureFixture) -> None:
    receiver.statuses = [401]
    notifier = WebhookNotifier(receiver.url, SECRET, backoff=0.02)
    service = service_with(notifier, tmp_path, clock)
    open_request(service)
    assert notifier.flush(SAFETY)
    assert len(receiver.received) == 1
    assert "HTTP 401; gave up after 1 attempt(s)" in caplog.text
    assert SECRET.decode() not in caplog.text
    notifier.close()
    service.close()


def test_unreachable_and_slow_receivers_time_out_and_are_retried(tmp_path: Path, clock: Clock,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    gone = Receiver().start()
    url = gone.url
    gone.stop()  # nothing listens there any more: connection refused
    notifier = WebhookNotifier(url, SECRET, backoff=0.01)
    service = service_with(notifier, tmp_path, clock)
    open_request(service)
    assert notifier.flush(SAFETY)
    assert notifier.failed == 1 and "gave up after 4 attempt(s)" in caplog.text
    notifier.close()
    service.close()

    slow = Receiver().start()
    slow.hold()  # it reads each request and never answers: every attempt times out
    try:
        notifier = WebhookNotifier(slow.url, SECRET, timeout=0.2, retries=1, backoff=0.01)
        notifier.notify("approval.requested", ApprovalService(ApprovalStore(tmp_path / "b.db"), clock=clock)
                        .request(**_request_kwargs()))
        assert notifier.flush(SAFETY)
        assert notifier.failed == 1
        slow.wait_arrived(2)  # the try and its retry both reached it
        notifier.close()
    finally:
        slow.stop()


def _request_kwargs() -> dict[str, Any]:
    from tests.holds import AGENT, CARD_UPDATE, decision
    return {"requester": AGENT, "target": "payments", "database": "payments", "sql": CARD_UPDATE, "params": None,
            "decision": decision(CARD_UPDATE), "fingerprint": "fp"}


def test_close_stops_taking_events(receiver: Receiver, tmp_path: Path, clock: Clock,
                                   caplog: pytest.LogCaptureFixture) -> None:
    notifier = WebhookNotifier(receiver.url, SECRET)
    service = service_with(notifier, tmp_path, clock)
    open_request(service)
    notifier.close(timeout=SAFETY)
    assert len(receiver.received) == 1  # close waited for what was queued
    open_request(service)
    assert "the notifier is closed" in caplog.text
    assert len(receiver.received) == 1
    service.close()


def test_notifier_from_config(tmp_path: Path, receiver: Receiver) -> None:
    base = '[identity]\nstate_dir = "state"\n'
    path = tmp_path / "tollgate.toml"
    path.write_text(base)
    assert isinstance(notifier_from_config(load_config(path)), NullNotifier)

    (tmp_path / "hook.secret").write_text(SECRET.decode() + "\n")
    path.write_text(base + f'\n[approvals]\nwebhook_url = "{receiver.url}"\nwebhook_secret_file = "hook.secret"\n')
    notifier = notifier_from_config(load_config(path))
    assert isinstance(notifier, WebhookNotifier)
    service = ApprovalService.from_config(load_config(path))
    open_request(service)
    (call,) = receiver.wait(1)
    assert verify(SECRET, call.body, call.headers["X-Tollgate-Signature"])
    service.close()

    (tmp_path / "hook.secret").write_text("\n")
    with pytest.raises(ConfigError, match=r"hook\.secret is empty"):
        notifier_from_config(load_config(path))
    (tmp_path / "hook.secret").unlink()
    with pytest.raises(ConfigError, match="cannot read"):
        notifier_from_config(load_config(path))


def test_bad_url_is_refused() -> None:
    with pytest.raises(ValueError, match="must be http:// or https://"):
        WebhookNotifier("ftp://example.test/hook")
