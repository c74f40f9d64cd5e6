"""The lab's identity plumbing: appliance CA, dev OIDC issuer, enrollment, an enrolled agent.

``lab up`` (unless told ``agent_auth="trust"``) creates the appliance CA and a server
certificate for the protected target, starts the dev-only OIDC issuer and the enrollment
service in the gateway namespace, and enrolls the agent with the client-credentials grant
— the real flow, over HTTPS — into the agent's own home, so that the unchanged psql
command in the demo presents its certificate as libpq does by default.

Everything here works from the lab's file layout (:class:`~appliance.lab.layout.Paths`),
never from the :class:`~appliance.lab.lab.Lab` itself, which starts what this module
describes: the dependency runs one way, lab → identity.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.identity import CertificateAuthority, certificate_pem, private_key_pem, write_file_atomically
from appliance.identity.registry import CertificateRegistry
from appliance.lab import topology
from appliance.lab.layout import Paths

ISSUER_PORT = 9443
# The dev issuer's admin endpoints: on the gateway's loopback only, out of the agent's reach.
ISSUER_ADMIN_ADDRESS = "127.0.0.1"
ISSUER_ADMIN_PORT = 9444
ENROLL_PORT = 8443
AUDIENCE = "tollgate"
AGENT_CLIENT = "lab-agent"
AGENT_GROUPS = ("payments-agents", "ci")
# People who approve held statements: client-credentials clients of the dev issuer, so
# tests and the demo can get their tokens without a browser.
APPROVERS = ("lab-dba-1", "lab-dba-2")
APPROVER_GROUPS = ("payments-dbas",)
# The web console signs people in as this client of the dev issuer (code grant + PKCE), and
# these are the people its login page offers: approvers, an auditor, an admin.
CONSOLE_CLIENT = "tollgate-console"
AUDITOR_GROUPS = ("payments-auditors",)
ADMIN_GROUPS = ("tollgate-admins",)
CONSOLE_USERS = (("dev@lab.tollgate", APPROVER_GROUPS), ("dba@lab.tollgate", APPROVER_GROUPS),
                 ("dba2@lab.tollgate", APPROVER_GROUPS), ("auditor@lab.tollgate", AUDITOR_GROUPS),
                 ("admin@lab.tollgate", ADMIN_GROUPS))
TARGET = "payments"


def issuer_url() -> str:
    return f"https://{topology.GW_AGENT_V4}:{ISSUER_PORT}"


def enroll_url() -> str:
    return f"https://{topology.GW_AGENT_V4}:{ENROLL_PORT}"


def console_url() -> str:
    """The web console, served by the web service beside enrollment and the approvals API."""
    return enroll_url()


def console_redirect_uri() -> str:
    return f"{console_url()}/auth/callback"


def issuer_admin_url() -> str:
    """Where the dev issuer serves ``/admin/*`` (reachable from the gw namespace only)."""
    return f"https://{ISSUER_ADMIN_ADDRESS}:{ISSUER_ADMIN_PORT}"


def secret_file(paths: Paths, client: str) -> Path:
    """Where a lab client's secret is: the agent's in its own home, the approvers' on the appliance."""
    return paths.agent_secret_file if client == AGENT_CLIENT else paths.client_secret_file(client)


def issuer_ready_url() -> str:
    """What the lab asks the dev issuer to know it answers (its discovery document)."""
    return f"{issuer_url()}/.well-known/openid-configuration"


def enroll_ready_url() -> str:
    """What the lab asks the enrollment service to know a worker answers."""
    return f"{enroll_url()}/healthz"


def prepare(paths: Paths) -> dict[str, Any]:
    """Files the identity layer needs, before any process starts. Returns the status part."""
    state = paths.identity_dir
    state.mkdir(mode=0o700)
    ca = CertificateAuthority.create(state / "ca")
    CertificateRegistry(state / "certificates.db")
    servers = state / "servers"
    servers.mkdir(mode=0o755)
    cert, key = ca.issue_server([ipaddress.ip_address(topology.DB_PROTECTED_V4),
                                 ipaddress.ip_address(topology.DB_PROTECTED_V6)], [])
    write_file_atomically(servers / f"{TARGET}.crt", certificate_pem(cert), mode=0o644)
    write_file_atomically(servers / f"{TARGET}.key", private_key_pem(key), mode=0o600)
    _issuer_certificate(paths)
    home = paths.agent_home  # made by the lab, with the lab CA in it (Lab._prepare_agent_home)
    for client in (AGENT_CLIENT, *APPROVERS, CONSOLE_CLIENT):
        _write_secret(secret_file(paths, client))
    _write_secret(paths.issuer_admin_token)
    # The agent sees nothing of the appliance (appliance.lab.agent_view): the appliance CA
    # certificate it trusts for enrollment is copied into its home.
    write_file_atomically(paths.agent_appliance_ca, paths.appliance_ca_cert.read_bytes(), mode=0o644)
    return {"state_dir": str(state), "ca_cert": str(paths.appliance_ca_cert), "issuer_url": issuer_url(),
            "enroll_url": enroll_url(), "agent_home": str(home), "dev_only_issuer": True,
            "agent": {"subject": AGENT_CLIENT, "groups": sorted(AGENT_GROUPS), "client_id": AGENT_CLIENT},
            "approvers": {c: {"groups": list(APPROVER_GROUPS), "secret_file": str(paths.client_secret_file(c))}
                          for c in APPROVERS}}


def _write_secret(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(24) + "\n")


def _issuer_certificate(paths: Paths) -> None:
    """The dev issuer's HTTPS certificate, from the lab's (database) CA, for the gateway address."""
    ca_key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev OIDC issuer (lab only)")]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(topology.GW_AGENT_V4)),
                                                    x509.IPAddress(ipaddress.ip_address(ISSUER_ADMIN_ADDRESS))]),
                       critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    write_file_atomically(paths.issuer_cert, certificate_pem(cert), mode=0o644)
    write_file_atomically(paths.issuer_key, private_key_pem(key), mode=0o600)


def config_lines(paths: Paths) -> list[str]:
    """The [identity] section of the lab's Tollgate config."""
    state = paths.identity_dir
    return [
        "", "[identity]",
        f'state_dir = "{state}"',
        f'enroll_url = "{enroll_url()}"',
        f'enroll_listen = "{topology.GW_AGENT_V4}:{ENROLL_PORT}"',
        "", "[identity.oidc]",
        f'issuer = "{issuer_url()}"',
        f'audience = "{AUDIENCE}"',
        f'ca_file = "{paths.ca_cert}"',
        # Lab only: follow the dev issuer's key rotations at once. The rate limit that
        # protects a real issuer from a stream of unknown kids is tested on its own.
        "jwks_min_refresh_seconds = 0",
        "", "[approvals]",
        f'api_url = "{enroll_url()}"',
        f'api_ca_file = "{paths.appliance_ca_cert}"',
        "poll_seconds = 0.1",
        "", "[webui]",
        f'console_url = "{console_url()}"',
        f'client_id = "{CONSOLE_CLIENT}"',
        f'client_secret_file = "{secret_file(paths, CONSOLE_CLIENT)}"',
        f"auditor_groups = {list(AUDITOR_GROUPS)!r}".replace("'", '"'),
        f"admin_groups = {list(ADMIN_GROUPS)!r}".replace("'", '"'),
    ]


def issuer_argv(paths: Paths) -> list[str]:
    def client(name: str, groups: tuple[str, ...]) -> list[str]:
        return ["--client", f"{name}:{secret_file(paths, name)}:{','.join(groups)}"]
    return [sys.executable, "-m", "appliance.lab.oidc_issuer", "--bind", f"{topology.GW_AGENT_V4}:{ISSUER_PORT}",
            "--tls-cert", str(paths.issuer_cert), "--tls-key", str(paths.issuer_key),
            "--audience", AUDIENCE, *client(AGENT_CLIENT, AGENT_GROUPS),
            *[arg for c in APPROVERS for arg in client(c, APPROVER_GROUPS)],
            "--code-client", f"{CONSOLE_CLIENT}:{secret_file(paths, CONSOLE_CLIENT)}:{console_redirect_uri()}",
            *[arg for email, groups in CONSOLE_USERS for arg in ("--user", f"{email}:{','.join(groups)}")],
            "--admin-bind", f"{ISSUER_ADMIN_ADDRESS}:{ISSUER_ADMIN_PORT}",
            "--admin-token-file", str(paths.issuer_admin_token)]


def enroll_server_argv(paths: Paths) -> list[str]:
    return [sys.executable, "-m", "appliance.cli", "enroll-server", "-c", str(paths.config)]


def enroll_agent_argv(paths: Paths) -> list[str]:
    """The agent's enrollment, run in the agent node: only files of its own home."""
    return [sys.executable, "-m", "appliance.cli", "enroll", "--url", enroll_url(),
            "--client-id", AGENT_CLIENT, "--client-secret-file", str(paths.agent_secret_file),
            "--issuer", issuer_url(), "--issuer-ca-file", str(paths.agent_lab_ca),
            "--ca-file", str(paths.agent_appliance_ca),
            "--out-dir", str(paths.agent_home / ".postgresql")]


def token_node(client: str) -> str:
    """Where a client's token is fetched: the agent's on the agent node, with the files of its
    home; an approver's on the appliance side (gw), where its secret is — never the agent's."""
    return "agent" if client == AGENT_CLIENT else "gw"


def token_argv(paths: Paths, client: str) -> list[str]:
    """A command (to run in :func:`token_node`) printing an access token for one of the dev
    issuer's clients — how the lab's approvers authenticate to the approvals API."""
    if client not in (AGENT_CLIENT, *APPROVERS):
        raise ValueError(f"the lab has no client {client!r}; its clients: {', '.join((AGENT_CLIENT, *APPROVERS))}")
    code = ("import sys; from pathlib import Path; "
            "from appliance.identity.enroll_client import client_credentials_token, tls_context; "
            "print(client_credentials_token(sys.argv[1], sys.argv[2], Path(sys.argv[3]).read_text().strip(), "
            "tls_context(Path(sys.argv[4]))))")
    ca = paths.agent_lab_ca if client == AGENT_CLIENT else paths.ca_cert
    return [sys.executable, "-c", code, issuer_url(), client, str(secret_file(paths, client)), str(ca)]


# Rotate the dev issuer's signing key: a POST with the admin bearer secret (run in gw).
_ROTATE = """\
import ssl, sys, urllib.request
url, ca_file, token_file = sys.argv[1:4]
token = open(token_file).read().strip()
request = urllib.request.Request(url, method="POST", headers={"Authorization": f"Bearer {token}"})
with urllib.request.urlopen(request, context=ssl.create_default_context(cafile=ca_file), timeout=30) as answer:
    print(answer.read().decode())
"""


def rotate_argv(paths: Paths, *, drop_old: bool = False) -> list[str]:
    """A command (to run in the gw node) rotating the dev issuer's signing key; prints its JSON
    answer (``kid``, ``kids``)."""
    url = f"{issuer_admin_url()}/admin/rotate" + ("?drop_old=1" if drop_old else "")
    return [sys.executable, "-c", _ROTATE, url, str(paths.ca_cert), str(paths.issuer_admin_token)]
