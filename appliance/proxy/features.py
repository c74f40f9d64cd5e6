"""Which features run in the proxy, built from the configuration, and their life cycle.

``tollgate run`` asks :func:`build_features` for the addons (enforcement, masking, audit)
and the background work they need (policy file watching and SIGHUP, the approvals poller,
catalog lookups, the audit log's group commit and checkpoints). The audit log is opened
before the server listens (no session may start unrecorded) and closed after the last
session has ended; the rest starts once the server listens and stops on the way out. Keeping the
assembly here leaves the server shell unaware of any particular feature.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from appliance.config import Config, ConfigError
from appliance.proxy.hooks import Addon, AddonManager

log = logging.getLogger("tollgate.features")


@dataclass
class Features:
    addons: AddonManager
    policy: Any = None  # appliance.policy.holder.PolicyHolder
    approvals: Any = None  # appliance.holds.broker.HoldBroker
    catalog: Any = None  # appliance.masking.catalog.PgColumnCatalog
    audit: Any = None  # appliance.audit.addon.AuditAddon
    audit_config: Any = None  # appliance.config.AuditConfig
    audit_log: Any = None  # appliance.audit.store.AuditLog, once opened
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    async def prepare(self) -> None:
        """Before the server listens: open the audit log (recovering it after a crash).
        Raises if it can't be opened: the proxy must not run unrecorded."""
        if self.audit is None:
            return
        from appliance import __version__
        from appliance.audit.store import AuditLog
        from appliance.audit.store_errors import AuditError
        try:
            self.audit_log = await asyncio.to_thread(AuditLog.open, self.audit_config, version=__version__)
        except AuditError as exc:
            raise ConfigError(f"audit log {self.audit_config.dir}: {exc}") from None
        self.audit_log.start(asyncio.get_running_loop())
        self.audit.log = self.audit_log
        if self.policy is not None:  # which policy was in force from the start
            self.audit.policy_reloaded(str(self.policy.path), self.policy.digest, self.policy.generation, None)

    async def start(self, server: Any) -> None:
        loop = asyncio.get_running_loop()
        if self.audit_log is not None:
            from appliance.audit.control import register_control_ops
            register_control_ops(server.control_ops, self.audit_log)
        if self.policy is not None:
            self.policy.install_sighup(loop)
            self._tasks.append(loop.create_task(self.policy.watch(), name="policy-watch"))
            server.control_ops["policy"] = lambda request: self.policy_status()
        if self.approvals is not None:
            await self.approvals.start()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks.clear()
        if self.approvals is not None:
            await self.approvals.close()
        if self.audit_log is not None:
            audit_log, self.audit_log = self.audit_log, None
            await asyncio.to_thread(audit_log.close, "the proxy stopped")

    def policy_status(self) -> dict[str, Any]:
        holder = self.policy
        return {"file": str(holder.path), "sha256": holder.digest, "generation": holder.generation,
                "epoch": self.addons.epoch, "loaded_at": holder.loaded_at, "last_error": holder.last_error,
                "rules": len(holder.current.rules)}


def build_features(config: Config) -> Features:
    """The addons ``config`` asks for. Raises ConfigError (or PolicyError) when a feature
    can't start as configured: the proxy must not run without the policy it was given."""
    addons: list[Addon] = []
    features = Features(AddonManager())
    scrub = _scrubber(config)
    if config.policy is not None:
        from appliance.masking.catalog import PgColumnCatalog
        from appliance.policy.addon import EnforcementAddon
        from appliance.policy.holder import PolicyHolder

        holder = PolicyHolder(config.policy.file, config.policy.reload_seconds)
        catalog = PgColumnCatalog(config.targets)
        catalog.set_columns(holder.current.masked_columns)
        features.policy, features.catalog = holder, catalog
        features.approvals = _approvals(config)

        @holder.on_reload
        def _reloaded(policy: Any) -> None:
            # Prepared statements decided under the old rules are decided again when run.
            features.addons.epoch += 1
            catalog.set_columns(policy.masked_columns)

        addons.append(EnforcementAddon(holder, features.approvals, catalog, scrub))
    else:
        log.warning("no [policy] configured: statements are not checked against any policy "
                    "(card numbers are still masked)")
    if config.masking.enabled:
        from appliance.masking.addon import MaskingAddon
        addons.append(MaskingAddon(config.masking.pan_format, features.catalog))
    else:
        log.warning("masking is turned off ([masking] enabled = false): card numbers reach agents in clear")
    if config.audit is not None:
        # Last: it records what the others decided and masked.
        addons.append(_audit(config, features, scrub))
    else:
        log.warning("no [audit] configured: sessions and statements are not recorded")
    for addon in addons:
        features.addons.add(addon)
    return features


def _audit(config: Config, features: Features, scrub: Any) -> Addon:
    from appliance.audit.addon import AuditAddon, SamplingAuditAddon
    from appliance.audit.keys import KeyRing
    audit_config = config.audit
    assert audit_config is not None
    from appliance.audit.keys import AuditKeyError
    try:
        KeyRing.load(audit_config)  # fail now, with the file named, rather than at the first session
    except AuditKeyError as exc:
        raise ConfigError(f"{config.path}: audit: {exc}") from None
    kind = SamplingAuditAddon if audit_config.result_rows > 0 and audit_config.result_bytes > 0 else AuditAddon
    addon = kind(None, scrub, result_rows=audit_config.result_rows, result_bytes=audit_config.result_bytes)
    features.audit, features.audit_config = addon, audit_config
    if features.approvals is not None:
        features.approvals.listeners.append(addon.approval_event)
    holder = features.policy
    if holder is not None:
        path = str(holder.path)
        holder.on_reload(lambda policy: addon.policy_reloaded(path, holder.digest, holder.generation, None))
        holder.on_failure(lambda error: addon.policy_reloaded(path, None, holder.generation, error))
    return addon


def _scrubber(config: Config) -> Any:
    from appliance.masking.scanner import scrub
    fmt = config.masking.pan_format
    return lambda text: scrub(text, fmt)


def _approvals(config: Config) -> Any:
    """The approvals broker, when the appliance can authenticate approvers (OIDC)."""
    identity = config.identity
    if identity is None or identity.oidc is None:
        log.warning("no [identity.oidc]: nobody can approve, so held statements are refused")
        return None
    from appliance.holds.broker import HoldBroker
    return HoldBroker.from_config(config)
