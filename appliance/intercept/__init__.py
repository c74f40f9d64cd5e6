"""Transparent intercept: divert agents' connections to protected databases into the proxy.

Agents keep dialling the database's real address; the appliance, as their gateway,
diverts those TCP connections with nftables into the proxy's local port. Two methods,
after sshuttle's firewall methods, share one interface (:class:`InterceptMethod`):

- ``redirect`` — NAT; the proxy reads the original destination with SO_ORIGINAL_DST.
- ``tproxy`` — transparent proxying plus policy routing; the accepted socket keeps the
  database's address, so ``getsockname()`` is the original destination.

The ruleset is rendered as text by :mod:`.ruleset` (pure) and applied atomically by
:mod:`.nft`; policy routing is in :mod:`.routing`.
"""

from __future__ import annotations

from appliance.intercept.base import InterceptError, InterceptMethod
from appliance.intercept.redirect import RedirectMethod
from appliance.intercept.tproxy import TproxyMethod

METHODS: dict[str, type[InterceptMethod]] = {
    RedirectMethod.name: RedirectMethod,
    TproxyMethod.name: TproxyMethod,
}


def get_method(name: str) -> InterceptMethod:
    """The intercept method called ``name`` (``redirect`` or ``tproxy``)."""
    try:
        return METHODS[name]()
    except KeyError:
        raise InterceptError(f"unknown intercept method {name!r} (known: {', '.join(METHODS)})") from None


__all__ = ["METHODS", "InterceptError", "InterceptMethod", "RedirectMethod", "TproxyMethod", "get_method"]
