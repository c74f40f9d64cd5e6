"""The approvals API: list held statements, show one, approve or deny it.

Routes, under ``/api/v1/approvals``:

- ``GET /api/v1/approvals[?status=pending|approved|denied|expired|withdrawn|all][&limit=N]``
  → ``{"approvals": [...], "count": n}``, newest first (default: all statuses, 100);
- ``GET /api/v1/approvals/<id>`` → the request;
- ``POST /api/v1/approvals/<id>/approve`` with ``{"reason": "...", "grant_minutes": N,
  "grant_scope": "exact"|"shape"}`` (``grant_minutes`` optional: also allow this statement
  for this identity on this target for N minutes — by default exactly it, its constants and
  parameter values; with ``"grant_scope": "shape"`` any constants, the request's ``free``
  parts) → the request as it now stands (still ``pending`` when more approvals are needed);
- ``POST /api/v1/approvals/<id>/deny`` with ``{"reason": "..."}``.

Every call needs ``Authorization: Bearer <token>``: an ID token or access token from the
configured OIDC issuer, validated like enrollment tokens and mapped to an Identity whose
groups decide who may approve. A caller sees only the requests they may decide (one of
their groups is among the request's approver groups) and those they made themselves
(:func:`appliance.holds.service.may_see`): list leaves the others out (before the limit),
and show, approve and deny answer 404 ``unknown_request`` for them, exactly as for an id
that doesn't exist — never 403, which would say the request is there. Deciding is where the
remaining rules apply (:mod:`appliance.holds.service`).

Status codes: 400 malformed body or query, ``reason_required``, ``invalid_reason``,
``invalid_grant``, ``grant_too_long``; 401 no token or a refused one (the detail says why;
RFC 6750 ``WWW-Authenticate``); 403 ``self_approval`` (the requester sees their request but
can't decide it); 404 ``unknown_request`` (no such request, or not one the caller may
see); 409 ``already_decided``, ``expired``, ``duplicate_vote``; 500 the approvals database
failed; 503 the issuer is unreachable. Errors are JSON
``{"error": code, "detail": message}``; tokens are never logged nor echoed.

Pending requests whose time is up are marked expired before a listing or a show, so a
request left behind by a stopped proxy never looks decidable.
"""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request

from appliance.config import Config, ConfigError
from appliance.holds.service import MAX_LIST_LIMIT, ApprovalError, ApprovalService
from appliance.holds.store import STATUSES, StoreError
from appliance.identity.oidc import (
    IssuerError,
    OIDCValidator,
    TokenError,
    identity_from_claims,
)
from appliance.model.identity import Identity
from appliance.model.oidc import OIDCSettings
from appliance.state.db import StateError
from webui import bearer_refused, error_response

log = logging.getLogger(__name__)

bp = Blueprint("approvals", __name__, url_prefix="/api/v1/approvals")

EXTENSION = "tollgate.approvals"
REALM = "tollgate-approvals"
RETRY_AFTER_SECONDS = 30
DEFAULT_LIMIT = 100
DECISION_FIELDS = {"approve": {"reason", "grant_minutes", "grant_scope"}, "deny": {"reason"}}
HTTP_STATUS = {
    "unknown_request": 404,
    "reason_required": 400,
    "invalid_reason": 400,
    "invalid_grant": 400,
    "grant_too_long": 400,
    "invalid_request": 400,
    "self_approval": 403,
    "not_an_approver": 403,
    "already_decided": 409,
    "expired": 409,
    "duplicate_vote": 409,
}
STORE_ERRORS = (StoreError, StateError, sqlite3.Error)


@dataclass
class ApprovalsApi:
    """What the blueprint needs: whom to trust for tokens and the approvals service."""

    validator: OIDCValidator
    settings: OIDCSettings
    service: ApprovalService

    @classmethod
    def from_config(cls, config: Config, *, validator: OIDCValidator | None = None,
                    service: ApprovalService | None = None) -> ApprovalsApi:
        if validator is None:
            if config.identity is None or config.identity.oidc is None:
                raise ConfigError(f"{config.path}: identity.oidc: the approvals API needs an OIDC issuer to "
                                  "authenticate approvers ([identity.oidc] with issuer and audience)")
            validator = OIDCValidator(config.identity.oidc)
        if service is None:
            service = ApprovalService.from_config(config)
        return cls(validator, validator.settings, service)

    def close(self) -> None:
        self.service.close()


def init_app(app: Flask, config: Config, **overrides: Any) -> None:
    app.extensions[EXTENSION] = ApprovalsApi.from_config(config, **overrides)


def _api() -> ApprovalsApi:
    return current_app.extensions[EXTENSION]


# --- responses ---------------------------------------------------------------------------

def _unauthorized(detail: str, error: str = "invalid_token") -> tuple[Response, int]:
    return bearer_refused(REALM, detail, error)


def _refused(exc: ApprovalError) -> tuple[Response, int]:
    return error_response(HTTP_STATUS.get(exc.code, 400), exc.code, exc.message)


def _store_failed(exc: BaseException) -> tuple[Response, int]:
    log.error("approvals database failed: %s", exc)
    return error_response(500, "store_failed", f"the approvals database failed: {exc}")


# --- authentication ----------------------------------------------------------------------

def authenticated(view: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``view`` only for a valid Bearer token; the caller's Identity is ``g.identity``."""
    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        header = request.headers.get("Authorization")
        if header is None or not header.strip():
            return _unauthorized("no token: send 'Authorization: Bearer <token>' with an ID or access token "
                                 "from the identity provider", error="missing_token")
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _unauthorized("the Authorization header must be 'Bearer <token>'")
        api = _api()
        try:
            identity = identity_from_claims(api.validator.validate(token.strip()), api.settings)
        except IssuerError as exc:
            log.warning("approvals API unavailable: %s", exc.reason)
            response, status = error_response(503, "issuer_unavailable",
                                              f"cannot check the token right now: {exc.reason}")
            response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
            return response, status
        except TokenError as exc:
            log.info("approvals API: token refused from %s: %s", request.remote_addr, exc.reason)
            return _unauthorized(exc.reason)
        g.identity = identity
        return view(*args, **kwargs)
    return wrapper


# --- endpoints ---------------------------------------------------------------------------

@bp.get("")
@authenticated
def list_requests() -> Any:
    status = request.args.get("status", "all")
    if status not in (*STATUSES, "all"):
        return error_response(400, "bad_request", f"status must be one of {', '.join(STATUSES)} or all, "
                                                  f"not {status!r}")
    limit_text = request.args.get("limit", str(DEFAULT_LIMIT))
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_LIST_LIMIT:
        return error_response(400, "bad_request", f"limit must be a whole number from 1 to {MAX_LIST_LIMIT}")
    service = _api().service
    try:
        service.expire_overdue()
        found = service.list(None if status == "all" else status, int(limit_text), viewer=g.identity)
    except STORE_ERRORS as exc:
        return _store_failed(exc)
    return jsonify(approvals=[r.to_json() for r in found], count=len(found))


@bp.get("/<request_id>")
@authenticated
def show_request(request_id: str) -> Any:
    service = _api().service
    try:
        service.expire_overdue()
        return jsonify(service.get(request_id, viewer=g.identity).to_json())
    except ApprovalError as exc:
        return _refused(exc)
    except STORE_ERRORS as exc:
        return _store_failed(exc)


@bp.post("/<request_id>/approve")
@authenticated
def approve(request_id: str) -> Any:
    return _decide(request_id, approve=True)


@bp.post("/<request_id>/deny")
@authenticated
def deny(request_id: str) -> Any:
    return _decide(request_id, approve=False)


def _decide(request_id: str, *, approve: bool) -> Any:
    verb = "approve" if approve else "deny"
    raw = request.get_data(cache=False)  # MAX_CONTENT_LENGTH (413) applies before we parse
    try:
        body = json.loads(raw) if raw.strip() else {}
    except (ValueError, UnicodeDecodeError) as exc:
        return error_response(400, "bad_request", f"the request body is not JSON: {exc}")
    if not isinstance(body, dict):
        return error_response(400, "bad_request", f"the request body must be a JSON object, not "
                                                  f"{type(body).__name__}")
    unknown = sorted(set(body) - DECISION_FIELDS[verb])
    if unknown:
        # A misspelt "grant_minute" silently ignored would grant less (or more) than meant.
        return error_response(400, "bad_request", f"unknown field(s) for {verb}: {', '.join(unknown)} "
                                                  f"(allowed: {', '.join(sorted(DECISION_FIELDS[verb]))})")
    reason = body.get("reason")
    if reason is not None and not isinstance(reason, str):
        return error_response(400, "bad_request", f"'reason' must be a string, not {type(reason).__name__}")
    identity: Identity = g.identity
    try:
        decided = _api().service.decide(request_id, identity, approve, reason or "", body.get("grant_minutes"),
                                        body.get("grant_scope"))
    except ApprovalError as exc:
        log.info("approvals API: %s %s refused for %s: %s", verb, request_id, identity.uri, exc.code)
        if exc.code == "not_an_approver":
            # Neither an approver nor the requester: for them the request does not exist.
            key = exc.request.id if exc.request is not None else request_id
            exc = ApprovalError("unknown_request", f"there is no approval request {key}")
        return _refused(exc)
    except STORE_ERRORS as exc:
        return _store_failed(exc)
    return jsonify(decided.to_json())


__all__ = ["EXTENSION", "HTTP_STATUS", "ApprovalsApi", "bp", "init_app"]
