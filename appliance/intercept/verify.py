"""Whether the filter half of Tollgate's ruleset is in force on this host.

``tollgate intercept check`` lists the installed table (``nft -j list table inet NAME``)
and :func:`filter_problems` compares it, as pure data, with what the config asks for: the
prerouting guard dropping invalid agent packets ahead of the divert, the forward chain
dropping invalid agent packets and agent traffic to every protected address, and the
protected sets holding every protected network. Each problem is one line naming what is
missing; none means the filter is in force.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from appliance.config import Config, IPNetwork
from appliance.intercept.ruleset import FORWARD_CHAIN, GUARD_CHAIN, protected_networks

# The divert's hook priorities; the guard must run before them (lower runs first).
_DIVERT_PRIORITY = {"redirect": -100, "tproxy": -150}
_FAMILIES = (("ip", "4"), ("ip6", "6"))


def config_warnings(config: Config) -> list[str]:
    """Weaknesses of a valid intercept config that the installed table can't show."""
    if config.intercept.agent_interfaces:
        return []
    return [("[intercept] agent_interfaces is empty: agent traffic is recognised by source address alone, so a "
            "packet an agent forges with a source outside agent_subnets is neither diverted nor dropped, and is "
            "routed to the database (set agent_interfaces to the agents' interfaces)")]


def filter_problems(listing: dict[str, Any], config: Config) -> list[str]:
    """What is missing from an ``nft -j list table`` listing of Tollgate's table."""
    ic = config.intercept
    items = [next(iter(item.items())) for item in listing.get("nftables", []) if isinstance(item, dict)]
    chains = {v["name"]: v for k, v in items if k == "chain" and v.get("table") == ic.table}
    sets = {v["name"]: v for k, v in items if k == "set" and v.get("table") == ic.table}
    rules: dict[str, list[list[dict[str, Any]]]] = {}
    for k, v in items:
        if k == "rule" and v.get("table") == ic.table:
            rules.setdefault(v["chain"], []).append(v.get("expr", []))
    if not any(k == "table" and v.get("name") == ic.table for k, v in items):
        return [(f"table inet {ic.table} is not installed: nothing is diverted or filtered "
                "(run `tollgate intercept up`)")]

    problems: list[str] = []
    guard = chains.get(GUARD_CHAIN)
    if not _is_hooked(guard, "prerouting"):
        problems.append(f"chain {GUARD_CHAIN} (filter, hook prerouting) is missing: invalid agent packets "
                        "are not dropped before the divert")
    else:
        assert guard is not None
        if guard.get("prio", 0) >= _DIVERT_PRIORITY[ic.method]:
            problems.append(f"chain {GUARD_CHAIN} runs at priority {guard.get('prio')}, not before the "
                            f"{ic.method} divert ({_DIVERT_PRIORITY[ic.method]})")
        problems += _invalid_drop_problems(GUARD_CHAIN, rules.get(GUARD_CHAIN, []))
    forward = chains.get(FORWARD_CHAIN)
    if not _is_hooked(forward, "forward"):
        problems.append(f"chain {FORWARD_CHAIN} (filter, hook forward) is missing: agent traffic to "
                        "protected addresses is forwarded around the proxy")
    else:
        forward_rules = rules.get(FORWARD_CHAIN, [])
        problems += _invalid_drop_problems(FORWARD_CHAIN, forward_rules)
        for family, suffix in _FAMILIES:
            if not any(_drops(r) and _matches(r, family, "saddr", f"@agents{suffix}")
                       and _matches(r, family, "daddr", f"@protected{suffix}") for r in forward_rules):
                problems.append(f"chain {FORWARD_CHAIN}: no rule drops {family} traffic from "
                                f"@agents{suffix} to @protected{suffix}")
    for network in protected_networks(config):
        name = f"protected{network.version}"
        if name not in sets:
            problems.append(f"set {name} is missing")
            continue
        if not any(network.subnet_of(have) for have in _elements(sets[name].get("elem", []))  # type: ignore[arg-type]
                   if have.version == network.version):
            problems.append(f"set {name} does not hold {network}: agents can reach it around the proxy")
    return sorted(set(problems), key=problems.index)


def _is_hooked(chain: dict[str, Any] | None, hook: str) -> bool:
    return chain is not None and chain.get("type") == "filter" and chain.get("hook") == hook


def _invalid_drop_problems(chain: str, rules: list[list[dict[str, Any]]]) -> list[str]:
    return [f"chain {chain}: no rule drops invalid {family} packets from @agents{suffix}"
            for family, suffix in _FAMILIES
            if not any(_drops(r) and _matches(r, family, "saddr", f"@agents{suffix}") and _invalid(r) for r in rules)]


def _drops(expr: list[dict[str, Any]]) -> bool:
    return any("drop" in e for e in expr)


def _matches(expr: list[dict[str, Any]], family: str, field: str, right: str) -> bool:
    for e in expr:
        m = e.get("match")
        if m and m.get("op") == "==" and m.get("right") == right:
            payload = m.get("left", {}).get("payload", {})
            if payload.get("protocol") == family and payload.get("field") == field:
                return True
    return False


def _invalid(expr: list[dict[str, Any]]) -> bool:
    for e in expr:
        m = e.get("match")
        if m and m.get("left", {}).get("ct", {}).get("key") == "state":
            right = m.get("right")
            if right == "invalid" or (isinstance(right, list) and "invalid" in right):
                return True
    return False


def _elements(elements: Iterable[Any]) -> list[IPNetwork]:
    nets: list[IPNetwork] = []
    for e in elements:
        if isinstance(e, dict) and "elem" in e:  # an element with options (timeout, counter …)
            e = e["elem"].get("val")
        if isinstance(e, str):
            nets.append(ipaddress.ip_network(e))
        elif isinstance(e, dict) and "prefix" in e:
            nets.append(ipaddress.ip_network(f"{e['prefix']['addr']}/{e['prefix']['len']}", strict=False))
        elif isinstance(e, dict) and "range" in e:
            low, high = (ipaddress.ip_address(a) for a in e["range"])
            nets += ipaddress.summarize_address_range(low, high)  # type: ignore[arg-type]
    return nets
