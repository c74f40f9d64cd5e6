"""No parser differential in any client encoding Tollgate reads (issue 14).

The same oracle as test_differential.py — the command tags of what a real PostgreSQL 15
runs, inside a rolled-back transaction — but with the session's ``client_encoding`` set to
each encoding family, and statements built from the characters that make those encodings
dangerous to a UTF-8 lexer: two-byte characters whose second byte is an ASCII quote,
backslash, semicolon, dash, star, slash or dollar (SJIS ソ is 0x83 0x5C), digits as trail
bytes (GB18030, JOHAB), and in the single-byte encodings a no-break space and ``café``.
Tollgate's view is what the enforcement addon classifies: the bytes decoded in the
session's encoding (:func:`appliance.policy.addon.session_text`), or a refusal.
"""

from __future__ import annotations

import pytest

from appliance.pgwire.encodings import UTF8, client_encoding
from appliance.policy.addon import session_text
from appliance.proxy.hooks import Reject, SessionInfo
from tests.policy.test_differential import _pglast_view

_SPECIAL = b"\\'\";-*/$0123456789"
_TEMPLATES = [
    "select E'{c}\\'; update t set x = 1; -- '",
    "select E'{c}\\\\'; update t set x = 1; -- '",
    "select '{c}'; update t set x = 1; -- '",
    "select '{c}\\'; update t set x = 1; -- '",
    'select 1 as "{c}"; update t set x = 1; -- "',
    "select 1 -- {c}\n; update t set x = 1",
    "select 1 /* {c}*/; update t set x = 1 /* {c} */",
    "select $${c}$$; update t set x = 1; select $${c}$$",
    "select $a${c}$a$; update t set x = 1",
    "select U&'{c}\\0027'; update t set x = 1; -- '",
    "select 1 as {c}x; update t set x = 1",
    "select {c}; update t set x = 1",
]
FAMILIES = ["LATIN1", "LATIN9", "WIN1252", "EUC_JP", "SJIS", "BIG5", "GBK", "GB18030", "JOHAB", "UHC", "EUC_KR",
            "EUC_CN", "KOI8R", "WIN1251"]


def _tricky_characters(name: str) -> list[str]:
    """Characters of ``name`` whose encoding holds an ASCII byte after its first, the
    high-bit single characters for single-byte encodings (at most 40, spread out)."""
    encoding = client_encoding(name)
    assert encoding is not None
    found: list[str] = []
    for lead in range(0x80, 0x100):
        for trail in _SPECIAL:
            try:
                text = encoding.decode(bytes([lead, trail]))
            except UnicodeDecodeError:
                continue
            if len(text) == 1:
                found.append(text)
    if name == "GB18030":
        found.extend(encoding.decode(data) for data in (b"\x81\x30\x81\x30", b"\x81\x35\xf4\x37",
                                                          b"\x84\x31\xa4\x39", b"\x95\x32\x82\x36"))
    if not found:  # a single-byte encoding
        found = [encoding.decode(bytes([b])) for b in (0xA0, 0xE9, 0xA4, 0xFF, 0xC0)
                 if _decodes(encoding.decode, bytes([b]))]
        found.append("café" if _decodes(encoding.encode, "café") else encoding.decode(b"\xe0\xe1"))
    return found[:: max(1, len(found) // 40)]


def _decodes(convert, value) -> bool:  # type: ignore[no-untyped-def]
    try:
        convert(value)
    except UnicodeError:
        return False
    return True


def _server_view(conn, name: str, data: bytes) -> tuple[list[str], str | None]:  # type: ignore[no-untyped-def]
    from psycopg import pq

    pgconn = conn.pgconn
    assert pgconn.exec_(f"set client_encoding = '{name}'".encode()).status == pq.ExecStatus.COMMAND_OK
    assert pgconn.exec_(b"BEGIN").status == pq.ExecStatus.COMMAND_OK
    pgconn.send_query(data)
    tags: list[str] = []
    error: str | None = None
    while (result := pgconn.get_result()) is not None:
        if result.status == pq.ExecStatus.FATAL_ERROR:
            error = (result.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode()
        elif result.status != pq.ExecStatus.EMPTY_QUERY:
            tags.append((result.command_status or b"").decode().split(" ")[0])
    pgconn.exec_(b"ROLLBACK")
    assert pgconn.exec_(b"reset client_encoding").status == pq.ExecStatus.COMMAND_OK
    return tags, error


@pytest.fixture(scope="module")
def server(postgres):  # type: ignore[no-untyped-def]
    conn = postgres.connect()
    conn.execute("drop table if exists t")
    conn.execute("create table t (x int, s text)")
    yield conn
    conn.close()


def _session(name: str) -> SessionInfo:
    session = SessionInfo(client=None, destination=None)  # type: ignore[arg-type]
    session.client_encoding = client_encoding(name)
    return session


def check(server, name: str, data: bytes) -> str:  # type: ignore[no-untyped-def]
    """Compare; return what happened ("refused", "agree")."""
    ran, error = _server_view(server, name, data)
    text = session_text(_session(name), data.decode("utf-8", "surrogateescape"))
    context = f"\n{name} bytes: {data!r}\nserver ran: {ran} (error {error})\nTollgate read: {text!r}"
    if isinstance(text, Reject):
        return "refused"  # Tollgate refuses: nothing runs whatever the server makes of it
    seen = _pglast_view(text)
    context += f"\npglast saw: {seen}"
    if seen is None:
        assert ran == [] and error is not None, "pglast can't parse it but the server ran it" + context
    elif error is None:
        assert seen == ran, "pglast and the server see different statements" + context
    else:
        assert seen[:len(ran)] == ran, "the server ran statements pglast doesn't see" + context
    return "agree"


@pytest.mark.parametrize("name", FAMILIES)
def test_statements_in_each_encoding_are_read_as_the_server_runs_them(server, name: str) -> None:  # type: ignore[no-untyped-def]
    encoding = client_encoding(name)
    assert encoding is not None
    outcomes = [check(server, name, encoding.encode(template.replace("{c}", character)))
                for character in _tricky_characters(name) for template in _TEMPLATES]
    assert outcomes.count("agree") >= len(outcomes) * 0.9, "most statements are read, not refused"


def test_the_sjis_backslash_trail_byte_is_not_a_backslash(server) -> None:  # type: ignore[no-untyped-def]
    attack = b"select E'\x83\x5c'; update t set x = 1; -- '"  # E'ソ'; update …
    assert _server_view(server, "SJIS", attack) == (["SELECT", "UPDATE"], None)
    text = session_text(_session("SJIS"), attack.decode("utf-8", "surrogateescape"))
    assert text == "select E'ソ'; update t set x = 1; -- '"
    assert _pglast_view(text) == ["SELECT", "UPDATE"]
    # The control: read a byte at a time (as a lexer that doesn't know SJIS does), 0x5C is a
    # backslash, the literal swallows the UPDATE, and the check says so.
    assert _pglast_view(attack.decode("latin-1")) == ["SELECT"]


@pytest.mark.parametrize("name, data", [
    ("SJIS", b"select '\x83'"),  # a lead byte and a quote: no character
    ("EUC_JP", b"select '\xa4\x27'"),
    ("BIG5", b"select '\xa1\x5a'"),  # the server reads U+FFFD here; Tollgate refuses
    ("UTF8", b"select '\xff'"),
])
def test_bytes_that_do_not_convert_are_refused(server, name: str, data: bytes) -> None:  # type: ignore[no-untyped-def]
    if name == "UTF8":
        session = SessionInfo(client=None, destination=None)  # type: ignore[arg-type]
        assert session.client_encoding is UTF8
        assert _pglast_view(data.decode("utf-8", "surrogateescape")) is None  # the classifier refuses it
        return
    assert check(server, name, data) == "refused"


def test_a_session_cannot_change_its_encoding_under_tollgate(server) -> None:  # type: ignore[no-untyped-def]
    text = session_text(_session("SJIS"), "set client_encoding = 'UTF8'")
    assert isinstance(text, Reject) and "client_encoding" in text.message
    assert session_text(_session("SJIS"), "reset client_encoding") == "reset client_encoding"
