"""Who hears about approval requests: the events, the notifier contract, and the no-op notifier.

The vocabulary :mod:`appliance.holds.service` (which sends events) and its notifiers (such as
:class:`appliance.holds.webhook.WebhookNotifier`) share. It lives here, below both, so the
dependency runs one way: the service builds a notifier, a notifier knows nothing of the service.
"""

from __future__ import annotations

from typing import Protocol

from appliance.holds.store import ApprovalRequest

EVENT_REQUESTED = "approval.requested"
EVENT_VOTED = "approval.voted"  # a vote that did not settle the request (more approvals needed)
EVENT_DECIDED = "approval.decided"  # approved or denied
EVENT_EXPIRED = "approval.expired"
EVENT_WITHDRAWN = "approval.withdrawn"
EVENTS = (EVENT_REQUESTED, EVENT_VOTED, EVENT_DECIDED, EVENT_EXPIRED, EVENT_WITHDRAWN)


class Notifier(Protocol):
    """Who hears about requests and decisions (appliance.holds.webhook.WebhookNotifier)."""

    def notify(self, event: str, request: ApprovalRequest) -> None: ...

    def close(self, timeout: float = 5.0) -> None: ...


class NullNotifier:
    """Tells nobody: no webhook configured."""

    def notify(self, event: str, request: ApprovalRequest) -> None:
        pass

    def close(self, timeout: float = 5.0) -> None:
        pass


__all__ = [
    "EVENTS",
    "EVENT_DECIDED",
    "EVENT_EXPIRED",
    "EVENT_REQUESTED",
    "EVENT_VOTED",
    "EVENT_WITHDRAWN",
    "Notifier",
    "NullNotifier",
]
