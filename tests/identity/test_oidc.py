"""OIDC validation against a real dev issuer over HTTPS: what is accepted, and every refusal."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from appliance.identity.oidc import (
    IssuerError,
    OIDCValidator,
    TokenError,
    https_fetch,
    identity_from_claims,
    token_kind,
)
from appliance.lab.oidc_issuer import DevClient, DevIssuer, DevUser
from appliance.model.identity import Identity
from appliance.model.oidc import OIDCSettings
from tests.identity.dev_flows import AUDIENCE, REDIRECT, client_credentials_token, id_token
from tests.identity.tls_helpers import TlsFiles, make_tls_files

CLIENTS = {
    AUDIENCE: DevClient(secret="tollgate-secret", redirect_uris=(REDIRECT,)),
    "agent-ci": DevClient(secret="ci-secret", groups=("ci", "payments-ro")),
}
USERS = {"alice": DevUser(email="alice@example.test", groups=("dba", "payments-ro"), name="Alice")}
UTC_TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC")


class Clock:
    """The validator's clock, moved by hand: time-based cases without sleeping."""

    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class FetchSpy:
    """The real HTTPS fetch, recording each URL it gets."""

    def __init__(self, ca_file: Path) -> None:
        self.fetch = https_fetch(ca_file, timeout=60)  # a safety net against a hang, not a bound
        self.urls: list[str] = []

    def __call__(self, url: str) -> tuple[int, bytes]:
        self.urls.append(url)
        return self.fetch(url)

    @property
    def jwks_fetches(self) -> int:
        return sum(url.endswith("/jwks") for url in self.urls)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def start_issuer(tls: TlsFiles, **kwargs: Any) -> DevIssuer:
    return DevIssuer(("127.0.0.1", 0), tls_cert=tls.cert_file, tls_key=tls.key_file, audience=AUDIENCE,
                     clients=CLIENTS, users=USERS, **kwargs).start()


@pytest.fixture
def issuer(tls: TlsFiles) -> Iterator[DevIssuer]:
    issuer = start_issuer(tls)
    yield issuer
    issuer.stop()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def spy(tls: TlsFiles) -> FetchSpy:
    return FetchSpy(tls.ca_file)


def settings_for(issuer: DevIssuer, tls: TlsFiles, **kwargs: Any) -> OIDCSettings:
    return OIDCSettings(issuer=issuer.url, audience=AUDIENCE, ca_file=tls.ca_file, **kwargs)


@pytest.fixture
def validator(issuer: DevIssuer, tls: TlsFiles, spy: FetchSpy, clock: Clock) -> OIDCValidator:
    return OIDCValidator(settings_for(issuer, tls), fetch=spy, now=clock)


def refused(validator: OIDCValidator, token: str) -> str:
    with pytest.raises(TokenError) as caught:
        validator.validate(token)
    return caught.value.reason


# --- accepted ----------------------------------------------------------------------------

def test_person_id_token_with_groups_from_nested_claim_path(tls: TlsFiles, spy: FetchSpy, clock: Clock) -> None:
    issuer = start_issuer(tls, groups_claim="realm_access.roles")
    try:
        settings = settings_for(issuer, tls, groups_claim="realm_access.roles")
        claims = OIDCValidator(settings, fetch=spy, now=clock).validate(id_token(issuer, tls, nonce="abc"))
    finally:
        issuer.stop()
    assert claims["nonce"] == "abc"
    assert identity_from_claims(claims, settings) == Identity(
        subject="alice", kind="person", groups=("dba", "payments-ro"), email="alice@example.test",
        issuer=issuer.url)


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_agent_client_credentials_access_token(tls: TlsFiles, spy: FetchSpy, clock: Clock, alg: str) -> None:
    issuer = start_issuer(tls, alg=alg)
    try:
        settings = settings_for(issuer, tls)
        claims = OIDCValidator(settings, fetch=spy, now=clock).validate(client_credentials_token(issuer, tls))
    finally:
        issuer.stop()
    assert identity_from_claims(claims, settings) == Identity(
        subject="agent-ci", kind="agent", groups=("ci", "payments-ro"), email=None, issuer=issuer.url)


def test_small_clock_skew_is_tolerated(issuer: DevIssuer, validator: OIDCValidator, clock: Clock) -> None:
    token = issuer.mint(issuer.base_claims("alice", ttl=60))
    clock.advance(60 + 20)  # expired 20 s ago by our clock: within the 30 s leeway
    assert validator.validate(token)["sub"] == "alice"


# --- refused: the token itself -----------------------------------------------------------

def test_alg_none_is_refused_without_fetching_anything(issuer: DevIssuer, validator: OIDCValidator,
                                                      spy: FetchSpy) -> None:
    token = issuer.mint(issuer.base_claims("mallory"), alg="none")
    assert token.endswith(".")  # really unsigned
    assert refused(validator, token).startswith("algorithm 'none' is not allowed")
    assert spy.urls == []


def test_hs256_signed_with_the_issuers_public_key_is_refused(issuer: DevIssuer, validator: OIDCValidator) -> None:
    token = issuer.mint(issuer.base_claims("mallory"), alg="HS256", key=issuer.public_pem())
    assert refused(validator, token) == "algorithm 'HS256' is not allowed (only RS256, ES256, EdDSA)"


def test_alg_not_matching_the_keys_type_is_refused(issuer: DevIssuer, validator: OIDCValidator) -> None:
    # Allowed algorithm, real kid, but the kid names an RSA key: never try ES256 with it.
    token = issuer.mint(issuer.base_claims("mallory"), alg="ES256", key=ec.generate_private_key(ec.SECP256R1()))
    assert refused(validator, token).startswith(f"algorithm 'ES256' does not match signing key '{issuer.kid}'")


def test_wrong_audience_is_refused(issuer: DevIssuer, validator: OIDCValidator) -> None:
    token = issuer.mint(issuer.base_claims("alice", aud="billing"))
    assert refused(validator, token) == "audience mismatch: expected 'tollgate', got 'billing'"


def test_wrong_issuer_is_refused(issuer: DevIssuer, validator: OIDCValidator) -> None:
    token = issuer.mint(issuer.base_claims("alice", iss="https://evil.example"))
    assert refused(validator, token) == f"issuer mismatch: expected {issuer.url!r}, got 'https://evil.example'"


def test_expired_token_is_refused(issuer: DevIssuer, validator: OIDCValidator, clock: Clock) -> None:
    token = issuer.mint(issuer.base_claims("alice", ttl=60))
    clock.advance(3600)
    reason = refused(validator, token)
    assert reason.startswith("token expired at ")
    assert UTC_TIME.search(reason)


def test_token_not_yet_valid_is_refused(issuer: DevIssuer, validator: OIDCValidator, clock: Clock) -> None:
    token = issuer.mint(issuer.base_claims("alice", nbf=int(clock()) + 600))
    assert refused(validator, token).startswith("token is not valid before ")


def test_token_issued_in_the_future_is_refused(issuer: DevIssuer, validator: OIDCValidator, clock: Clock) -> None:
    token = issuer.mint(issuer.base_claims("alice", iat=int(clock()) + 600))
    assert refused(validator, token).startswith("token issued in the future")


def test_missing_exp_is_refused(issuer: DevIssuer, validator: OIDCValidator) -> None:
    claims = issuer.base_claims("alice")
    del claims["exp"]
    assert refused(validator, issuer.mint(claims)) == "token has no 'exp' claim"


def test_tampered_signature_is_refused(issuer: DevIssuer, validator: OIDCValidator) -> None:
    head, body, signature = issuer.mint(issuer.base_claims("alice")).split(".")
    middle = len(signature) // 2  # not the last character: its low bits may be padding
    flipped = signature[:middle] + ("A" if signature[middle] != "A" else "B") + signature[middle + 1:]
    assert refused(validator, f"{head}.{body}.{flipped}") == "signature verification failed"


def test_tampered_payload_is_refused(issuer: DevIssuer, validator: OIDCValidator) -> None:
    head, _, signature = issuer.mint(issuer.base_claims("alice")).split(".")
    forged_body = issuer.mint(issuer.base_claims("root")).split(".")[1]
    assert refused(validator, f"{head}.{forged_body}.{signature}") == "signature verification failed"


def test_garbage_is_refused_as_malformed(validator: OIDCValidator) -> None:
    assert refused(validator, "not-a-jwt").startswith("malformed token")


def test_the_token_never_appears_in_logs_or_reasons(issuer: DevIssuer, validator: OIDCValidator, clock: Clock,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    good = issuer.mint(issuer.base_claims("alice"))
    validator.validate(good)
    clock.advance(31)
    unknown = issuer.mint(issuer.base_claims("alice"), kid="nope")
    reason = refused(validator, unknown)
    for token in (good, unknown):
        assert token.split(".")[2] not in caplog.text and token not in reason


# --- keys: unknown kid, refresh, rotation -------------------------------------------------

def test_unknown_kid_is_refused_after_one_jwks_refresh(issuer: DevIssuer, validator: OIDCValidator,
                                                       spy: FetchSpy, clock: Clock) -> None:
    validator.validate(issuer.mint(issuer.base_claims("alice")))
    assert spy.jwks_fetches == 1
    clock.advance(31)
    reason = refused(validator, issuer.mint(issuer.base_claims("alice"), kid="unknown-kid"))
    assert reason.startswith("signing key 'unknown-kid' is not in the issuer's JWKS (refreshed at ")
    assert UTC_TIME.search(reason)
    assert spy.jwks_fetches == 2


def test_jwks_refresh_is_rate_limited(issuer: DevIssuer, validator: OIDCValidator,
                                      spy: FetchSpy, clock: Clock) -> None:
    validator.validate(issuer.mint(issuer.base_claims("alice")))
    clock.advance(31)
    refused(validator, issuer.mint(issuer.base_claims("alice"), kid="junk-1"))
    refused(validator, issuer.mint(issuer.base_claims("alice"), kid="junk-2"))
    assert spy.jwks_fetches == 2  # the first load plus one refresh for both unknown kids
    clock.advance(31)
    refused(validator, issuer.mint(issuer.base_claims("alice"), kid="junk-3"))
    assert spy.jwks_fetches == 3


def test_rotation_is_followed_without_a_new_validator(issuer: DevIssuer, tls: TlsFiles,
                                                      validator: OIDCValidator, clock: Clock) -> None:
    old_token = client_credentials_token(issuer, tls)
    validator.validate(old_token)
    old_kid = issuer.kid
    issuer.rotate()
    assert issuer.kid != old_kid
    clock.advance(31)
    assert validator.validate(client_credentials_token(issuer, tls))["sub"] == "agent-ci"
    assert validator.validate(old_token)["sub"] == "agent-ci"  # still in the JWKS: grace period


def test_dropped_old_key_is_refused_after_rotation(issuer: DevIssuer, tls: TlsFiles,
                                                   validator: OIDCValidator, clock: Clock) -> None:
    old_kid = issuer.kid
    old_token = client_credentials_token(issuer, tls)
    validator.validate(old_token)
    issuer.rotate(drop_old=True)
    clock.advance(31)
    validator.validate(client_credentials_token(issuer, tls))  # unknown kid → refresh
    assert refused(validator, old_token).startswith(f"signing key '{old_kid}' is not in the issuer's JWKS")


def test_withdrawn_key_stops_working_once_the_jwks_is_old(issuer: DevIssuer, validator: OIDCValidator,
                                                           clock: Clock) -> None:
    claims = issuer.base_claims("alice", ttl=7200)
    old_token = issuer.mint(claims)
    validator.validate(old_token)
    issuer.rotate(drop_old=True)
    clock.advance(3600)  # jwks_max_age_seconds: the cache is refetched even for a known kid
    assert "is not in the issuer's JWKS" in refused(validator, old_token)


# --- the issuer's documents ---------------------------------------------------------------

def test_discovery_document_naming_another_issuer_is_refused(issuer: DevIssuer, tls: TlsFiles,
                                                             spy: FetchSpy, clock: Clock) -> None:
    # Same server, reached by another name: its document says 127.0.0.1, not localhost.
    port = urlsplit(issuer.url).port
    settings = OIDCSettings(issuer=f"https://localhost:{port}", audience=AUDIENCE, ca_file=tls.ca_file)
    token = issuer.mint(issuer.base_claims("alice", iss=settings.issuer))
    with pytest.raises(IssuerError) as caught:
        OIDCValidator(settings, fetch=spy, now=clock).validate(token)
    assert f"names issuer {issuer.url!r}, expected 'https://localhost:{port}'" in caught.value.reason
    assert spy.jwks_fetches == 0


def test_issuer_not_trusted_by_the_ca_file_is_refused_and_retried_rate_limited(
        issuer: DevIssuer, tmp_path: Path, clock: Clock) -> None:
    spy = FetchSpy(make_tls_files(tmp_path).ca_file)  # another CA: the issuer's cert is untrusted
    validator = OIDCValidator(OIDCSettings(issuer=issuer.url, audience=AUDIENCE), fetch=spy, now=clock)
    token = issuer.mint(issuer.base_claims("alice"))
    for _ in range(2):
        with pytest.raises(IssuerError, match=r"discovery document.*CERTIFICATE_VERIFY_FAILED"):
            validator.validate(token)
    assert len(spy.urls) == 1
    clock.advance(31)
    with pytest.raises(IssuerError):
        validator.validate(token)
    assert len(spy.urls) == 2


# --- settings and claims → identity -------------------------------------------------------

@pytest.mark.parametrize("kwargs, problem", [
    ({"algorithms": ()}, "algorithms is empty"),
    ({"algorithms": ("RS256", "none")}, "'none' is never allowed"),
    ({"algorithms": ("HS256",)}, "'HS256' is not allowed"),
    ({"algorithms": ("RS1",)}, "'RS1' is unknown"),
    ({"issuer": "http://127.0.0.1:8443"}, "must be an https:// URL"),
    ({"agent_when": ("vibes",)}, "unknown signal 'vibes'"),
])
def test_unsafe_settings_are_refused(kwargs: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        OIDCSettings(**{"issuer": "https://idp.example", "audience": AUDIENCE, **kwargs})


BASE = {"iss": "https://idp.example", "sub": "u1"}
SETTINGS = OIDCSettings(issuer="https://idp.example", audience=AUDIENCE)


def test_a_single_group_string_becomes_one_group() -> None:
    identity = identity_from_claims({**BASE, "nonce": "n", "groups": "dba"}, SETTINGS)
    assert identity.groups == ("dba",)


def test_groups_of_another_shape_are_refused() -> None:
    with pytest.raises(TokenError, match="claim 'groups' must be a list of strings"):
        identity_from_claims({**BASE, "nonce": "n", "groups": {"dba": True}}, SETTINGS)


def test_unverified_email_is_not_taken() -> None:
    claims = {**BASE, "auth_time": 1, "email": "ceo@example.test", "email_verified": False}
    assert identity_from_claims(claims, SETTINGS).email is None


@pytest.mark.parametrize("claims, kind", [
    ({"gty": "client-credentials"}, "agent"),
    ({"azp": "u1"}, "agent"),
    ({"client_id": "u1"}, "agent"),
    ({"idtyp": "app"}, "agent"),
    ({"nonce": "n", "azp": "cli"}, "person"),
    ({"auth_time": 1}, "person"),
    ({"email": "a@example.test"}, "person"),
])
def test_person_or_agent_rule(claims: dict[str, Any], kind: str) -> None:
    assert token_kind({**BASE, **claims}, SETTINGS) == kind


def test_a_token_that_is_neither_or_both_is_refused_unless_a_default_is_set() -> None:
    with pytest.raises(TokenError, match="cannot tell whether the token names a person or an agent"):
        token_kind(BASE, SETTINGS)
    with pytest.raises(TokenError, match="looks like both"):
        token_kind({**BASE, "client_id": "u1", "nonce": "n"}, SETTINGS)
    assert token_kind(BASE, OIDCSettings(issuer="https://idp.example", audience=AUDIENCE,
                                         default_kind="agent")) == "agent"


def test_kind_claim_decides_when_configured() -> None:
    settings = OIDCSettings(issuer="https://idp.example", audience=AUDIENCE, kind_claim="tollgate.kind")
    assert token_kind({**BASE, "nonce": "n", "tollgate": {"kind": "agent"}}, settings) == "agent"
    with pytest.raises(TokenError, match="must be 'person' or 'agent', got 'robot'"):
        token_kind({**BASE, "tollgate": {"kind": "robot"}}, settings)
