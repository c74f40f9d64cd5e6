"""The policy engine: a loaded rule set deciding what happens to each request.

:class:`Policy` answers "may these groups run this SQL on this target?" with a
:class:`~appliance.model.decision.Decision`. Each statement is judged on its own
(:meth:`Policy.judge`) and the verdicts are combined for the request: the first BLOCK
wins; else any HOLD holds (the first hold's spec); else MASK with every mask; else ALLOW.

Judging one statement — rules in file order, first match wins:

- EMPTY statements are allowed without consulting rules.
- ``block`` / ``hold`` rules match when the statement *touches* what they name: ANY of
  its classes is listed, and for each listed dimension (relations, columns, functions)
  ANY of its names *could* match a pattern (bare names in any schema).
- ``allow`` / ``mask`` rules match only when they *cover* the statement: ALL its classes
  are listed, and for each listed dimension ALL its names are matched whatever they
  resolve to (bare names in every schema of the policy's ``search_path``). A statement
  that needs anything the rule doesn't grant falls through to later rules.
- UNPARSABLE statements are blocked (rule ``unparsable``) unless an allow/mask rule lists
  class ``unparsable`` explicitly; a block/hold rule may still claim them first. Those the
  classifier REFUSED (a pinned setting changed, a NUL, invalid UTF-8, too deep to walk)
  are blocked by the built-in rule ``refused`` before any rule is consulted.
- For the groups the file names in ``agent_groups``, two more built-in rules come before
  any rule: ``untrusted-function`` refuses calls of functions whose bodies the policy
  can't see (:mod:`appliance.policy.functions`), and ``lineage`` refuses any use of a
  cardholder column other than a plain, masked projection (:mod:`appliance.policy.lineage`)
  — or holds a plain copy into a table, if ``cardholder_writes`` says so and the rules
  would allow it.
- Nothing matched: the policy's default (``deny`` unless the file says ``allow``).

A listed dimension the statement has nothing of is covered vacuously: ``SELECT 1`` or
``SELECT now()`` is covered by a rule allowing reads of ``public.*``. Statements that act on
no particular relation but are not harmless (VACUUM of everything, CREATE ROLE, DROP OWNED,
CREATE EXTENSION, …) name the relation ``*.*`` so that scoped allow rules don't cover them.

Masks follow the data, not the rule that let the statement through: every mask rule that
applies to the groups and target and whose listed relations/columns/functions the statement
touches adds its masks to an allowed or held statement (its ``classes`` only govern when it
acts as an allow rule). So a broader allow rule further down cannot unmask a column.

Classification is cached by text (see :func:`appliance.policy.classifier.classify`), and
each Policy caches its decisions by (target, groups, SQL): a repeated request costs a
dictionary lookup. A reloaded policy is a new Policy with an empty cache.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from appliance.model.decision import (
    Action,
    Classification,
    ColumnMask,
    Decision,
    HoldSpec,
    MaskMethod,
    StatementClass,
)
from appliance.policy import lineage
from appliance.policy.classifier import CACHE_MAX_CHARS, CACHE_SIZE, REFUSED, classify
from appliance.policy.functions import server_side_copy, untrusted_function
from appliance.policy.patterns import Kind, Pattern, covers, hits, split_name, unquote
from appliance.policy.rules import PolicyError, Rule, RuleSet, load_rules, parse_rules
from appliance.policy.shape import shape

__all__ = ["Policy", "PolicyError", "Verdict", "load_policy"]

# Where two mask rules name the same column, the one showing less wins.
_MASK_STRENGTH = {MaskMethod.PAN: 1, MaskMethod.LAST4: 2, MaskMethod.FULL: 3, MaskMethod.NULL: 4}
_DIMENSIONS: tuple[tuple[str, Kind], ...] = (("relations", "relation"), ("columns", "column"),
                                             ("functions", "function"))


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the policy says about one statement."""

    action: Action
    rule: str  # a rule's name, or "default" / "unparsable" / "empty"
    line: int | None = None
    message: str = ""
    hold: HoldSpec | None = None
    masks: tuple[ColumnMask, ...] = ()


def _merge_masks(groups: Iterable[Iterable[ColumnMask]]) -> tuple[ColumnMask, ...]:
    chosen: dict[str, ColumnMask] = {}
    for masks in groups:
        for mask in masks:
            held = chosen.get(mask.column)
            if held is None or _MASK_STRENGTH[mask.method] > _MASK_STRENGTH[held.method]:
                chosen[mask.column] = mask
    return tuple(chosen.values())


class Policy:
    """A validated rule set that decides requests. Immutable; safe to share across sessions."""

    def __init__(self, ruleset: RuleSet):
        self.ruleset = ruleset
        self.rules = ruleset.rules
        self.search_path = ruleset.search_path
        self._decide_cached = functools.lru_cache(maxsize=CACHE_SIZE)(self._decide_uncached)
        # In front: by exact text (a repeated statement is one lookup); behind it, by shape.
        self._decide_exact = functools.lru_cache(maxsize=CACHE_SIZE)(self._decide_by_shape)
        self._function_cached = functools.lru_cache(maxsize=1024)(self._decide_function_uncached)
        self._applicable = functools.lru_cache(maxsize=256)(self._applicable_uncached)
        self._agent_cached = functools.lru_cache(maxsize=CACHE_SIZE)(self._agent_problem_uncached)
        self._cardholder_columns = tuple(sorted(
            set(ruleset.cardholder_columns)
            | {m.column for r in ruleset.rules for m in r.masks if m.method is MaskMethod.PAN}))
        self._cardholders = lineage.Cardholders(self.cardholder_column_parts())

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        return cls(load_rules(path))

    @classmethod
    def parse(cls, text: str, path: str | Path = "<policy>") -> Policy:
        return cls(parse_rules(text, path))

    @property
    def path(self) -> Path:
        return self.ruleset.path

    @property
    def masked_columns(self) -> tuple[str, ...]:
        """Every column some mask rule masks (what masking must recognise in results)."""
        return tuple(sorted({m.column for r in self.rules for m in r.masks}))

    @property
    def cardholder_columns(self) -> tuple[str, ...]:
        """Every cardholder column: those the file declares in ``cardholder_columns`` and
        every column a mask rule masks with method ``pan``. Sorted ``schema.table.column``
        names spelled as the policy spells them (a part with a dot, space, quote or glob
        character is double-quoted); :meth:`cardholder_column_parts` gives the parts as
        PostgreSQL stores them. Stable API: ``tollgate db discover/provision`` read it."""
        return self._cardholder_columns

    def cardholder_column_parts(self) -> tuple[tuple[str, str, str], ...]:
        """:attr:`cardholder_columns` as ``(schema, table, column)``, unquoted: the names
        as ``pg_attribute``/``information_schema`` hold them, ready for a catalog query."""
        return tuple(tuple(unquote(p) for p in split_name(c)) for c in self._cardholder_columns)  # type: ignore[misc]

    @property
    def agent_groups(self) -> frozenset[str]:
        """The groups the file's ``agent_groups`` names (empty: the lineage and function
        rules apply to nobody)."""
        return self.ruleset.agent_groups or frozenset()

    def is_agent(self, groups: Iterable[str]) -> bool:
        """Whether a requester with ``groups`` is held to the lineage and function rules."""
        agents = self.ruleset.agent_groups
        return bool(agents) and not agents.isdisjoint(groups)

    def __repr__(self) -> str:
        return f"<Policy {self.path} ({len(self.rules)} rules)>"

    # ---- decisions ----------------------------------------------------------------------

    def decide(self, groups: Iterable[str], target: str, sql: str) -> Decision:
        """The decision for a whole request (every statement of a Query, or one Parse)."""
        key = groups if isinstance(groups, frozenset) else frozenset(groups)
        if len(sql) > CACHE_MAX_CHARS:
            return self._decide_uncached(target, key, sql)
        return self._decide_exact(target, key, sql)

    def _decide_by_shape(self, target: str, key: frozenset[str], sql: str) -> Decision:
        shaped = shape(sql)
        if shaped is None:
            return self._decide_cached(target, key, sql)
        # Same statement, other numbers: the shape's decision, with this statement's text.
        decision = self._decide_cached(target, key, shaped)
        c = decision.statements[0]
        text = sql.strip().rstrip(";").rstrip()
        own = Classification(c.classes, c.relations, c.columns, c.functions, c.command, text, c.prepared_name, c.error)
        return Decision(decision.action, decision.rule, decision.message, decision.rule_line, (own,),
                        decision.hold, decision.masks)

    def _decide_uncached(self, target: str, groups: frozenset[str], sql: str) -> Decision:
        return self.decide_classified(groups, target, classify(sql))

    def decide_function_call(self, groups: Iterable[str], target: str, oid: int) -> Decision:
        """The FunctionCall message names a function by OID only: class function_call,
        function ``oid:<n>`` (which block rules' function patterns treat as any function)."""
        key = groups if isinstance(groups, frozenset) else frozenset(groups)
        return self._function_cached(target, key, int(oid))

    def _decide_function_uncached(self, target: str, groups: frozenset[str], oid: int) -> Decision:
        statement = Classification(frozenset({StatementClass.FUNCTION_CALL}), functions=frozenset({f"oid:{oid}"}),
                                   command="FUNCTION CALL", text=f"<FunctionCall of function OID {oid}>")
        return self.decide_classified(groups, target, (statement,))

    def decide_classified(self, groups: Iterable[str], target: str,
                          statements: Sequence[Classification]) -> Decision:
        """Decide a request whose statements are already classified."""
        group_set = groups if isinstance(groups, frozenset) else frozenset(groups)
        statements = tuple(statements)
        if not statements:
            statements = (Classification(frozenset({StatementClass.EMPTY})),)
        verdicts = [self.judge(group_set, target, s) for s in statements]
        for v in verdicts:
            if v.action is Action.BLOCK:
                return Decision(Action.BLOCK, v.rule, v.message, v.line, statements)
        masks = _merge_masks(v.masks for v in verdicts)
        for v in verdicts:
            if v.action is Action.HOLD:
                return Decision(Action.HOLD, v.rule, v.message, v.line, statements, v.hold, masks)
        if masks:
            first = next(v for v in verdicts if v.masks)
            return Decision(Action.MASK, first.rule, first.message, first.line, statements, None, masks)
        first = next((v for v in verdicts if v.rule != "empty"), verdicts[0])
        return Decision(Action.ALLOW, first.rule, first.message, first.line, statements)

    # ---- one statement ------------------------------------------------------------------

    def _applicable_uncached(self, groups: frozenset[str], target: str) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules
                     if (r.groups is None or r.groups & groups) and (r.targets is None or target in r.targets))

    def judge(self, groups: Iterable[str], target: str, statement: Classification) -> Verdict:
        """The verdict for one statement, before combination with the request's others."""
        classes = statement.classes
        if StatementClass.EMPTY in classes and len(classes) == 1:
            return Verdict(Action.ALLOW, "empty")
        group_set = groups if isinstance(groups, frozenset) else frozenset(groups)
        rules = self._applicable(group_set, target)
        unparsable = StatementClass.UNPARSABLE in classes
        if unparsable and statement.command == REFUSED:
            return Verdict(Action.BLOCK, "refused", None, f"Tollgate refuses this statement: {statement.error}")
        if not unparsable and self.is_agent(group_set):
            problem = self._agent_cached(statement)
            if problem is not None:
                rule_name, message, hold = problem
                if hold is None:
                    return Verdict(Action.BLOCK, rule_name, None, message)
                # What the rules say still counts: a block blocks, a hold of theirs holds;
                # what they would allow waits for the cardholder_writes approvers.
                ruled = self._judge_rules(statement, rules, unparsable)
                if ruled.action in (Action.BLOCK, Action.HOLD):
                    return ruled
                return Verdict(Action.HOLD, rule_name, None, message, hold, ruled.masks)
        return self._judge_rules(statement, rules, unparsable)

    def _judge_rules(self, statement: Classification, rules: tuple[Rule, ...], unparsable: bool) -> Verdict:
        """The verdict of the file's rules (and its default) for one statement."""
        for rule in rules:
            if rule.action in (Action.ALLOW, Action.MASK):
                if unparsable and (rule.classes is None or StatementClass.UNPARSABLE not in rule.classes):
                    continue  # only an explicit "unparsable" lets unreadable SQL through
                if not self._covers(rule, statement):
                    continue
            elif not self._hits(rule, statement, use_classes=True):
                continue
            return self._verdict_for(rule, statement, rules)
        if unparsable:
            return Verdict(Action.BLOCK, "unparsable", None,
                           "the policy cannot classify this statement, so it is blocked"
                           + (f": {statement.error}" if statement.error else ""))
        if self.ruleset.default is Action.BLOCK:
            return Verdict(Action.BLOCK, "default", self.ruleset.default_line, self.ruleset.default_message)
        masks = self._obligations(statement, rules)
        return Verdict(Action.MASK if masks else Action.ALLOW, "default", self.ruleset.default_line, "", None, masks)

    def _agent_problem_uncached(self, statement: Classification) -> tuple[str, str, HoldSpec | None] | None:
        """Why an agent may not run ``statement`` whatever the rules say: (rule, message,
        and the hold that lets it run instead, if any)."""
        if StatementClass.DO_BLOCK in statement.classes:
            return "untrusted-function", ("Tollgate refuses this for agents: a DO block runs code the policy can't "
                                          "see into"), None
        if StatementClass.FUNCTION_CALL in statement.classes:
            problem = untrusted_function(statement.functions, self.ruleset.trusted_functions)
            if problem is not None:
                return "untrusted-function", f"Tollgate refuses this for agents: {problem}", None
        if statement.command == "COPY" and statement.text:
            problem = server_side_copy(statement.text)
            if problem is not None:
                return "untrusted-function", f"Tollgate refuses this for agents: {problem}", None
        if not self._cardholders or not statement.text or StatementClass.EMPTY in statement.classes:
            return None
        hold = self.ruleset.cardholder_writes
        try:
            try:
                lineage.check(statement.text, self._cardholders)
            except lineage.LineageWrite as exc:
                if hold is None:
                    raise
                # Held only if copying into a table is all that is wrong with it.
                lineage.check(statement.text, self._cardholders, writes_allowed=True)
                return "lineage", f"this statement needs approval (cardholder_writes): {exc}", hold
        except lineage.LineageRefusal as exc:
            return "lineage", f"Tollgate refuses this for agents: {exc}", None
        except Exception as exc:  # noqa: BLE001 -- fail closed: an unchecked statement must not run
            return "lineage", (f"Tollgate refuses this for agents: the use of cardholder columns could not be "
                               f"checked ({type(exc).__name__}: {exc})"), None
        return None

    def _verdict_for(self, rule: Rule, statement: Classification, rules: tuple[Rule, ...]) -> Verdict:
        where = f"{self.path.name}:{rule.line}"
        if rule.action is Action.BLOCK:
            return Verdict(Action.BLOCK, rule.name, rule.line,
                           rule.message or f"blocked by policy rule {rule.name!r} ({where})")
        masks = self._obligations(statement, rules)
        if rule.action is Action.HOLD:
            return Verdict(Action.HOLD, rule.name, rule.line,
                           rule.message or f"this statement needs approval under policy rule {rule.name!r} ({where})",
                           rule.hold, masks)
        # A mask rule covering the statement contributes its masks through the obligations
        # (only if the statement touches its objects: "SELECT 1" is covered vacuously by a
        # rule about payments.cards, but has no cards columns to mask).
        return Verdict(Action.MASK if masks else Action.ALLOW, rule.name, rule.line, rule.message, None, masks)

    def _obligations(self, statement: Classification, rules: tuple[Rule, ...]) -> tuple[ColumnMask, ...]:
        """Masks of every applicable mask rule whose objects the statement touches."""
        found = [r.masks for r in rules if r.action is Action.MASK and self._hits(r, statement, use_classes=False)]
        return _merge_masks(found) if found else ()

    def _hits(self, rule: Rule, statement: Classification, use_classes: bool) -> bool:
        if use_classes and rule.classes is not None and not (rule.classes & statement.classes):
            return False
        if use_classes and rule.commands is not None and statement.command not in rule.commands:
            return False
        for attr, kind in _DIMENSIONS:
            patterns: tuple[Pattern, ...] | None = getattr(rule, attr)
            if patterns is None:
                continue
            names = getattr(statement, attr)
            if not any(hits(p, name, kind) for name in names for p in patterns):
                return False
        return True

    def _covers(self, rule: Rule, statement: Classification) -> bool:
        if rule.classes is not None and not statement.classes <= rule.classes:
            return False
        if rule.commands is not None and statement.command not in rule.commands:
            return False
        for attr, kind in _DIMENSIONS:
            patterns: tuple[Pattern, ...] | None = getattr(rule, attr)
            if patterns is None:
                continue
            for name in getattr(statement, attr):
                if not any(covers(p, name, kind, self.search_path) for p in patterns):
                    return False
        return True


def load_policy(path: str | Path) -> Policy:
    """Load and validate a policy file; raises PolicyError (``FILE:LINE: reason``)."""
    return Policy.load(path)
