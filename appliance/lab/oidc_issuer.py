"""A DEV-ONLY OpenID Connect issuer for the lab and the tests. Never use it for anything real.

It trusts everyone: ``/authorize`` logs in a configured test user without a password (with
``prompt=login`` it shows a form to pick one, as a browser sign-in would), secrets are
compared but stored in clear. Only its admin endpoints are guarded: they require a
bearer secret (``Authorization: Bearer …``, else 401), and with ``admin_bind`` they are
served on a listener of their own — in the lab, the gateway's loopback, which the agent's
namespace cannot reach — and not at all on the public one. It exists
so enrollment can be exercised end to end without a real identity provider, and so tests
can craft tokens — also malicious ones — with :meth:`DevIssuer.mint`.

Served over HTTPS (the validator refuses anything else), and only on loopback or a lab
namespace address: :class:`DevIssuer` refuses to bind anywhere a real client could reach.
Every response carries ``X-Tollgate-Dev-Only`` and every JSON body a ``dev_only`` member.

Endpoints: ``/.well-known/openid-configuration``; ``/jwks`` (the current key and, during a
rotation's grace period, the previous ones); ``GET /authorize`` (authorization-code grant,
auto-approved; ``login_hint`` picks the user, else the first configured one);
``POST /authorize`` (the login form's answer: ``user`` and the original parameters);
``POST /token`` (``client_credentials``: an access token whose ``sub`` is the client;
``authorization_code``: single-use codes, an ID token with ``nonce``, ``email``, groups;
PKCE (RFC 7636, S256) checked when the code was asked for with a ``code_challenge``);
``POST /admin/rotate[?drop_old=1]`` (bearer secret; on the admin listener if there is one).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import ipaddress
import json
import secrets
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from flask import Flask, Response, jsonify, redirect, request
from werkzeug.serving import BaseWSGIServer, make_server

from appliance.lab.topology import LAB_SUBNETS

DEV_ONLY = "DEV-ONLY OIDC issuer for the Tollgate lab and tests; not for production use"
SIGNING_ALGS = ("RS256", "ES256")
CODE_TTL = 60


@dataclass(frozen=True)
class DevClient:
    """A registered OAuth client: agents use client_credentials, tools the code grant."""

    secret: str = field(repr=False)
    groups: tuple[str, ...] = ()
    redirect_uris: tuple[str, ...] = ()


@dataclass(frozen=True)
class DevUser:
    """A test person the issuer logs in without asking (it is dev-only)."""

    email: str
    groups: tuple[str, ...] = ()
    name: str | None = None


@dataclass
class _SigningKey:
    kid: str
    alg: str
    private_key: Any
    retired_at: float | None = None  # when a newer key replaced it


@dataclass
class _Code:
    client_id: str
    redirect_uri: str
    user: str
    nonce: str | None
    auth_time: float
    expires_at: float
    code_challenge: str | None = None  # PKCE S256: base64url(sha256(code_verifier))


def check_bind_address(host: str) -> None:
    """Refuse anything but loopback or a lab namespace address (the lab's fixed subnets)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"dev-only OIDC issuer: bind address {host!r} must be an IP address") from None
    if address.is_loopback or any(address in ipaddress.ip_network(net) for net in LAB_SUBNETS):
        return
    raise ValueError(f"dev-only OIDC issuer refuses to bind to {host}: only loopback or a lab "
                     f"namespace address ({', '.join(LAB_SUBNETS)}) is allowed")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _new_key(alg: str) -> _SigningKey:
    if alg == "RS256":
        private_key: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif alg == "ES256":
        private_key = ec.generate_private_key(ec.SECP256R1())
    else:
        raise ValueError(f"dev issuer signs with {' or '.join(SIGNING_ALGS)}, not {alg!r}")
    return _SigningKey(kid=f"dev-{uuid.uuid4().hex[:12]}", alg=alg, private_key=private_key)


def _set_path(claims: dict[str, Any], path: str, value: Any) -> None:
    """Put ``value`` at a dotted claim path, creating the nested objects on the way."""
    *parents, last = path.split(".")
    for step in parents:
        claims = claims.setdefault(step, {})
    claims[last] = value


class DevIssuer:
    """The dev-only issuer: a Flask app served over TLS from a background thread."""

    def __init__(self, bind: tuple[str, int] = ("127.0.0.1", 0), *, tls_cert: Path, tls_key: Path,
                 audience: str, clients: Mapping[str, DevClient] | None = None,
                 users: Mapping[str, DevUser] | None = None, alg: str = "RS256",
                 groups_claim: str = "groups", token_ttl: int = 300,
                 rotation_grace_seconds: float = 600, now: Callable[[], float] = time.time,
                 admin_token: str | None = None, admin_bind: tuple[str, int] | None = None):
        check_bind_address(bind[0])
        if admin_bind is not None:
            check_bind_address(admin_bind[0])
        self.bind = bind
        # None: the admin endpoints refuse everyone (there is no secret to present).
        self.admin_token = admin_token
        self.admin_bind = admin_bind
        self.tls_cert, self.tls_key = Path(tls_cert), Path(tls_key)
        self.audience = audience
        self.clients = dict(clients or {})
        self.users = dict(users or {})
        self.groups_claim = groups_claim
        self.token_ttl = token_ttl
        self.rotation_grace_seconds = rotation_grace_seconds
        self.now = now
        self._lock = threading.Lock()
        self._keys: list[_SigningKey] = [_new_key(alg)]  # newest last
        self._codes: dict[str, _Code] = {}
        self._servers: list[tuple[BaseWSGIServer, threading.Thread]] = []
        self.url = ""
        self.admin_url = ""  # where /admin/* is served: self.url unless admin_bind is given
        self.app = self._make_app(admin=admin_bind is None)
        self.admin_app = self.app if admin_bind is None else self._make_admin_app()

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> DevIssuer:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.tls_cert, self.tls_key)
        try:
            self.url = self._serve(self.bind, self.app, context, "dev-oidc-issuer")
            self.admin_url = (self.url if self.admin_bind is None
                              else self._serve(self.admin_bind, self.admin_app, context, "dev-oidc-issuer-admin"))
        except BaseException:
            self.stop()
            raise
        return self

    def _serve(self, bind: tuple[str, int], app: Flask, context: ssl.SSLContext, name: str) -> str:
        server = make_server(bind[0], bind[1], app, threaded=True, ssl_context=context)
        # A short poll interval: stop() waits for the serving loop to notice the shutdown.
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=name,
                                  daemon=True)
        self._servers.append((server, thread))
        thread.start()
        host, port = server.socket.getsockname()[:2]
        return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"

    def stop(self) -> None:
        while self._servers:
            server, thread = self._servers.pop()
            server.shutdown()
            server.server_close()
            thread.join()

    def __enter__(self) -> DevIssuer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- keys ------------------------------------------------------------------------

    @property
    def kid(self) -> str:
        """The kid of the current signing key."""
        return self._keys[-1].kid

    def rotate(self, drop_old: bool = False, alg: str | None = None) -> str:
        """A new signing key (new kid); old keys stay in the JWKS for the grace period."""
        with self._lock:
            now = self.now()
            new = _new_key(alg or self._keys[-1].alg)
            for key in self._keys:
                key.retired_at = key.retired_at or now
            self._keys = ([] if drop_old else self._keys) + [new]
            return new.kid

    def _published_keys(self) -> list[_SigningKey]:
        with self._lock:
            now = self.now()
            self._keys = [k for k in self._keys
                          if k.retired_at is None or now - k.retired_at < self.rotation_grace_seconds]
            return list(self._keys)

    def _key(self, kid: str | None) -> _SigningKey:
        for key in self._keys:
            if key.kid == kid:
                return key
        raise KeyError(f"dev issuer has no key {kid!r}")

    def jwks(self) -> dict[str, Any]:
        keys = []
        for key in self._published_keys():
            algorithm = jwt.algorithms.get_default_algorithms()[key.alg]
            jwk = algorithm.to_jwk(key.private_key.public_key(), as_dict=True)
            keys.append({**jwk, "kid": key.kid, "alg": key.alg, "use": "sig"})
        return {"keys": keys, "dev_only": DEV_ONLY}

    def public_pem(self, kid: str | None = None) -> bytes:
        """A signing key's public half as PEM (what a key-confusion attacker would HMAC with)."""
        key = self._key(kid or self.kid)
        return key.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    # --- tokens ----------------------------------------------------------------------

    def base_claims(self, subject: str, *, ttl: int | None = None, **extra: Any) -> dict[str, Any]:
        """Claims a well-formed token for ``subject`` would carry; ``extra`` adds or overrides."""
        now = int(self.now())
        return {"iss": self.url, "sub": subject, "aud": self.audience, "iat": now,
                "exp": now + (self.token_ttl if ttl is None else ttl), "jti": uuid.uuid4().hex, **extra}

    def mint(self, claims: Mapping[str, Any], *, kid: str | None = None, alg: str | None = None,
             key: Any = None, headers: Mapping[str, Any] | None = None) -> str:
        """Sign ``claims`` exactly as given — for tests, including tokens a validator must refuse.

        ``kid``/``alg`` default to the current key's; ``key`` overrides the signing key (a
        private key, or bytes for HS*); ``alg="none"`` leaves the token unsigned. A header
        given as None in ``headers`` is removed.
        """
        # An unknown kid still signs with the current key: that is the "unknown kid" test.
        signing = next((k for k in self._keys if k.kid == kid), self._keys[-1])
        alg = alg or signing.alg
        header: dict[str, Any] = {"alg": alg, "typ": "JWT", "kid": kid or signing.kid}
        for name, value in (headers or {}).items():
            if value is None:
                header.pop(name, None)
            else:
                header[name] = value
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(dict(claims)).encode())}"
        if alg == "none":
            signature = b""
        elif alg.startswith("HS"):
            # By hand: PyJWT (rightly) refuses to HMAC with a PEM public key.
            digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
            secret = key if key is not None else b"dev-only-secret"
            signature = hmac.new(secret, signing_input.encode(), digest).digest()
        else:
            private_key = key if key is not None else signing.private_key
            algorithm = jwt.algorithms.get_default_algorithms()[alg]
            signature = algorithm.sign(signing_input.encode(), private_key)
        return f"{signing_input}.{_b64(signature)}"

    def _sign(self, claims: dict[str, Any], typ: str = "JWT") -> str:
        with self._lock:
            key = self._keys[-1]
        return jwt.encode(claims, key.private_key, algorithm=key.alg, headers={"kid": key.kid, "typ": typ})

    def _with_groups(self, claims: dict[str, Any], groups: tuple[str, ...]) -> dict[str, Any]:
        _set_path(claims, self.groups_claim, list(groups))
        return claims

    # --- HTTP ------------------------------------------------------------------------

    @staticmethod
    def _labelled_app() -> Flask:
        app = Flask(__name__)

        @app.after_request
        def label(response: Response) -> Response:
            response.headers["X-Tollgate-Dev-Only"] = DEV_ONLY
            response.headers["Cache-Control"] = "no-store"
            return response

        return app

    def _admin_authorized(self) -> bool:
        """The request presents the admin bearer secret (never true when there is none)."""
        auth = request.headers.get("Authorization", "")
        scheme, _, presented = auth.partition(" ")
        if self.admin_token is None or scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(presented.strip().encode(), self.admin_token.encode())

    def _add_admin_routes(self, app: Flask) -> None:
        @app.post("/admin/rotate")
        def rotate() -> Any:
            if not self._admin_authorized():
                response, status = _error(401, "unauthorized", "the admin endpoints require the admin bearer secret")
                response.headers["WWW-Authenticate"] = 'Bearer realm="dev-oidc-admin"'
                return response, status
            drop_old = request.args.get("drop_old", "") in ("1", "true", "yes")
            kid = self.rotate(drop_old=drop_old)
            return jsonify(kid=kid, kids=[k.kid for k in self._published_keys()], dev_only=DEV_ONLY)

    def _make_admin_app(self) -> Flask:
        app = self._labelled_app()
        self._add_admin_routes(app)
        return app

    def _make_app(self, *, admin: bool) -> Flask:
        app = self._labelled_app()
        error = _error

        @app.get("/.well-known/openid-configuration")
        def discovery() -> Response:
            return jsonify({
                "issuer": self.url,
                "authorization_endpoint": f"{self.url}/authorize",
                "token_endpoint": f"{self.url}/token",
                "jwks_uri": f"{self.url}/jwks",
                "response_types_supported": ["code"],
                "grant_types_supported": ["authorization_code", "client_credentials"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": list(SIGNING_ALGS),
                "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
                "claims_supported": ["sub", "iss", "aud", "exp", "iat", "auth_time", "nonce", "email",
                                     "email_verified", "name", self.groups_claim],
                "dev_only": DEV_ONLY,
            })

        @app.get("/jwks")
        def jwks() -> Response:
            return jsonify(self.jwks())

        @app.route("/authorize", methods=["GET", "POST"])
        def authorize() -> Any:
            # The form posts the original query back as hidden fields, beside ``user``.
            args = request.args if request.method == "GET" else request.form
            client = self.clients.get(args.get("client_id", ""))
            redirect_uri = args.get("redirect_uri", "")
            # Checked before anything is redirected: never bounce to an unregistered URI.
            if client is None:
                return error(400, "invalid_request", "unknown client_id")
            if redirect_uri not in client.redirect_uris:
                return error(400, "invalid_request", "redirect_uri is not registered for this client")
            if args.get("response_type", "code") != "code":
                return error(400, "unsupported_response_type", "only response_type=code")
            method = args.get("code_challenge_method", "S256" if "code_challenge" in args else None)
            if method not in (None, "S256"):
                return error(400, "invalid_request", "only code_challenge_method=S256")
            if request.method == "POST":
                user = request.form.get("user")
            elif args.get("prompt") == "login":
                return login_form(args)
            else:
                user = args.get("login_hint") or next(iter(self.users), None)
            if user not in self.users:
                return error(400, "invalid_request", f"no test user {user!r}")
            code = secrets.token_urlsafe(24)
            now = self.now()
            with self._lock:
                self._codes[code] = _Code(args["client_id"], redirect_uri, user, args.get("nonce"),
                                          auth_time=now, expires_at=now + CODE_TTL,
                                          code_challenge=args.get("code_challenge"))
            params = {"code": code, **({"state": args["state"]} if "state" in args else {})}
            url = urlsplit(redirect_uri)
            query = urlencode(parse_qsl(url.query) + list(params.items()))
            return redirect(urlunsplit(url._replace(query=query)), code=302)

        @app.post("/token")
        def token() -> Any:
            client_id, client = authenticate()
            if client is None:
                response, status = error(401, "invalid_client", "client authentication failed")
                response.headers["WWW-Authenticate"] = 'Basic realm="dev-oidc"'
                return response, status
            grant = request.form.get("grant_type")
            if grant == "client_credentials":
                return client_credentials(client_id, client)
            if grant == "authorization_code":
                return authorization_code(client_id)
            return error(400, "unsupported_grant_type", f"grant_type {grant!r} is not supported")

        def authenticate() -> tuple[str, DevClient | None]:
            auth = request.authorization
            if auth is not None and auth.type == "basic":
                client_id, secret = auth.username or "", auth.password or ""
            else:
                client_id = request.form.get("client_id", "")
                secret = request.form.get("client_secret", "")
            client = self.clients.get(client_id)
            if client is None or not hmac.compare_digest(secret.encode(), client.secret.encode()):
                return client_id, None
            return client_id, client

        def client_credentials(client_id: str, client: DevClient) -> Response:
            claims = self._with_groups(self.base_claims(client_id, client_id=client_id), client.groups)
            return jsonify(access_token=self._sign(claims, typ="at+jwt"), token_type="Bearer",
                           expires_in=self.token_ttl, dev_only=DEV_ONLY)

        def authorization_code(client_id: str) -> Any:
            with self._lock:
                code = self._codes.pop(request.form.get("code", ""), None)  # single use
            if code is None or code.expires_at < self.now():
                return error(400, "invalid_grant", "unknown, used or expired authorization code")
            if code.client_id != client_id or code.redirect_uri != request.form.get("redirect_uri"):
                return error(400, "invalid_grant", "code was issued to another client or redirect_uri")
            if code.code_challenge is not None:
                verifier = request.form.get("code_verifier", "")
                if not hmac.compare_digest(_b64(hashlib.sha256(verifier.encode()).digest()), code.code_challenge):
                    return error(400, "invalid_grant", "code_verifier does not match the code_challenge (PKCE)")
            user = self.users[code.user]
            id_claims = self.base_claims(code.user, aud=client_id, azp=client_id, auth_time=int(code.auth_time),
                                         email=user.email, email_verified=True)
            if code.nonce is not None:
                id_claims["nonce"] = code.nonce
            if user.name:
                id_claims["name"] = user.name
            access_claims = self.base_claims(code.user, client_id=client_id)
            return jsonify(
                access_token=self._sign(self._with_groups(access_claims, user.groups), typ="at+jwt"),
                id_token=self._sign(self._with_groups(id_claims, user.groups)),
                token_type="Bearer", expires_in=self.token_ttl, dev_only=DEV_ONLY)

        def login_form(args: Mapping[str, str]) -> Response:
            hidden = "".join(f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
                             for k, v in args.items() if k != "user")
            buttons = "".join(
                f'<li><button type="submit" name="user" value="{html.escape(key)}">Sign in as '
                f'<b>{html.escape(key)}</b> <small>{html.escape(u.email)} · '
                f'{html.escape(", ".join(u.groups) or "no groups")}</small></button></li>'
                for key, u in self.users.items())
            page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Dev sign-in</title>'
                    f'<meta name="viewport" content="width=device-width, initial-scale=1">'
                    f'<style>{_LOGIN_CSS}</style></head><body><main><h1>Dev OIDC issuer: sign in</h1>'
                    f'<p class="warn">{html.escape(DEV_ONLY)}. No passwords: pick a test user.</p>'
                    f'<form method="post" action="/authorize">{hidden}<ul>{buttons}</ul></form></main></body></html>')
            response = Response(page, mimetype="text/html")
            # form-action covers the redirect the form's answer makes: to the client's redirect URI.
            back = urlsplit(args.get("redirect_uri", ""))
            response.headers["Content-Security-Policy"] = _LOGIN_CSP + f" {back.scheme}://{back.netloc}"
            return response

        if admin:
            self._add_admin_routes(app)
        return app


_LOGIN_CSP = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; form-action 'self'"
_LOGIN_CSS = ("body{font:20px/1.5 system-ui,sans-serif;background:#111;color:#eee;margin:0}"
              "main{max-width:36rem;margin:2rem auto;padding:0 1rem}.warn{color:#fc6}"
              "ul{list-style:none;padding:0}button{font:inherit;width:100%;text-align:left;margin:.4rem 0;"
              "padding:.8rem 1rem;background:#224;color:#fff;border:2px solid #88f;border-radius:.4rem;cursor:pointer}"
              "button:focus,button:hover{outline:3px solid #ff0}small{color:#ccc}")


def _error(status: int, code: str, description: str) -> tuple[Response, int]:
    return jsonify(error=code, error_description=description, dev_only=DEV_ONLY), status


def main(argv: list[str] | None = None) -> int:
    """Run the dev issuer as a process (the lab starts it in the gateway namespace)."""
    import argparse
    import signal
    import sys

    parser = argparse.ArgumentParser(prog="python -m appliance.lab.oidc_issuer", description=DEV_ONLY)
    parser.add_argument("--bind", required=True, help="ADDRESS:PORT (loopback or a lab address)")
    parser.add_argument("--tls-cert", required=True, type=Path)
    parser.add_argument("--tls-key", required=True, type=Path)
    parser.add_argument("--audience", required=True)
    parser.add_argument("--client", action="append", default=[], metavar="ID:SECRET_FILE:GROUP,GROUP",
                        help="a client-credentials client (repeatable)")
    parser.add_argument("--code-client", action="append", default=[], metavar="ID:SECRET_FILE:REDIRECT_URI",
                        help="a client of the authorization-code grant (a web sign-in; repeatable)")
    parser.add_argument("--user", action="append", default=[], metavar="EMAIL:GROUP,GROUP",
                        help="a person the code grant logs in (repeatable)")
    parser.add_argument("--admin-token-file", type=Path,
                        help="the bearer secret /admin/* requires (without it, they refuse everyone)")
    parser.add_argument("--admin-bind", help="ADDRESS:PORT to serve /admin/* on instead of --bind (loopback)")
    args = parser.parse_args(argv)

    def address(spec: str) -> tuple[str, int]:
        host, _, port = spec.rpartition(":")
        return host.strip("[]"), int(port)

    clients = {}
    for spec in args.client:
        client_id, secret_file, groups = [*spec.split(":", 2), ""][:3]
        clients[client_id] = DevClient(Path(secret_file).read_text().strip(), tuple(filter(None, groups.split(","))))
    for spec in args.code_client:
        client_id, secret_file, redirect_uri = spec.split(":", 2)
        clients[client_id] = DevClient(Path(secret_file).read_text().strip(), (), (redirect_uri,))
    users = {}
    for spec in args.user:
        email, _, groups = spec.partition(":")
        users[email] = DevUser(email, tuple(filter(None, groups.split(","))))
    admin_token = args.admin_token_file.read_text().strip() if args.admin_token_file else None
    issuer = DevIssuer(address(args.bind), tls_cert=args.tls_cert, tls_key=args.tls_key, audience=args.audience,
                       clients=clients, users=users, admin_token=admin_token,
                       admin_bind=address(args.admin_bind) if args.admin_bind else None).start()
    print(f"dev-oidc-issuer: ready on {issuer.url}, admin on {issuer.admin_url} ({DEV_ONLY})",
          file=sys.stderr, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    issuer.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
