"""``POST /v1/enroll`` through Flask's test client, against a real dev issuer over HTTPS and a real CA."""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from flask import Flask
from flask.testing import FlaskClient

from appliance.config import ConfigError, load_config
from appliance.identity import identity_from_certificate
from appliance.identity.certs import fingerprint, not_valid_after, not_valid_before
from appliance.lab.oidc_issuer import DevIssuer
from tests.identity import ec_key, make_csr
from tests.identity.dev_flows import AUDIENCE, client_credentials_token, id_token
from tests.identity.tls_helpers import TlsFiles, make_tls_files
from tests.webui import Appliance, agent, alice, make_appliance, start_issuer
from webui import MAX_REQUEST_BYTES, create_app


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def issuer(tls: TlsFiles) -> Iterator[DevIssuer]:
    issuer = start_issuer(tls)
    yield issuer
    issuer.stop()


@pytest.fixture
def appliance(tmp_path: Path, issuer: DevIssuer, tls: TlsFiles) -> Appliance:
    return make_appliance(tmp_path, issuer.url, tls.ca_file)


@pytest.fixture
def app(appliance: Appliance) -> Iterator[Flask]:
    app = create_app(appliance.config())  # everything from the config: validator, CA key, registry
    yield app
    app.extensions["tollgate.enroll"].close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def csr_pem(cn: str | None = None, sans: list[x509.GeneralName] | None = None) -> tuple[Any, str]:
    key = ec_key()
    return key, make_csr(key, cn=cn, sans=sans).decode()


def post(client: FlaskClient, token: str, csr: str | None = None, **kwargs: Any) -> Any:
    return client.post("/v1/enroll", json={"token": token, "csr": csr or csr_pem()[1]}, **kwargs)


# --- issued ------------------------------------------------------------------------------

def test_person_id_token_gets_a_certificate_carrying_the_identity_and_groups(
        client: FlaskClient, issuer: DevIssuer, tls: TlsFiles, appliance: Appliance) -> None:
    key, csr = csr_pem()
    response = post(client, id_token(issuer, tls), csr)
    assert response.status_code == 200, response.json
    body = response.json
    assert list(body) == ["certificate", "ca", "identity", "serial", "not_after"]
    cert = x509.load_pem_x509_certificate(body["certificate"].encode())
    assert identity_from_certificate(cert) == alice(issuer)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    appliance.ca.verify_client_chain(cert)
    assert body["ca"].encode() == appliance.ca.certificate_pem
    assert body["identity"] == {"subject": "alice", "kind": "person", "groups": ["dba", "payments-ro"],
                                "email": "alice@example.test", "issuer": issuer.url,
                                "uri": "tollgate:identity:person:alice"}
    assert body["serial"] == f"{cert.serial_number:032X}"
    assert body["not_after"] == not_valid_after(cert).strftime("%Y-%m-%dT%H:%M:%SZ")
    lifetime = not_valid_after(cert) - not_valid_before(cert)
    assert lifetime == timedelta(hours=8, minutes=1)  # client_cert_hours, plus the CA's one-minute backdate
    assert response.headers["Cache-Control"] == "no-store"


def test_agent_client_credentials_token_gets_an_agent_certificate(client: FlaskClient, issuer: DevIssuer,
                                                                  tls: TlsFiles) -> None:
    response = post(client, client_credentials_token(issuer, tls))
    assert response.status_code == 200, response.json
    cert = x509.load_pem_x509_certificate(response.json["certificate"].encode())
    assert identity_from_certificate(cert) == agent(issuer)
    assert response.json["identity"]["kind"] == "agent"


def test_token_as_bearer_header_works_too(client: FlaskClient, issuer: DevIssuer, tls: TlsFiles) -> None:
    token = client_credentials_token(issuer, tls)
    response = client.post("/v1/enroll", json={"csr": csr_pem()[1]}, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.json


def test_csr_naming_the_requester_itself_is_accepted(client: FlaskClient, issuer: DevIssuer, tls: TlsFiles) -> None:
    _, csr = csr_pem(cn="alice", sans=[x509.UniformResourceIdentifier("tollgate:identity:person:alice")])
    assert post(client, id_token(issuer, tls), csr).status_code == 200


def test_issued_certificate_is_recorded_in_the_registry(client: FlaskClient, issuer: DevIssuer, tls: TlsFiles,
                                                        appliance: Appliance) -> None:
    response = post(client, client_credentials_token(issuer, tls))
    cert = x509.load_pem_x509_certificate(response.json["certificate"].encode())
    registry = appliance.registry()  # a separate connection: it is really in the database
    try:
        record = registry.get(cert.serial_number)
    finally:
        registry.close()
    assert record is not None
    assert record.identity == agent(issuer)
    assert record.fingerprint == fingerprint(cert)
    assert record.serial_hex == response.json["serial"]
    assert record.status() == "valid"


def test_ca_pem_and_healthz(client: FlaskClient, appliance: Appliance) -> None:
    response = client.get("/v1/ca.pem")
    assert response.status_code == 200
    assert response.data == appliance.ca.certificate_pem
    assert response.mimetype == "application/x-pem-file"
    assert client.get("/healthz").json == {"status": "ok"}


# --- 403: the CSR claims someone else -----------------------------------------------------

@pytest.mark.parametrize("claim, reason", [
    ({"cn": "bob"}, "CSR subject claims CN='bob', but the requester is authenticated as 'alice'"),
    ({"sans": [x509.UniformResourceIdentifier("tollgate:identity:person:bob")]},
     ("CSR requests subjectAltName URI:tollgate:identity:person:bob, which is not the requester's identity "
      "(tollgate:identity:person:alice)")),
    ({"sans": [x509.RFC822Name("bob@example.test")]},
     ("CSR requests subjectAltName email:bob@example.test, which is not the requester's identity "
      "(tollgate:identity:person:alice)")),
], ids=["cn", "uri-san", "email-san"])
def test_csr_claiming_another_identity_is_refused_403(client: FlaskClient, issuer: DevIssuer, tls: TlsFiles,
                                                      appliance: Appliance, claim: dict[str, Any],
                                                      reason: str) -> None:
    _, csr = csr_pem(**claim)
    response = post(client, id_token(issuer, tls), csr)
    assert response.status_code == 403
    assert response.json == {"error": "csr_identity_mismatch", "detail": reason}
    registry = appliance.registry()
    try:
        assert registry.list(include_expired=True) == []
    finally:
        registry.close()


# --- 401: the token is refused --------------------------------------------------------------

def _tampered(issuer: DevIssuer) -> str:
    head, body, signature = issuer.mint(issuer.base_claims("alice", email="alice@example.test")).split(".")
    middle = len(signature) // 2  # not the last character: its low bits may be padding
    return f"{head}.{body}.{signature[:middle]}{'A' if signature[middle] != 'A' else 'B'}{signature[middle + 1:]}"


BAD_TOKENS: dict[str, tuple[Callable[[DevIssuer], str], Callable[[DevIssuer], str]]] = {
    "alg-none": (lambda i: i.mint(i.base_claims("alice"), alg="none"),
                 lambda i: "algorithm 'none' is not allowed (only RS256, ES256, EdDSA)"),
    "hs256-with-public-key": (lambda i: i.mint(i.base_claims("alice"), alg="HS256", key=i.public_pem()),
                              lambda i: "algorithm 'HS256' is not allowed (only RS256, ES256, EdDSA)"),
    "wrong-audience": (lambda i: i.mint(i.base_claims("alice", aud="billing")),
                       lambda i: f"audience mismatch: expected '{AUDIENCE}', got 'billing'"),
    "wrong-issuer": (lambda i: i.mint(i.base_claims("alice", iss="https://evil.example")),
                     lambda i: f"issuer mismatch: expected {i.url!r}, got 'https://evil.example'"),
    "expired": (lambda i: i.mint(i.base_claims("alice", ttl=-3600)), lambda i: "token expired at "),
    "unknown-kid": (lambda i: i.mint(i.base_claims("alice"), kid="no-such-kid"),
                    lambda i: "signing key 'no-such-kid' is not in the issuer's JWKS (refreshed at "),
    "tampered-signature": (_tampered, lambda i: "signature verification failed"),
}


@pytest.mark.parametrize("case", list(BAD_TOKENS))
def test_refused_token_is_401_with_the_reason(client: FlaskClient, issuer: DevIssuer, case: str) -> None:
    make_token, reason = BAD_TOKENS[case]
    response = post(client, make_token(issuer))
    assert response.status_code == 401
    assert response.json["error"] == "invalid_token"
    assert response.json["detail"].startswith(reason(issuer))
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="tollgate-enroll", error="invalid_token", error_description="')
    assert reason(issuer)[:20] in challenge


def test_missing_token_is_401(client: FlaskClient) -> None:
    response = client.post("/v1/enroll", json={"csr": csr_pem()[1]})
    assert response.status_code == 401
    assert response.json["error"] == "missing_token"
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="tollgate-enroll"'


def test_tokens_never_reach_the_logs(client: FlaskClient, issuer: DevIssuer, tls: TlsFiles,
                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    good, bad = client_credentials_token(issuer, tls), issuer.mint(issuer.base_claims("alice", aud="billing"))
    assert post(client, good).status_code == 200
    assert post(client, bad).status_code == 401
    assert "enrolled tollgate:identity:agent:agent-ci" in caplog.text
    assert "audience mismatch" in caplog.text
    for token in (good, bad):
        assert token.split(".")[2] not in caplog.text


def test_unreachable_issuer_is_503(tmp_path: Path, tls: TlsFiles) -> None:
    gone = start_issuer(tls)
    gone.stop()  # its port is now closed: discovery fails with connection refused
    appliance = make_appliance(tmp_path, gone.url, tls.ca_file)
    app = create_app(appliance.config())
    try:
        response = post(app.test_client(), gone.mint(gone.base_claims("alice")))
    finally:
        app.extensions["tollgate.enroll"].close()
    assert response.status_code == 503
    assert response.json["error"] == "issuer_unavailable"
    assert response.json["detail"].startswith("cannot check the token right now: could not fetch the issuer's "
                                              "discovery document from ")
    assert response.headers["Retry-After"] == "30"


# --- 403: revoked identities and used tokens stay refused ------------------------------------

def _serials(appliance: Appliance) -> list[str]:
    registry = appliance.registry()
    try:
        return [r.serial_hex for r in registry.list(include_expired=True)]
    finally:
        registry.close()


def test_a_token_enrolls_one_certificate_only(client: FlaskClient, issuer: DevIssuer, tls: TlsFiles,
                                              appliance: Appliance) -> None:
    token = client_credentials_token(issuer, tls)
    first = post(client, token)
    assert first.status_code == 200, first.json
    again = post(client, token)  # a fresh key and CSR: still the same token
    assert again.status_code == 403
    assert again.json["error"] == "token_already_used"
    assert again.json["detail"].startswith("this token (jti '")
    assert "was already used to enroll a certificate, at " in again.json["detail"]
    assert again.json["detail"].endswith("get a new token from the identity provider")
    assert _serials(appliance) == [first.json["serial"]]
    assert post(client, client_credentials_token(issuer, tls)).status_code == 200  # a new token is fine


def test_a_token_is_spent_for_every_worker(appliance: Appliance, issuer: DevIssuer, tls: TlsFiles) -> None:
    # Two apps on one state directory: two gunicorn workers, each with its own registry connection.
    apps = [create_app(appliance.config()), create_app(appliance.config())]
    try:
        token = id_token(issuer, tls)
        assert post(apps[0].test_client(), token).status_code == 200
        response = post(apps[1].test_client(), token)
        assert (response.status_code, response.json["error"]) == (403, "token_already_used")
    finally:
        for app in apps:
            app.extensions["tollgate.enroll"].close()
    assert len(_serials(appliance)) == 1


@pytest.mark.parametrize("jti", [None, "", "  "], ids=["missing", "empty", "blank"])
def test_a_token_without_jti_is_refused(client: FlaskClient, issuer: DevIssuer, appliance: Appliance,
                                        jti: Any) -> None:
    claims = issuer.base_claims("alice", email="alice@example.test")
    if jti is None:
        del claims["jti"]
    else:
        claims["jti"] = jti
    response = post(client, issuer.mint(claims))
    assert response.status_code == 401
    assert response.json["error"] == "invalid_token"
    assert response.json["detail"].startswith("the token has no 'jti' claim (a non-empty string)")
    assert _serials(appliance) == []


def test_a_revoked_identity_cannot_enroll_until_reinstated(client: FlaskClient, issuer: DevIssuer, tls: TlsFiles,
                                                          appliance: Appliance) -> None:
    enrolled = post(client, client_credentials_token(issuer, tls))
    assert enrolled.status_code == 200
    registry = appliance.registry()  # the operator's CLI: another connection to the same file
    try:
        registry.revoke_subject("agent-ci", "client secret leaked", "ops")
        token = client_credentials_token(issuer, tls)
        refused = post(client, token)
        assert refused.status_code == 403
        assert refused.json["error"] == "identity_revoked"
        detail = refused.json["detail"]
        assert detail.startswith("identity 'agent-ci' was revoked at ")
        assert detail.endswith(" by ops: client secret leaked; it cannot enroll until an operator reinstates it "
                               "(tollgate certs reinstate --subject agent-ci)")
        assert post(client, id_token(issuer, tls)).status_code == 200  # alice is not affected
        assert len(_serials(appliance)) == 2

        registry.reinstate_subject("agent-ci", "secret rotated", "ops")
        reinstated = post(client, token)  # the refused token was not spent
        assert reinstated.status_code == 200, reinstated.json
        assert registry.is_revoked(int(enrolled.json["serial"], 16))
        assert not registry.is_revoked(int(reinstated.json["serial"], 16))
    finally:
        registry.close()


# --- 400 and 413: requests we can't read ----------------------------------------------------

@pytest.mark.parametrize("body, detail", [
    ({"csr": "-----BEGIN CERTIFICATE REQUEST-----\nbm90IGEgY3Ny\n-----END CERTIFICATE REQUEST-----\n"},
     "'csr' is not a PEM certificate signing request: "),
    ({"csr": "hello"}, "'csr' is not a PEM certificate signing request: "),
    ({"csr": 42}, "'csr' must be a string (PEM), not int"),
    ({}, "'csr' is required"),
], ids=["bad-der", "not-pem", "not-a-string", "missing"])
def test_malformed_csr_is_400(client: FlaskClient, issuer: DevIssuer, tls: TlsFiles, body: dict[str, Any],
                              detail: str) -> None:
    response = client.post("/v1/enroll", json={"token": client_credentials_token(issuer, tls), **body})
    assert response.status_code == 400
    assert response.json["error"] == "bad_request"
    assert response.json["detail"].startswith(detail)


def test_csr_with_a_broken_signature_is_400(client: FlaskClient, issuer: DevIssuer, tls: TlsFiles) -> None:
    der = bytearray(x509.load_pem_x509_csr(make_csr(ec_key())).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the signature's s value: still well-formed DER, no longer a valid signature
    pem = "-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(bytes(der)).decode() \
        + "-----END CERTIFICATE REQUEST-----\n"
    response = post(client, client_credentials_token(issuer, tls), pem)
    assert response.status_code == 400
    assert response.json["detail"] == ("the CSR's signature is invalid: it was altered or not signed by "
                                       "its key's owner")


@pytest.mark.parametrize("data, detail", [
    (b"{not json", "the request body is not JSON: "),
    (b"[1, 2]", "the request body must be a JSON object, not list"),
])
def test_malformed_json_is_400(client: FlaskClient, data: bytes, detail: str) -> None:
    response = client.post("/v1/enroll", data=data, content_type="application/json")
    assert response.status_code == 400
    assert response.json["detail"].startswith(detail)


def test_oversized_body_is_413(client: FlaskClient) -> None:
    response = client.post("/v1/enroll", data=b'{"csr": "' + b"A" * MAX_REQUEST_BYTES + b'"}',
                           content_type="application/json")
    assert response.status_code == 413
    assert response.json == {"error": "request_too_large",
                             "detail": f"the request body is larger than {MAX_REQUEST_BYTES} bytes"}


def test_unknown_path_and_method_are_json_errors(client: FlaskClient) -> None:
    assert client.get("/nope").json["error"] == "not_found"
    response = client.get("/v1/enroll")
    assert response.status_code == 405
    assert response.json["error"] == "method_not_allowed"
    assert "POST" in response.headers["Allow"]


# --- the factory ----------------------------------------------------------------------------

def test_factory_refuses_a_config_without_oidc(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text('[identity]\nstate_dir = "state"\n')
    with pytest.raises(ConfigError, match=r"identity\.oidc: enrollment needs an OIDC issuer"):
        create_app(load_config(path))
