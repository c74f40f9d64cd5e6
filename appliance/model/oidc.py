"""How to trust one OpenID Connect issuer, and read identities out of its tokens: the
``[identity.oidc]`` settings, validated on construction.

The configuration builds these and the identity layer uses them; the checks live with the
data so a bad setting is refused where it is read, naming the setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

Kind = Literal["person", "agent"]

# Which header `alg` a key may verify, by JWK key type (and curve for EC/OKP).
RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
EC_ALGS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512", "secp256k1": "ES256K"}
ASYMMETRIC_ALGS = RSA_ALGS | frozenset(EC_ALGS.values()) | {"EdDSA"}
# The claims that tell an agent's token from a person's (appliance.identity.oidc reads them).
AGENT_SIGNALS = ("gty", "sub_is_client", "idtyp_app", "no_email")
PERSON_SIGNALS = ("nonce", "auth_time", "email")


@dataclass(frozen=True)
class OIDCSettings:
    """How to trust one issuer and how to read identities out of its tokens."""

    issuer: str
    audience: str
    algorithms: tuple[str, ...] = ("RS256", "ES256", "EdDSA")
    ca_file: Path | None = None
    subject_claim: str = "sub"
    email_claim: str = "email"
    groups_claim: str = "groups"
    kind_claim: str | None = None
    agent_when: tuple[str, ...] = ("gty", "sub_is_client", "idtyp_app")
    person_when: tuple[str, ...] = ("nonce", "auth_time", "email")
    default_kind: Kind | None = None
    leeway_seconds: float = 30
    jwks_min_refresh_seconds: float = 30
    jwks_max_age_seconds: float = 3600
    http_timeout: float = 5

    def __post_init__(self) -> None:
        url = urlsplit(self.issuer)
        if url.scheme != "https" or not url.hostname:
            raise ValueError(f"issuer {self.issuer!r} must be an https:// URL")
        if url.query or url.fragment:
            raise ValueError(f"issuer {self.issuer!r} must not have a query or fragment")
        if not self.audience:
            raise ValueError("audience is empty")
        algorithms = tuple(self.algorithms)
        if not algorithms:
            raise ValueError("algorithms is empty: no token could ever be verified")
        for alg in algorithms:
            if alg.lower() == "none":
                raise ValueError("algorithm 'none' is never allowed: it means an unsigned token")
            if alg.upper().startswith("HS"):
                raise ValueError(f"algorithm {alg!r} is not allowed: HMAC verified with a public key "
                                 "lets anyone who has the key forge tokens")
            if alg not in ASYMMETRIC_ALGS:
                raise ValueError(f"algorithm {alg!r} is unknown (known: {', '.join(sorted(ASYMMETRIC_ALGS))})")
        object.__setattr__(self, "algorithms", algorithms)
        if self.ca_file is not None:
            object.__setattr__(self, "ca_file", Path(self.ca_file))
        for name in ("subject_claim", "email_claim", "groups_claim"):
            if not getattr(self, name):
                raise ValueError(f"{name} is empty")
        for signal in self.agent_when:
            if signal not in AGENT_SIGNALS:
                raise ValueError(f"agent_when: unknown signal {signal!r} (known: {', '.join(AGENT_SIGNALS)})")
        for signal in self.person_when:
            if signal not in PERSON_SIGNALS:
                raise ValueError(f"person_when: unknown signal {signal!r} (known: {', '.join(PERSON_SIGNALS)})")
        if self.default_kind not in (None, "person", "agent"):
            raise ValueError(f"default_kind must be 'person', 'agent' or unset, not {self.default_kind!r}")
        for name in ("leeway_seconds", "jwks_min_refresh_seconds", "jwks_max_age_seconds", "http_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
