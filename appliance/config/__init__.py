"""The appliance's configuration: a TOML file parsed into frozen, validated dataclasses.

Everything that starts Tollgate reads its config through :func:`load_config`, so a bad file
is caught before anything is set up. ``model`` holds the dataclasses, ``parse`` the
checks; the names below are the package's interface.
"""

from .model import (
    DEFAULT_MAX_PENDING_REQUESTS,
    PG_MAX_MESSAGE,
    AuditConfig,
    Config,
    ConfigError,
    Credential,
    Endpoint,
    FlowsConfig,
    IdentityConfig,
    InterceptConfig,
    IPNetwork,
    ProxyConfig,
    Target,
    WebuiConfig,
    WitnessConfig,
    normalize_address,
)
from .parse import load_config, parse_config

__all__ = [
    "DEFAULT_MAX_PENDING_REQUESTS", "PG_MAX_MESSAGE",
    "AuditConfig", "Config", "ConfigError", "Credential", "Endpoint", "FlowsConfig", "IPNetwork",
    "IdentityConfig", "InterceptConfig", "ProxyConfig", "Target", "WebuiConfig", "WitnessConfig", "load_config",
    "normalize_address", "parse_config",
]
