"""``tollgate lab up|down|status|exec|gc``: the lab from the command line.

Registered into the ``tollgate`` CLI by :func:`register`; also runnable on its own as
``python -m appliance.lab.cli up|down|...`` (same arguments, without the ``lab`` word), which
needs nothing but this package.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from appliance.lab import topology
from appliance.lab.lab import METHODS, Lab, LabError, gc

NODES = topology.NODES


def register(subparsers: Any) -> None:
    lab = subparsers.add_parser(
        "lab", help="the agent/appliance/database namespace lab (tests, demo, benchmarks)",
        description="Network-namespace lab: agent → appliance (gw) → PostgreSQL (db).")
    _add_commands(lab.add_subparsers(dest="lab_command", metavar="ACTION", required=True))


def _add_commands(sub: Any) -> None:
    up = sub.add_parser("up", help="bring a lab up (namespaces, PostgreSQL, Tollgate)")
    up.add_argument("--name", help="lab name, 1-11 lowercase letters/digits (default: generated)")
    up.add_argument("--owner-pid", type=int, metavar="PID",
                    help="tear this lab down at the next `lab gc` once PID has exited (tests)")
    up.add_argument("--no-proxy", dest="proxy", action="store_false",
                    help="everything but the Tollgate proxy")
    up.add_argument("--method", choices=METHODS, default="redirect", help="intercept method (default: redirect)")
    up.add_argument("--policy", choices=("lab", "permissive"), default="lab",
                    help="the policy the appliance enforces: the lab's strict one (default) or allow-all "
                         "(card numbers are masked either way)")
    up.add_argument("--agent-auth", choices=("certificate", "trust"), default="certificate",
                    help="certificate: enroll the agent by OIDC and require mTLS (default); trust: no identity")
    up.add_argument("--audit", choices=("fsync", "write", "off"), default="fsync",
                    help="the audit log's durability: a statement runs once its record is fsync'd (default) "
                         "or written; off: no audit log")
    up.add_argument("--json", action="store_true", help="print the status as JSON when up")
    up.set_defaults(handler=cmd_up)

    down = sub.add_parser("down", help="tear a lab down (also a half-built one)")
    down.add_argument("--name", help="which lab (optional when only one exists)")
    down.set_defaults(handler=cmd_down)

    status = sub.add_parser("status", help="addresses, database, roles, proxy, conninfo of a lab")
    status.add_argument("--name", help="which lab (optional when only one exists)")
    status.add_argument("--json", action="store_true", help="machine-readable")
    status.add_argument("--next-steps", action="store_true", help="print what to try next")
    status.set_defaults(handler=cmd_status)

    ex = sub.add_parser("exec", help="run a command in a lab node's namespace",
                        usage="%(prog)s [--name N] {agent,gw,db} -- CMD [ARG...]")
    ex.add_argument("--name", help="which lab (optional when only one exists)")
    ex.add_argument("node", choices=NODES)
    ex.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    ex.set_defaults(handler=cmd_exec)

    token = sub.add_parser("token", help="print an access token for a lab client (approvers: lab-dba-1, lab-dba-2)")
    token.add_argument("--name", help="the lab (may be omitted when exactly one exists)")
    token.add_argument("client", help="lab-dba-1, lab-dba-2 or lab-agent")
    token.set_defaults(handler=cmd_token)

    rotate = sub.add_parser("rotate-issuer-key", help="rotate the dev OIDC issuer's signing key (its admin API)")
    rotate.add_argument("--name", help="the lab (may be omitted when exactly one exists)")
    rotate.add_argument("--drop-old", action="store_true", help="publish only the new key at once (no grace period)")
    rotate.set_defaults(handler=cmd_rotate_issuer_key)

    console = sub.add_parser("console", help="open the lab's web console from the host: a loopback proxy that "
                                             "reaches it from inside the lab")
    console.add_argument("--name", help="the lab (may be omitted when exactly one exists)")
    console.add_argument("--port", type=int, default=8480, help="loopback port to listen on (default: %(default)s)")
    console.set_defaults(handler=cmd_console)

    collect = sub.add_parser("gc", help="tear down every lab whose owner process has exited")
    collect.set_defaults(handler=cmd_gc)


def _fail(message: str) -> int:
    print(f"tollgate lab: {message}", file=sys.stderr)
    return 1


def cmd_up(args: argparse.Namespace) -> int:
    try:
        lab = Lab.create(args.name, owner_pid=args.owner_pid, proxy=args.proxy, method=args.method,
                         agent_auth=args.agent_auth, policy=args.policy, audit=args.audit)
    except LabError as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps(lab.status(), indent=2))
    else:
        proxy = f"proxy pid {lab.status()['proxy']['pid']}" if args.proxy else "no proxy"
        print(f"lab {lab.name} is up ({proxy}); details: tollgate lab status --name {lab.name}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    try:
        lab = _open_for_down(args.name)
        lab.down()
    except LabError as exc:
        return _fail(str(exc))
    print(f"lab {lab.name} is down")
    return 0


def _open_for_down(name: str | None) -> Lab:
    try:
        return Lab.open(name)
    except LabError:
        # No state record, but maybe leftover namespaces of that name: still clean them up.
        if name and any(topology.namespace_exists(ns) for ns in topology.namespace_names(name).values()):
            return Lab(name)
        raise


def cmd_status(args: argparse.Namespace) -> int:
    try:
        lab = Lab.open(args.name)
    except LabError as exc:
        return _fail(str(exc))
    status = lab.status()
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(format_status(status))
    if args.next_steps:
        print()
        print(next_steps(status))
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd[:1] == ["--"]:
        cmd = cmd[1:]
    if not cmd:
        return _fail("exec: no command given (usage: tollgate lab exec NODE -- CMD [ARG...])")
    try:
        lab = Lab.open(args.name)
    except LabError as exc:
        return _fail(str(exc))
    sys.stdout.flush()
    sys.stderr.flush()
    # Become the command: its stdio, signals and exit status are the caller's, unfiltered.
    argv = lab.command(args.node, cmd)
    try:
        os.execvpe(argv[0], argv, lab.env())
    except OSError as exc:
        return _fail(f"exec: cannot run {argv[0]}: {exc.strerror}")
    return 127  # not reached


def cmd_token(args: argparse.Namespace) -> int:
    from appliance.lab import identity as lab_identity
    try:
        lab = Lab.open(args.name)
        argv = lab_identity.token_argv(lab.paths, args.client)
    except (LabError, ValueError) as exc:
        return _fail(str(exc))
    # An approver's secret is on the appliance side, out of the agent's view: fetched from gw.
    node = lab_identity.token_node(args.client)
    proc = subprocess.run(lab.command(node, argv), env=lab.env(), capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        return _fail(f"token: {proc.stderr.strip() or proc.stdout.strip()}")
    print(proc.stdout.strip())
    return 0


def cmd_rotate_issuer_key(args: argparse.Namespace) -> int:
    from appliance.lab import identity as lab_identity
    try:
        lab = Lab.open(args.name)
    except LabError as exc:
        return _fail(str(exc))
    # The admin endpoint listens on gw's loopback and wants the admin secret: asked from gw.
    argv = lab_identity.rotate_argv(lab.paths, drop_old=args.drop_old)
    proc = subprocess.run(lab.command("gw", argv), env=lab.env(), capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        return _fail(f"rotate-issuer-key: {proc.stderr.strip() or proc.stdout.strip()}")
    print(proc.stdout.strip())
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    """Serve a CONNECT proxy on 127.0.0.1:PORT into the lab until interrupted."""
    from appliance.lab import identity as lab_identity
    from appliance.lab.console import LabConnectProxy, console_targets
    try:
        lab = Lab.open(args.name)
    except LabError as exc:
        return _fail(str(exc))
    url = lab.status().get("console_url")
    if not url:
        return _fail(f"lab {lab.name} has no console (it was brought up with --agent-auth trust)")
    try:
        proxy = LabConnectProxy(lab.namespace("gw"), console_targets(), ("127.0.0.1", args.port))
    except OSError as exc:
        return _fail(f"cannot serve the console proxy on 127.0.0.1:{args.port}: {exc}")
    with proxy:
        print(f"The console of lab {lab.name} is {url}/ — reachable through this proxy, {proxy.url}.\n"
              f"Open it in a browser that uses the proxy, e.g.:\n"
              f"  chromium --proxy-server={proxy.url} --user-data-dir=$(mktemp -d) {url}/\n"
              f"Its certificate is issued by the lab's appliance CA ({lab.paths.appliance_ca_cert}) and the dev "
              f"issuer's by the lab CA ({lab.paths.ca_cert}): trust them in that browser profile, or accept the "
              f"warning (lab only).\nSign in as one of the dev issuer's users: "
              f"{', '.join(email for email, _ in lab_identity.CONSOLE_USERS)}.\nCtrl-C stops the proxy.",
              flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    try:
        collected = gc()
    except LabError as exc:
        return _fail(str(exc))
    for name, reason in collected:
        print(f"removed lab {name}: {reason}")
    if not collected:
        print("no orphaned labs")
    return 0


# --- human output -------------------------------------------------------------------------

def format_status(s: dict[str, Any]) -> str:
    ns, db, proxy, addr = s["namespaces"], s["database"], s["proxy"], s["addresses"]
    health = "healthy" if s["healthy"] else "NOT healthy"
    owner = f"owner pid {s['owner_pid']}" if s["owner_pid"] else "no owner (never garbage-collected)"
    lines = [
        f"lab {s['name']}: {s['phase']}, {health}; {owner}; state in {s['state_dir']}",
        f"  agent  {ns['agent']:<16} {', '.join([addr['agent']['ipv4'], addr['agent']['ipv6']])}",
        f"  gw     {ns['gw']:<16} {', '.join(addr['gw']['agent_side'] + addr['gw']['db_side'])}",
        (f"  db     {ns['db']:<16} protected {', '.join(addr['db']['protected'])}; "
         f"direct {', '.join(addr['db']['direct'])}"),
        *([(f"  direct {ns['direct']:<16} {addr['direct']['ipv4']}, {addr['direct']['ipv6']} "
            "(clients of the direct address)")] if "direct" in ns and "direct" in addr else []),
        *([(f"  witness {ns['witness']:<15} {s['witness']['url']} "
           f"({'running' if s['witness']['running'] else 'NOT running'}), key {s['witness']['key']}")]
          if s.get("witness") and "witness" in ns else []),
        (f"  database  {db['dbname']} on port {db['port']}, "
         f"{'running' if db['running'] else 'NOT running'} (pid {db['pid']}), TLS CA {db['tls_ca']}"),
        f"  roles ({s['roles_note']}):",
    ]
    for role, info in s["roles"].items():
        lines.append(f"    {role:<11} {info['auth']:<14} password {info['password']}")
    if proxy["enabled"]:
        lines.append(f"  proxy  {'running' if proxy['running'] else 'NOT running'} (pid {proxy['pid']}), "
                     f"port {proxy['port']}, intercept {proxy['method']}")
        flows = proxy.get("flows") or {}
        if flows:  # the eBPF flow ledger and bypass guard (docs/ebpf.md)
            attached = ", ".join(flows.get("attached") or []) or "nothing attached"
            lines.append(f"  flows  mode {flows.get('mode')}, {flows.get('state')} ({attached})"
                         + (f": {flows['error']}" if flows.get("error") else ""))
    else:
        lines.append("  proxy  not started (--no-proxy)")
    lines += [f"         config {proxy['config']}", f"         log    {proxy['log']}",
              f"  agent conninfo: {s['agent_conninfo']}"]
    return "\n".join(lines)


def next_steps(s: dict[str, Any]) -> str:
    name = s["name"]
    agent = s["agent_conninfo"].replace(" port=5432", "")
    direct = (s["conninfo"]["direct"] or "").replace(" port=5432", "")
    query = '-c "SELECT id, brand, pan FROM cards ORDER BY id LIMIT 5"'
    # The venv's commands, by path: printed commands must work as printed, and neither the
    # host's PATH nor the namespaces' need have the venv in it.
    tollgate = Path(sys.executable).with_name("tollgate")
    verify = Path(sys.executable).with_name("tollgate-verify")
    down = (f"make demo-down   (or: {tollgate} lab down --name {name})" if name == "demo"
            else f"{tollgate} lab down --name {name}")
    lines = [
        "Next steps:",
        "",
        "  Connect as an agent would — unchanged config, no password (the appliance holds it):",
        f"    {tollgate} lab exec --name {name} agent -- psql \"{agent}\"",
        f"    {tollgate} lab exec --name {name} agent -- psql \"{agent}\" {query}",
        "",
        "  Compare with the direct path, from the direct namespace (the agent can't reach it: the",
        "  gateway drops agent traffic to the database subnet); only the database's own",
        "  authentication applies (lab-only password):",
        f"    {tollgate} lab exec --name {name} direct -- psql \"{direct}\" {query}",
        "",
        "  Policy at work (the lab's policy file is beside its config; edit it, it reloads):",
        f"    {tollgate} lab exec --name {name} agent -- psql \"{agent}\" -c \"DROP TABLE cards\"      # blocked",
        (f"    {tollgate} lab exec --name {name} agent -- psql \"{agent}\" "
         f"-c \"UPDATE cards SET brand = brand WHERE id = 1\""),
        "      (waits for a payments DBA; in another terminal:)",
        f"    T=$({tollgate} lab token --name {name} lab-dba-1)",
        (f"    {tollgate} lab exec --name {name} gw -- env TOLLGATE_TOKEN=$T {tollgate} "
         f"approvals list -c {s['proxy']['config']}"),
        (f"    {tollgate} lab exec --name {name} gw -- env TOLLGATE_TOKEN=$T {tollgate} "
         f"approvals approve ID --reason \"why\" -c {s['proxy']['config']}"),
        (f"    {tollgate} policy check -c {s['proxy']['config']} --as payments-agents --target payments "
         f"--sql \"TRUNCATE cards\""),
        "",
    ]
    if s.get("console_url"):
        lines += [
            "  The web console (approvals, sessions, replay, audit) — in another terminal:",
            f"    {tollgate} lab console --name {name}",
            f"      (then open {s['console_url']}/ in a browser using the proxy it prints)",
            "",
        ]
    if s["proxy"].get("audit", "off") != "off":
        config = s["proxy"]["config"]
        lines += [
            "  What happened, from the audit log (signed; verifiable offline):",
            f"    {tollgate} sessions -c {config}",
            f"    {tollgate} replay SESSION -c {config}",
            f"    {tollgate} audit export -c {config} -o /tmp/bundle.tar.gz",
            f"    {verify} /tmp/bundle.tar.gz --root-key @{s['proxy']['audit_dir']}/keys/root.pub",
            "",
        ]
    if s["proxy"]["enabled"]:
        lines += [f"  Watch the appliance:  tail -f {s['proxy']['log']}"]
    else:
        lines += ["  The proxy is not running (--no-proxy): the protected address is not intercepted."]
    lines += [
        f"  Everything about it:  {tollgate} lab status --name {name} --json",
        f"  Tear it down:         {down}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m appliance.lab.cli ACTION ...``."""
    parser = argparse.ArgumentParser(prog="python -m appliance.lab.cli",
                                     description="The Tollgate namespace lab (same as `tollgate lab`).")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    _add_commands(parser.add_subparsers(dest="lab_command", metavar="ACTION", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
