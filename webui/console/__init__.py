"""The web console: server-rendered pages for approvers, operators and auditors.

One blueprint per area — sign-in (:mod:`.auth`), approvals (:mod:`.approvals`), grants,
sessions and replay (:mod:`.sessions`), the audit log (:mod:`.audit`) and the policy tester
(:mod:`.policy`) — rendered with Jinja from ``webui/templates``, styled and scripted from
``webui/static`` (our own small stylesheet and script, served from here: no CDN, nothing
fetched from elsewhere at run time). Every console response carries a Content-Security-Policy
that allows no inline script and nothing from another origin.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from flask import Flask, Response, g, redirect, request, url_for

from appliance.config import Config, ConfigError

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
COOKIE_KEY_NAME = "webui-cookie.key"


def cookie_key_path(config: Config) -> Path:
    if config.webui.cookie_key_file is not None:
        return config.webui.cookie_key_file
    if config.identity is None:
        raise ConfigError(f"{config.path}: the web console needs [identity] (its OIDC issuer signs people in)")
    return config.identity.state_dir / COOKIE_KEY_NAME


def ensure_cookie_key(config: Config) -> bytes:
    """The key that signs the console's cookies, made (0600) when missing. The server calls
    this once before forking its workers, so they all read the same key."""
    path = cookie_key_path(config)
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    return key


def is_console_path(path: str) -> bool:
    """Console pages (HTML), as opposed to the JSON APIs the same app serves."""
    return not (path.startswith(("/api/", "/v1/")) or path == "/healthz")


def init_app(app: Flask, config: Config) -> None:
    from webui.console import approvals, audit, auth, grants, policy, sessions

    app.secret_key = ensure_cookie_key(config)
    auth.init_app(app, config, lambda: policy.approver_groups(config))
    for blueprint in (auth.bp, approvals.bp, grants.bp, sessions.bp, audit.bp, policy.bp):
        app.register_blueprint(blueprint)

    @app.get("/")
    def home() -> Any:
        return redirect(url_for("approvals_pages.inbox"))

    @app.context_processor
    def page_globals() -> dict[str, Any]:
        return {"csrf_token": auth.csrf_token, "me": getattr(g, "identity", None), "roles": getattr(g, "roles", []),
                "console_nav": [("approvals_pages.inbox", "Approvals"), ("approvals_pages.history", "History"),
                                ("grants_pages.index", "Grants"), ("sessions_pages.index", "Sessions"),
                                ("audit_pages.index", "Audit"), ("policy_pages.tester", "Policy tester")]}

    @app.after_request
    def security_headers(response: Response) -> Response:
        if is_console_path(request.path):
            response.headers["Content-Security-Policy"] = CSP
            response.headers["X-Frame-Options"] = "DENY"
            response.headers["Referrer-Policy"] = "same-origin"
        return response


__all__ = ["CSP", "ensure_cookie_key", "init_app", "is_console_path"]
