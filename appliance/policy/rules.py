"""The policy file: TOML rules, loaded and validated, every problem reported as ``FILE:LINE: reason``.

Format (docs/policy.md has the full guide)::

    default = "deny"                    # "deny" (the default) or "allow": when no rule matches
    default_message = "no policy rule allows this statement"
    search_path = ["public"]            # where bare names resolve, for allow/mask coverage
    cardholder_columns = ["payments.cards.pan"]  # exact schema.table.column names (see lineage)
    agent_groups = ["payments-agents"]  # groups the lineage and function rules apply to
    trusted_functions = ["reporting.*"]  # functions outside pg_catalog agents may call
    cardholder_writes = "refuse"        # or { action = "hold", approvers = [...], … }

    [[rule]]
    name = "no-ddl-on-cardholder-data"  # required, unique
    description = "…"                   # free text, for people
    groups = ["payments-agents"]        # identity groups, any of; omitted = everyone
    targets = ["payments"]              # target names; omitted = every target
    classes = ["ddl", "truncate"]       # StatementClass values; omitted = any
    commands = ["CREATE FUNCTION"]      # command tags (as `policy check` shows them); omitted = any
    relations = ["payments.*"]          # globs over schema.name; omitted = any
    columns = ["payments.cards.pan"]    # globs over schema.table.column; omitted = any
    functions = ["pg_read_file", "lo_*"]  # globs over [schema.]name; omitted = any
    action = "block"                    # allow | block | hold | mask (required)
    message = "…"                       # what the agent is told

    # action = "hold" also takes:
    approvers = ["dba"]                 # groups whose members may approve (required)
    min_approvals = 1
    timeout = "15m"                     # "90s", "15m", "2h", "1h30m" or a number of seconds

    # action = "mask" also takes (required):
    mask = [{ columns = ["payments.cards.cvv"], method = "full" }]  # pan | last4 | full | null

Matching (see :mod:`appliance.policy.engine`): rules in file order, first match wins.
``block``/``hold`` match when the statement touches ANY listed class and, for each listed
object dimension, ANY of its names hits a pattern. ``allow``/``mask`` match only when they
COVER the statement: ALL its classes listed, ALL its names of each listed dimension
covered. That asymmetry is what keeps allow rules least-privilege.

Unknown keys are errors (a misspelt ``relatons`` silently ignored would widen a rule), as
are unknown classes, actions and methods, bad globs, duplicate names and a hold without
approvers. Semantic errors point at the offending key inside its ``[[rule]]`` block, found
by scanning the text, since tomllib keeps no positions.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.model.decision import (
    Action,
    ColumnMask,
    HoldSpec,
    MaskMethod,
    StatementClass,
)
from appliance.policy.patterns import Pattern, PatternError, compile_pattern, split_name

DEFAULT_MESSAGE = "no policy rule allows this statement"
DEFAULT_SEARCH_PATH = ("public",)
RESERVED_RULE_NAMES = frozenset({"default", "unparsable", "refused", "empty", "lineage", "untrusted-function"})
MIN_TIMEOUT, MAX_TIMEOUT = 1.0, 24 * 3600.0

TOP_KEYS = ("default", "default_message", "search_path", "cardholder_columns", "agent_groups",
            "trusted_functions", "cardholder_writes", "rule")
RULE_KEYS = ("name", "description", "groups", "targets", "classes", "commands", "relations", "columns",
             "functions", "action", "message", "approvers", "min_approvals", "timeout", "mask")
HOLD_KEYS = ("approvers", "min_approvals", "timeout")
MASK_KEYS = ("columns", "method")


class PolicyError(Exception):
    """A policy problem, phrased as ``FILE:LINE: reason`` (or ``FILE: reason``)."""


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``[[rule]]``: who and what it is about, and what to do."""

    name: str
    line: int
    action: Action
    groups: frozenset[str] | None = None
    targets: frozenset[str] | None = None
    classes: frozenset[StatementClass] | None = None
    commands: frozenset[str] | None = None  # command tags, upper case, single-spaced
    relations: tuple[Pattern, ...] | None = None
    columns: tuple[Pattern, ...] | None = None
    functions: tuple[Pattern, ...] | None = None
    message: str = ""
    hold: HoldSpec | None = None
    masks: tuple[ColumnMask, ...] = ()
    description: str = ""


@dataclass(frozen=True, slots=True)
class RuleSet:
    """A whole policy file, validated."""

    path: Path
    rules: tuple[Rule, ...]
    default: Action = Action.BLOCK  # ALLOW or BLOCK
    default_message: str = DEFAULT_MESSAGE
    default_line: int | None = None
    search_path: tuple[str, ...] = DEFAULT_SEARCH_PATH
    # Declared with ``cardholder_columns``: exact ``schema.table.column`` names.
    cardholder_columns: tuple[str, ...] = ()
    # ``agent_groups``: whom the lineage and function rules apply to (None: nobody).
    agent_groups: frozenset[str] | None = None
    # ``trusted_functions``: globs of functions outside pg_catalog agents may call.
    trusted_functions: tuple[Pattern, ...] = ()
    # ``cardholder_writes``: None refuses an agent's plain copy of a cardholder column into
    # a table; a HoldSpec holds it for approval instead.
    cardholder_writes: HoldSpec | None = None


# ---- positions --------------------------------------------------------------------------

_RULE_HEADER = re.compile(r"^\s*\[\[\s*rule\s*\]\]\s*(#.*)?$")
_TABLE_HEADER = re.compile(r"^\s*\[\[?\s*[A-Za-z0-9_\-.\"' ]+\]\]?\s*(#.*)?$")


class _Lines:
    """Finds where things are in the policy text (tomllib reports no positions)."""

    def __init__(self, text: str):
        self.lines = text.splitlines()
        self.rule_headers = [i + 1 for i, line in enumerate(self.lines) if _RULE_HEADER.match(line)]
        self.table_headers = [i + 1 for i, line in enumerate(self.lines) if _TABLE_HEADER.match(line)]

    def rule(self, index: int) -> int | None:
        if index < len(self.rule_headers):
            return self.rule_headers[index]
        return self.key(None, "rule")

    def key(self, index: int | None, key: str) -> int | None:
        """The line of ``key = …`` in rule ``index``'s block (or at top level for None)."""
        if index is None:
            start = 1
            end = self.table_headers[0] if self.table_headers else len(self.lines) + 1
        else:
            start = self.rule(index) if index < len(self.rule_headers) else None
            if start is None:
                return self.key(None, "rule")
            end = next((h for h in self.table_headers if h > start), len(self.lines) + 1)
        pattern = re.compile(rf"""^\s*(?:{re.escape(key)}|"{re.escape(key)}"|'{re.escape(key)}')\s*=""")
        for number in range(start, end):
            if pattern.match(self.lines[number - 1]):
                return number
        return start if index is not None else None


class _Reader:
    def __init__(self, path: Path, text: str):
        self.path = path
        self.where = _Lines(text)

    def error(self, line: int | None, reason: str) -> PolicyError:
        return PolicyError(f"{self.path}:{line}: {reason}" if line else f"{self.path}: {reason}")

    def rule_error(self, index: int, key: str | None, reason: str) -> PolicyError:
        line = self.where.key(index, key) if key else self.where.rule(index)
        return self.error(line, reason)


# ---- values -----------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> float:
    """``"90s"``, ``"15m"``, ``"2h"``, ``"1h30m"``, ``"300"`` or a number: seconds."""
    if isinstance(value, bool):
        raise TypeError("must be a duration like \"15m\", not a boolean")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            seconds = float(text)
        else:
            compact = text.replace(" ", "")
            parts = _DURATION_PART.findall(compact)
            if not parts or "".join(n + u for n, u in parts) != compact:
                raise ValueError(f"{value!r} is not a duration (write e.g. \"90s\", \"15m\", \"2h\")")
            seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    else:
        raise TypeError(f"must be a duration like \"15m\", not {type(value).__name__}")
    if not MIN_TIMEOUT <= seconds <= MAX_TIMEOUT:
        raise ValueError(f"{value!r} is out of range (1s to 24h)")
    return seconds


def _string_list(reader: _Reader, index: int | None, key: str, value: Any, where: str) -> tuple[str, ...]:
    line = reader.where.key(index, key) if index is not None else reader.where.key(None, key)
    if not isinstance(value, list):
        raise reader.error(line, f"{where}{key} must be an array of strings, not {type(value).__name__}")
    if not value:
        raise reader.error(line, f"{where}{key} must not be empty (omit it to mean any)")
    for item in value:
        if not isinstance(item, str) or not item:
            raise reader.error(line, f"{where}{key} must hold non-empty strings, not {item!r}")
    return tuple(value)


_CLASS_NAMES = {c.value: c for c in StatementClass}
_ACTIONS = {a.value: a for a in Action}
_METHODS = {m.value: m for m in MaskMethod}


def _rule(reader: _Reader, index: int, raw: Any, seen: dict[str, int]) -> Rule:
    header = reader.where.rule(index)
    if not isinstance(raw, dict):
        raise reader.error(header, f"rule {index + 1} must be a table, not {type(raw).__name__}")
    name = raw.get("name")
    if name is None:
        raise reader.error(header, f"rule {index + 1} has no name (every rule needs a unique name = \"…\")")
    if not isinstance(name, str) or not name.strip():
        raise reader.rule_error(index, "name", "rule name must be a non-empty string")
    where = f"rule {name!r}: "
    if name in RESERVED_RULE_NAMES:
        raise reader.rule_error(index, "name", f"{where}the name is reserved for the built-in decisions")
    if name in seen:
        raise reader.rule_error(index, "name", f"duplicate rule name {name!r} (first used at line {seen[name]})")
    seen[name] = header or 0
    for key in raw:
        if key not in RULE_KEYS:
            raise reader.rule_error(index, key, f"{where}unknown key {key!r} (known: {', '.join(RULE_KEYS)})")

    def strings(key: str) -> tuple[str, ...] | None:
        return _string_list(reader, index, key, raw[key], where) if key in raw else None

    def text(key: str) -> str:
        value = raw.get(key, "")
        if not isinstance(value, str):
            raise reader.rule_error(index, key, f"{where}{key} must be a string")
        return value

    def patterns(key: str) -> tuple[Pattern, ...] | None:
        values = strings(key)
        if values is None:
            return None
        try:
            return tuple(compile_pattern(v) for v in values)
        except PatternError as exc:
            raise reader.rule_error(index, key, f"{where}{key}: {exc}") from None

    action_text = raw.get("action")
    if action_text is None:
        raise reader.error(header, f"{where}action is required ({' | '.join(_ACTIONS)})")
    if action_text not in _ACTIONS:
        raise reader.rule_error(index, "action",
                                f"{where}action must be one of {', '.join(_ACTIONS)}, not {action_text!r}")
    action = _ACTIONS[action_text]

    commands = None
    command_names = strings("commands")
    if command_names is not None:
        commands = frozenset(command_tag(c) for c in command_names)

    classes = None
    class_names = strings("classes")
    if class_names is not None:
        unknown = [c for c in class_names if c not in _CLASS_NAMES]
        if unknown:
            raise reader.rule_error(index, "classes", f"{where}unknown class {unknown[0]!r} "
                                                      f"(known: {', '.join(_CLASS_NAMES)})")
        classes = frozenset(_CLASS_NAMES[c] for c in class_names)

    hold = None
    if action is Action.HOLD:
        approvers = strings("approvers")
        if approvers is None:
            raise reader.rule_error(index, "action", f"{where}action = \"hold\" needs approvers = [\"group\", …]")
        min_approvals = raw.get("min_approvals", 1)
        if isinstance(min_approvals, bool) or not isinstance(min_approvals, int) or not 1 <= min_approvals <= 100:
            raise reader.rule_error(index, "min_approvals", f"{where}min_approvals must be an integer from 1 to 100")
        try:
            timeout = parse_duration(raw.get("timeout", "15m"))
        except (ValueError, TypeError) as exc:
            raise reader.rule_error(index, "timeout", f"{where}timeout {exc}") from None
        hold = HoldSpec(approvers, min_approvals, timeout)
    else:
        for key in HOLD_KEYS:
            if key in raw:
                raise reader.rule_error(index, key, f"{where}{key} is only for action = \"hold\"")

    masks: tuple[ColumnMask, ...] = ()
    if action is Action.MASK:
        if "mask" not in raw:
            raise reader.rule_error(index, "action", f"{where}action = \"mask\" needs mask = "
                                    "[{ columns = [\"schema.table.column\"], method = \"…\" }]")
        masks = _masks(reader, index, raw["mask"], where)
    elif "mask" in raw:
        raise reader.rule_error(index, "mask", f"{where}mask is only for action = \"mask\"")

    return Rule(
        name=name, line=header or 0, action=action,
        groups=frozenset(g) if (g := strings("groups")) is not None else None,
        targets=frozenset(t) if (t := strings("targets")) is not None else None,
        classes=classes, commands=commands, relations=patterns("relations"), columns=patterns("columns"),
        functions=patterns("functions"), message=text("message"), hold=hold, masks=masks,
        description=text("description"))


def _masks(reader: _Reader, index: int, raw: Any, where: str) -> tuple[ColumnMask, ...]:
    def bad(reason: str) -> PolicyError:
        return reader.rule_error(index, "mask", f"{where}mask: {reason}")

    if not isinstance(raw, list) or not raw:
        raise bad("must be a non-empty array of { columns = [...], method = \"...\" }")
    out: list[ColumnMask] = []
    for entry in raw:
        if not isinstance(entry, dict):
            raise bad(f"entries must be tables, not {type(entry).__name__}")
        for key in entry:
            if key not in MASK_KEYS:
                raise bad(f"unknown key {key!r} (known: {', '.join(MASK_KEYS)})")
        method = entry.get("method")
        if method not in _METHODS:
            raise bad(f"method must be one of {', '.join(_METHODS)}, not {method!r}")
        columns = entry.get("columns")
        if not isinstance(columns, list) or not columns:
            raise bad("columns must be a non-empty array of \"schema.table.column\" names")
        for column in columns:
            # Masks are applied by catalog lookup of exact names, so no globs here.
            if not is_exact_column(column):
                raise bad(f"{column!r} is not a schema.table.column name (masks take exact names)")
            out.append(ColumnMask(column, _METHODS[method]))
    return tuple(out)


def command_tag(text: str) -> str:
    """A command tag as statements carry it: ``create  function`` -> ``CREATE FUNCTION``."""
    return " ".join(text.upper().split())


def is_exact_column(column: object) -> bool:
    """Whether ``column`` is an exact ``schema.table.column`` name (no globs, no empty part)."""
    if not isinstance(column, str) or any(ch in column for ch in "*?[]"):
        return False
    parts = split_name(column)
    return len(parts) == 3 and all(parts)


def _cardholder_writes(reader: _Reader, value: Any) -> HoldSpec | None:
    """``"refuse"`` (the default), or ``{ action = "hold", approvers = [...], … }``."""
    line = reader.where.key(None, "cardholder_writes")
    if value == "refuse":
        return None
    if not isinstance(value, dict) or value.get("action") != "hold":
        raise reader.error(line, 'cardholder_writes must be "refuse" or { action = "hold", approvers = [...] }')
    for key in value:
        if key not in ("action", *HOLD_KEYS):
            raise reader.error(line, f"cardholder_writes: unknown key {key!r} (known: action, {', '.join(HOLD_KEYS)})")
    approvers = value.get("approvers")
    if not isinstance(approvers, list) or not approvers or not all(isinstance(a, str) and a for a in approvers):
        raise reader.error(line, "cardholder_writes: a hold needs approvers = [\"group\", …]")
    min_approvals = value.get("min_approvals", 1)
    if isinstance(min_approvals, bool) or not isinstance(min_approvals, int) or not 1 <= min_approvals <= 100:
        raise reader.error(line, "cardholder_writes: min_approvals must be an integer from 1 to 100")
    try:
        timeout = parse_duration(value.get("timeout", "15m"))
    except (ValueError, TypeError) as exc:
        raise reader.error(line, f"cardholder_writes: timeout {exc}") from None
    return HoldSpec(tuple(approvers), min_approvals, timeout)


def _cardholder_columns(reader: _Reader, value: Any) -> tuple[str, ...]:
    columns = _string_list(reader, None, "cardholder_columns", value, "")
    for column in columns:
        if not is_exact_column(column):
            raise reader.error(reader.where.key(None, "cardholder_columns"),
                               f"cardholder_columns: {column!r} is not a schema.table.column name "
                               "(write exact names, like mask columns; quote parts that need it)")
    return tuple(sorted(set(columns)))


def _toml_error(path: Path, text: str, exc: tomllib.TOMLDecodeError) -> PolicyError:
    message = str(exc)
    match = re.search(r"\s*\(at line (\d+), column (\d+)\)\s*$", message)
    if match:
        return PolicyError(f"{path}:{match.group(1)}: {message[:match.start()]} (column {match.group(2)})")
    match = re.search(r"\s*\(at end of document\)\s*$", message)
    if match:
        return PolicyError(f"{path}:{max(1, len(text.splitlines()))}: {message[:match.start()]} (at end of file)")
    return PolicyError(f"{path}: {message}")


def parse_rules(text: str, path: str | Path = "<policy>") -> RuleSet:
    """Parse and validate policy text; raises :class:`PolicyError`."""
    path = Path(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _toml_error(path, text, exc) from None
    reader = _Reader(path, text)
    for key in data:
        if key not in TOP_KEYS:
            line = reader.where.key(None, key) or next(
                (i + 1 for i, ln in enumerate(reader.where.lines) if re.match(rf"^\s*\[+\s*{re.escape(key)}\b", ln)),
                None)
            raise reader.error(line, f"unknown key {key!r} (known: {', '.join(TOP_KEYS)})")

    default_text = data.get("default", "deny")
    if default_text not in ("deny", "allow"):
        raise reader.error(reader.where.key(None, "default"), f"default must be \"deny\" or \"allow\", "
                                                             f"not {default_text!r}")
    default_message = data.get("default_message", DEFAULT_MESSAGE)
    if not isinstance(default_message, str) or not default_message.strip():
        raise reader.error(reader.where.key(None, "default_message"), "default_message must be a non-empty string")
    search_path = DEFAULT_SEARCH_PATH
    if "search_path" in data:
        search_path = _string_list(reader, None, "search_path", data["search_path"], "")
    cardholder = _cardholder_columns(reader, data["cardholder_columns"]) if "cardholder_columns" in data else ()
    agents = None
    if "agent_groups" in data:
        agents = frozenset(_string_list(reader, None, "agent_groups", data["agent_groups"], ""))
    writes = _cardholder_writes(reader, data["cardholder_writes"]) if "cardholder_writes" in data else None
    trusted: tuple[Pattern, ...] = ()
    if "trusted_functions" in data:
        try:
            trusted = tuple(compile_pattern(v) for v in _string_list(reader, None, "trusted_functions",
                                                                     data["trusted_functions"], ""))
        except PatternError as exc:
            raise reader.error(reader.where.key(None, "trusted_functions"), f"trusted_functions: {exc}") from None

    raw_rules = data.get("rule", [])
    if not isinstance(raw_rules, list):
        raise reader.error(reader.where.key(None, "rule"), "rule must be an array of tables: write [[rule]]")
    seen: dict[str, int] = {}
    rules = tuple(_rule(reader, i, raw, seen) for i, raw in enumerate(raw_rules))
    return RuleSet(path=path, rules=rules, default=Action.ALLOW if default_text == "allow" else Action.BLOCK,
                   default_message=default_message, default_line=reader.where.key(None, "default"),
                   search_path=search_path, cardholder_columns=cardholder, agent_groups=agents,
                   trusted_functions=trusted, cardholder_writes=writes)


def parse_rules_bytes(raw: bytes, path: str | Path) -> RuleSet:
    """Parse a policy file's bytes (TOML is UTF-8; anything else is an error with its line)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise PolicyError(f"{path}:{line}: not valid UTF-8") from None
    return parse_rules(text, path)


def load_rules(path: str | Path) -> RuleSet:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return parse_rules_bytes(raw, path)
