"""The appliance's durable state: small SQLite databases shared by the proxy and the CLI.

``db`` is the SQLite helper (WAL, numbered migrations, a connection per thread);
``certificates`` is the registry of issued client certificates and revocations.
"""

from appliance.state.certificates import (
    REGISTRY_FILE,
    CertificateRegistry,
    CertRecord,
    RegistryError,
    format_serial,
    serial_candidates,
)
from appliance.state.db import Database, StateError

__all__ = [
    "REGISTRY_FILE", "CertRecord", "CertificateRegistry", "Database", "RegistryError", "StateError",
    "format_serial", "serial_candidates",
]
