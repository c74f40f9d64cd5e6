"""Tollgate: a network appliance that governs how AI agents reach PostgreSQL.

Packages: ``pgwire`` (sans-io protocol codec), ``proxy`` (session layer, hooks, asyncio
shell), ``intercept`` (nftables rulesets and the redirect/tproxy methods), ``lab`` (the
namespace lab the tests and the demo run in), ``config`` (the TOML configuration).
"""

__version__ = "0.1.0"
