"""OIDC token validation: turns a token from the identity provider into an :class:`Identity`.

People enroll with an ID token, non-human agents with a client-credentials access token.
:class:`OIDCValidator` checks either against the issuer's discovery document and JWKS with
PyJWT; :func:`identity_from_claims` maps the verified claims to an Identity as configured.

What a token must pass, in order (each failure is a :class:`TokenError` with a precise,
human message; the token itself is never logged nor echoed):

1. its header ``alg`` is on the allow-list (never ``none``, never HMAC: the allow-list
   cannot hold them) and matches the type of the key its ``kid`` names — so a public key
   never reaches PyJWT as an HMAC secret;
2. the key is in the issuer's JWKS. An unknown ``kid`` triggers one JWKS refresh, at most
   once per ``jwks_min_refresh_seconds`` whatever the traffic (a stream of junk kids must
   not turn us into a flood against the issuer); the whole JWKS is also refetched once it
   is older than ``jwks_max_age_seconds``, so a key the issuer withdraws stops working;
3. the signature, then ``iss`` (exactly the configured issuer) and ``aud``, with ``exp``,
   ``iat``, ``iss``, ``aud`` and ``sub`` required;
4. ``exp``, ``nbf`` (if present) and ``iat`` against our clock, with ``leeway_seconds``.

Person or agent (:func:`token_kind`), first rule that applies:

- ``kind_claim`` set: that claim (a dotted path) must be ``"person"`` or ``"agent"``;
- an ``agent_when`` signal fires → agent. Signals: ``gty`` (``gty`` is
  ``client-credentials``, Auth0), ``sub_is_client`` (``client_id`` or ``azp`` equals
  ``sub``: a client acting as itself — Okta, RFC 9068, the dev issuer), ``idtyp_app``
  (``idtyp`` is ``app``, Entra ID), ``no_email`` (no email claim; off by default);
- a ``person_when`` signal fires → person. Signals: ``nonce``, ``auth_time`` (only ID
  tokens from an interactive login carry them), ``email``;
- both or neither fire → ``default_kind`` if configured, else the token is refused: an
  identity we can't classify must not get either kind's policy by accident.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt

from appliance.model.identity import Identity, IdentityError
from appliance.model.oidc import (
    AGENT_SIGNALS,
    EC_ALGS,
    PERSON_SIGNALS,
    RSA_ALGS,
    Kind,
    OIDCSettings,
)

log = logging.getLogger(__name__)

Claims = dict[str, Any]
Fetch = Callable[[str], tuple[int, bytes]]

_OKP_CURVES = frozenset({"Ed25519", "Ed448"})

_AGENT_SIGNALS: dict[str, Callable[[Mapping[str, Any], OIDCSettings], bool]] = {
    "gty": lambda c, s: c.get("gty") == "client-credentials",
    "sub_is_client": lambda c, s: c.get("sub") is not None
    and c.get("sub") in (c.get("client_id"), c.get("azp")),
    "idtyp_app": lambda c, s: c.get("idtyp") == "app",
    "no_email": lambda c, s: _claim_at(c, s.email_claim) is None,
}
_PERSON_SIGNALS: dict[str, Callable[[Mapping[str, Any], OIDCSettings], bool]] = {
    "nonce": lambda c, s: "nonce" in c,
    "auth_time": lambda c, s: "auth_time" in c,
    "email": lambda c, s: _claim_at(c, s.email_claim) is not None,
}
# The settings check names against the model's lists; the two must say the same.
assert set(_AGENT_SIGNALS) == set(AGENT_SIGNALS) and set(_PERSON_SIGNALS) == set(PERSON_SIGNALS)

MAX_DOCUMENT_BYTES = 1 << 20


class TokenError(Exception):
    """A token refused, with the reason phrased for a human (never containing the token)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class IssuerError(TokenError):
    """The issuer's discovery document or JWKS could not be fetched or is wrong."""


def https_fetch(ca_file: Path | None = None, timeout: float = 5) -> Fetch:
    """An HTTPS GET returning ``(status, body)``: certificate verified, no redirects, size-capped.

    Redirects are not followed so a compromised or misconfigured endpoint can't send us to
    plain HTTP or elsewhere; the issuer's URLs must be the real ones.
    """
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), NoRedirect)

    def fetch(url: str) -> tuple[int, bytes]:
        if urlsplit(url).scheme != "https":
            raise OSError(f"refusing to fetch {url!r}: not https")
        request = urllib.request.Request(url, headers={"Accept": "application/json"})
        try:
            with opener.open(request, timeout=timeout) as response:
                return response.status, response.read(MAX_DOCUMENT_BYTES + 1)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(MAX_DOCUMENT_BYTES + 1)

    return fetch


def _utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _claim_at(claims: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted path (``realm_access.roles``), or None if any step is missing."""
    if path in claims:  # a claim may itself contain dots (URL-named claims)
        return claims[path]
    value: Any = claims
    for step in path.split("."):
        if not isinstance(value, Mapping) or step not in value:
            return None
        value = value[step]
    return value


def _key_algorithms(jwk: Mapping[str, Any]) -> frozenset[str]:
    """The header algorithms a public JWK may verify; empty for anything not a public key."""
    kty = jwk.get("kty")
    if kty == "RSA":
        algs = RSA_ALGS
    elif kty == "EC" and jwk.get("crv") in EC_ALGS:
        algs = frozenset({EC_ALGS[jwk["crv"]]})
    elif kty == "OKP" and jwk.get("crv") in _OKP_CURVES:
        algs = frozenset({"EdDSA"})
    else:
        # "oct" (a symmetric secret) above all: it has no business in a public JWKS.
        return frozenset()
    if "alg" in jwk:
        return algs & {jwk["alg"]}
    return algs


@dataclass(frozen=True)
class _Key:
    kid: str | None
    algorithms: frozenset[str]
    key: Any
    kty: str


class OIDCValidator:
    """Validates tokens from one issuer; keys cached, refreshed on rotation. Thread-safe."""

    def __init__(self, settings: OIDCSettings, fetch: Fetch | None = None,
                 now: Callable[[], float] = time.time):
        self.settings = settings
        self._fetch = fetch or https_fetch(settings.ca_file, settings.http_timeout)
        self._now = now
        self._lock = threading.Lock()
        self._jwks_uri: str | None = None
        self._keys: dict[str | None, _Key] = {}
        self._jwks_fetched_at: float | None = None  # last successful fetch
        self._jwks_tried_at: float | None = None  # last attempt, successful or not
        self._discovery_failed: tuple[float, IssuerError] | None = None
        self._last_error: IssuerError | None = None  # why the last refresh failed, if it did

    # --- public ----------------------------------------------------------------------

    def validate(self, token: str) -> Claims:
        """The verified claims of ``token``, or :class:`TokenError` saying why not."""
        s = self.settings
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise TokenError(f"malformed token: {exc}") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in s.algorithms:
            raise TokenError(f"algorithm {alg!r} is not allowed (only {', '.join(s.algorithms)})")
        if header.get("crit"):
            raise TokenError("token marks header extensions critical (crit), which are not supported")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenError(f"token header 'kid' must be a string, not {type(kid).__name__}")
        key = self._key_for(kid)
        if alg not in key.algorithms:
            raise TokenError(f"algorithm {alg!r} does not match signing key {kid!r} "
                             f"({key.kty} key, verifies only {', '.join(sorted(key.algorithms))})")
        try:
            claims = jwt.decode(
                token, key.key, algorithms=[alg], audience=s.audience, issuer=s.issuer,
                # Time claims are checked below against our (injectable) clock.
                options={"require": ["exp", "iat", "iss", "aud", "sub"],
                         "verify_exp": False, "verify_nbf": False, "verify_iat": False},
            )
        except jwt.InvalidSignatureError:
            raise TokenError("signature verification failed") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenError(f"token has no {exc.claim!r} claim") from None
        except jwt.InvalidIssuerError:
            # PyJWT checks claims only after the signature, so these claims are authentic.
            got = self._unverified(token).get("iss")
            raise TokenError(f"issuer mismatch: expected {s.issuer!r}, got {got!r}") from None
        except jwt.InvalidAudienceError:
            got = self._unverified(token).get("aud")
            raise TokenError(f"audience mismatch: expected {s.audience!r}, got {got!r}") from None
        except jwt.DecodeError as exc:
            raise TokenError(f"malformed token: {exc}") from None
        except jwt.PyJWTError as exc:
            raise TokenError(f"token rejected: {exc}") from None
        self._check_times(claims)
        return claims

    # --- time claims -----------------------------------------------------------------

    def _check_times(self, claims: Claims) -> None:
        now, leeway = self._now(), self.settings.leeway_seconds
        for name in ("exp", "iat", "nbf"):
            if name in claims and (isinstance(claims[name], bool)
                                   or not isinstance(claims[name], (int, float))):
                raise TokenError(f"claim {name!r} must be a number (seconds since the epoch)")
        if claims["exp"] <= now - leeway:
            raise TokenError(f"token expired at {_utc(claims['exp'])} (now {_utc(now)})")
        if "nbf" in claims and claims["nbf"] > now + leeway:
            raise TokenError(f"token is not valid before {_utc(claims['nbf'])} (now {_utc(now)})")
        if claims["iat"] > now + leeway:
            raise TokenError(f"token issued in the future, at {_utc(claims['iat'])} (now {_utc(now)})")

    @staticmethod
    def _unverified(token: str) -> Claims:
        return jwt.decode(token, options={"verify_signature": False})

    # --- keys ------------------------------------------------------------------------

    def _key_for(self, kid: str | None) -> _Key:
        now = self._now()
        stale = (self._jwks_fetched_at is None
                 or now - self._jwks_fetched_at >= self.settings.jwks_max_age_seconds)
        key = self._lookup(kid)
        if key is not None and not stale:
            return key
        with self._lock:
            # Another thread may have refreshed while we waited for the lock.
            key = self._lookup(kid)
            fresh = (self._jwks_fetched_at is not None
                     and self._now() - self._jwks_fetched_at < self.settings.jwks_max_age_seconds)
            if (key is None or not fresh) and self._may_refresh():
                try:
                    self._refresh_jwks()
                    self._last_error = None
                except IssuerError as exc:
                    self._last_error = exc
                    # Keep serving the keys we have if the issuer is briefly unreachable;
                    # with none at all there is nothing to fall back on.
                    if not self._keys:
                        raise
                    log.warning("JWKS refresh failed; still using keys fetched at %s",
                                _utc(self._jwks_fetched_at or 0))
                key = self._lookup(kid)
        if key is None:
            if not self._keys and self._last_error is not None:
                raise self._last_error  # rate-limited retry: say why there are no keys
            if kid is None:
                raise TokenError(f"token header has no 'kid' and the issuer publishes {len(self._keys)} keys")
            when = _utc(self._jwks_fetched_at) if self._jwks_fetched_at is not None else "never"
            raise TokenError(f"signing key {kid!r} is not in the issuer's JWKS (refreshed at {when})")
        return key

    def _lookup(self, kid: str | None) -> _Key | None:
        keys = self._keys  # one read: a refresh swaps the whole dict
        if kid is None:
            return next(iter(keys.values())) if len(keys) == 1 else None
        return keys.get(kid)

    def _may_refresh(self) -> bool:
        tried = self._jwks_tried_at
        return tried is None or self._now() - tried >= self.settings.jwks_min_refresh_seconds

    def _get_json(self, what: str, url: str) -> dict[str, Any]:
        try:
            status, body = self._fetch(url)
        except (OSError, ValueError) as exc:
            raise IssuerError(f"could not fetch the issuer's {what} from {url}: {exc}") from None
        if status != 200:
            raise IssuerError(f"could not fetch the issuer's {what} from {url}: HTTP {status}")
        if len(body) > MAX_DOCUMENT_BYTES:
            raise IssuerError(f"the issuer's {what} at {url} is larger than {MAX_DOCUMENT_BYTES} bytes")
        try:
            document = json.loads(body)
        except ValueError as exc:
            raise IssuerError(f"the issuer's {what} at {url} is not JSON: {exc}") from None
        if not isinstance(document, dict):
            raise IssuerError(f"the issuer's {what} at {url} is not a JSON object")
        return document

    def _discover(self) -> str:
        """The JWKS URI from the discovery document (fetched once, retried rate-limited)."""
        if self._jwks_uri is not None:
            return self._jwks_uri
        if self._discovery_failed is not None:
            at, error = self._discovery_failed
            if self._now() - at < self.settings.jwks_min_refresh_seconds:
                raise error
        try:
            self._jwks_uri = self._fetch_discovery()
        except IssuerError as exc:
            self._discovery_failed = (self._now(), exc)
            raise
        return self._jwks_uri

    def _fetch_discovery(self) -> str:
        issuer = self.settings.issuer
        url = issuer.rstrip("/") + "/.well-known/openid-configuration"
        document = self._get_json("discovery document", url)
        # OIDC Discovery §4.3: the document must name exactly the issuer we asked, or a
        # document served from one place could vouch for keys of another.
        if document.get("issuer") != issuer:
            raise IssuerError(f"discovery document at {url} names issuer {document.get('issuer')!r}, "
                              f"expected {issuer!r}")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or urlsplit(jwks_uri).scheme != "https":
            raise IssuerError(f"discovery document at {url} has no https jwks_uri (got {jwks_uri!r})")
        return jwks_uri

    def _refresh_jwks(self) -> None:
        """Fetch the JWKS and replace the key cache. Call with the lock held."""
        jwks_uri = self._discover()
        self._jwks_tried_at = self._now()
        document = self._get_json("JWKS", jwks_uri)
        if not isinstance(document.get("keys"), list):
            raise IssuerError(f"the issuer's JWKS at {jwks_uri} has no 'keys' list")
        keys: dict[str | None, _Key] = {}
        for jwk in document["keys"]:
            key = self._parse_jwk(jwk)
            if key is not None:
                keys[key.kid] = key
        self._keys = keys
        self._jwks_fetched_at = self._now()
        log.info("fetched JWKS from %s: %d usable keys (%s)", jwks_uri, len(keys),
                 ", ".join(str(k) for k in keys))

    @staticmethod
    def _parse_jwk(jwk: Any) -> _Key | None:
        if not isinstance(jwk, dict):
            return None
        kid = jwk.get("kid")
        if jwk.get("use", "sig") != "sig" or (kid is not None and not isinstance(kid, str)):
            return None
        algorithms = _key_algorithms(jwk)
        if not algorithms:
            log.warning("ignoring JWKS key %r: not a public signing key we support (kty %r)",
                        kid, jwk.get("kty"))
            return None
        try:
            key = jwt.PyJWK(jwk).key
        except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
            log.warning("ignoring JWKS key %r: %s", kid, exc)
            return None
        if hasattr(key, "private_bytes"):
            # A private key published by mistake: verifying with it would work, but
            # trusting an issuer that leaks its signing key would not.
            log.warning("ignoring JWKS key %r: it is a private key", kid)
            return None
        return _Key(kid, algorithms, key, jwk["kty"])


# --- claims → identity -------------------------------------------------------------------

def token_kind(claims: Mapping[str, Any], settings: OIDCSettings) -> Kind:
    """Person or agent, by the rule in the module docstring."""
    if settings.kind_claim is not None:
        value = _claim_at(claims, settings.kind_claim)
        if value not in ("person", "agent"):
            raise TokenError(f"claim {settings.kind_claim!r} must be 'person' or 'agent', got {value!r}")
        return value
    agent = [name for name in settings.agent_when if _AGENT_SIGNALS[name](claims, settings)]
    person = [name for name in settings.person_when if _PERSON_SIGNALS[name](claims, settings)]
    if agent and not person:
        return "agent"
    if person and not agent:
        return "person"
    if settings.default_kind is not None:
        return settings.default_kind
    if agent and person:
        raise TokenError(f"token looks like both an agent's ({', '.join(agent)}) and a person's "
                         f"({', '.join(person)}); set kind_claim or default_kind")
    raise TokenError("cannot tell whether the token names a person or an agent "
                     f"(none of {', '.join(settings.agent_when + settings.person_when)} applies); "
                     "set kind_claim, agent_when/person_when or default_kind")


def _groups(claims: Mapping[str, Any], path: str) -> tuple[str, ...]:
    value = _claim_at(claims, path)
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(group, str) for group in value):
        return tuple(value)
    raise TokenError(f"claim {path!r} must be a list of strings or a string, got {type(value).__name__}")


def identity_from_claims(claims: Mapping[str, Any], settings: OIDCSettings) -> Identity:
    """The Identity verified claims describe (subjects are issuer-local: the issuer is kept)."""
    subject = _claim_at(claims, settings.subject_claim)
    if not isinstance(subject, str) or not subject:
        raise TokenError(f"claim {settings.subject_claim!r} (the subject) must be a non-empty string, "
                         f"got {subject!r}")
    email = _claim_at(claims, settings.email_claim)
    if email is not None and not isinstance(email, str):
        raise TokenError(f"claim {settings.email_claim!r} must be a string, got {type(email).__name__}")
    # An address the provider says it has not verified is whatever the user typed in.
    if claims.get("email_verified") is False:
        email = None
    try:
        return Identity(subject=subject, kind=token_kind(claims, settings),
                        groups=_groups(claims, settings.groups_claim), email=email or None,
                        issuer=claims.get("iss"))
    except IdentityError as exc:
        raise TokenError(f"token does not describe a valid identity: {exc}") from None
