"""Client encodings end to end: a real ProxyServer with the enforcement, masking and audit
addons in front of a real PostgreSQL 15 (issue 14).

Each session logs in with a ``client_encoding``; what is checked is what an agent and an
auditor see: statements judged as the server runs them (the SJIS and BIG5 trail-byte 0x5C
injection is an UPDATE, and blocked), card numbers masked with the text around them still
valid in the encoding, records in Unicode with the session's encoding, and the sessions
Tollgate can't serve (GB18030, a change of encoding) refused.
"""

from __future__ import annotations

import asyncio
import json
import select
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import pq

from appliance.audit.addon import AuditAddon
from appliance.audit.keys import init_audit_dir
from appliance.audit.store import AuditLog
from appliance.config import AuditConfig, Endpoint
from appliance.masking.addon import MaskingAddon
from appliance.pan.scanner import scrub
from appliance.policy.addon import EnforcementAddon
from appliance.policy.holder import PolicyHolder
from appliance.proxy.hooks import AddonManager
from tests.masking.conftest import Postgres, postgres  # noqa: F401 -- the real server, as a fixture
from tests.proxy.loop_thread import LoopThread
from tests.proxy.real_proxy import READ_TIMEOUT, postgres_proxy_config, start_proxy

PAN = "4111111111111111"
POLICY = """
default = "deny"

[[rule]]
name = "reads-and-settings"
classes = ["read", "session", "transaction"]
action = "allow"
"""


class Harness(LoopThread):
    def __init__(self, pg: Postgres, tmp: Path) -> None:
        super().__init__()
        self.pg = pg
        (tmp / "policy.toml").write_text(POLICY)
        audit = AuditConfig(tmp / "audit", origin="tollgate.test/encodings", durability="write")
        init_audit_dir(audit)
        self.log = AuditLog.open(audit, version="test")
        addons = AddonManager([EnforcementAddon(PolicyHolder(tmp / "policy.toml"), None), MaskingAddon(),
                               AuditAddon(self.log, lambda text: scrub(text, "pci"))])
        self.server, self.port = start_proxy(self, lambda port: postgres_proxy_config(port, pg.port),
                                             Endpoint.parse(f"127.0.0.1:{pg.port}"), addons)

    def connect(self, encoding: str) -> psycopg.Connection[Any]:
        return psycopg.connect(host="127.0.0.1", port=self.port, user="agent", dbname="postgres", sslmode="disable",
                               autocommit=True, client_encoding=encoding)

    def records(self) -> list[dict[str, Any]]:
        out = []
        for segment in sorted((self.log.config.dir / "segments").glob("*.jsonl")):
            out += [json.loads(line) for line in segment.read_bytes().splitlines() if line]
        return out

    def close(self) -> None:
        self.stop(lambda: asyncio.wait_for(self.server.close(), READ_TIMEOUT))
        self.log.close("test over")


@pytest.fixture(scope="module")
def harness(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:  # noqa: F811
    direct = postgres.connect()
    direct.execute("drop table if exists t")
    direct.execute("create table t (x int)")
    direct.execute("insert into t values (0)")
    direct.close()
    h = Harness(postgres, tmp_path_factory.mktemp("encodings"))
    yield h
    h.close()


def run(conn: psycopg.Connection[Any], sql: bytes) -> tuple[list[list[bytes | None]], str | None]:
    """Send raw bytes as one simple Query: the rows (raw text) and the SQLSTATE if it failed.

    The proxy runs on a thread of this process, and libpq's blocking calls hold the GIL:
    every wait is a select() on the socket, with libpq only reading what has arrived."""
    pgconn = conn.pgconn
    pgconn.send_query(sql)
    while pgconn.flush():
        select.select([], [pgconn.socket], [], READ_TIMEOUT)
    rows: list[list[bytes | None]] = []
    error = None
    while True:
        while pgconn.is_busy():
            ready, _, _ = select.select([pgconn.socket], [], [], READ_TIMEOUT)
            assert ready, "no answer through the proxy"
            pgconn.consume_input()
        result = pgconn.get_result()
        if result is None:
            return rows, error
        if result.status == pq.ExecStatus.FATAL_ERROR:
            error = (result.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode()
        rows.extend([result.get_value(r, c) for c in range(result.nfields)] for r in range(result.ntuples))


def x_now(postgres: Postgres) -> int:  # noqa: F811
    with postgres.connect() as direct:
        return direct.execute("select x from t").fetchone()[0]  # type: ignore[index]


@pytest.mark.parametrize("name, character", [("SJIS", "ソ"), ("BIG5", "許"), ("GBK", "乗")])
def test_a_trail_byte_backslash_is_read_as_the_server_reads_it(harness: Harness, postgres: Postgres,  # noqa: F811
                                                               name: str, character: str) -> None:
    codec = {"SJIS": "cp932", "BIG5": "big5", "GBK": "gbk", "UHC": "cp949"}[name]
    encoded = character.encode(codec)
    assert encoded[-1:] == b"\\"
    attack = b"select E'" + encoded + b"'; update t set x = 1; -- '"
    with harness.connect(name) as conn:
        assert run(conn, attack) == ([], "42501")  # the UPDATE is seen, and refused by the policy
        assert x_now(postgres) == 0
        rows, error = run(conn, b"select E'" + encoded + b"', 'a'")
        assert error is None and rows == [[encoded, b"a"]]
    [statement] = [r for r in harness.records() if r["type"] == "statement" and r["text"].startswith("select E'")
                   and "update" in r["text"] and character in r["text"]]
    assert statement["decision"] == "block" and statement["classes"] == ["read", "write"]


@pytest.mark.parametrize("name, text", [
    ("LATIN9", "café € œ"), ("WIN1252", "café € “quoted”"), ("LATIN1", "café ½"), ("EUC_JP", "カード番号"),
    ("SJIS", "カード番号ソ"), ("BIG5", "信用卡號碼許"), ("GBK", "信用卡号码"), ("UHC", "카드 번호"), ("KOI8R", "карта"),
])
def test_card_numbers_are_masked_and_the_text_stays_valid(harness: Harness, name: str, text: str) -> None:
    with harness.connect(name) as conn:
        value = conn.execute(f"select '{text} {PAN} {text}' as \"{text}\"").fetchone()[0]  # type: ignore[index]
        assert value == f"{text} 411111******1111 {text}"  # psycopg decoded it in the encoding
        backend_pid = conn.info.backend_pid
    records = harness.records()
    [start] = [r for r in records if r["type"] == "session.start" and r.get("backend_pid") == backend_pid]
    assert start["client_encoding"] == name
    [statement] = [r for r in records if r["type"] == "statement" and r["session"] == start["session"]
                   and text in r["text"]]
    assert statement["text"] == f"select '{text} 411111******1111 {text}' as \"{text}\""
    assert "escaped" not in statement
    assert PAN not in json.dumps(records)


@pytest.mark.parametrize("name", ["GB18030", "JOHAB", "EUC_TW"])
def test_a_session_in_an_encoding_tollgate_cannot_serve_is_refused(harness: Harness, name: str) -> None:
    with harness.connect(name) as conn:
        rows, error = run(conn, b"select 1")
        assert error == "42501" and rows == []


def test_the_encoding_cannot_be_changed_under_tollgate(harness: Harness) -> None:
    with harness.connect("SJIS") as conn:
        assert run(conn, b"set client_encoding = 'UTF8'") == ([], "42501")
        assert run(conn, b"select set_config('client_encoding', 'UTF8', false)") == ([], "42501")
        assert run(conn, b"reset client_encoding") == ([], None)
        assert run(conn, "select 'ソ'".encode("cp932")) == ([["ソ".encode("cp932")]], None)


def test_bytes_that_are_not_text_in_the_encoding_are_refused(harness: Harness) -> None:
    with harness.connect("SJIS") as conn:
        assert run(conn, b"select '\x83'") == ([], "42501")
        assert run(conn, b"select 1") == ([[b"1"]], None)  # the session goes on


def test_on_a_single_byte_database_unquoted_non_ascii_identifiers_are_refused(harness: Harness,
                                                                              postgres: Postgres) -> None:  # noqa: F811
    with postgres.connect() as direct:
        direct.execute("drop database if exists latin1_db")
        direct.execute("create database latin1_db encoding 'LATIN1' locale 'C' template template0")
    conn = psycopg.connect(host="127.0.0.1", port=harness.port, user="agent", dbname="latin1_db", sslmode="disable",
                           autocommit=True, client_encoding="LATIN1")
    with conn:
        assert conn.info.parameter_status("server_encoding") == "LATIN1"
        assert run(conn, "select 1 as CAFÉ".encode("latin-1")) == ([], "42501")
        assert run(conn, 'select 1 as "CAFÉ", \'CAFÉ\''.encode("latin-1")) == (
            [[b"1", "CAFÉ".encode("latin-1")]], None)
