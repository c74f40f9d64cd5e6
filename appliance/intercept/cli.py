"""``tollgate intercept up|down|show|check``: install, remove, preview or check the divert."""

from __future__ import annotations

import argparse
import logging
import sys

from appliance.config import Config, load_config
from appliance.intercept import InterceptError, get_method, nft
from appliance.intercept.ruleset import render_ruleset
from appliance.intercept.verify import config_warnings, filter_problems

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "intercept", help="the transparent intercept (nftables divert into the proxy)",
        description="Install, remove, preview or check the nftables divert that sends "
                    "agents' connections to protected databases into the proxy.",
    )
    verbs = parser.add_subparsers(dest="intercept_command", metavar="VERB", required=True)
    for name, handler, help_text in (
        ("up", _up, "install or replace the divert (idempotent)"),
        ("down", _down, "remove Tollgate's table, rules and routes (nothing else)"),
        ("show", _show, "print the nftables ruleset 'up' would apply, without applying it"),
        ("check", _check, ("check that this host supports the configured method and that the installed "
                           "ruleset's filter is in force")),
    ):
        verb = verbs.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        verb.add_argument("-c", "--config", required=True, metavar="CONFIG", help="the Tollgate TOML config")
        verb.set_defaults(handler=handler)


def _fail(exc: InterceptError) -> int:
    print(f"tollgate: intercept: {exc}", file=sys.stderr)
    return 1


def _warn_if_inert(config: Config) -> None:
    # Valid, but it diverts nothing: agents would reach the databases directly.
    if not config.intercept.agent_subnets:
        log.warning("intercept.agent_subnets is empty: no connection will be diverted")
    if not config.protected_endpoints:
        log.warning("no targets are configured: no connection will be diverted")
    for warning in config_warnings(config):
        log.warning("%s", warning)


def _up(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    method = get_method(config.intercept.method)
    _warn_if_inert(config)
    try:
        method.setup(config)
    except InterceptError as exc:
        return _fail(exc)
    ic = config.intercept
    print(f"intercept up: {method.name}, table inet {ic.table}, proxy port {config.proxy.listen_port}, "
          f"{len(config.protected_endpoints)} target address(es), {len(ic.agent_subnets)} agent subnet(s)")
    return 0


def _down(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    method = get_method(config.intercept.method)
    try:
        method.teardown(config)
    except InterceptError as exc:
        return _fail(exc)
    print(f"intercept down: table inet {config.intercept.table} and policy routing removed (if present)")
    return 0


def _show(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    try:
        sys.stdout.write(render_ruleset(config))
    except InterceptError as exc:
        return _fail(exc)
    return 0


def _check(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    method = get_method(config.intercept.method)
    ok, reason = method.is_supported()
    print(f"{method.name}: {'supported' if ok else 'NOT supported'}: {reason}")
    try:
        listing = nft.list_table_json(config.intercept.table)
    except InterceptError as exc:
        return _fail(exc)
    problems = filter_problems(listing or {}, config)
    if problems:
        print("filter: NOT in force:")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    print(f"filter: in force: table inet {config.intercept.table} drops invalid agent packets before the divert "
          "and forwards no agent traffic to protected addresses")
    for warning in config_warnings(config):
        print(f"filter: warning: {warning}")
    return 0 if ok else 1
