"""Sign-in to the console: OIDC authorization code with PKCE, a signed session cookie, roles, CSRF.

``/auth/login`` sends the browser to the configured issuer (``state``, ``nonce`` and a PKCE
S256 challenge kept in the session cookie); ``/auth/callback`` exchanges the code for tokens
at the issuer's token endpoint, validates the ID token (signature, issuer, audience = the
console's client id, ``nonce``) with the same validator code as every other token, and
signs the person in. ``/auth/logout`` (POST, CSRF-checked) ends it.

The session lives in Flask's signed cookie (``__Host-tollgate``: Secure, HttpOnly,
SameSite=Lax — Lax, not Strict, so the issuer's redirect back carries the login state), keyed
by ``[webui] cookie_key_file`` so every worker reads the others' cookies. A sign-in unused
for ``idle_minutes`` is over: the next request is sent back to sign in.

Roles come from the person's groups: **approver** (a group the policy names as approvers),
**auditor** (``[webui] auditor_groups``) and **admin** (``[webui] admin_groups``; everything
an auditor may). Every POST must carry the session's CSRF token (form field ``csrf`` or
header ``X-CSRF-Token``), else 403. Sign-ins are recorded in the audit log (through the
proxy's control socket, :mod:`webui.console.records`); a sign-in that can't be recorded is
refused.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import logging
import secrets
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from flask import Blueprint, abort, current_app, g, redirect, render_template, request, session, url_for

from appliance.config import Config
from appliance.identity.oidc import IssuerError, OIDCValidator, TokenError, https_fetch, identity_from_claims
from appliance.model.identity import Identity
from webui.console import records

log = logging.getLogger(__name__)

bp = Blueprint("auth", __name__, url_prefix="/auth")

EXTENSION = "tollgate.console.auth"
COOKIE_NAME = "__Host-tollgate"
ROLES = ("approver", "auditor", "admin")


@dataclass
class SignIn:
    """How the console signs people in: the issuer's endpoints, its client, and the roles."""

    config: Config
    validator: OIDCValidator  # for ID tokens: audience = the console's client id
    client_id: str
    client_secret: str | None
    idle_seconds: float
    approver_groups: Callable[[], set[str]]
    clock: Callable[[], float] = time.time
    _endpoints: tuple[str, str] | None = None

    @classmethod
    def from_config(cls, config: Config, approver_groups: Callable[[], set[str]]) -> SignIn:
        webui = config.webui
        assert config.identity is not None and config.identity.oidc is not None  # checked by the app factory
        settings = replace(config.identity.oidc, audience=webui.client_id)
        secret = webui.client_secret_file.read_text().strip() if webui.client_secret_file else None
        return cls(config, OIDCValidator(settings), webui.client_id, secret, webui.idle_minutes * 60.0,
                   approver_groups)

    def endpoints(self) -> tuple[str, str]:
        """(authorization_endpoint, token_endpoint) from the issuer's discovery document."""
        if self._endpoints is None:
            settings = self.validator.settings
            url = settings.issuer.rstrip("/") + "/.well-known/openid-configuration"
            status, body = https_fetch(settings.ca_file, settings.http_timeout)(url)
            if status != 200:
                raise IssuerError(f"could not fetch the issuer's discovery document from {url}: HTTP {status}")
            document = json.loads(body)
            if document.get("issuer") != settings.issuer:
                raise IssuerError(f"discovery document at {url} names issuer {document.get('issuer')!r}")
            authorize, token = document.get("authorization_endpoint"), document.get("token_endpoint")
            for name, value in (("authorization_endpoint", authorize), ("token_endpoint", token)):
                if not isinstance(value, str) or not value.startswith("https://"):
                    raise IssuerError(f"discovery document at {url} has no https {name}")
            self._endpoints = (authorize, token)
        return self._endpoints

    def exchange(self, code: str, redirect_uri: str, verifier: str) -> dict[str, Any]:
        """The token endpoint's answer to an authorization code (with the PKCE verifier)."""
        _, token_url = self.endpoints()
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
                "code_verifier": verifier, "client_id": self.client_id}
        headers = {"Accept": "application/json", "Content-Type": "application/x-www-form-urlencoded"}
        if self.client_secret is not None:
            pair = f"{urllib.parse.quote(self.client_id)}:{urllib.parse.quote(self.client_secret)}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        settings = self.validator.settings
        context = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
        post = urllib.request.Request(token_url, data=urllib.parse.urlencode(form).encode(), headers=headers,
                                      method="POST")
        try:
            with urllib.request.urlopen(post, context=context, timeout=settings.http_timeout) as answer:
                return json.loads(answer.read(1 << 20))
        except urllib.error.HTTPError as exc:
            detail = exc.read(4096).decode(errors="replace")
            raise TokenError(f"the issuer refused the sign-in code (HTTP {exc.code}): {detail}") from None
        except (OSError, ValueError) as exc:
            raise IssuerError(f"could not reach the issuer's token endpoint {token_url}: {exc}") from None

    def roles(self, groups: tuple[str, ...]) -> list[str]:
        webui = self.config.webui
        mine = set(groups)
        roles = []
        if mine & self.approver_groups():
            roles.append("approver")
        if mine & set(webui.auditor_groups) or mine & set(webui.admin_groups):
            roles.append("auditor")
        if mine & set(webui.admin_groups):
            roles.append("admin")
        return roles


def init_app(app: Any, config: Config, approver_groups: Callable[[], set[str]]) -> None:
    app.extensions[EXTENSION] = SignIn.from_config(config, approver_groups)
    app.config.update(SESSION_COOKIE_NAME=COOKIE_NAME, SESSION_COOKIE_SECURE=True, SESSION_COOKIE_HTTPONLY=True,
                      SESSION_COOKIE_SAMESITE="Lax", SESSION_COOKIE_PATH="/")
    app.before_request(_check_csrf)


def sign_in() -> SignIn:
    return current_app.extensions[EXTENSION]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def csrf_token() -> str:
    """The session's CSRF token (made on first use); forms carry it as ``csrf``."""
    token = session.get("csrf")
    if not token:
        token = session["csrf"] = secrets.token_urlsafe(32)
    return token


def _check_csrf() -> Any:
    """Every state-changing request of the console carries the session's CSRF token."""
    if request.method in ("GET", "HEAD", "OPTIONS") or not _is_console(request.path):
        return None
    sent = request.form.get("csrf") or request.headers.get("X-CSRF-Token") or ""
    expected = session.get("csrf") or ""
    if not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
        log.info("console: %s %s refused: no valid CSRF token", request.method, request.path)
        abort(403, description="this form has expired or did not come from the console (CSRF token missing or "
                               "wrong): reload the page and try again")
    return None


def _is_console(path: str) -> bool:
    # The JSON APIs (enrollment, approvals) authenticate each call with a bearer token and
    # carry no cookie: CSRF does not apply to them.
    return not path.startswith(("/api/", "/v1/"))


def current_identity() -> Identity | None:
    """The signed-in person, or None (not signed in, or idle too long: the session is cleared)."""
    user = session.get("user")
    if not user:
        return None
    now = sign_in().clock()
    if now - float(session.get("seen", 0)) > sign_in().idle_seconds:
        session.pop("user", None)
        session["expired"] = True
        return None
    session["seen"] = int(now)
    return Identity(user["subject"], user["kind"], tuple(user["groups"]), email=user.get("email"),
                    issuer=user.get("issuer"))


def signed_in(*roles: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The view needs a signed-in person (any of ``roles``, if given); ``g.identity``, ``g.roles``."""
    def wrap(view: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            identity = current_identity()
            if identity is None:
                if request.method != "GET" or request.headers.get("Accept") == "text/event-stream":
                    abort(401, description="your sign-in has expired or you are not signed in: sign in again")
                return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
            g.identity = identity
            g.roles = session["user"].get("roles", [])
            if roles and not set(roles) & set(g.roles):
                abort(403, description=f"this page is for {' or '.join(roles)}s; you are signed in as "
                                       f"{identity.display} ({', '.join(g.roles) or 'no console role'})")
            return view(*args, **kwargs)
        return wrapper
    return wrap


def _safe_next(target: str | None) -> str:
    """Only a path of this site: never an open redirect."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return url_for("approvals_pages.inbox")
    return target


def redirect_uri() -> str:
    base = sign_in().config.webui.console_url or sign_in().config.approvals.api_url or request.host_url
    return base.rstrip("/") + url_for("auth.callback")


@bp.get("/login")
def login() -> Any:
    expired = session.pop("expired", False)
    if request.args.get("go") != "1":
        return render_template("login.html", expired=expired, next=_safe_next(request.args.get("next")))
    try:
        authorize, _ = sign_in().endpoints()
    except (IssuerError, OSError, ValueError) as exc:
        abort(503, description=f"the identity provider cannot be reached right now: {exc}")
    state, nonce, verifier = secrets.token_urlsafe(24), secrets.token_urlsafe(24), secrets.token_urlsafe(48)
    session["login"] = {"state": state, "nonce": nonce, "verifier": verifier,
                        "next": _safe_next(request.args.get("next"))}
    query = urllib.parse.urlencode({
        "response_type": "code", "client_id": sign_in().client_id, "redirect_uri": redirect_uri(),
        "scope": "openid email profile groups", "state": state, "nonce": nonce, "prompt": "login",
        "code_challenge": _b64(hashlib.sha256(verifier.encode()).digest()), "code_challenge_method": "S256"})
    return redirect(f"{authorize}?{query}")


@bp.get("/callback")
def callback() -> Any:
    pending = session.pop("login", None)
    if pending is None or not hmac.compare_digest(request.args.get("state", ""), pending["state"]):
        abort(400, description="this sign-in did not start here or has already been used: sign in again")
    if "error" in request.args:
        abort(401, description=f"the identity provider refused the sign-in: {request.args.get('error')}")
    try:
        tokens = sign_in().exchange(request.args.get("code", ""), redirect_uri(), pending["verifier"])
        claims = sign_in().validator.validate(str(tokens.get("id_token") or ""))
        if not hmac.compare_digest(str(claims.get("nonce", "")), pending["nonce"]):
            raise TokenError("the ID token's nonce is not this sign-in's")
        identity = identity_from_claims(claims, sign_in().validator.settings)
    except IssuerError as exc:
        abort(503, description=f"the identity provider cannot be reached right now: {exc.reason}")
    except TokenError as exc:
        log.info("console: sign-in refused: %s", exc.reason)
        records.admin("console.signin", identity=None, outcome="failure", reason=exc.reason)
        abort(401, description=f"sign-in refused: {exc.reason}")
    roles = sign_in().roles(identity.groups)
    if not records.admin("console.signin", identity=identity, outcome="success", roles=",".join(roles)):
        abort(503, description="the appliance cannot record your sign-in in its audit log right now (is the "
                               "proxy running?); try again in a moment")
    session.clear()
    session["user"] = {"subject": identity.subject, "kind": identity.kind, "groups": list(identity.groups),
                       "email": identity.email, "issuer": identity.issuer, "roles": roles}
    session["seen"] = int(sign_in().clock())
    session["csrf"] = secrets.token_urlsafe(32)
    log.info("console: %s signed in (%s)", identity.display, ", ".join(roles) or "no role")
    return redirect(pending["next"])


@bp.post("/logout")
def logout() -> Any:
    session.clear()
    return redirect(url_for("auth.login"))


__all__ = ["ROLES", "SignIn", "bp", "csrf_token", "current_identity", "init_app", "signed_in"]
