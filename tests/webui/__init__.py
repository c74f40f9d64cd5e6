"""Tests of ``webui``, and the helpers they and the ``tollgate enroll`` tests share.

An :class:`Appliance` is a real appliance state directory (CA, registry) plus a config file
trusting a real dev OIDC issuer served over HTTPS on 127.0.0.1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

from appliance.config import Config, load_config
from appliance.identity import CertificateAuthority, Identity
from appliance.lab.oidc_issuer import DevClient, DevIssuer, DevUser
from appliance.state.certificates import CertificateRegistry
from tests.identity.tls_helpers import TlsFiles, https_json, https_request

AUDIENCE = "tollgate"
REDIRECT = "http://127.0.0.1:8765/callback"
AGENT_ID, AGENT_SECRET = "agent-ci", "ci-secret"
CLIENTS = {
    AUDIENCE: DevClient(secret="tollgate-secret", redirect_uris=(REDIRECT,)),
    AGENT_ID: DevClient(secret=AGENT_SECRET, groups=("ci", "payments-ro")),
}
USERS = {"alice": DevUser(email="alice@example.test", groups=("dba", "payments-ro"), name="Alice")}


def start_issuer(tls: TlsFiles) -> DevIssuer:
    return DevIssuer(("127.0.0.1", 0), tls_cert=tls.cert_file, tls_key=tls.key_file, audience=AUDIENCE,
                     clients=CLIENTS, users=USERS).start()


def alice(issuer: DevIssuer) -> Identity:
    return Identity("alice", "person", ("dba", "payments-ro"), "alice@example.test", issuer.url)


def agent(issuer: DevIssuer) -> Identity:
    return Identity(AGENT_ID, "agent", ("ci", "payments-ro"), None, issuer.url)


def client_credentials_token(issuer: DevIssuer, tls: TlsFiles) -> str:
    status, body = https_json(f"{issuer.url}/token", tls.ca_file, basic=(AGENT_ID, AGENT_SECRET),
                              form={"grant_type": "client_credentials"})
    assert status == 200, body
    return body["access_token"]


def id_token(issuer: DevIssuer, tls: TlsFiles) -> str:
    """A person's ID token through the real authorization-code flow (auto-approved)."""
    query = urlencode({"response_type": "code", "client_id": AUDIENCE, "redirect_uri": REDIRECT,
                       "state": "st", "nonce": "n-0S6_WzA2Mj"})
    status, headers, _ = https_request(f"{issuer.url}/authorize?{query}", tls.ca_file)
    assert status == 302
    code = parse_qs(urlsplit(headers["Location"]).query)["code"][0]
    status, body = https_json(f"{issuer.url}/token", tls.ca_file, basic=(AUDIENCE, "tollgate-secret"),
                              form={"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT})
    assert status == 200, body
    return body["id_token"]


@dataclass
class Appliance:
    """A state directory with a CA and registry, and a config file pointing at ``issuer_url``."""

    root: Path
    config_path: Path
    ca: CertificateAuthority

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def config(self) -> Config:
        return load_config(self.config_path)

    def registry(self) -> CertificateRegistry:
        return CertificateRegistry(self.state_dir / "certificates.db", create=False)


def make_appliance(root: Path, issuer_url: str, issuer_ca: Path, *, listen: str = "127.0.0.1:8443") -> Appliance:
    ca = CertificateAuthority.create(root / "state" / "ca")
    CertificateRegistry(root / "state" / "certificates.db").close()
    config_path = root / "tollgate.toml"
    config_path.write_text(f"""\
[identity]
state_dir = "state"
client_cert_hours = 8
enroll_listen = "{listen}"

[identity.oidc]
issuer = "{issuer_url}"
audience = "{AUDIENCE}"
ca_file = "{issuer_ca}"
""")
    return Appliance(root, config_path, ca)
