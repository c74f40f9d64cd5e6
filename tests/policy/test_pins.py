"""Pinned settings (issue 12, no parser differential): what would make the server lex SQL
differently from the classifier is refused, and a session whose server reports such a
setting refuses every statement until it is put back."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.model.identity import Identity
from appliance.pgwire import messages as m
from appliance.pgwire.encodings import UTF8, client_encoding
from appliance.policy.addon import EnforcementAddon
from appliance.policy.classifier import classify
from appliance.policy.engine import Policy
from appliance.policy.holder import PolicyHolder
from appliance.policy.pins import encoding_change_problem, identifier_case_problem, session_problem
from appliance.proxy.pipeline import BLOCKED_SQL
from tests.proxy.trace import backend, frontend, ready_session

ATTACK = "select '\\''; update cards set expiry = $$S0/01$$ where id = 300; -- '"

REFUSED = [
    "set standard_conforming_strings = off",
    "SET standard_conforming_strings TO false",
    "set session standard_conforming_strings = 0",
    "begin; set local standard_conforming_strings = off; commit",
    'set "Standard_Conforming_Strings" = \'off\'',
    "set standard_conforming_strings = off; " + ATTACK,
    "select set_config('standard_conforming_strings', 'off', false)",
    "select pg_catalog.set_config('standard_conforming_strings', 'of', true)",
    "select set_config(U&'standard\\005fconforming_strings', 'off', false)",
    "select set_config(E'standard\\137conforming_strings', 'off', false)",
    "select * from set_config('standard_conforming_strings', 'off', false)",
    "select set_config('standard_conforming_strings', 'o' || 'ff', false)",
    "select set_config(name, 'off', false) from pg_settings",
    "select set_config(name, 'of', false) from pg_settings where name = 'standard_conforming_strings'",
    "select set_config(name, 'SJIS', false) from pg_settings where name = 'client_encoding'",
    "select set_config(name, setting, false) from pg_settings",
    "alter role app set standard_conforming_strings = off",
    "alter role all in database payments set standard_conforming_strings = off",
    "alter database payments set standard_conforming_strings to off",
    "alter system set standard_conforming_strings = off",
    "create function f() returns int language sql set standard_conforming_strings = off as 'select 1'",
    "update pg_settings set setting = 'off' where name = 'standard_conforming_strings'",
    "set client_encoding = 'SJIS'",
    "set names 'BIG5'",
    "select set_config('client_encoding', 'GBK', false)",
    "select 1\x00; update cards set expiry = '01/01'",
]

ALLOWED = [
    "set standard_conforming_strings = on",
    "set standard_conforming_strings to true",
    "reset standard_conforming_strings",
    "set standard_conforming_strings to default",
    "reset all",
    "set client_encoding = 'UTF8'",
    "set names 'utf-8'",
    "select set_config('application_name', 'x', false)",
    # pg_dump's own: a name from pg_settings, a value no pinned setting could take
    ("SELECT set_config(name, 'view, foreign-table', false) FROM pg_settings "
     "WHERE name = 'restrict_nonsystem_relation_kind'"),
    "select '\\'' as backslash_then_quote",  # one literal, with the settings Tollgate keeps
    ATTACK,
]

EVERYTHING = """
default = "allow"

[[rule]]
name = "parse-errors-reach-the-server"
classes = ["unparsable"]
action = "allow"

[[rule]]
name = "no-writes"
classes = ["write", "ddl", "do_block"]
action = "block"
"""


@pytest.mark.parametrize("sql", REFUSED)
def test_changing_a_pinned_setting_is_refused_and_no_rule_can_allow_it(sql: str) -> None:
    [c] = classify(sql)
    assert c.command == "REFUSED" and c.error
    decision = Policy.parse(EVERYTHING).decide(["agents"], "payments", sql)
    assert (decision.action.value, decision.rule) == ("block", "refused")
    assert "Tollgate refuses" in decision.message


@pytest.mark.parametrize("sql", ALLOWED)
def test_keeping_them_is_not_refused(sql: str) -> None:
    assert all(c.command != "REFUSED" for c in classify(sql))


def test_the_attack_is_one_select_of_one_literal_with_the_pinned_settings() -> None:
    [c] = classify(ATTACK)
    assert c.command == "SELECT" and c.relations == frozenset()


def test_a_syntax_error_is_still_allowable_explicitly_but_a_refusal_is_not() -> None:
    p = Policy.parse(EVERYTHING)
    assert p.decide([], "t", "selec 1").rule == "parse-errors-reach-the-server"
    assert p.decide([], "t", "select 1\x00").rule == "refused"


@pytest.mark.parametrize("parameters, refused", [
    ({"standard_conforming_strings": "on", "client_encoding": "UTF8"}, False),
    ({"standard_conforming_strings": "on", "client_encoding": "SQL_ASCII"}, False),
    ({"standard_conforming_strings": "off", "client_encoding": "UTF8"}, True),
    ({"standard_conforming_strings": "on", "client_encoding": "SJIS"}, True),
    ({}, False),
])
def test_session_problem(parameters: dict[str, str], refused: bool) -> None:
    assert (session_problem(parameters, UTF8) is not None) is refused


@pytest.mark.parametrize("login, now, refused", [
    ("SJIS", "SJIS", False), ("SJIS", "UTF8", True), ("SJIS", "SQL_ASCII", True), ("LATIN9", "LATIN9", False),
    ("LATIN9", "LATIN1", True), ("UTF8", "SJIS", True), ("BIG5", "BIG5", False),
])
def test_the_client_encoding_is_pinned_at_its_login_value(login: str, now: str, refused: bool) -> None:
    parameters = {"standard_conforming_strings": "on", "client_encoding": now}
    assert (session_problem(parameters, client_encoding(login)) is not None) is refused


def test_a_session_in_an_encoding_tollgate_cannot_read_is_refused() -> None:
    problem = session_problem({"client_encoding": "MULE_INTERNAL"}, client_encoding("MULE_INTERNAL"))
    assert problem is not None and "MULE_INTERNAL" in problem


@pytest.mark.parametrize("sql, refused", [
    ("set client_encoding = 'UTF8'", True), ("set names 'sjis'", True), ("set local client_encoding to sjis", True),
    ("select set_config('client_encoding', 'UTF8', false)", True),
    ("select set_config(E'client\\x5fencoding', 'UTF8', false)", True),
    ('set U&"client\\005fencoding" = \'UTF8\'', True),
    ("reset client_encoding", False), ("set client_encoding to default", False), ("show client_encoding", False),
    ("select 'client_encoding'", False), ("select 1", False),
])
def test_no_change_of_a_non_utf8_login_encoding(sql: str, refused: bool) -> None:
    assert (encoding_change_problem(sql) is not None) is refused


POLICY = """
default = "deny"

[[rule]]
name = "reads-and-settings"
classes = ["read", "session"]
action = "allow"
"""


@pytest.fixture
def proxied(tmp_path: Path):
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    session, io = ready_session([EnforcementAddon(PolicyHolder(path), None)])
    session.info.identity = Identity("agent-1", "agent", ("agents",))
    return session, io


def _refused(session, io, query: str) -> m.ErrorResponse:  # type: ignore[no-untyped-def]
    session.client_data(frontend(m.Query(query)))
    [sent] = io.server_got()
    assert sent.query.encode() == BLOCKED_SQL
    session.server_data(backend(m.ErrorResponse.build("ERROR", "42601", "syntax"), m.ReadyForQuery(b"I")))
    error, _ = io.client_got()
    return error


def test_through_a_session_the_set_is_refused_and_the_attack_is_a_select(proxied) -> None:  # type: ignore[no-untyped-def]
    session, io = proxied
    error = _refused(session, io, "SET standard_conforming_strings = off")
    assert error.sqlstate == "42501" and "standard_conforming_strings" in error.message
    session.client_data(frontend(m.Query(ATTACK)))
    assert io.server_got()[0].query == ATTACK  # a read, and the server reads it as one too


def test_a_session_whose_server_reports_it_off_refuses_everything_until_it_is_back(proxied) -> None:  # type: ignore[no-untyped-def]
    session, io = proxied
    # Whatever turned it off (a startup option, ALTER ROLE … SET, a DO block), the server says so.
    session.client_data(frontend(m.Query("SELECT 1")))
    io.server_got()
    session.server_data(backend(m.CommandComplete("SELECT 1"), m.ParameterStatus("standard_conforming_strings", "off"),
                                m.ReadyForQuery(b"I")))
    io.client_got()
    error = _refused(session, io, ATTACK)
    assert error.sqlstate == "42501" and "standard_conforming_strings = off" in error.message
    session.client_data(frontend(m.Parse("", "SELECT 1", ()), m.Sync()))
    assert io.server_got()[0].query.encode() == BLOCKED_SQL  # the extended protocol too
    session.server_data(backend(m.ErrorResponse.build("ERROR", "42601", "syntax"), m.ReadyForQuery(b"I")))
    io.client_got()
    session.client_data(frontend(m.Query("SET standard_conforming_strings = on")))  # putting it back is allowed
    assert io.server_got()[0].query == "SET standard_conforming_strings = on"
    session.server_data(backend(m.CommandComplete("SET"), m.ParameterStatus("standard_conforming_strings", "on"),
                                m.ReadyForQuery(b"I")))
    io.client_got()
    session.client_data(frontend(m.Query("SELECT 1")))
    assert io.server_got()[0].query == "SELECT 1"


def test_a_client_encoding_that_hides_backslashes_refuses_everything(proxied) -> None:  # type: ignore[no-untyped-def]
    session, io = proxied
    session.client_data(frontend(m.Query("SELECT 1")))
    io.server_got()
    session.server_data(backend(m.CommandComplete("SELECT 1"), m.ParameterStatus("client_encoding", "SJIS"),
                                m.ReadyForQuery(b"I")))
    io.client_got()
    assert "client_encoding = SJIS" in _refused(session, io, "SELECT 1").message


@pytest.mark.parametrize("sql, server_encoding, refused", [
    ("select * from CAFÉ", "LATIN1", True), ("select * from café", "WIN1252", True),
    ("select 1 as Été", "SQL_ASCII", True), ('select * from "CAFÉ"', "LATIN1", False),
    ("select 'CAFÉ' from t", "LATIN1", False), ("select * from cafe -- CAFÉ", "LATIN1", False),
    ("select * from CAFÉ", "UTF8", False), ("select * from CAFÉ", "EUC_JP", False),
    ("select * from t", "LATIN1", False),
])
def test_unquoted_non_ascii_identifiers_are_refused_on_a_single_byte_server(sql: str, server_encoding: str,
                                                                            refused: bool) -> None:
    # The server lower-cases their letters with its locale, which pglast can't know.
    assert (identifier_case_problem(sql, server_encoding) is not None) is refused
