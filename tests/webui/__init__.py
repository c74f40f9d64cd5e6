"""Tests of ``webui``, and the helpers they and the ``tollgate enroll`` tests share.

An :class:`Appliance` is a real appliance state directory (CA, registry) plus a config file
trusting a real dev OIDC issuer served over HTTPS on 127.0.0.1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from appliance.config import Config, load_config
from appliance.identity import CertificateAuthority, Identity
from appliance.identity.registry import CertificateRegistry
from appliance.lab.oidc_issuer import DevClient, DevIssuer, DevUser
from tests.identity.dev_flows import AGENT_ID, AGENT_SECRET, AUDIENCE, REDIRECT
from tests.identity.tls_helpers import TlsFiles

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
