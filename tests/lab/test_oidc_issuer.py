"""The dev-only OIDC issuer over real HTTPS: discovery, JWKS and rotation, both grants, binding,
and its admin endpoints: a bearer secret, and a listener of their own."""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import jwt
import pytest

from appliance.lab.oidc_issuer import DevClient, DevIssuer, DevUser, check_bind_address
from tests.identity.tls_helpers import TlsFiles, https_json, https_request, make_tls_files

AUDIENCE = "tollgate"
REDIRECT = "http://127.0.0.1:8765/callback?from=test"
CLIENTS = {
    "cli": DevClient(secret="cli-secret", redirect_uris=(REDIRECT,)),
    "agent-ci": DevClient(secret="ci-secret", groups=("ci",)),
}
ADMIN_TOKEN = "admin-secret"
USERS = {"alice": DevUser(email="alice@example.test", groups=("dba",)),
         "bob": DevUser(email="bob@example.test")}


class Clock:
    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def issuer(tls: TlsFiles, clock: Clock) -> Iterator[DevIssuer]:
    with DevIssuer(("127.0.0.1", 0), tls_cert=tls.cert_file, tls_key=tls.key_file, audience=AUDIENCE,
                   clients=CLIENTS, users=USERS, now=clock, rotation_grace_seconds=600,
                   admin_token=ADMIN_TOKEN) as issuer:
        yield issuer


def admin_post(url: str, tls: TlsFiles, authorization: str | None = f"Bearer {ADMIN_TOKEN}") -> tuple[int, Any]:
    """POST to an admin endpoint with (by default) the right bearer secret: ``(status, JSON body)``."""
    headers = {} if authorization is None else {"Authorization": authorization}
    request = urllib.request.Request(url, data=b"", headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, context=ssl.create_default_context(cafile=str(tls.ca_file)),
                                    timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        return exc.code, json.loads(body) if body.startswith(b"{") else body


def verify(issuer: DevIssuer, tls: TlsFiles, token: str, audience: str) -> dict[str, Any]:
    """Check a token the way a relying party would: with the key the JWKS publishes for its kid."""
    _, jwks = https_json(f"{issuer.url}/jwks", tls.ca_file)
    kid = jwt.get_unverified_header(token)["kid"]
    jwk = next(k for k in jwks["keys"] if k["kid"] == kid)
    return jwt.decode(token, jwt.PyJWK(jwk).key, algorithms=[jwk["alg"]], audience=audience, issuer=issuer.url)


def authorize(issuer: DevIssuer, tls: TlsFiles, **params: str) -> tuple[int, dict[str, str], bytes]:
    query = urlencode({"response_type": "code", "client_id": "cli", "redirect_uri": REDIRECT, **params})
    return https_request(f"{issuer.url}/authorize?{query}", tls.ca_file)


def exchange(issuer: DevIssuer, tls: TlsFiles, code: str) -> tuple[int, Any]:
    return https_json(f"{issuer.url}/token", tls.ca_file, basic=("cli", "cli-secret"),
                      form={"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT})


def test_discovery_document_over_https_is_labelled_dev_only(issuer: DevIssuer, tls: TlsFiles) -> None:
    status, headers, body = https_request(f"{issuer.url}/.well-known/openid-configuration", tls.ca_file)
    document = json.loads(body)
    assert status == 200
    assert document["issuer"] == issuer.url
    assert document["jwks_uri"] == f"{issuer.url}/jwks"
    assert document["token_endpoint"] == f"{issuer.url}/token"
    assert "DEV-ONLY" in headers["X-Tollgate-Dev-Only"] and "DEV-ONLY" in document["dev_only"]


def test_jwks_keeps_the_old_key_through_the_grace_period(issuer: DevIssuer, tls: TlsFiles, clock: Clock) -> None:
    first = issuer.kid
    status, rotated = admin_post(f"{issuer.url}/admin/rotate", tls)
    assert status == 200 and rotated["kid"] != first
    _, jwks = https_json(f"{issuer.url}/jwks", tls.ca_file)
    assert [k["kid"] for k in jwks["keys"]] == [first, rotated["kid"]]
    clock.t += 601
    _, jwks = https_json(f"{issuer.url}/jwks", tls.ca_file)
    assert [k["kid"] for k in jwks["keys"]] == [rotated["kid"]]


def test_rotate_with_drop_old_publishes_only_the_new_key(issuer: DevIssuer, tls: TlsFiles) -> None:
    status, rotated = admin_post(f"{issuer.url}/admin/rotate?drop_old=1", tls)
    assert status == 200
    _, jwks = https_json(f"{issuer.url}/jwks", tls.ca_file)
    assert [k["kid"] for k in jwks["keys"]] == [rotated["kid"]]


@pytest.mark.parametrize("authorization", [
    None, "Bearer wrong-secret", "Bearer ", f"Basic {ADMIN_TOKEN}", ADMIN_TOKEN, f"Bearer {ADMIN_TOKEN}x",
])
def test_rotate_without_the_admin_secret_is_refused(issuer: DevIssuer, tls: TlsFiles,
                                                    authorization: str | None) -> None:
    first = issuer.kid
    status, body = admin_post(f"{issuer.url}/admin/rotate?drop_old=1", tls, authorization)
    assert status == 401 and body["error"] == "unauthorized"
    assert issuer.kid == first
    _, jwks = https_json(f"{issuer.url}/jwks", tls.ca_file)
    assert [k["kid"] for k in jwks["keys"]] == [first]


def test_without_an_admin_secret_configured_rotate_refuses_everyone(tls: TlsFiles) -> None:
    with DevIssuer(("127.0.0.1", 0), tls_cert=tls.cert_file, tls_key=tls.key_file, audience=AUDIENCE) as issuer:
        first = issuer.kid
        for authorization in (None, "Bearer ", "Bearer None"):
            status, _ = admin_post(f"{issuer.url}/admin/rotate", tls, authorization)
            assert status == 401
        assert issuer.kid == first


def test_an_admin_listener_takes_the_admin_endpoints_off_the_public_one(tls: TlsFiles) -> None:
    with DevIssuer(("127.0.0.1", 0), tls_cert=tls.cert_file, tls_key=tls.key_file, audience=AUDIENCE,
                   admin_token=ADMIN_TOKEN, admin_bind=("127.0.0.1", 0)) as issuer:
        assert issuer.admin_url != issuer.url
        first = issuer.kid
        status, _ = admin_post(f"{issuer.url}/admin/rotate", tls)
        assert status == 404 and issuer.kid == first  # not there at all, even with the secret
        assert admin_post(f"{issuer.admin_url}/admin/rotate", tls, None)[0] == 401
        status, rotated = admin_post(f"{issuer.admin_url}/admin/rotate", tls)
        assert status == 200 and rotated["kid"] == issuer.kid != first
        # The admin listener serves nothing else.
        assert https_request(f"{issuer.admin_url}/jwks", tls.ca_file)[0] == 404


@pytest.mark.parametrize("how", ["basic", "form"])
def test_client_credentials_grant(issuer: DevIssuer, tls: TlsFiles, how: str) -> None:
    form = {"grant_type": "client_credentials"}
    if how == "basic":
        status, body = https_json(f"{issuer.url}/token", tls.ca_file, basic=("agent-ci", "ci-secret"), form=form)
    else:
        form |= {"client_id": "agent-ci", "client_secret": "ci-secret"}
        status, body = https_json(f"{issuer.url}/token", tls.ca_file, form=form)
    assert status == 200, body
    assert body["token_type"] == "Bearer"
    claims = verify(issuer, tls, body["access_token"], AUDIENCE)
    assert (claims["sub"], claims["client_id"], claims["groups"]) == ("agent-ci", "agent-ci", ["ci"])


def test_client_credentials_with_a_wrong_secret_is_refused(issuer: DevIssuer, tls: TlsFiles) -> None:
    status, body = https_json(f"{issuer.url}/token", tls.ca_file, basic=("agent-ci", "guess"),
                              form={"grant_type": "client_credentials"})
    assert status == 401 and body["error"] == "invalid_client"
    assert "access_token" not in body


def test_authorization_code_grant_issues_an_id_token(issuer: DevIssuer, tls: TlsFiles) -> None:
    status, headers, _ = authorize(issuer, tls, state="xyz", nonce="n-123")
    assert status == 302
    location = urlsplit(headers["Location"])
    assert location._replace(query="").geturl() == REDIRECT.split("?")[0]
    query = parse_qs(location.query)
    assert query["state"] == ["xyz"] and query["from"] == ["test"]
    status, body = exchange(issuer, tls, query["code"][0])
    assert status == 200, body
    claims = verify(issuer, tls, body["id_token"], "cli")
    assert claims["sub"] == "alice" and claims["nonce"] == "n-123"
    assert claims["email"] == "alice@example.test" and claims["groups"] == ["dba"]


def test_login_hint_picks_the_test_user(issuer: DevIssuer, tls: TlsFiles) -> None:
    _, headers, _ = authorize(issuer, tls, login_hint="bob")
    code = parse_qs(urlsplit(headers["Location"]).query)["code"][0]
    _, body = exchange(issuer, tls, code)
    assert verify(issuer, tls, body["id_token"], "cli")["email"] == "bob@example.test"


def test_authorization_code_is_single_use(issuer: DevIssuer, tls: TlsFiles) -> None:
    _, headers, _ = authorize(issuer, tls)
    code = parse_qs(urlsplit(headers["Location"]).query)["code"][0]
    assert exchange(issuer, tls, code)[0] == 200
    status, body = exchange(issuer, tls, code)
    assert status == 400 and body["error"] == "invalid_grant"


def test_authorization_code_expires(issuer: DevIssuer, tls: TlsFiles, clock: Clock) -> None:
    _, headers, _ = authorize(issuer, tls)
    code = parse_qs(urlsplit(headers["Location"]).query)["code"][0]
    clock.t += 61
    status, body = exchange(issuer, tls, code)
    assert status == 400 and body["error"] == "invalid_grant"


def test_unregistered_redirect_uri_is_not_redirected_to(issuer: DevIssuer, tls: TlsFiles) -> None:
    status, headers, _ = authorize(issuer, tls, redirect_uri="https://evil.example/cb")
    assert status == 400 and "Location" not in headers


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "192.168.1.1", "2001:db8::1", "localhost"])
def test_refuses_to_bind_outside_loopback_and_the_lab(tls: TlsFiles, host: str) -> None:
    with pytest.raises(ValueError, match="dev-only OIDC issuer"):
        DevIssuer((host, 0), tls_cert=tls.cert_file, tls_key=tls.key_file, audience=AUDIENCE)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "198.18.1.1", "fd7a:6c67:2::1"])
def test_loopback_and_lab_addresses_are_allowed(host: str) -> None:
    check_bind_address(host)  # raises if refused


def _pkce(verifier: str) -> str:
    import base64
    import hashlib
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


def test_prompt_login_shows_a_form_and_its_answer_signs_in_the_chosen_user(issuer: DevIssuer, tls: TlsFiles) -> None:
    params = {"response_type": "code", "client_id": "cli", "redirect_uri": REDIRECT, "state": "s1",
              "prompt": "login", "code_challenge": _pkce("v" * 43), "code_challenge_method": "S256"}
    status, headers, body = authorize(issuer, tls, **params)
    page = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "alice@example.test" in page and "bob@example.test" in page and "<script" not in page
    assert "script-src" not in headers["Content-Security-Policy"]  # default-src 'none': no script at all
    status, headers, _ = https_request(f"{issuer.url}/authorize", tls.ca_file, form={**params, "user": "bob"})
    assert status == 302
    query = parse_qs(urlsplit(headers["Location"]).query)
    assert query["state"] == ["s1"]
    status, body = https_json(f"{issuer.url}/token", tls.ca_file, basic=("cli", "cli-secret"),
                              form={"grant_type": "authorization_code", "code": query["code"][0],
                                    "redirect_uri": REDIRECT, "code_verifier": "v" * 43})
    assert status == 200, body
    assert verify(issuer, tls, body["id_token"], "cli")["email"] == "bob@example.test"


def test_a_pkce_code_needs_the_matching_verifier(issuer: DevIssuer, tls: TlsFiles) -> None:
    _, headers, _ = authorize(issuer, tls, code_challenge=_pkce("right-verifier-" * 3))
    code = parse_qs(urlsplit(headers["Location"]).query)["code"][0]
    status, body = https_json(f"{issuer.url}/token", tls.ca_file, basic=("cli", "cli-secret"),
                              form={"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT,
                                    "code_verifier": "wrong-verifier-" * 3})
    assert status == 400 and body["error"] == "invalid_grant" and "PKCE" in body["error_description"]
    status, _, _ = authorize(issuer, tls, code_challenge="x", code_challenge_method="plain")
    assert status == 400
