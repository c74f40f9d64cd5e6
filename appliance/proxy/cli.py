"""``tollgate run`` (the proxy), and what it is serving now (``tollgate sessions --live``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import socket
import sys
from typing import Any

from appliance.config import Config, ConfigError, load_config
from appliance.intercept import get_method
from appliance.proxy.agent_auth import AgentAuthenticator, TrustAuthenticator
from appliance.proxy.features import Features, build_features
from appliance.proxy.server import ProxyServer

log = logging.getLogger("tollgate")


def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="run the proxy (applies the intercept ruleset first)")
    run.add_argument("-c", "--config", required=True, help="Tollgate configuration (TOML)")
    run.add_argument("--no-intercept", action="store_true",
                     help="don't touch nftables or routing (the ruleset is managed elsewhere)")
    run.set_defaults(handler=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    method = get_method(config.intercept.method)
    if not args.no_intercept:
        supported, why = method.is_supported()
        if not supported:
            raise ConfigError(f"{config.path}: intercept.method: {method.name} is not usable here: {why}")
    try:
        import uvloop  # optional: about a third faster on the relay path
    except ImportError:
        uvloop = None
    runner = uvloop.run if uvloop is not None else asyncio.run
    from appliance.policy.rules import PolicyError
    try:
        features = build_features(config)
    except PolicyError as exc:
        print(f"tollgate: policy: {exc}", file=sys.stderr)
        return 2
    return runner(serve(config, method, features, authenticator_for(config), intercept=not args.no_intercept))


def authenticator_for(config: Config) -> AgentAuthenticator:
    if config.proxy.agent_auth == "certificate":
        from appliance.identity.agent_auth import CertificateAuthenticator
        return CertificateAuthenticator(config)
    return TrustAuthenticator()


async def serve(config: Config, method: Any, features: Features, authenticator: AgentAuthenticator,
                *, intercept: bool = True) -> int:
    server = ProxyServer(config, method, features.addons, authenticator)
    # Listen first, divert second: traffic is only diverted to a port that is answering.
    # The ruleset stays when we exit, so agents fail closed rather than bypass the proxy.
    await features.prepare()  # the audit log is open before the first session can start
    try:
        await server.start()
    except BaseException:
        await features.close()
        raise
    try:
        await features.start(server)
        if intercept:
            # pyroute2 drives an event loop of its own, which can't nest inside ours.
            await asyncio.to_thread(method.setup, config)
    except BaseException:
        await features.close()
        await server.close()
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    targets = ", ".join(f"{t.name} ({', '.join(map(str, t.endpoints))})" for t in config.targets)
    log.info("listening on port %d (%s intercept); protecting %s", config.proxy.listen_port,
             config.intercept.method, targets or "nothing")
    # The lab and service managers wait for this exact line.
    print("tollgate: ready", file=sys.stderr, flush=True)
    await stop.wait()
    log.info("shutting down")
    await server.close()
    await features.close()
    return 0


def control_request(config: Config, request: dict[str, Any]) -> dict[str, Any]:
    path = config.proxy.control_socket
    if path is None:
        raise ConfigError(f"{config.path}: proxy.control_socket: is not set, so the proxy can't be asked")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError as exc:
            raise ConfigError(f"{config.path}: proxy.control_socket: cannot reach {path}: {exc.strerror} (is tollgate running?)") from None
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


def cmd_live_sessions(args: argparse.Namespace) -> int:
    """``tollgate sessions --live`` (registered with the audit commands): the proxy's sessions now."""
    config = load_config(args.config)
    reply = control_request(config, {"op": "sessions"})
    sessions = reply.get("sessions", [])
    if args.json:
        print(json.dumps(sessions, indent=2))
        return 0
    print(f"{'ID':>5}  {'CLIENT':<24} {'IDENTITY':<28} {'GROUPS':<20} {'TARGET':<10} {'ROLE':<10} {'TX':<2} PHASE")
    for s in sessions:
        who = s.get("identity") or "-"
        if s.get("identity_source") == "legacy-source-address":
            who += " (legacy: by address)"
        print(f"{s['id']:>5}  {s['client']:<24} {who:<28} {','.join(s.get('groups') or []) or '-':<20} "
              f"{s['target'] or '-':<10} {s['user'] or '-':<10} {s['transaction_status']:<2} "
              f"{s['phase']}{' (held)' if s['held'] else ''}")
    return 0
