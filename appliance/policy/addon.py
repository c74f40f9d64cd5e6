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
  SQL-level ``PREPARE`` likewise defers to its ``EXECUTE``. A statement that runs prepared
  statements (SQL ``EXECUTE name``, resolved by the session in its one namespace, see
  ``Statement.executes``) is decided as the stricter of itself and what it runs. A live
  time-boxed grant for this identity and target lets a held statement through without
  asking if it covers exactly this statement (text, constants and parameter values) or,
  where the approver chose so, its shape (constants and parameters free): see
  :func:`appliance.policy.shape.grant_keys`.
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

from appliance.model.decision import Action, Decision
from appliance.pgwire import ProtocolError, decode_frontend
from appliance.pgwire.params import bind_params
from appliance.policy.holder import PolicyHolder
from appliance.policy.pins import encoding_change_problem, identifier_case_problem, session_problem
from appliance.policy.shape import grant_keys
from appliance.proxy.hooks import Addon, Hold, Notice, Reject, SessionInfo, Statement, StatementKind, Verdict

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

    def hold(self, request: dict[str, Any], decision: Decision) -> tuple[Any, Awaitable[Reject | None]]:
        """Open a request; (the request — its ``id`` and ``timeout_seconds`` —, its outcome)."""

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


class EnforcementAddon(Addon):
    name = "enforcement"

    def __init__(self, policy: PolicySource, approvals: Approvals | None = None, catalog: Catalog | None = None,
                 scrub: Callable[[str], str] = lambda text: text, console_url: str | None = None):
        self.policy = policy
        # Where approvers decide (the web console's base URL): named in the held agent's notice.
        self.console_url = console_url.rstrip("/") if console_url else None
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
            text = session_text(session, statement.text)
            if isinstance(text, Reject):
                return text
            decision = policy.decide(groups, target, text)
        for runs in statement.executes:
            text = session_text(session, runs.text)
            if isinstance(text, Reject):
                return text
            decision = _stricter(decision, policy.decide(groups, target, text))
        statement.decision = decision
        action = decision.action
        if action is Action.BLOCK or action is Action.HOLD:
            # Every statement is in the audit log; the journal gets what an operator watches
            # for, with fields to filter on (appliance.proxy.journal).
            log.info("session %s: %s by rule %s", session.id, "blocked" if action is Action.BLOCK else "held",
                     decision.rule, extra={"session_id": session.id, "identity": requester(session)["subject"],
                                           "decision": action.value, "rule": decision.rule, "target": target})
        if action is Action.BLOCK:
            return _reject(decision)
        if action is Action.HOLD:
            if _only_prepares(decision):
                return None  # preparing runs nothing: what it prepared is decided when it runs
            if statement.kind is StatementKind.PARSE:
                statement.deferred = decision  # asked for at each Execute, with its parameters
                return None
            if self._granted(session, target, statement, None):
                return None
            return self._hold(session, statement, None, decision)
        return self._catalog_wait(session, decision)

    def execute(self, session: SessionInfo, statement: Statement, bind: bytes | None) -> Verdict:
        pinned = _pinned(session, statement)
        if pinned is not None:
            return pinned
        decision = statement.deferred
        if decision is None or decision.action is not Action.HOLD:
            return None
        target = session.target.name if session.target is not None else ""
        if self._granted(session, target, statement, bind):
            return None
        return self._hold(session, statement, bind, decision)

    def session_end(self, session: SessionInfo, reason: str) -> None:
        session.addon_state.pop(self.name, None)

    # ---- helpers -----------------------------------------------------------------------

    def _granted(self, session: SessionInfo, target: str, statement: Statement, bind: bytes | None) -> bool:
        """A live grant covers this statement: exactly it, or its shape where the approver
        chose that."""
        if self.approvals is None:
            return False
        keys = grant_keys(statement.text, _param_values(bind), [runs.text for runs in statement.executes])
        subject = requester(session)["subject"]
        return self.approvals.grant_allows(subject, target, keys.exact) or \
            self.approvals.grant_allows(subject, target, keys.shape)

    def _hold(self, session: SessionInfo, statement: Statement, bind: bytes | None, decision: Decision) -> Verdict:
        # Approvers read the text the server will run: converted from the session's encoding.
        sql = _readable(session, shown_sql(statement))
        keys = grant_keys(statement.text, _param_values(bind), [runs.text for runs in statement.executes])
        params = bind_params(bind, statement.param_types, self.scrub)
        if self.approvals is None:
            return Reject(BLOCKED_SQLSTATE, f"{decision.message or 'this statement needs approval'}; "
                          "approvals are not configured on this appliance, so it cannot run",
                          detail=f"policy rule {decision.rule!r}")
        request = {
            **{f"requester_{k}": v for k, v in requester(session).items()},
            "session_id": session.key, "client": str(session.client),
            "target": session.target.name if session.target is not None else "",
            "database": session.database or "", "role": session.user or "",
            "sql": self.scrub(sql), "params": params, "fingerprint": keys.exact, "shape": keys.shape,
            "free": [self.scrub(part) for part in keys.free],
        }
        try:
            opened, waiting = self.approvals.hold(request, decision)
        except Exception as exc:  # the request could not even be recorded: fail closed
            log.exception("could not open an approval request")
            return Reject(BLOCKED_SQLSTATE, f"this statement needs approval, and the request could not be "
                          f"recorded: {exc}")
        return Hold(waiting, f"waiting for approval {opened.id} (rule {decision.rule})",
                    notice=self._held_notice(opened, decision), approval=opened.id)

    def _held_notice(self, opened: Any, decision: Decision) -> Notice:
        """What the held agent is told at once: the approval id, the rule, where it is decided."""
        where = f"{self.console_url}/approvals/{opened.id}" if self.console_url else \
            f"`tollgate approvals show {opened.id}`"
        seconds = getattr(opened, "timeout_seconds", None)
        until = f" (at most {round(seconds)} s)" if seconds else ""
        return Notice(f"statement held for approval {opened.id} by policy rule {decision.rule!r}",
                      detail=decision.message or None,
                      hint=f"an approver decides it at {where}; this session waits for the decision{until}")

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
    login = session.client_encoding
    if parameters.get("standard_conforming_strings", "on") == "on" and login is not None and \
            not login.digits_inside_characters and \
            parameters.get("client_encoding", "UTF8") in (("UTF8", "SQL_ASCII") if login.is_utf8 else (login.name,)):
        return None  # the server's own spelling of the allowed values: the usual case, two lookups
    problem = session_problem(parameters, login)
    if problem is None or (statement.kind is not StatementKind.FUNCTION_CALL and _PUT_BACK.fullmatch(statement.text)):
        return None
    return Reject(BLOCKED_SQLSTATE, problem, hint="SET standard_conforming_strings = on (or RESET client_encoding) "
                  "puts it back.")


def session_text(session: SessionInfo, text: str) -> str | Reject:
    """Statement text as the server reads it: converted from the session's client encoding
    (the wire text is UTF-8 with its other bytes kept as surrogates), or a refusal where the
    bytes don't convert (the server would raise 22021) or would change the encoding."""
    encoding = session.client_encoding
    if encoding is None or encoding.is_utf8:
        # Read as UTF-8; the classifier refuses bytes that aren't.
        return _identifiers_checked(session, text)
    try:
        decoded = encoding.decode(text.encode("utf-8", "surrogateescape"))
    except UnicodeError as exc:
        return Reject(BLOCKED_SQLSTATE, f"the statement is not valid {encoding.name} text, which the session's "
                      f"client_encoding says it is ({exc.reason} at byte {getattr(exc, 'start', '?')}); it is refused")
    problem = encoding_change_problem(decoded)
    if problem is not None:
        return Reject(BLOCKED_SQLSTATE, problem)
    return _identifiers_checked(session, decoded)


def _readable(session: SessionInfo, text: str) -> str:
    """Wire text as people read it: converted from the session's client encoding where it
    isn't UTF-8, with U+FFFD for bytes that don't convert; as it is otherwise."""
    encoding = session.client_encoding
    if encoding is None or encoding.is_utf8 or text.isascii():
        return text
    raw = text.encode("utf-8", "surrogateescape")
    try:
        return encoding.decode(raw)
    except UnicodeError:
        return raw.decode(encoding.codec, "replace")


def _identifiers_checked(session: SessionInfo, text: str) -> str | Reject:
    if text.isascii():
        return text
    problem = identifier_case_problem(text, session.parameters.get("server_encoding", "UTF8"))
    return text if problem is None else Reject(BLOCKED_SQLSTATE, problem)


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


def _only_prepares(decision: Decision) -> bool:
    """The request only PREPAREs statements (SQL, or a Parse of a SQL PREPARE)."""
    return all(s.command.upper().startswith("PREPARE") and s.prepared_name is not None
               for s in decision.statements)


def _stricter(decision: Decision, runs: Decision) -> Decision:
    """A request that runs a prepared statement: the stricter of the two decisions, with the
    classes and masks of both (what it runs is what it reads and writes)."""
    first = decision
    if runs.action is Action.BLOCK or (runs.action is Action.HOLD and decision.action is not Action.BLOCK):
        first = runs
    return Decision(first.action, first.rule, first.message, first.rule_line,
                    decision.statements + runs.statements, first.hold or decision.hold or runs.hold,
                    tuple(dict.fromkeys(decision.masks + runs.masks)))


def shown_sql(statement: Statement) -> str:
    """The statement as approvers see it and grants bind it: its text, then the text of
    each prepared statement it runs (``EXECUTE s1(5)`` alone says nothing of what runs)."""
    if not statement.executes:
        return statement.text
    return "\n".join([statement.text, *(f"-- {runs.name} is: {runs.text}" for runs in statement.executes)])


def _param_values(bind: bytes | None) -> list[tuple[int, bytes | None]] | None:
    """Each Bind parameter's format and value, whole (what an exact grant binds)."""
    if bind is None:
        return None
    try:
        message = decode_frontend(b"B", bind)
    except ProtocolError:
        return [(-1, bind)]  # undecodable: the whole body, so only the same bytes match
    formats = message.param_formats
    return [(formats[0] if len(formats) == 1 else formats[i] if i < len(formats) else 0, value)
            for i, value in enumerate(message.params)]
