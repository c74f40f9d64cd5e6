"""The appliance's web service: a Flask app factory that later features plug blueprints into.

:func:`create_app` builds one app from the appliance :class:`~appliance.config.Config`:
enrollment (``webui.enroll``) and the approvals API (``webui.approvals``), both JSON, and
the web console (``webui.console``: pages for approvals, grants, sessions and replay, the
audit log and the policy tester). An error of the JSON APIs leaves as JSON
``{"error": ..., "detail": ...}`` so clients never have to parse HTML; a console page's
error is a page.

Production serving (gunicorn, TLS) is in ``webui.serve``; tests use Flask's test client.
"""

from __future__ import annotations

import re
from typing import Any

from flask import Flask, Response, jsonify, render_template, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from appliance.config import Config

# Enrollment bodies are a token and a CSR, a few KiB; anything much larger is abuse.
MAX_REQUEST_BYTES = 64 * 1024


def error_response(status: int, error: str, detail: str) -> tuple[Response, int]:
    """The one error shape every endpoint returns."""
    return jsonify(error=error, detail=detail), status


# What may stand inside a quoted header parameter: printable ASCII but '"' and '\\'.
_UNSAFE_IN_HEADER = re.compile(r'[^\x20-\x21\x23-\x5b\x5d-\x7e]')


def bearer_refused(realm: str, detail: str, error: str = "invalid_token") -> tuple[Response, int]:
    """401 for a missing or refused bearer token, with RFC 6750's WWW-Authenticate."""
    response, status = error_response(401, error, detail)
    header = f'Bearer realm="{realm}"'
    if error == "invalid_token":
        header += f', error="invalid_token", error_description="{_UNSAFE_IN_HEADER.sub("?", detail)}"'
    response.headers["WWW-Authenticate"] = header
    return response, status


def _http_error(exc: HTTPException) -> Any:
    status = exc.code or 500
    from webui.console import is_console_path
    wants_html = request.accept_mimetypes.best_match(("application/json", "text/html")) == "text/html"
    if is_console_path(request.path) and wants_html and not isinstance(exc, RequestEntityTooLarge):
        # A page's error is a page: the console's people read it, not a JSON client.
        page = render_template("error.html", code=status, name=exc.name or "Error",
                               detail=exc.description or exc.name or "")
        return page, status, {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
    if isinstance(exc, RequestEntityTooLarge):
        return error_response(status, "request_too_large",
                              f"the request body is larger than {MAX_REQUEST_BYTES} bytes")
    slug = (exc.name or "error").lower().replace(" ", "_")
    response, status = error_response(status, slug, exc.description or exc.name or "")
    # Keep what Werkzeug says about the error (Allow on 405, for one).
    for name, value in exc.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response, status


def create_app(config: Config, *, validator: Any = None, ca: Any = None, registry: Any = None,
               approvals: Any = None) -> Flask:
    """The appliance web app for ``config``; ``validator``/``ca``/``registry``/``approvals`` (an
    ApprovalService) replace the configured ones.

    Raises :class:`~appliance.config.ConfigError` (or the identity layer's errors) when
    the configuration can't support enrollment, so a bad setup fails at start, not on
    the first request.
    """
    # Late: keeps `import webui` cheap for tools that only need the constants.
    from webui import approvals as approvals_api
    from webui import enroll

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    app.config["TOLLGATE_CONFIG"] = config
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep documented field order

    enroll.init_app(app, config, validator=validator, ca=ca, registry=registry)
    app.register_blueprint(enroll.bp)
    # One validator for both: approvers' tokens share the issuer's JWKS cache with enrollment.
    approvals_api.init_app(app, config, validator=app.extensions[enroll.EXTENSION].validator, service=approvals)
    app.register_blueprint(approvals_api.bp)
    # The console's pages sign people in with the same issuer and read the same approvals.
    from webui import console
    console.init_app(app, config)

    app.register_error_handler(HTTPException, _http_error)

    @app.after_request
    def no_store(response: Response) -> Response:
        # Responses carry certificates and identities: no proxy or browser should keep them.
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify(status="ok")

    return app


__all__ = ["MAX_REQUEST_BYTES", "create_app", "error_response"]
