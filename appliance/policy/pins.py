"""Settings Tollgate pins, so that the classifier and the server read SQL the same way.

The classifier parses every statement with libpg_query (pglast) under PostgreSQL's
defaults. Two settings change how the *server* splits a string into tokens:

- ``standard_conforming_strings``: when off, a backslash in an ordinary ``'…'`` literal is
  an escape, so ``select '\\''; update …; -- '`` is one SELECT to pglast and an UPDATE to
  the server. With it on, a backslash is an escape only inside ``E'…'`` strings, which
  pglast lexes exactly as the server does. (``backslash_quote`` only decides whether
  ``\\'`` inside an escape string is an *error*; it never changes where a token ends, so a
  difference there makes the server refuse what pglast accepted — nothing runs.)
- ``client_encoding``: the server converts the client's bytes to its own encoding before
  lexing, and Tollgate reads statement text in the session's encoding the same way
  (:mod:`appliance.pgwire.encodings`, only encodings verified against the server). So the
  encoding is pinned at *the value the server reported at login*: were it changed later,
  the next statement would be read in one encoding by Tollgate and another by the server —
  in SJIS, BIG5, GBK, UHC, JOHAB and GB18030 an ASCII byte, a backslash, can be the second
  byte of a character, so ``E'ソ\\'…`` ends the literal for one and not the other.
  Statements can only set it to UTF8 or SQL_ASCII (read alike as UTF-8), and in a session
  logged in with another encoding not at all (:func:`changes_client_encoding`).

Rather than lex with each session's settings, Tollgate keeps them at the values it lexes
with: a statement that would change them is refused by the classifier (never allowable by
a rule), and a session whose server reports another value (ParameterStatus, at login or
later — a startup option, ``ALTER ROLE … SET``, a DO block) refuses every statement until
it is back. docs/policy.md, "Keeping the classifier and the server in agreement".
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

from pglast.parser import ParseError, parse_sql_json, scan

from appliance.pgwire.encodings import ClientEncoding, canonical_name

# Values the server accepts for "on" (parse_bool: on, true, yes, 1 and unique prefixes).
_ON = frozenset({"on", "true", "yes", "1", "t", "tr", "tru", "y", "ye"})
# Encodings whose bytes the server lexes as Tollgate reads them (names cleaned as
# PostgreSQL's clean_encoding_name does: lower case, alphanumerics only).
_SAME_BYTES = frozenset({"utf8", "unicode", "sqlascii"})


def _clean(value: str) -> str:
    return value.strip().strip("'\"").strip().lower()


def _scs_ok(value: str) -> bool:
    return _clean(value) in _ON


def _encoding_ok(value: str) -> bool:
    return re.sub(r"[^0-9a-z]", "", _clean(value)) in _SAME_BYTES


PINNED = {
    "standard_conforming_strings": (_scs_ok, "on"),
    "client_encoding": (_encoding_ok, "UTF8 or SQL_ASCII"),
}

# Text in libpg_query's JSON parse tree (lower-cased) that may mean a pinned setting is
# being changed; a tree without any of these is not walked. Names appear decoded in the
# JSON (U&"…" identifiers and E'…' strings included), and the JSON escapes only quotes,
# backslashes and control characters.
_MARKERS = ("conforming", "client_encoding", "set_config", "pg_settings")


def value_problem(name: str, value: str) -> str | None:
    """Why ``name = value`` is not allowed, or None (also None for settings not pinned)."""
    pinned = PINNED.get(name.strip().lower())
    if pinned is None:
        return None
    ok, wanted = pinned
    if ok(value):
        return None
    return (f"Tollgate keeps {name.strip().lower()} = {wanted} so that it reads SQL exactly as the database "
            f"does; {value!r} is refused")


def session_problem(parameters: Mapping[str, str], login: ClientEncoding | None) -> str | None:
    """Why a session whose server reports ``parameters``, and reported the client encoding
    ``login`` at login (None: one Tollgate can't read), must refuse statements, or None."""
    value = parameters.get("standard_conforming_strings")
    if value is not None and not _scs_ok(value):
        return (f"the database reports standard_conforming_strings = {value}, which Tollgate does not allow (it "
                "must be on for statements to be judged as the database runs them); every statement is refused "
                "until it is set back")
    value = parameters.get("client_encoding", "UTF8")
    if login is None:
        return (f"the session's client_encoding {value} is not one Tollgate reads exactly as the database does; "
                "every statement is refused (connect with a supported encoding, such as UTF8)")
    if login.digits_inside_characters:
        # Statements would be read right, but results are searched for card numbers as
        # bytes, and here a character's later bytes can be digits that join (and hide) a
        # card number's digits: fail closed until masking reads the session's encoding.
        return (f"the session's client_encoding {login.name} can hide card numbers from Tollgate's masking (a "
                "character's later bytes can be digits); every statement is refused (connect with UTF8)")
    now = canonical_name(value)
    if now == login.name or (login.is_utf8 and now in ("UTF8", "SQL_ASCII")):
        return None
    return (f"the database reports client_encoding = {value}, but the session logged in with {login.name}, the "
            "encoding Tollgate reads its statements in; every statement is refused until it is set back")


def encoding_change_problem(sql: str) -> str | None:
    """Why ``sql``, in a session that logged in with an encoding other than UTF-8, is
    refused for changing it (see :func:`changes_client_encoding`), or None."""
    try:
        tree_json = parse_sql_json(sql)
    except ParseError:
        return None  # the classifier says what it makes of text it can't parse
    if "client_encoding" not in tree_json.lower() or not changes_client_encoding(tree_json, json.loads(tree_json)):
        return None
    return ("this session's statements are read in the client_encoding it logged in with; changing it is "
            "refused (RESET client_encoding is not)")


# Server encodings of more than one byte a character: the server lower-cases only ASCII
# letters of an unquoted identifier there, as pglast does.
_MULTIBYTE_SERVER = frozenset({"UTF8", "EUC_JP", "EUC_CN", "EUC_KR", "EUC_TW", "EUC_JIS_2004", "MULE_INTERNAL"})


def identifier_case_problem(sql: str, server_encoding: str) -> str | None:
    """Why ``sql`` is refused on a server whose encoding has one byte a character, or None.

    There the server lower-cases an unquoted identifier's non-ASCII letters with its
    locale's ``tolower`` (``CAFÉ`` is ``café``), which pglast doesn't (it reads ``cafÉ``): a
    rule naming ``café`` wouldn't see ``CAFÉ``. Rather than guess the locale, unquoted
    identifiers with non-ASCII characters are refused there; quoted ones are read alike."""
    if sql.isascii() or canonical_name(server_encoding) in _MULTIBYTE_SERVER:
        return None
    try:
        tokens = scan(sql)
    except ParseError:
        return None  # the classifier says what it makes of text it can't parse
    for token in tokens:
        if token.name == "IDENT" and sql[token.start] != '"' and not sql[token.start:token.end + 1].isascii():
            return (f"the database's encoding is {server_encoding}, where it lower-cases the identifier "
                    f"{sql[token.start:token.end + 1]} with its locale; write it in double quotes, exactly as it is "
                    "named")
    return None


def changes_client_encoding(tree_json: str, tree: Any) -> bool:
    """Whether a parsed request sets client_encoding to any value (``SET``, ``SET NAMES``,
    ``set_config``; RESET and DEFAULT go back to the login value). Refused in sessions that
    logged in with an encoding other than UTF-8: every change is one there."""
    lowered = tree_json.lower()
    if "client_encoding" not in lowered:
        return False
    for node in _dicts(tree):
        kind = node.get("kind")
        if isinstance(kind, str) and kind.startswith("VAR_") and str(node.get("name", "")).strip().lower() == \
                "client_encoding":
            if kind == "VAR_SET_VALUE":
                return True
        elif "funcname" in node:
            args = node.get("args") or []
            setting = _constant(args[0]) if args else None
            names = [part.get("String", {}).get("sval", "") for part in node.get("funcname") or ()
                     if isinstance(part, dict)]
            if names and names[-1].lower() == "set_config" and (setting or "").strip().lower() == "client_encoding":
                return True
    return False


def statement_problem(tree_json: str, tree: Any) -> str | None:
    """Why a parsed request would change a pinned setting, or None.

    ``tree_json`` is libpg_query's JSON text (a cheap pre-check), ``tree`` the decoded tree.
    Refused: ``SET [LOCAL|SESSION]`` / ``ALTER ROLE|DATABASE|SYSTEM … SET`` / a function's
    ``SET`` clause of a pinned setting to another value (RESET and DEFAULT go back to the
    value checked at login), ``set_config`` of a pinned setting to anything but a literal
    allowed value or with a setting name that isn't a literal, and any UPDATE of
    ``pg_settings`` (whose rule calls set_config).
    """
    lowered = tree_json.lower()
    if not any(marker in lowered for marker in _MARKERS):
        return None
    for node in _dicts(tree):
        kind = node.get("kind")
        if isinstance(kind, str) and kind.startswith("VAR_") and isinstance(node.get("name"), str):
            problem = _set_problem(node)
        elif "funcname" in node:
            problem = _set_config_problem(node)
        elif isinstance(node.get("UpdateStmt"), dict):
            problem = _pg_settings_problem(node["UpdateStmt"])
        else:
            continue
        if problem is not None:
            return problem
    return None


def _dicts(tree: Any) -> Iterator[dict[str, Any]]:
    stack = [tree]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _constant(node: Any) -> str | None:
    """The text of a literal A_Const node (as the server would read it as a setting), else None."""
    if not isinstance(node, dict):
        return None
    const = node.get("A_Const")
    if not isinstance(const, dict):
        return None
    if "sval" in const:
        return str(const["sval"].get("sval", ""))
    if "ival" in const:
        return str(const["ival"].get("ival", 0))
    if "fval" in const:
        return str(const["fval"].get("fval", ""))
    if "boolval" in const:
        return "true" if const["boolval"].get("boolval") else "false"
    return None


def _set_problem(node: dict[str, Any]) -> str | None:
    name = node["name"]
    if name.strip().lower() not in PINNED:
        return None
    if node["kind"] != "VAR_SET_VALUE":
        return None  # RESET, DEFAULT, FROM CURRENT: the value the session had, checked at login
    args = node.get("args") or []
    value = _constant(args[0]) if len(args) == 1 else None
    if value is None:
        return f"Tollgate keeps {name.lower()} at {PINNED[name.strip().lower()][1]}; this SET is refused"
    return value_problem(name, value)


def _set_config_problem(node: dict[str, Any]) -> str | None:
    names = [part.get("String", {}).get("sval", "") for part in node.get("funcname") or () if isinstance(part, dict)]
    if not names or names[-1].lower() != "set_config":
        return None
    args = node.get("args") or []
    setting = _constant(args[0]) if args else None
    if setting is None:
        # Any setting, pinned ones included: only a literal value no pinned setting could
        # take differently (pg_dump sets restrict_nonsystem_relation_kind to a list this way).
        value = _constant(args[1]) if len(args) > 1 else None
        if value is not None and all(_harmless(name, value) for name in PINNED):
            return None
        return ("set_config with a setting name that isn't a literal could change a setting Tollgate keeps "
                "fixed; it is refused")
    if setting.strip().lower() not in PINNED:
        return None
    value = _constant(args[1]) if len(args) > 1 else None
    if value is None:
        return f"set_config of {setting.strip().lower()} to a value that isn't a literal is refused"
    return value_problem(setting, value)


# What PostgreSQL's parse_bool accepts: any of these could set standard_conforming_strings.
_BOOLEAN = frozenset({"t", "tr", "tru", "true", "f", "fa", "fal", "fals", "false", "y", "ye", "yes", "n", "no",
                      "on", "of", "off", "1", "0"})


def _harmless(name: str, value: str) -> bool:
    """Whether setting pinned ``name`` to ``value`` keeps it as Tollgate needs, or the server
    would refuse the value outright for that setting."""
    ok, _ = PINNED[name]
    if ok(value):
        return True
    if name == "standard_conforming_strings":
        return _clean(value) not in _BOOLEAN
    # An encoding name is letters, digits, '_' and '-'; anything else names no encoding.
    return re.fullmatch(r"[A-Za-z0-9_-]+", value.strip()) is None


def _pg_settings_problem(body: dict[str, Any]) -> str | None:
    relation = body.get("relation")
    if isinstance(relation, dict) and str(relation.get("relname", "")).lower() == "pg_settings":
        return "an UPDATE of pg_settings changes settings (its rule calls set_config); it is refused"
    return None
