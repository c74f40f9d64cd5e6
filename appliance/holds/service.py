"""The rules of approval: who may decide a held request, when it is settled, what a grant allows.

:class:`ApprovalService` is used by both sides: the proxy opens requests, expires and
withdraws them (through :class:`~appliance.holds.broker.HoldBroker`); the web service
records approvers' votes. Every refusal is an :class:`ApprovalError` whose ``code`` is
stable (the API and CLI turn it into a status and a message):

====================  ======================================================================
``unknown_request``   no such request (or text that can't be a request id)
``reason_required``   a vote (or withdrawal) without a reason — PCI DSS 6.5 wants the why
``invalid_reason``    a reason with control characters, or longer than 2000 characters
``invalid_grant``     grant minutes that aren't a positive whole number, or given with a denial;
                      a grant scope other than ``exact``/``shape``, or without grant minutes
``grant_too_long``    more grant minutes than ``[approvals] max_grant_minutes`` allows
``self_approval``     the requester approving or denying their own request
``not_an_approver``   the approver is in none of the request's approver groups
``expired``           the request's time ran out before it was settled
``already_decided``   the request was already approved, denied or withdrawn
``duplicate_vote``    this approver already voted on this request
``invalid_request``   a hold that names no approver groups, or a non-positive timeout
====================  ======================================================================

How a request is settled: any deny denies it at once; it is approved when ``min_approvals``
different approvers approved. A grant ("allow this statement for this identity on this
target for N minutes") is made on approval only if every approving vote asked for one — a
grant reaches further than the one execution, so each approver must have agreed to it — and
lasts the shortest of the asked durations. By default it covers exactly the approved
statement: its text (whitespace, comments and case aside), its constants and its bound
parameter values. It covers the statement's shape — any constants and parameters, the
request's ``free`` parts — only if every approving vote chose ``grant_scope = "shape"``.

Who sees what (:func:`may_see`, applied by :meth:`ApprovalService.list` and ``get`` when given a
viewer): a request is shown to those who may decide it — in one of its approver groups — and
to its requester; to anyone else it does not exist (``unknown_request``), so its SQL is not
shown and even its existence is not revealed.

Approvers may be people or agents: the lab's approvers are client-credentials clients, and
whether a machine may approve is a matter of who is put in the approver groups.

Times are UTC from an injectable ``clock``; notifications are sent after the write is
committed, never inside it, and a notifier that fails never fails the caller.
"""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from appliance.holds.notifier import (
    EVENT_DECIDED,
    EVENT_EXPIRED,
    EVENT_REQUESTED,
    EVENT_VOTED,
    EVENT_WITHDRAWN,
    EVENTS,
    Notifier,
    NullNotifier,
)
from appliance.holds.store import (
    GRANT_SCOPES,
    STATUSES,
    ApprovalRequest,
    ApprovalStore,
    Grant,
    Requester,
    Status,
    Vote,
    iso,
    new_request_id,
    normalize_request_id,
    utcnow,
)
from appliance.holds.webhook import notifier_from_config
from appliance.model.identity import Identity
from appliance.pan.scanner import scrub

log = logging.getLogger("tollgate.approvals")

MAX_REASON_CHARS = 2000
DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 1000


class ApprovalError(Exception):
    """A request the rules refuse, with a stable ``code`` and a message for a human."""

    def __init__(self, code: str, message: str, request: ApprovalRequest | None = None):
        super().__init__(message)
        self.code, self.message, self.request = code, message, request


def classification_json(decision: Any) -> tuple[dict[str, Any], ...]:
    """What the policy found in each statement, as approvers are shown it.

    Deliberately not the statement's own text nor pglast's parse error: those are unscrubbed
    SQL, and a card number in a WHERE clause would end up in the store.
    """
    out = []
    for s in getattr(decision, "statements", ()):
        entry: dict[str, Any] = {"command": s.command, "classes": sorted(c.value for c in s.classes),
                                 "relations": sorted(s.relations), "columns": sorted(s.columns),
                                 "functions": sorted(s.functions)}
        if s.prepared_name is not None:
            entry["prepared_name"] = s.prepared_name
        out.append(entry)
    return tuple(out)


def _who(vote: Vote) -> str:
    return vote.approver_display


def _check_reason(reason: Any) -> str:
    if not isinstance(reason, str) or not reason.strip():
        raise ApprovalError("reason_required", "a reason is required: say why, it is recorded with the decision")
    reason = reason.strip()
    if len(reason) > MAX_REASON_CHARS:
        raise ApprovalError("invalid_reason", f"the reason is {len(reason)} characters long; at most "
                                              f"{MAX_REASON_CHARS} are kept")
    # Control characters could forge lines in listings and logs; newlines and tabs are prose.
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") and ch not in "\n\t" for ch in reason):
        raise ApprovalError("invalid_reason", "the reason contains control characters")
    return reason


def may_see(viewer: Identity, request: ApprovalRequest) -> bool:
    """Whether ``viewer`` may see ``request``: they asked for it, or they are in one of its
    approver groups (and so may decide it, unless they asked for it themselves)."""
    return viewer.subject == request.requester.subject or bool(set(viewer.groups) & set(request.approver_groups))


class ApprovalService:
    """Approval requests in ``store``, decided by the rules in the module docstring."""

    def __init__(self, store: ApprovalStore, *, max_grant_minutes: int = 240, notifier: Notifier | None = None,
                 clock: Callable[[], datetime] = utcnow, scrub: Callable[[str], str] | None = None):
        self.store = store
        self.max_grant_minutes = max_grant_minutes
        self.notifier: Notifier = notifier or NullNotifier()
        self.clock = clock
        # Reasons are free text from approvers: scrubbed like SQL so the store stays PAN-free.
        self.scrub = scrub or (lambda text: text)

    @classmethod
    def from_config(cls, config: Any, *, path: Any = None, clock: Callable[[], datetime] = utcnow) -> ApprovalService:
        """The service for an appliance config: its approvals database (``identity.approvals``:
        approvals.db in ``state_dir``, or the shared ``state_url``; or ``path``), the
        configured webhook, and PAN scrubbing of reasons."""
        from appliance.config import ConfigError

        if path is None:
            if config.identity is None:
                raise ConfigError(f"{config.path}: identity: approvals need an [identity] section "
                                  "(its state_dir holds approvals.db)")
            path = config.identity.approvals
        notifier = notifier_from_config(config)
        return cls(ApprovalStore(path), max_grant_minutes=config.approvals.max_grant_minutes, notifier=notifier,
                   clock=clock, scrub=_scrubber(config))

    def close(self) -> None:
        self.notifier.close()
        self.store.close()

    def now(self) -> datetime:
        return self.clock()

    # --- opening --------------------------------------------------------------------------

    def request(self, *, requester: Requester | Identity, target: str, database: str, sql: str,
                params: Sequence[str] | None, decision: Any, fingerprint: str, session_id: str | int | None = None,
                client: str = "", role: str = "", timeout_seconds: float | None = None, shape: str = "",
                free: Sequence[str] | None = None) -> ApprovalRequest:
        """Record a new pending request for a statement policy ``decision`` holds.

        ``fingerprint`` is the key an exact grant binds, ``shape`` the key a shape grant
        binds ("": none may be made) and ``free`` the parts a shape grant lets vary.
        ``sql``, ``params`` and ``free`` must already be PAN-scrubbed. The request expires after
        ``timeout_seconds``, by default the hold's own timeout.
        """
        hold = getattr(decision, "hold", None)
        if hold is None or not hold.approver_groups:
            raise ApprovalError("invalid_request", f"policy rule {decision.rule!r} holds this statement but names "
                                                   "no approver groups, so nobody could approve it")
        if hold.min_approvals < 1:
            raise ApprovalError("invalid_request", f"policy rule {decision.rule!r} asks for {hold.min_approvals} "
                                                   "approvals; at least one is needed")
        timeout = hold.timeout_seconds if timeout_seconds is None else timeout_seconds
        if not timeout > 0:
            raise ApprovalError("invalid_request", f"an approval timeout must be positive, not {timeout}")
        if not isinstance(requester, Requester):
            requester = Requester.from_identity(requester)
        now = self.clock()
        request = ApprovalRequest(
            id=new_request_id(), created_at=now, requester=requester, target=target, database=database, sql=sql,
            params=None if params is None else tuple(str(p) for p in params),
            classification=classification_json(decision), rule=decision.rule, rule_line=decision.rule_line,
            approver_groups=tuple(hold.approver_groups), min_approvals=hold.min_approvals,
            expires_at=now + timedelta(seconds=timeout), fingerprint=fingerprint,
            session_id=None if session_id is None else str(session_id), client=client, role=role,
            message=decision.message or "", shape=shape,
            free=None if free is None else tuple(str(part) for part in free),
        )
        with self.store.write() as tx:
            request = tx.insert_request(request)
        log.info("approval %s opened: %s %s on %s/%s, rule %r, approvers %s, expires %s", request.id,
                 requester.kind, requester.display, target, database, request.rule,
                 ", ".join(request.approver_groups), iso(request.expires_at))
        self._notify(EVENT_REQUESTED, request)
        return request

    # --- deciding -------------------------------------------------------------------------

    def decide(self, request_id: str, approver: Identity, approve: bool, reason: str,
               grant_minutes: int | None = None, grant_scope: str | None = None) -> ApprovalRequest:
        """Record ``approver``'s vote; returns the request as it now stands (maybe still pending).
        A grant covers exactly the statement unless ``grant_scope`` is ``"shape"``."""
        key = self._key(request_id)
        reason = self.scrub(_check_reason(reason))
        self._check_grant(approve, grant_minutes)
        scope = self._check_scope(grant_minutes, grant_scope)
        verb = "approve" if approve else "deny"
        expired_now = False
        with self.store.write() as tx:
            request = tx.get(key)
            if request is None:
                raise ApprovalError("unknown_request", f"there is no approval request {key}")
            if approver.subject == request.requester.subject:
                raise ApprovalError("self_approval", f"{approver.display} asked for {key} and cannot {verb} "
                                                     "their own request", request)
            if not set(approver.groups) & set(request.approver_groups):
                raise ApprovalError("not_an_approver",
                                    f"{approver.display} is not in an approver group of {key} "
                                    f"({', '.join(request.approver_groups)}); your groups: "
                                    f"{', '.join(approver.groups) or 'none'}", request)
            now = self.clock()
            if request.pending and now >= request.expires_at:
                tx.settle(key, "expired", now, self._timeout_reason(request))
                expired_now = True
            elif not request.pending:
                raise self._settled_error(request)
            elif scope == "shape" and not request.shape:
                raise ApprovalError("invalid_grant", f"{key} was opened before shape grants existed: only an "
                                                     "exact grant can be made for it", request)
            elif any(v.approver_subject == approver.subject for v in request.votes):
                mine = next(v for v in request.votes if v.approver_subject == approver.subject)
                raise ApprovalError("duplicate_vote", f"{approver.display} already voted to {mine.verdict} "
                                                      f"{key} at {iso(mine.at)}", request)
            else:
                vote = Vote(approver.subject, approver.display, approver.kind, tuple(approver.groups),
                            "approve" if approve else "deny", reason, now, grant_minutes, scope)
                tx.add_vote(key, vote)
                votes = (*request.votes, vote)
                if not approve:
                    tx.settle(key, "denied", now)
                elif sum(1 for v in votes if v.verdict == "approve") >= request.min_approvals:
                    tx.settle(key, "approved", now)
                    grant = self._grant_for(request, votes, now)
                    if grant is not None:
                        tx.add_grant(grant)
        settled = self._get(key)
        if expired_now:
            self._notify(EVENT_EXPIRED, settled)
            raise ApprovalError("expired", f"{key} expired at {iso(settled.expires_at)} without a decision; "
                                           "it can no longer be decided", settled)
        log.info("approval %s: %s %s voted to %s (%s): %s -> %s", key, approver.kind, approver.display, verb,
                 reason, f"{scope} grant {grant_minutes} min" if grant_minutes else "no grant", settled.status)
        self._notify(EVENT_VOTED if settled.pending else EVENT_DECIDED, settled)
        return settled

    def _check_grant(self, approve: bool, grant_minutes: Any) -> None:
        if grant_minutes is None:
            return
        if not approve:
            raise ApprovalError("invalid_grant", "a denial grants nothing: leave out the grant minutes")
        if isinstance(grant_minutes, bool) or not isinstance(grant_minutes, int) or grant_minutes < 1:
            raise ApprovalError("invalid_grant", f"grant minutes must be a whole number of at least 1, "
                                                 f"not {grant_minutes!r}")
        if self.max_grant_minutes <= 0:
            raise ApprovalError("grant_too_long", "time-boxed grants are turned off on this appliance "
                                                  "([approvals] max_grant_minutes = 0)")
        if grant_minutes > self.max_grant_minutes:
            raise ApprovalError("grant_too_long", f"a grant may last at most {self.max_grant_minutes} minutes "
                                                  f"([approvals] max_grant_minutes), not {grant_minutes}")

    @staticmethod
    def _check_scope(grant_minutes: int | None, grant_scope: Any) -> str | None:
        if grant_scope is None:
            return None if grant_minutes is None else "exact"
        if grant_minutes is None:
            raise ApprovalError("invalid_grant", "a grant scope needs grant minutes: without them nothing is granted")
        if grant_scope not in GRANT_SCOPES:
            raise ApprovalError("invalid_grant", f"a grant covers 'exact' (this statement, its constants and "
                                                 f"parameters) or 'shape' (any constants), not {grant_scope!r}")
        return str(grant_scope)

    @staticmethod
    def _grant_for(request: ApprovalRequest, votes: Sequence[Vote], now: datetime) -> Grant | None:
        approving = [v for v in votes if v.verdict == "approve"]
        asked = [v.grant_minutes for v in approving]
        if not asked or any(m is None for m in asked):
            return None
        minutes = min(m for m in asked if m is not None)
        # The narrowest any approver agreed to: a shape only if every one of them chose it.
        if all(v.grant_scope == "shape" for v in approving) and request.shape:
            return Grant(request.requester.subject, request.target, request.shape, now,
                         now + timedelta(minutes=minutes), request.id, "shape")
        return Grant(request.requester.subject, request.target, request.fingerprint, now,
                     now + timedelta(minutes=minutes), request.id, "exact")

    @staticmethod
    def _timeout_reason(request: ApprovalRequest) -> str:
        return f"no decision within {request.timeout_seconds:g} s"

    @staticmethod
    def _settled_error(request: ApprovalRequest) -> ApprovalError:
        if request.status == "expired":
            return ApprovalError("expired", f"{request.id} expired at {iso(request.decided_at)} without a decision; "
                                            "it can no longer be decided", request)
        if request.status == "withdrawn":
            why = f": {request.status_reason}" if request.status_reason else ""
            return ApprovalError("already_decided", f"{request.id} was withdrawn at {iso(request.decided_at)}{why}",
                                 request)
        deciding = request.denial if request.status == "denied" else None
        by = f" by {_who(deciding)}" if deciding is not None else ""
        return ApprovalError("already_decided", f"{request.id} was already {request.status}{by} at "
                                                f"{iso(request.decided_at)}", request)

    # --- ending without a decision ----------------------------------------------------------

    def expire(self, request_id: str, why: str | None = None) -> ApprovalRequest:
        """Give up on a pending request (its waiter's time ran out). Returns the request as it
        now stands: one settled first (approved a moment earlier, say) keeps its outcome."""
        return self._end(request_id, "expired", why)

    def withdraw(self, request_id: str, why: str) -> ApprovalRequest:
        """The statement is no longer waiting (cancelled, disconnected, shutdown). Returns the
        request as it now stands, like :meth:`expire`."""
        return self._end(request_id, "withdrawn", _check_reason(why))

    def _end(self, request_id: str, status: Status, why: str | None) -> ApprovalRequest:
        key = self._key(request_id)
        changed = False
        with self.store.write() as tx:
            request = tx.get(key)
            if request is None:
                raise ApprovalError("unknown_request", f"there is no approval request {key}")
            if request.pending:
                tx.settle(key, status, self.clock(), why or self._timeout_reason(request))
                changed = True
        request = self._get(key)
        if changed:
            log.info("approval %s %s: %s", key, status, request.status_reason)
            self._notify(EVENT_EXPIRED if status == "expired" else EVENT_WITHDRAWN, request)
        return request

    def expire_overdue(self) -> list[ApprovalRequest]:
        """Expire every pending request whose time is up (e.g. left behind by a proxy that
        stopped); returns those expired now."""
        now = self.clock()
        # A read first: the common case (nothing overdue) must not take the writer lock.
        if not self.store.any_overdue(now):
            return []
        with self.store.write() as tx:
            ids = tx.overdue(now)
            for key in ids:
                request = tx.get(key)
                tx.settle(key, "expired", now, self._timeout_reason(request) if request else None)
        expired = [self._get(key) for key in ids]
        for request in expired:
            log.info("approval %s expired: %s", request.id, request.status_reason)
            self._notify(EVENT_EXPIRED, request)
        return expired

    # --- reading --------------------------------------------------------------------------

    def get(self, request_id: str, viewer: Identity | None = None) -> ApprovalRequest:
        """The request; with a ``viewer``, only one they may see (:func:`may_see`) — any other
        is ``unknown_request``, exactly as if it did not exist."""
        key = self._key(request_id)
        request = self._get(key)
        if viewer is not None and not may_see(viewer, request):
            raise ApprovalError("unknown_request", f"there is no approval request {key}")
        return request

    def list(self, status: str | None = None, limit: int = DEFAULT_LIST_LIMIT,
             viewer: Identity | None = None) -> list[ApprovalRequest]:
        """Newest first; ``status`` one of pending, approved, denied, expired, withdrawn (None: all);
        with a ``viewer``, only the requests they may see (:func:`may_see`)."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"unknown status {status!r} (one of {', '.join(STATUSES)})")
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise ValueError(f"limit must be between 1 and {MAX_LIST_LIMIT}")
        visible_to = None if viewer is None else (viewer.subject, tuple(viewer.groups))
        return self.store.list(status, limit, visible_to=visible_to)  # type: ignore[arg-type]

    def active_grant(self, subject: str, target: str, fingerprint: str,
                     now: datetime | None = None) -> Grant | None:
        return self.store.active_grant(subject, target, fingerprint, self.clock() if now is None else now)

    def active_grants(self, now: datetime | None = None) -> list[Grant]:
        return self.store.active_grants(self.clock() if now is None else now)

    def revoke_grant(self, request_id: str, by: Identity) -> ApprovalRequest:
        """End the live grant request ``request_id`` made, before its time. Only a member of
        the request's approver groups may (ApprovalError ``not_an_approver``); ``no_grant``
        when it made none or it has already ended."""
        key = self._key(request_id)
        with self.store.write() as tx:
            request = tx.get(key)
            if request is None:
                raise ApprovalError("unknown_request", f"there is no approval request {key}")
            if not set(by.groups) & set(request.approver_groups):
                raise ApprovalError("not_an_approver", f"{by.display} is not in {', '.join(request.approver_groups)}, "
                                                       "who may revoke its grant", request)
            if not tx.end_grant(key, self.clock()):
                raise ApprovalError("no_grant", f"approval {key} has no live grant to revoke", request)
        log.info("approval %s: its grant was revoked by %s", key, by.display)
        return self._get(key)

    # --- helpers --------------------------------------------------------------------------

    @staticmethod
    def _key(request_id: str) -> str:
        key = normalize_request_id(request_id) if isinstance(request_id, str) else None
        if key is None:
            raise ApprovalError("unknown_request", f"{request_id!r} is not an approval request id "
                                                   "(they look like apr-7F3K2Q)")
        return key

    def _get(self, key: str) -> ApprovalRequest:
        request = self.store.get(key)
        if request is None:
            raise ApprovalError("unknown_request", f"there is no approval request {key}")
        return request

    def _notify(self, event: str, request: ApprovalRequest) -> None:
        try:
            self.notifier.notify(event, request)
        except Exception:  # telling others is best effort; the decision itself is recorded
            log.exception("could not queue the %s notification for %s", event, request.id)


def _scrubber(config: Any) -> Callable[[str], str] | None:
    fmt = config.masking.pan_format
    return lambda text: scrub(text, fmt)


__all__ = [
    "EVENTS",
    "EVENT_DECIDED",
    "EVENT_EXPIRED",
    "EVENT_REQUESTED",
    "EVENT_VOTED",
    "EVENT_WITHDRAWN",
    "ApprovalError",
    "ApprovalService",
    "Notifier",
    "NullNotifier",
    "classification_json",
    "may_see",
]
