"""``tollgate enroll-server``: the web service (enrollment and approvals) over HTTPS.

Registered with the ``tollgate`` command like every area's verbs; the web stack (Flask,
gunicorn) is imported only when this command runs.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from pathlib import Path

from appliance.config import ConfigError
from appliance.identity.registry import RegistryError
from appliance.model.identity import IdentityError
from appliance.state.db import StateError


def register(sub: argparse._SubParsersAction) -> None:
    enroll_server = sub.add_parser("enroll-server", help="serve enrollment (OIDC token + CSR -> client "
                                                         "certificate) and approvals over HTTPS")
    enroll_server.add_argument("-c", "--config", type=Path, required=True, help="the appliance config file")
    enroll_server.add_argument("--listen", metavar="IP:PORT",
                               help="override identity.enroll_listen (port 0: any free port, shown in the "
                                    "ready line)")
    enroll_server.add_argument("--workers", type=int, default=2, help="worker processes (default: %(default)s)")
    enroll_server.set_defaults(handler=cmd_enroll_server)


def cmd_enroll_server(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise ConfigError("--workers must be at least 1")
    from webui.serve import run

    try:
        return run(args)
    except (IdentityError, RegistryError, StateError) as exc:
        print(f"tollgate: {exc}", file=sys.stderr)
    except sqlite3.Error as exc:
        print(f"tollgate: certificate registry: {exc}", file=sys.stderr)
    return 1
