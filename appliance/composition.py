"""The composition root: ``tollgate run`` builds the proxy and its addons from the
configuration, wires the features to one another, and drives their life cycle.

This is the one module that knows every feature. The features don't import one another:
what one must hear of another (a policy reload, an approval) is wired here, and what passes
between them in the data path travels in the typed hook data. The addons run in the order
of :data:`ADDON_ORDER` — enforcement decides, masking masks what was decided, audit records
both — and :class:`~appliance.proxy.hooks.AddonManager` checks it against what each addon
declares before the proxy starts.

Start-up order matters for the guarantees: the addons open (the audit log is recovered and
open) before the server listens, the server listens before traffic is diverted to it, and
on the way out sessions end before the addons close.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from appliance import __version__
from appliance.audit.addon import AuditAddon, SamplingAuditAddon
from appliance.audit.control import register_control_ops
from appliance.audit.keys import AuditKeyError, KeyRing
from appliance.audit.remote import AuditWriter, RemoteAuditLog
from appliance.audit.siem import SiemGate
from appliance.audit.store import AuditLog
from appliance.audit.store_errors import AuditError
from appliance.config import Config, ConfigError, load_config
from appliance.flows.addon import FlowAddon
from appliance.flows.bpf import GuardError
from appliance.holds.broker import HoldBroker
from appliance.identity.agent_auth import CertificateAuthenticator
from appliance.intercept import get_method
from appliance.masking.addon import MaskingAddon
from appliance.masking.catalog import PgColumnCatalog
from appliance.metrics import Metrics, serve_metrics
from appliance.pan.scanner import scrub
from appliance.policy.addon import EnforcementAddon
from appliance.policy.holder import PolicyHolder
from appliance.policy.rules import PolicyError
from appliance.proxy.agent_auth import AgentAuthenticator, TrustAuthenticator
from appliance.proxy.channel import Channel
from appliance.proxy.control import ControlOps, start_control_server
from appliance.proxy.hooks import PROXY_RUN, Addon, AddonManager, AddonOrderError
from appliance.proxy.sdnotify import Notifier, Watchdog
from appliance.proxy.server import ProxyServer
from appliance.proxy.workers import SessionRelay, Supervisor, WorkerLink, name_worker_in_logs

log = logging.getLogger("tollgate")

ADDON_ORDER = ("enforcement", "masking", "audit", "flows")


@dataclass
class Assembly:
    """What ``tollgate run`` serves with: the addons in order, and the agent authenticator."""

    addons: AddonManager
    authenticator: AgentAuthenticator
    audit: AuditAddon | None = None
    policy: PolicyHolder | None = None
    flows: FlowAddon | None = None
    metrics: Metrics | None = None


def build(config: Config, *, worker: bool = False) -> Assembly:
    """The addons ``config`` asks for, wired together. Raises ConfigError (or PolicyError)
    when a feature can't start as configured: the proxy must not run without the policy
    or the audit log it was given. ``worker``: for one of several workers, where the flow
    ledger is the primary's (one eBPF program per appliance) and a SessionRelay tells it
    of this worker's sessions."""
    text_scrubber = _scrubber(config)
    policy, catalog, approvals = None, None, None
    addons: dict[str, Addon] = {}
    if config.policy is not None:
        policy = PolicyHolder(config.policy.file, config.policy.reload_seconds)
        catalog = PgColumnCatalog(config.targets)
        catalog.set_columns(policy.current.masked_columns)
        approvals = _approvals(config)
        addons["enforcement"] = EnforcementAddon(policy, approvals, catalog, text_scrubber,
                                                 console_url=config.webui.console_url or config.approvals.api_url)
    else:
        log.warning("no [policy] configured: statements are not checked against any policy "
                    "(card numbers are still masked)")
    if config.masking.enabled:
        addons["masking"] = MaskingAddon(config.masking.pan_format, catalog)
    else:
        log.warning("masking is turned off ([masking] enabled = false): card numbers reach agents in clear")
    # Counted from the audit log's records: without a log there is nothing to count.
    metrics = Metrics() if config.metrics.listen is not None and config.audit is not None else None
    if config.metrics.listen is not None and metrics is None:
        log.warning("[metrics] listen is set but there is no [audit]: the metrics count audit records; none served")
    audit = _audit(config, text_scrubber, metrics) if config.audit is not None else None
    if audit is not None:
        addons["audit"] = audit
    else:
        log.warning("no [audit] configured: sessions and statements are not recorded")
    # The flow ledger's records go to the audit log's one writer, signed like the rest.
    flows: FlowAddon | None = None
    if worker:
        addons["flows"] = SessionRelay(audit.session_id if audit is not None else lambda session: None)
    else:
        flows = FlowAddon(config, audit.record if audit is not None else None,
                          audit.session_id if audit is not None else None)
        addons["flows"] = flows
    try:
        manager = AddonManager(addons[name] for name in ADDON_ORDER if name in addons)
    except AddonOrderError as exc:
        raise ConfigError(f"{config.path}: the proxy's addons: {exc}") from None
    if policy is not None:
        _wire_policy(policy, manager, catalog, audit)
    if approvals is not None and audit is not None:
        approvals.listeners.append(audit.approval_event)
    return Assembly(manager, authenticator_for(config), audit, policy, flows, metrics)


def _wire_policy(policy: PolicyHolder, manager: AddonManager, catalog: PgColumnCatalog | None,
                 audit: AuditAddon | None) -> None:
    @policy.on_reload
    def reloaded(current: Any) -> None:
        # Prepared statements decided under the old rules are decided again when run.
        manager.bump_epoch()
        if catalog is not None:
            catalog.set_columns(current.masked_columns)

    if audit is not None:
        path = str(policy.path)
        policy.on_reload(lambda current: audit.policy_reloaded(path, policy.digest, policy.generation, None))
        policy.on_failure(lambda error: audit.policy_reloaded(path, None, policy.generation, error))


def _audit(config: Config, text_scrubber: Any, metrics: Metrics | None = None) -> AuditAddon:
    audit_config = config.audit
    assert audit_config is not None
    try:
        KeyRing.load(audit_config)  # fail now, with the file named, rather than at the first session
    except AuditKeyError as exc:
        raise ConfigError(f"{config.path}: audit: {exc}") from None
    sampling = audit_config.result_rows > 0 and audit_config.result_bytes > 0
    kind = SamplingAuditAddon if sampling else AuditAddon

    def opener() -> AuditLog:
        audit_log = AuditLog.open(audit_config, version=__version__, run=PROXY_RUN)
        if metrics is not None:
            audit_log.observe(metrics)
        return audit_log

    gate = None
    if config.siem is not None and config.siem.on_full == "block":
        gate = SiemGate(config)
    return kind(None, text_scrubber, result_rows=audit_config.result_rows, result_bytes=audit_config.result_bytes,
                opener=opener, gate=gate)


def _scrubber(config: Config) -> Any:
    fmt = config.masking.pan_format
    return lambda text: scrub(text, fmt)


def _approvals(config: Config) -> HoldBroker | None:
    """The approvals broker, when the appliance can authenticate approvers (OIDC)."""
    identity = config.identity
    if identity is None or identity.oidc is None:
        log.warning("no [identity.oidc]: nobody can approve, so held statements are refused")
        return None
    return HoldBroker.from_config(config)


def authenticator_for(config: Config) -> AgentAuthenticator:
    if config.proxy.agent_auth == "certificate":
        return CertificateAuthenticator(config)
    return TrustAuthenticator()


# ---- tollgate run ------------------------------------------------------------------------------

def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="run the proxy (applies the intercept ruleset first)")
    run.add_argument("-c", "--config", required=True, help="Tollgate configuration (TOML)")
    run.add_argument("--no-intercept", action="store_true",
                     help="don't touch nftables or routing (the ruleset is managed elsewhere)")
    # INDEX:FD:RUN — how the primary of [proxy] workers > 1 starts each worker.
    run.add_argument("--worker", help=argparse.SUPPRESS)
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
    if args.worker is not None:
        try:
            assembly = build(config, worker=True)
        except PolicyError as exc:
            print(f"tollgate: policy: {exc}", file=sys.stderr)
            return 2
        return runner(serve_worker(config, method, assembly, args.worker))
    if config.proxy.workers > 1:
        return runner(serve_primary(config, method, intercept=not args.no_intercept))
    try:
        assembly = build(config)
    except PolicyError as exc:
        print(f"tollgate: policy: {exc}", file=sys.stderr)
        return 2
    return runner(serve(config, method, assembly, intercept=not args.no_intercept))


async def serve(config: Config, method: Any, assembly: Assembly, *, intercept: bool = True,
                notifier: Notifier | None = None) -> int:
    addons = assembly.addons
    server = ProxyServer(config, method, addons, assembly.authenticator)
    # systemd's Type=notify: READY only once the ruleset diverts to a listening proxy.
    notifier = notifier or Notifier()
    notifier.status("opening the audit log and the addons")
    try:
        # The audit log is open, and the flow guard attached, before the first session can start.
        await addons.open()
    except AuditError as exc:
        raise ConfigError(f"audit log {config.audit.dir if config.audit else '?'}: {exc}") from None
    except GuardError as exc:
        raise ConfigError(f"{config.path}: flows: the bypass guard could not attach, so the proxy does not start "
                          f"(set [flows] mode = \"ledger\" or \"off\" to run without it): {exc}") from None
    metrics_server = None
    if assembly.metrics is not None and config.metrics.listen is not None:
        try:
            metrics_server = serve_metrics(assembly.metrics, config.metrics.listen)
        except OSError as exc:
            await addons.close()
            raise ConfigError(f"{config.path}: metrics.listen: cannot listen on {config.metrics.listen}: "
                              f"{exc.strerror}") from None
    if assembly.audit is not None and assembly.policy is not None:  # which policy was in force from the start
        policy = assembly.policy
        assembly.audit.policy_reloaded(str(policy.path), policy.digest, policy.generation, None)
    # Listen first, divert second: traffic is only diverted to a port that is answering.
    # The ruleset stays when we exit, so agents fail closed rather than bypass the proxy.
    try:
        await server.start()
    except BaseException:
        await addons.close()
        raise
    try:
        await addons.start(server.control)
        if intercept:
            notifier.status("applying the intercept ruleset")
            # pyroute2 drives an event loop of its own, which can't nest inside ours.
            await asyncio.to_thread(method.setup, config)
    except BaseException:
        await server.close()
        await addons.close()
        raise
    targets = ", ".join(f"{t.name} ({', '.join(map(str, t.endpoints))})" for t in config.targets)
    log.info("listening on port %d (%s intercept); protecting %s", config.proxy.listen_port,
             config.intercept.method, targets or "nothing")
    summary = f"port {config.proxy.listen_port}, {config.intercept.method}{'' if intercept else ' (not applied)'}"
    await _ready_until_signalled(notifier, f"ready: {summary}; 0 sessions",
                                 lambda: f"ready: {summary}; {len(server.sessions)} sessions")
    await server.close()
    await addons.close()
    if metrics_server is not None:
        metrics_server.shutdown()
    notifier.close()
    return 0


async def _ready_until_signalled(notifier: Notifier, ready: str, status: Callable[[], str]) -> None:
    """Up: say so (to systemd, and the exact line the lab and service managers wait for),
    feed the watchdog with ``status``, and wait for SIGTERM or SIGINT; then say we stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    notifier.ready(ready)
    watchdog = None
    if notifier.watchdog_interval is not None:
        watchdog = Watchdog(notifier, notifier.watchdog_interval, status)
        watchdog.start()
    print("tollgate: ready", file=sys.stderr, flush=True)
    await stop.wait()
    log.info("shutting down")
    notifier.stopping()
    if watchdog is not None:
        watchdog.stop()


# ---- [proxy] workers > 1: a primary and its workers (appliance/proxy/workers.py) ---------------

async def serve_primary(config: Config, method: Any, *, intercept: bool = True,
                        notifier: Notifier | None = None) -> int:
    """The primary: the audit log's one writer, the control socket, the ruleset, the
    signals; the sessions run in ``config.proxy.workers`` worker processes."""
    loop = asyncio.get_running_loop()
    notifier = notifier or Notifier()
    notifier.status("opening the audit log")
    audit_log = None
    if config.audit is not None:
        audit_config = config.audit
        try:
            audit_log = await asyncio.to_thread(AuditLog.open, audit_config, version=__version__, run=PROXY_RUN)
        except AuditError as exc:
            raise ConfigError(f"audit log {audit_config.dir}: {exc}") from None
        audit_log.start(loop)
    # The metrics count the audit log's records: the primary's, the one log.
    metrics = Metrics() if config.metrics.listen is not None and audit_log is not None else None
    if metrics is not None and audit_log is not None:
        audit_log.observe(metrics)
    writer = AuditWriter(audit_log) if audit_log is not None else None
    run = audit_log.run if audit_log is not None else secrets.token_hex(6)
    # The flow ledger and bypass guard: one eBPF program per appliance, so the primary's;
    # the workers tell it of their sessions (SessionRelay), which it matches flows with.
    recorder = AuditAddon(audit_log, _scrubber(config)) if audit_log is not None else None
    flows = FlowAddon(config, recorder.record if recorder is not None else None,
                      lambda session: session.sid)
    try:
        await flows.open()
    except GuardError as exc:
        if audit_log is not None:
            await asyncio.to_thread(audit_log.close, "the proxy did not start")
        raise ConfigError(f"{config.path}: flows: the bypass guard could not attach, so the proxy does not start "
                          f"(set [flows] mode = \"ledger\" or \"off\" to run without it): {exc}") from None

    def attach(channel: Channel, index: int) -> None:
        if writer is not None:
            writer.attach(channel)
        channel.on("session", lambda event, *fields: relayed_session(flows, event, *fields))

    def argv(index: int, fd: int) -> list[str]:
        return [sys.executable, "-m", "appliance.cli", "run", "-c", str(config.path), "--no-intercept",
                "--worker", f"{index}:{fd}:{run}"]

    supervisor = Supervisor(config.proxy.workers, argv, attach=attach)
    ops = ControlOps()
    ops.register("ping", lambda request: {})
    ops.register("sessions", supervisor.sessions)
    ops.register("workers", lambda request: supervisor.status())
    ops.fallback = supervisor.forward
    if audit_log is not None:
        register_control_ops(ops, audit_log)
    control = None
    metrics_server = None
    try:
        notifier.status(f"starting {config.proxy.workers} workers")
        await supervisor.start()
        await flows.start(ops)
        if metrics is not None and config.metrics.listen is not None:
            try:
                metrics_server = serve_metrics(metrics, config.metrics.listen)
            except OSError as exc:
                raise ConfigError(f"{config.path}: metrics.listen: cannot listen on {config.metrics.listen}: "
                                  f"{exc.strerror}") from None
        if config.proxy.control_socket is not None:
            control = await start_control_server(ops, config.proxy.control_socket)
        if intercept:
            notifier.status("applying the intercept ruleset")
            await asyncio.to_thread(method.setup, config)
    except BaseException:
        await supervisor.stop()
        if control is not None:
            control.close()
        if metrics_server is not None:
            metrics_server.shutdown()
        await flows.close()
        if audit_log is not None:
            await asyncio.to_thread(audit_log.close, "the proxy did not start")
        raise
    # The workers reload their policy on SIGHUP, as a single process does.
    loop.add_signal_handler(signal.SIGHUP, supervisor.signal, signal.SIGHUP)
    log.info("listening on port %d (%s intercept) with %d workers", config.proxy.listen_port,
             config.intercept.method, config.proxy.workers)
    summary = f"port {config.proxy.listen_port}, {config.proxy.workers} workers"
    await _ready_until_signalled(notifier, f"ready: {summary}",
                                 lambda: f"ready: {summary}; {len(supervisor.workers)} running")
    await supervisor.stop()
    if control is not None:
        control.close()
    if metrics_server is not None:
        metrics_server.shutdown()
    await flows.close()
    if audit_log is not None:
        await asyncio.to_thread(audit_log.close, "the proxy stopped")
    notifier.close()
    return 0


@dataclass(slots=True)
class _RelayedSession:
    """What the flow ledger needs of a worker's session: its pair, id and user."""

    client: str
    destination: str
    sid: str | None
    user: str | None


def relayed_session(flows: FlowAddon, event: str, client: str, destination: str, sid: str | None,
                    user: str | None) -> None:
    session: Any = _RelayedSession(client, destination, sid, user)
    if event == "start":
        flows.session_start(session)
    elif event == "end":
        flows.session_end(session, "")
    else:
        flows.session_refused(session, "")


async def serve_worker(config: Config, method: Any, assembly: Assembly, spec: str) -> int:
    """One worker: a whole proxy on its own loop, sharing the port; its audit records go
    to the primary over the channel on descriptor FD (``spec`` is ``INDEX:FD:RUN``)."""
    index, fd, run = spec.split(":", 2)
    name_worker_in_logs(index)
    loop = asyncio.get_running_loop()
    # The primary passes SIGHUP on to every worker, a starting one too: until the policy
    # installs its reload handler, a SIGHUP must not end the worker (its default action).
    loop.add_signal_handler(signal.SIGHUP, lambda: None)
    channel = await Channel.connect(socket.socket(fileno=int(fd)), "the primary")
    stop = asyncio.Event()
    remote = None
    if assembly.audit is not None:
        remote = RemoteAuditLog(channel, run)
        assembly.audit.opener = None
        assembly.audit.log = remote  # type: ignore[assignment]

    def primary_gone() -> None:
        # No audit writer: nothing may run. Waiting statements are refused; sessions end.
        log.error("worker %s: the primary process is gone; stopping", index)
        if remote is not None:
            remote.lost()
        link.lost()
        stop.set()

    addons = assembly.addons
    server = ProxyServer(config, method, addons, assembly.authenticator, worker=True)
    link = WorkerLink(channel, server)
    channel.on_lost = primary_gone
    for addon in addons.addons:
        if isinstance(addon, SessionRelay):
            addon.channel = channel
    await addons.open()
    if assembly.audit is not None and assembly.policy is not None:
        policy = assembly.policy
        assembly.audit.policy_reloaded(str(policy.path), policy.digest, policy.generation, None)
    try:
        await server.start()
    except BaseException:
        await addons.close()
        raise
    try:
        await addons.start(server.control)
    except BaseException:
        await server.close()
        await addons.close()
        raise
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    link.ready()
    await stop.wait()
    await server.close()
    await addons.close()
    channel.close()
    return 0
