"""The enforcement addon: policy decisions carried out in the data path.

For every statement the session is about to forward (a Query with all its statements, a
Parse, a FunctionCall) it asks the current policy for a :class:`Decision` and turns it into
a verdict the session layer understands:

- ``block`` → :class:`Reject` with SQLSTATE 42501 and the rule's message; the session
  swaps the request for one the server is sure to fail, so transaction and pipeline state
  end up exactly as after a real error.
- ``hold`` → :class:`Hold`: an approval request is opened and only this session waits for
  it. A Parse is prepared at once and held at each Execute instead, so approvers see the
  parameters it runs with (and approve one execution, not a statement shape forever);
  SQL-level ``PREPARE`` likewise defers to its ``EXECUTE``. A live time-boxed grant for
  this identity, target and statement shape lets the statement through without asking.
- a session whose server reports a setting Tollgate pins at another value
  (:mod:`appliance.policy.pins`: ``standard_conforming_strings`` off, a client encoding
  whose bytes the server would read differently) → every statement and execution is
  refused (:class:`Reject`, 42501) until the server reports it back, except the plain
  ``SET``/``RESET`` that puts it back.
- ``allow`` / ``mask`` → forwarded; the decision stays on the statement, where masking
  reads the columns to mask. If those columns' OIDs aren't known yet for this database,
  the statement waits (a hold of its own) for the catalog lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from appliance.model.decision import Action, Decision, StatementClass
from appliance.pgwire.params import bind_params
from appliance.policy.holder import PolicyHolder
from appliance.policy.pins import session_problem
from appliance.proxy.hooks import Addon, Hold, Reject, SessionInfo, Statement, StatementKind, Verdict

if TYPE_CHECKING:
    from appliance.proxy.control import ControlOps

log = logging.getLogger("tollgate.enforcement")

BLOCKED_SQLSTATE = "42501"  # insufficient_privilege, as the server says for a missing GRANT

# What a session whose pinned settings are off may still send: putting them back. Plain
# ASCII with no quote inside a literal or backslash, so it lexes alike whatever the settings.
_PUT_BACK = re.compile(
    r"\s*(?:set\s+(?:session\s+)?(?:standard_conforming_strings\s*(?:=|to)\s*'?(?:on|true)'?"
    r"|client_encoding\s*(?:=|to)\s*'?(?:utf8|utf-8|sql_ascii)'?|names\s+'?(?:utf8|utf-8|sql_ascii)'?)"
    r"|reset\s+(?:standard_conforming_strings|client_encoding))\s*;?\s*", re.IGNORECASE | re.ASCII)


class PolicySource(Protocol):
    """Where the current policy comes from (appliance.policy.holder.PolicyHolder)."""

    @property
    def current(self) -> Any: ...


class Approvals(Protocol):
    """The proxy's side of approvals (appliance.holds.broker.HoldBroker)."""

    def grant_allows(self, subject: str, target: str, fingerprint: str) -> bool: ...

    def hold(self, request: dict[str, Any], decision: Decision) -> Awaitable[Reject | None]: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class Catalog(Protocol):
    def ready(self, target: str, database: str) -> asyncio.Future[None] | None: ...


def requester(session: SessionInfo) -> dict[str, Any]:
    """Who is asking, as approval requests and records show it."""
    identity = session.identity
    if identity is None:
        return {"subject": f"unidentified@{session.client.address}", "display": f"unidentified ({session.client})",
                "kind": "unidentified", "groups": []}
    return {"subject": identity.subject, "display": identity.display,
            "kind": identity.kind, "groups": list(identity.groups)}


def fingerprint(sql: str) -> str:
    """The statement's shape (constants and parameters stripped), for time-boxed grants."""
    from pglast.parser import ParseError
    from pglast.parser import fingerprint as pg_fingerprint
    try:
        return pg_fingerprint(sql)
    except (ParseError, UnicodeEncodeError):  # unparsable SQL has no shape: only the exact text matches
        import hashlib
        return "text:" + hashlib.sha256(sql.encode("utf-8", "surrogateescape")).hexdigest()[:16]


class EnforcementAddon(Addon):
    name = "enforcement"

    def __init__(self, policy: PolicySource, approvals: Approvals | None = None, catalog: Catalog | None = None,
                 scrub: Callable[[str], str] = lambda text: text):
        self.policy = policy
        self.approvals = approvals
        self.catalog = catalog
        self.scrub = scrub
        self._watch: asyncio.Task[None] | None = None

    # ---- life cycle ------------------------------------------------------------------------

    async def start(self, control: ControlOps) -> None:
        """Reload the policy file on change and on SIGHUP; hold requests reach approvers."""
        if isinstance(self.policy, PolicyHolder):
            holder = self.policy
            holder.install_sighup(asyncio.get_running_loop())
            self._watch = asyncio.get_running_loop().create_task(holder.watch(), name="policy-watch")
            control.register("policy", lambda request: holder.status())
        if self.approvals is not None:
            await self.approvals.start()

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        if self.approvals is not None:
            await self.approvals.close()

    # ---- hooks -------------------------------------------------------------------------

    def statement(self, session: SessionInfo, statement: Statement) -> Verdict:
        pinned = _pinned(session, statement)
        if pinned is not None:
            return pinned
        policy = self.policy.current
        target = session.target.name if session.target is not None else ""
        groups = _groups(session)
        if statement.kind is StatementKind.FUNCTION_CALL:
            decision = policy.decide_function_call(groups, target, statement.function_oid or 0)
        else:
            decision = policy.decide(groups, target, statement.text)
        decision = self._follow_prepared(session, decision)
        statement.decision = decision
        action = decision.action
        if action is Action.BLOCK:
            return _reject(decision)
        if action is Action.HOLD:
            if self._granted(session, target, statement.text):
                return None
            if statement.kind is StatementKind.PARSE:
                statement.deferred = decision  # asked for at each Execute, with its parameters
                return None
            prepared = _sole_prepare(decision)
            if prepared is not None:
                _prepared(session)[prepared] = decision  # asked for at its EXECUTE
                return None
            return self._hold(session, statement.text, None, decision)
        if statement.kind is not StatementKind.PARSE:
            prepared = _sole_prepare(decision)
            if prepared is not None:
                _prepared(session)[prepared] = decision
        return self._catalog_wait(session, decision)

    def execute(self, session: SessionInfo, statement: Statement, bind: bytes | None) -> Verdict:
        pinned = _pinned(session, statement)
        if pinned is not None:
            return pinned
        decision = statement.deferred
        if decision is None or decision.action is not Action.HOLD:
            return None
        target = session.target.name if session.target is not None else ""
        if self._granted(session, target, statement.text):
            return None
        return self._hold(session, statement.text, bind_params(bind, statement.param_types, self.scrub), decision)

    def session_end(self, session: SessionInfo, reason: str) -> None:
        session.addon_state.pop(self.name, None)

    # ---- helpers -----------------------------------------------------------------------

    def _follow_prepared(self, session: SessionInfo, decision: Decision) -> Decision:
        """``EXECUTE name`` runs what ``PREPARE name`` was decided to be: a deferred hold
        is asked for now, and the prepared statement's masks apply to its results."""
        if len(decision.statements) != 1 or decision.action is Action.BLOCK:
            return decision
        only = decision.statements[0]
        if StatementClass.PREPARED not in only.classes or only.prepared_name is None:
            return decision
        if only.command.upper().startswith("PREPARE"):
            return decision
        prepared = session.addon_state.get(self.name, {}).get(only.prepared_name)
        if prepared is None:
            return decision
        if only.command.upper().startswith("DEALLOCATE"):
            _prepared(session).pop(only.prepared_name, None)
            return decision
        # EXECUTE: the stricter of the two, with the prepared statement's masks.
        action = prepared.action if prepared.action in (Action.HOLD, Action.BLOCK) else decision.action
        return Decision(action, prepared.rule if action is prepared.action else decision.rule,
                        prepared.message if action is prepared.action else decision.message,
                        prepared.rule_line if action is prepared.action else decision.rule_line,
                        decision.statements + prepared.statements, prepared.hold or decision.hold,
                        tuple(dict.fromkeys(decision.masks + prepared.masks)))

    def _granted(self, session: SessionInfo, target: str, sql: str) -> bool:
        if self.approvals is None:
            return False
        return self.approvals.grant_allows(requester(session)["subject"], target, fingerprint(sql))

    def _hold(self, session: SessionInfo, sql: str, params: list[str] | None, decision: Decision) -> Verdict:
        if self.approvals is None:
            return Reject(BLOCKED_SQLSTATE, f"{decision.message or 'this statement needs approval'}; "
                          "approvals are not configured on this appliance, so it cannot run",
                          detail=f"policy rule {decision.rule!r}")
        request = {
            **{f"requester_{k}": v for k, v in requester(session).items()},
            "session_id": session.id, "client": str(session.client),
            "target": session.target.name if session.target is not None else "",
            "database": session.database or "", "role": session.user or "",
            "sql": self.scrub(sql), "params": params, "fingerprint": fingerprint(sql),
        }
        try:
            waiting = self.approvals.hold(request, decision)
        except Exception as exc:  # the request could not even be recorded: fail closed
            log.exception("could not open an approval request")
            return Reject(BLOCKED_SQLSTATE, f"this statement needs approval, and the request could not be "
                          f"recorded: {exc}")
        return Hold(waiting, f"waiting for approval (rule {decision.rule})")

    def _catalog_wait(self, session: SessionInfo, decision: Decision) -> Verdict:
        if not decision.masks or self.catalog is None or session.target is None:
            return None
        lookup = self.catalog.ready(session.target.name, session.database or "")
        if lookup is None:
            return None

        async def looked_up() -> None:
            await asyncio.shield(lookup)
            return None
        return Hold(looked_up(), "looking up the masked columns")


def _pinned(session: SessionInfo, statement: Statement) -> Reject | None:
    """A refusal while the server reports a pinned setting at another value (see pins)."""
    parameters = session.parameters
    if parameters.get("standard_conforming_strings", "on") == "on" and \
            parameters.get("client_encoding", "UTF8") in ("UTF8", "SQL_ASCII"):
        return None  # the server's own spelling of the allowed values: the usual case, two lookups
    problem = session_problem(parameters)
    if problem is None or (statement.kind is not StatementKind.FUNCTION_CALL and _PUT_BACK.fullmatch(statement.text)):
        return None
    return Reject(BLOCKED_SQLSTATE, problem, hint="SET standard_conforming_strings = on (or client_encoding = "
                  "'UTF8') puts it back.")


def _groups(session: SessionInfo) -> frozenset[str]:
    """The identity's groups, as the policy's cache keys them (made once per session)."""
    groups = session.addon_state.get("groups")
    if groups is None:
        identity = session.identity
        groups = session.addon_state["groups"] = frozenset(identity.groups) if identity is not None else frozenset()
    return groups


def _reject(decision: Decision) -> Reject:
    where = f"{decision.rule!r}" + (f" (line {decision.rule_line})" if decision.rule_line else "")
    return Reject(BLOCKED_SQLSTATE, decision.message or f"blocked by policy rule {where}",
                  detail=f"policy rule {where}")


def _sole_prepare(decision: Decision) -> str | None:
    """The name, when the request is one SQL ``PREPARE`` and nothing else."""
    if len(decision.statements) != 1:
        return None
    only = decision.statements[0]
    if only.prepared_name is not None and only.command.upper().startswith("PREPARE"):
        return only.prepared_name
    return None


def _prepared(session: SessionInfo) -> dict[str, Decision]:
    return session.addon_state.setdefault(EnforcementAddon.name, {})
