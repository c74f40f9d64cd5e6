"""No parser differential (issue 12): the statements pglast sees are the statements the
server runs, under every session setting Tollgate allows.

The oracle is the server itself. Each generated string is sent as one simple Query (libpq's
PQsendQuery, the protocol an agent's multi-statement string uses) inside a transaction
that is rolled back, and every result the server returns is collected: PostgreSQL parses
the whole string first (a syntax error anywhere runs nothing) and then returns one result,
with its command tag, per statement it ran. That list — how many statements and of which
kind — is compared with the classifier's view of the same text:

- the server ran everything: pglast saw exactly those statements, in order, of those kinds;
- the server refused the text before running anything (a syntax error, or an escape its
  ``backslash_quote`` rejects): nothing ran, whatever pglast thought — the safe direction;
- the server ran k statements and then failed: pglast parsed the text and its first k
  statements are those;
- pglast could not parse it: the server ran nothing.

The strings come from a grammar of what makes lexing hard: standard, E'', U&'' (with and
without UESCAPE) and dollar-quoted literals with and without tags, quoted identifiers,
nested block comments, line comments, semicolons and quotes inside all of these, several
statements per string, and free-form soup of the same pieces (which is how the
``'\\''; update …; -- '`` attack looks). The server runs with the settings Tollgate allows
(standard_conforming_strings on, client_encoding UTF8), and each example picks a
``backslash_quote`` and ``escape_string_warning`` — settings Tollgate does not pin because
they can only make the server refuse what pglast accepted. A control shows the oracle does
see the differential once standard_conforming_strings is off.

Budget: TOLLGATE_FUZZ_EXAMPLES (default 150, a few seconds) examples per run.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.model.decision import StatementClass
from appliance.policy.classifier import classify_uncached

EXAMPLES = int(os.environ.get("TOLLGATE_FUZZ_EXAMPLES", "150"))
ATTACK = "select '\\''; update t set s = $$S0/01$$ where x = 300; -- '"


def _pieces(*items: str) -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(items), max_size=6).map("".join)


_std = _pieces("a", " ", "\\", "''", ";", "$", "$$", "--", "/*", "*/", '"', "\n", "é").map(lambda s: f"'{s}'")
_national = _std.map(lambda s: "N" + s)
_escape = _pieces("a", "\\\\", "\\'", "''", "\\n", "\\x41", "\\101", "\\u00e9", ";", "--", "/*", "$$", '"').map(
    lambda s: f"E'{s}'")
_unicode = st.one_of(
    _pieces("a", "\\00e9", "\\\\", "''", ";", "--", "/*", "!").map(lambda s: f"U&'{s}'"),
    _pieces("a", "!00e9", "!!", "\\", "''", ";", "--").map(lambda s: f"U&'{s}' UESCAPE '!'"),
)
_tag = st.sampled_from(["", "a", "tag_1", "Q"])
_dollar = st.builds(lambda tag, body: f"${tag}${body}${tag}$", _tag,
                    _pieces("a", "$", "$$", "$a$", "'", "\\", ";", "--", "/*", "*/", "\n"))
_literal = st.one_of(_std, _national, _escape, _unicode, _dollar)

_comment = st.one_of(
    _pieces("a", "'", "\\", ";", "$$", "/* x */", "*", "/").map(lambda s: f"/* {s} */"),
    st.builds(lambda a, b: f"/* {a} /* {b} */ */", _pieces("a", "'", ";", "*"), _pieces("b", "\\", "$$", ";")),
    _pieces("a", "'", "\\", ";", "$$", "/*", "*/").map(lambda s: f"-- {s}\n"),
)
_space = st.one_of(st.sampled_from([" ", "\n", "\t"]), _comment)
_alias = _pieces("q", ";", "'", "\\", " ", '""', "$$", "--").map(lambda s: f'"a{s}"')

_TEMPLATES = [
    "select {L}", "select {L} as {A}", "values ({L})", "insert into t(s) values ({L})",
    "update t set s = {L}", "delete from t where s = {L}", "comment on table t is {L}",
    "set application_name = {L}", "show application_name", "do $d$ begin null; end $d$",
    "select s from t where s = {L}{S}or s = {L}",
]
_statement = st.builds(
    lambda template, lit1, lit2, alias, space: template.replace("{L}", lit1, 1).replace("{L}", lit2)
    .replace("{A}", alias).replace("{S}", space),
    st.sampled_from(_TEMPLATES), _literal, _literal, _alias, _space)
# Free-form soup of the same pieces: most of it fails to parse, some parses differently.
_soup = _pieces("'", "\\", ";", "$$", "$a$", "/*", "*/", "--", "\n", "E'", "U&'", " select 1 ",
                " update t set x = 1 ", '"', " ", "a", "''", "\\'")
_query = st.builds(
    lambda parts, lead, tail: lead + "".join(parts) + tail,
    st.lists(st.tuples(st.one_of(_statement, _statement, _soup), _space, st.sampled_from([";", ";", " ;"]))
             .map(lambda t: t[0] + t[1] + t[2]), min_size=1, max_size=4),
    st.one_of(st.just(""), _space), st.one_of(st.just(""), _space, _soup))


def _server_view(conn, sql: str) -> tuple[list[str], str | None]:  # type: ignore[no-untyped-def]
    """The first word of each statement's command tag, and the SQLSTATE if it failed."""
    from psycopg import pq

    pgconn = conn.pgconn
    assert pgconn.exec_(b"BEGIN").status == pq.ExecStatus.COMMAND_OK
    pgconn.send_query(sql.encode())
    tags: list[str] = []
    error: str | None = None
    while (result := pgconn.get_result()) is not None:
        if result.status == pq.ExecStatus.FATAL_ERROR:
            error = (result.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode()
        elif result.status != pq.ExecStatus.EMPTY_QUERY:
            tags.append((result.command_status or b"").decode().split(" ")[0])
    pgconn.exec_(b"ROLLBACK")
    return tags, error


def _pglast_view(sql: str) -> list[str] | None:
    """The command of each statement pglast sees (None: it can't parse the text)."""
    statements = classify_uncached(sql)
    if any(StatementClass.UNPARSABLE in c.classes for c in statements):
        return None
    # VALUES is a SelectStmt; the server's tag for it is SELECT too.
    return [c.command.split(" ")[0] for c in statements if StatementClass.EMPTY not in c.classes]


@pytest.fixture(scope="module")
def server(postgres):  # type: ignore[no-untyped-def]
    conn = postgres.connect()
    conn.execute("drop table if exists t")
    conn.execute("create table t (x int, s text)")
    yield conn
    conn.close()


def check(server, sql: str) -> None:  # type: ignore[no-untyped-def]
    ran, error = _server_view(server, sql)
    seen = _pglast_view(sql)
    context = f"\nSQL: {sql!r}\nserver ran: {ran} (error {error})\npglast saw: {seen}"
    if seen is None:
        assert ran == [] and error is not None, "pglast can't parse it but the server ran it" + context
    elif error is None:
        assert seen == ran, "pglast and the server see different statements" + context
    else:
        assert seen[:len(ran)] == ran, "the server ran statements pglast doesn't see" + context


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                      HealthCheck.function_scoped_fixture])
@given(sql=_query, backslash_quote=st.sampled_from(["on", "off", "safe_encoding"]),
       escape_string_warning=st.booleans())
def test_pglast_sees_what_the_server_runs(server, sql: str, backslash_quote: str,  # type: ignore[no-untyped-def]
                                          escape_string_warning: bool) -> None:
    server.execute(f"set backslash_quote = {backslash_quote}")
    server.execute(f"set escape_string_warning = {'on' if escape_string_warning else 'off'}")
    check(server, sql)


@pytest.mark.parametrize("sql", [
    ATTACK,
    "select E'\\''; update t set x = 1; -- '",
    "select $a$ $$ ; update t set x = 1 $a$; select 1",
    "select /* /* */ ; update t set x = 1 */ 1",
    "select U&'\\0027'; update t set x = 1; -- '",
    "select U&'!0027' UESCAPE '!'; update t set x = 1; -- '",
    "select 'a' -- '; update t set x = 1\n; select 2",
    "select 'a\\'; update t set x = 1; select ''",
    'select 1 as "a\\"; update t set x = 1; select "b"',
])
def test_known_tricks_agree(server, sql: str) -> None:  # type: ignore[no-untyped-def]
    server.execute("reset backslash_quote")
    check(server, sql)


def test_the_oracle_sees_the_differential_when_the_setting_is_off(server) -> None:  # type: ignore[no-untyped-def]
    # The control: with standard_conforming_strings off (what Tollgate refuses), the server
    # runs an UPDATE pglast doesn't see, and this check says so.
    server.execute("set standard_conforming_strings = off")
    try:
        ran, _ = _server_view(server, ATTACK)
        assert ran == ["SELECT", "UPDATE"] and _pglast_view(ATTACK) == ["SELECT"]
        with pytest.raises(AssertionError, match="different statements"):
            check(server, ATTACK)
    finally:
        server.execute("reset standard_conforming_strings")
