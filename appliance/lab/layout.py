"""Where one lab keeps its files, all under its state directory ``/run/tollgate-lab/NAME/``.

Every part of the lab — the cluster (:mod:`appliance.lab.database`), the identity plumbing
(:mod:`appliance.lab.identity`), the :class:`~appliance.lab.lab.Lab` that brings them up —
finds its files through one :class:`Paths`. It depends on nothing else of the lab, so each
of those modules can take a ``Paths`` instead of reaching back into the ``Lab``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Paths:
    """One lab's files, from its state directory ``root``."""

    root: Path

    # --- PostgreSQL ----------------------------------------------------------------------

    @property
    def data(self) -> Path: return self.root / "pgdata"
    @property
    def socket_dir(self) -> Path: return self.root / "pgsock"
    @property
    def log(self) -> Path: return self.root / "postgres.log"

    # --- the database's TLS (the lab CA, also behind the dev issuer's certificate) ---------

    @property
    def tls_dir(self) -> Path: return self.root / "tls"
    @property
    def ca_cert(self) -> Path: return self.tls_dir / "ca.crt"
    @property
    def ca_key(self) -> Path: return self.tls_dir / "ca.key"
    @property
    def server_cert(self) -> Path: return self.tls_dir / "server.crt"
    @property
    def server_key(self) -> Path: return self.tls_dir / "server.key"

    # --- the appliance -------------------------------------------------------------------

    @property
    def config(self) -> Path: return self.root / "tollgate.toml"
    @property
    def proxy_log(self) -> Path: return self.root / "tollgate.log"
    @property
    def policy(self) -> Path: return self.root / "policy.toml"
    @property
    def control_socket(self) -> Path: return self.root / "tollgate.sock"
    @property
    def secrets_dir(self) -> Path: return self.root / "secrets"
    @property
    def audit_dir(self) -> Path: return self.root / "audit"
    @property
    def offbox_dir(self) -> Path: return self.root / "offbox-checkpoints"

    @property
    def witness_dir(self) -> Path:
        """The witness's key and state: its own directory, which no appliance process writes."""
        return self.root / "witness"
    @property
    def witness_log(self) -> Path: return self.root / "witness.log"

    def password_file(self, role: str) -> Path:
        return self.secrets_dir / f"{role}.password"

    def service_log(self, name: str) -> Path:
        """The log of a lab service other than the proxy (``oidc-issuer``, ``enroll``)."""
        return self.root / f"{name}.log"

    # --- identity: appliance CA, dev issuer, enrolled agent ------------------------------

    @property
    def identity_dir(self) -> Path: return self.root / "identity"
    @property
    def appliance_ca_cert(self) -> Path: return self.identity_dir / "ca" / "ca.crt"
    @property
    def issuer_cert(self) -> Path: return self.identity_dir / "issuer.crt"
    @property
    def issuer_key(self) -> Path: return self.identity_dir / "issuer.key"
    @property
    def issuer_admin_token(self) -> Path:
        """The bearer secret the dev issuer's admin endpoints require (root only, gw side)."""
        return self.identity_dir / "issuer-admin.token"

    def client_secret_file(self, client: str) -> Path:
        """An approver's client secret (appliance side; the agent's own is in its home)."""
        return self.identity_dir / f"{client}.secret"

    # --- the agent's side: all it can see of the lab (appliance.lab.agent_view) -----------

    @property
    def agent_home(self) -> Path: return self.root / "agent-home"
    @property
    def agent_config_dir(self) -> Path: return self.agent_home / ".tollgate"
    @property
    def agent_secret_file(self) -> Path:
        """The agent's own OAuth client secret, in its home."""
        return self.agent_config_dir / "client.secret"
    @property
    def agent_lab_ca(self) -> Path:
        """The agent's copy of the lab CA certificate: the database's TLS and the dev issuer's HTTPS."""
        return self.agent_config_dir / "lab-ca.crt"
    @property
    def agent_appliance_ca(self) -> Path:
        """The agent's copy of the appliance CA certificate (behind enrollment's HTTPS)."""
        return self.agent_config_dir / "appliance-ca.crt"

    def recorded(self) -> dict[str, str]:
        """The paths ``state.json`` records (its keys are part of the state format)."""
        return {
            "dir": str(self.root), "config": str(self.config), "policy": str(self.policy),
            "proxy_log": str(self.proxy_log), "control_socket": str(self.control_socket),
            "secrets": str(self.secrets_dir), "pg_data": str(self.data), "pg_socket_dir": str(self.socket_dir),
            "pg_log": str(self.log), "tls_ca": str(self.ca_cert), "tls_ca_key": str(self.ca_key),
            "tls_server_cert": str(self.server_cert), "tls_server_key": str(self.server_key),
        }


__all__ = ["Paths"]
