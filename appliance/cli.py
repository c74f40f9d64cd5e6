"""The ``tollgate`` command line: one argparse tree, each area registering its own verbs.

Each module in COMMAND_MODULES has ``register(subparsers)`` that adds its sub-commands and
sets ``handler`` (``args -> exit code``) on them; this keeps the CLI as modular as the
package and lets an area's commands live next to its code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from appliance.audit.export import append_admin_direct
from appliance.config import ConfigError
from appliance.intercept.base import InterceptError
from appliance.proxy.control import install_direct_writer
from appliance.proxy.journal import JournalHandler, handler_for_stderr

COMMAND_MODULES = (
    "appliance.composition",
    "appliance.intercept.cli",
    "appliance.lab.cli",
    "appliance.identity.cli",
    "appliance.policy.cli",
    "appliance.holds.cli",
    "appliance.audit.cli",
    "appliance.flows_cli",
    "appliance.dbadmin.cli",
    "appliance.witness.cli",
    "webui.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tollgate",
        description="Tollgate: governs how AI agents reach PostgreSQL databases holding cardholder data.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Under systemd, records go to journald with structured fields (the journal stamps
    # time and priority itself); elsewhere, text on stderr.
    handler = handler_for_stderr()
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2) if args.verbose else logging.INFO,
        format="%(message)s" if isinstance(handler, JournalHandler)
        else "%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[handler],
    )
    # Admin actions (certificates, enrollment) are recorded through the running proxy, or,
    # when none runs, by opening the audit log here.
    install_direct_writer(append_admin_direct)
    try:
        return int(args.handler(args) or 0)
    except ConfigError as exc:
        print(f"tollgate: {exc}", file=sys.stderr)
        return 2
    except InterceptError as exc:
        print(f"tollgate: intercept: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"tollgate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
