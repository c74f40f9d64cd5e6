"""``tollgate db discover`` and ``tollgate db provision``.

Exit status of ``discover``: 0 when every candidate cardholder column is declared and every
readable column was sampled, 1 when some candidates are not declared or a column could not
be sampled in time, 2 on errors. Of ``provision``: 0 when the SQL was printed (or applied) and,
with ``--apply`` or ``--check``, the server confirms no agent role can do what it should
not; 1 when the check finds something; 2 on errors (including what provisioning cannot
fix, such as an agent role that owns a cardholder table).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from appliance.config import Config, Target, load_config
from appliance.dbadmin import discover as disc
from appliance.dbadmin import provision as prov
from appliance.dbadmin.columns import ColumnNameError
from appliance.dbadmin.connect import TargetError, agent_roles, held_params
from appliance.dbadmin.declaration import column_masks, declared_columns
from appliance.policy.engine import Policy
from appliance.policy.rules import PolicyError

EXIT_OK, EXIT_FOUND, EXIT_ERROR = 0, 1, 2


def register(sub: argparse._SubParsersAction) -> None:
    db = sub.add_parser("db", help="a protected database: find cardholder columns, provision the agent roles")
    db_sub = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", required=True, help="the appliance config (targets, credentials, policy)")
        p.add_argument("--target", help="the target name (default: the only one)")
        p.add_argument("--database", required=True, help="the database on that target")
        p.add_argument("--column", dest="columns", action="append", default=[], metavar="SCHEMA.TABLE.COLUMN",
                       help="a cardholder column, added to the policy's declaration (repeat for several)")
        p.add_argument("--json", action="store_true", help="machine-readable output")

    discover = db_sub.add_parser(
        "discover", help="sample columns for card numbers and compare with the declared cardholder columns",
        description="Exit status: 0 no undeclared candidates, 1 undeclared candidates (or a column not "
                    "sampled in time), 2 error.")
    common(discover)
    discover.add_argument("--as", dest="role", metavar="ROLE",
                          help="the held credential to connect with (default: the target's first)")
    discover.add_argument("--dsn", help="connect with this libpq conninfo instead of a held credential")
    discover.add_argument("--sample-rows", type=int, default=disc.DEFAULT_SAMPLE_ROWS,
                          help=f"values sampled per column (default {disc.DEFAULT_SAMPLE_ROWS})")
    discover.add_argument("--min-ratio", type=float, default=disc.DEFAULT_MIN_RATIO,
                          help="share of a column's sampled values that must hold a card number "
                               f"for it to be a candidate (default {disc.DEFAULT_MIN_RATIO})")
    discover.add_argument("--timeout", type=float, default=disc.DEFAULT_TIMEOUT_SECONDS,
                          help="seconds each column's sample may take, waiting on locks included "
                               f"(default {disc.DEFAULT_TIMEOUT_SECONDS:g}); a column that runs out is reported, "
                               "and the exit status is 1")
    discover.set_defaults(handler=cmd_discover)

    provision = db_sub.add_parser(
        "provision", help="the SQL that gives the agent login roles least privilege (PCI DSS 7.2); --apply runs it",
        description="Exit status: 0 done (and checked), 1 the check found a privilege an agent role should not "
                    "have, 2 error.")
    common(provision)
    provision.add_argument("--dsn", help="libpq conninfo of a role that may grant and own objects "
                                         "(required for --apply and --check; else the catalog is read "
                                         "with a held credential)")
    provision.add_argument("--agent-role", dest="agent_roles", action="append", default=[], metavar="ROLE",
                           help="an agent login role (default: the upstream_user of every credential the "
                                "policy's agent_groups may use; all of them when it names none)")
    provision.add_argument("--writes", choices=prov.WRITE_MODES, default="refused",
                           help="refused: agent roles write no cardholder table (default); held: they may write "
                                "its other columns, and the proxy's holds decide")
    provision.add_argument("--allow-temp", action="store_true", help="leave TEMPORARY on the database")
    mode = provision.add_mutually_exclusive_group()
    mode.add_argument("--apply", action="store_true", help="run the SQL in one transaction, then check")
    mode.add_argument("--check", action="store_true", help="only check what the agent roles can do")
    provision.set_defaults(handler=cmd_provision)


def _error(message: str) -> int:
    print(f"tollgate: {message}", file=sys.stderr)
    return EXIT_ERROR


def _target(config: Config, name: str | None) -> Target:
    if name is None:
        if len(config.targets) != 1:
            raise TargetError(f"{config.path}: name one of the targets with --target: "
                              f"{', '.join(t.name for t in config.targets) or 'none'}")
        return config.targets[0]
    for target in config.targets:
        if target.name == name:
            return target
    raise TargetError(f"{config.path}: no target named {name!r}")


def _policy(config: Config) -> Policy | None:
    return None if config.policy is None else Policy.load(config.policy.file)


def _connect(params: dict[str, Any] | None, dsn: str | None) -> Any:
    import psycopg  # late: only these commands need a client

    if dsn is not None:
        return psycopg.connect(dsn, autocommit=True)
    return psycopg.connect(**params, autocommit=True)  # type: ignore[arg-type]


def cmd_discover(args: argparse.Namespace) -> int:
    import psycopg

    try:
        config = load_config(args.config)
        target = _target(config, args.target)
        declared = declared_columns(_policy(config), args.columns)
        params = None if args.dsn else held_params(target, args.database, args.role)
        with _connect(params, args.dsn) as conn:
            report = disc.discover(conn, declared, sample_rows=args.sample_rows, min_ratio=args.min_ratio,
                                   timeout=args.timeout)
    except (TargetError, ColumnNameError, PolicyError, ValueError, psycopg.Error) as exc:
        return _error(str(exc).strip())
    print(json.dumps(report.as_json(), indent=2) if args.json else disc.render(report), end="\n" if args.json else "")
    return EXIT_OK if report.clean else EXIT_FOUND


def cmd_provision(args: argparse.Namespace) -> int:
    import psycopg

    if (args.apply or args.check) and not args.dsn:
        return _error("--apply and --check need --dsn: a role that may grant (the held credentials are the "
                      "agents' own)")
    try:
        config = load_config(args.config)
        target = _target(config, args.target)
        policy = _policy(config)
        declared = declared_columns(policy, args.columns)
        masks = column_masks(policy)
        if not declared:
            return _error("no cardholder columns declared: add cardholder_columns to the policy, or --column")
        options = prov.Options(pan_format=config.masking.pan_format, writes=args.writes, allow_temp=args.allow_temp)
        roles = args.agent_roles or list(agent_roles(target, policy.agent_groups if policy is not None else ()))
        params = None if args.dsn else held_params(target, args.database)
        with _connect(params, args.dsn) as conn:
            snapshot = prov.read_snapshot(conn, declared, roles, masks)
            statements: list[str] = []
            if not args.check:
                statements = prov.plan(snapshot, options)
                if args.apply:
                    prov.apply(conn, statements)
                    snapshot = prov.read_snapshot(conn, declared, roles, masks)
            result = prov.verify(conn, snapshot, options) if (args.apply or args.check) else None
    except prov.ProvisionError as exc:
        return _error("cannot provision:\n  " + "\n  ".join(exc.problems))
    except (TargetError, ColumnNameError, PolicyError, ValueError, psycopg.Error) as exc:
        return _error(str(exc).strip())
    if args.json:
        out: dict[str, Any] = {"database": snapshot.database, "agent_roles": [r.name for r in snapshot.roles],
                               "applied": bool(args.apply), "sql": [s for s in statements if not s.startswith("--")]}
        if result is not None:
            out["findings"] = [{"role": f.role, "what": f.what} for f in result.findings]
        print(json.dumps(out, indent=2))
    else:
        if statements and not args.apply:
            print(prov.script(statements), end="")
        if args.apply:
            print(f"applied {sum(1 for s in statements if not s.startswith('--'))} statements to "
                  f"{snapshot.database} for {', '.join(r.name for r in snapshot.roles)}")
        if result is not None:
            print("check: " + ("no agent role can read a cardholder column in clear, write a cardholder table, "
                               "create objects or run a denied function" if result.ok else
                               f"{len(result.findings)} finding(s)"))
            for finding in result.findings:
                print(f"  {finding}")
    return EXIT_FOUND if result is not None and not result.ok else EXIT_OK
