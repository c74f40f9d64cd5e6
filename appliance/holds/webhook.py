"""Webhook notifications: each new approval request and each outcome, POSTed as signed JSON.

The body is ``{"event": ..., "id": ..., "request": {...}, "sent_at": ...}`` where ``event``
is one of ``approval.requested``, ``approval.voted`` (a vote that did not settle it yet),
``approval.decided`` (approved or denied), ``approval.expired``, ``approval.withdrawn``;
``request`` is the request as the API shows it (SQL and parameters already PAN-scrubbed),
``id`` identifies the delivery (retries resend the same body, so a receiver can drop
duplicates) and ``sent_at`` is when the event happened. With a secret, the header
``X-Tollgate-Signature: sha256=<hex>`` carries HMAC-SHA256(secret, body) over the exact
bytes sent; ``sent_at`` is inside what is signed, so a receiver can refuse stale replays.

Delivery never blocks the caller: events go on a bounded queue drained by one background
thread. Each is tried once and retried up to ``retries`` times with exponential backoff
(1 s, 2 s, 4 s by default) on network errors, timeouts (``timeout`` seconds each), 5xx,
408 and 429; any other 4xx is final (sending it again would get the same answer). Failures
are logged, never raised. Redirects are not followed: a webhook URL is configured, not
discovered.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import queue
import ssl
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.holds.notifier import Notifier, NullNotifier
from appliance.holds.store import ApprovalRequest, iso, utcnow

log = logging.getLogger("tollgate.approvals.webhook")

SIGNATURE_HEADER = "X-Tollgate-Signature"
EVENT_HEADER = "X-Tollgate-Event"
DELIVERY_HEADER = "X-Tollgate-Delivery"
USER_AGENT = "tollgate-approvals-webhook/1"
DEFAULT_TIMEOUT = 5.0
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF = 1.0
MAX_QUEUE = 1000
_RETRYABLE_STATUS = frozenset({408, 429})


def sign(secret: bytes, body: bytes) -> str:
    """The ``X-Tollgate-Signature`` value for ``body``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(secret: bytes, body: bytes, header: str | None) -> bool:
    """What a receiver does: constant-time comparison of the header with our own signature."""
    return header is not None and hmac.compare_digest(sign(secret, body), header)


@dataclass(frozen=True, slots=True)
class _Delivery:
    event: str
    delivery_id: str
    body: bytes


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class WebhookNotifier:
    """POSTs approval events to ``url`` from a background thread, signed when ``secret`` is set."""

    def __init__(self, url: str, secret: bytes | None = None, *, timeout: float = DEFAULT_TIMEOUT,
                 retries: int = DEFAULT_RETRIES, backoff: float = DEFAULT_BACKOFF, max_queue: int = MAX_QUEUE,
                 ca_file: Path | None = None, clock: Callable[[], Any] = utcnow):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"webhook URL {url!r} must be http:// or https://")
        self.url = url
        self._secret = secret or None
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.clock = clock
        self._queue: queue.Queue[_Delivery | None] = queue.Queue(maxsize=max_queue)
        handlers: list[Any] = [_NoRedirect]
        if url.startswith("https://"):
            handlers.append(urllib.request.HTTPSHandler(
                context=ssl.create_default_context(cafile=str(ca_file) if ca_file else None)))
        self._opener = urllib.request.build_opener(*handlers)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._closing = threading.Event()
        self.delivered = 0
        self.failed = 0
        self.dropped = 0

    # --- the caller's side ------------------------------------------------------------------

    def notify(self, event: str, request: ApprovalRequest) -> None:
        """Queue ``event`` for ``request``; returns at once."""
        if self._closing.is_set():
            log.warning("webhook: %s for %s not sent: the notifier is closed", event, request.id)
            return
        delivery_id = str(uuid.uuid4())
        # Serialised now, not at send time: the event describes the request as it was.
        body = json.dumps({"event": event, "id": delivery_id, "request": request.to_json(),
                           "sent_at": iso(self.clock())}, separators=(",", ":"), ensure_ascii=False).encode()
        self._ensure_thread()
        try:
            self._queue.put_nowait(_Delivery(event, delivery_id, body))
        except queue.Full:
            self.dropped += 1
            log.error("webhook: queue full (%d events waiting for %s); dropped %s for %s",
                      self._queue.maxsize, self.url, event, request.id)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued was delivered or given up on; False on timeout."""
        done = threading.Event()

        def wait() -> None:
            self._queue.join()
            done.set()
        threading.Thread(target=wait, daemon=True).start()
        return done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking events; give queued ones ``timeout`` seconds (retries no longer wait)."""
        self._closing.set()
        with self._lock:
            thread = self._thread
        if thread is None or not thread.is_alive():
            return
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        thread.join(timeout)
        if thread.is_alive():
            log.warning("webhook: %d event(s) for %s not delivered before shutdown", self._queue.qsize(), self.url)

    def _ensure_thread(self) -> None:
        with self._lock:
            # After a fork (gunicorn workers) the parent's thread does not exist here.
            if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="approvals-webhook", daemon=True)
                self._thread.start()

    # --- the sender's side ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._deliver(item)
            except Exception:  # never let one bad event end the sender
                log.exception("webhook: unexpected error delivering an event")
            finally:
                self._queue.task_done()

    def _deliver(self, item: _Delivery) -> None:
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, EVENT_HEADER: item.event,
                   DELIVERY_HEADER: item.delivery_id}
        if self._secret is not None:
            headers[SIGNATURE_HEADER] = sign(self._secret, item.body)
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                # On shutdown the remaining attempts go at once rather than hold the exit up.
                self._closing.wait(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=item.body, headers=headers, method="POST")
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    response.read(1 << 16)
                    status = response.status
            except urllib.error.HTTPError as exc:
                status = exc.code
                exc.close()
            except (OSError, ValueError) as exc:  # URLError, timeouts, refused connections
                problem = f"{getattr(exc, 'reason', exc)}"
                continue
            if 200 <= status < 300:
                self.delivered += 1
                log.debug("webhook: %s %s delivered to %s (HTTP %d)", item.event, item.delivery_id, self.url, status)
                return
            problem = f"HTTP {status}"
            if 400 <= status < 500 and status not in _RETRYABLE_STATUS:
                break
        self.failed += 1
        log.warning("webhook: could not deliver %s (delivery %s) to %s: %s; gave up after %d attempt(s)",
                    item.event, item.delivery_id, self.url, problem, attempt + 1)


def read_secret(path: Path) -> bytes:
    """The HMAC key from ``webhook_secret_file`` (surrounding whitespace removed)."""
    from appliance.config import ConfigError

    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"approvals.webhook_secret_file: cannot read {path}: {exc.strerror}") from None
    if not secret:
        raise ConfigError(f"approvals.webhook_secret_file: {path} is empty")
    return secret


def notifier_from_config(config: Any) -> Notifier:
    """A :class:`WebhookNotifier` for ``[approvals] webhook_url``, or a no-op notifier."""
    approvals = config.approvals
    if not approvals.webhook_url:
        return NullNotifier()
    secret = read_secret(approvals.webhook_secret_file) if approvals.webhook_secret_file else None
    if secret is None:
        log.warning("approvals webhook %s has no webhook_secret_file: its events are not signed",
                    approvals.webhook_url)
    return WebhookNotifier(approvals.webhook_url, secret)


__all__ = ["DELIVERY_HEADER", "EVENT_HEADER", "SIGNATURE_HEADER", "WebhookNotifier", "notifier_from_config",
           "read_secret", "sign", "verify"]
