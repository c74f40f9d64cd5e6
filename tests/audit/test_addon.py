"""The audit addon on session traces, writing to a real audit log in a temp directory.

Sessions are driven with no sockets (tests/proxy/trace.py); the log is the real writer
with real fsync, so what is asserted is what an auditor would read back.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.audit.addon import AuditAddon, SamplingAuditAddon
from appliance.audit.keys import init_audit_dir
from appliance.audit.store import AuditLog
from appliance.audit.store_errors import AuditUnavailable
from appliance.audit.verify_records import record_problems
from appliance.config import AuditConfig
from appliance.masking.addon import MaskingAddon
from appliance.pan.scanner import scrub
from appliance.pgwire import messages as m
from appliance.proxy.hooks import Addon, Reject, SessionInfo, Statement
from appliance.proxy.pipeline import BLOCKED_SQL
from tests.audit.conftest import fill
from tests.proxy.playbook import UPSTREAM_KEY
from tests.proxy.trace import backend, frontend, new_session, ready_session, startup

PAN = "4111111111111111"


def _scrub(text: str) -> str:
    return scrub(text, "pci")


@pytest.fixture
def audit_log(tmp_path: Path) -> Iterator[AuditLog]:
    config = AuditConfig(tmp_path / "audit", origin="tollgate.test/addon", durability="write")
    init_audit_dir(config)
    log = AuditLog.open(config, version="test")
    try:
        yield log
    finally:
        log.close("test over")


def read(log: AuditLog) -> list[dict[str, Any]]:
    out = []
    for segment in sorted((log.config.dir / "segments").glob("*.jsonl")):
        out += [json.loads(line) for line in segment.read_bytes().splitlines() if line]
    return out


class Blocker(Addon):
    def statement(self, session: SessionInfo, statement: Statement):
        return Reject("42501", "no truncating") if "TRUNCATE" in statement.text else None


def test_a_statement_is_recorded_before_it_goes_upstream_and_its_result_after(audit_log: AuditLog):
    session, io = ready_session([MaskingAddon("pci"), SamplingAuditAddon(audit_log, _scrub, result_rows=2)])
    session.client_data(frontend(m.Query(f"SELECT '{PAN}' AS pan, 1 AS n")))
    [statement] = [r for r in read(audit_log) if r["type"] == "statement"]
    assert io.server_got()  # forwarded only now that the record exists
    assert statement["text"] == "SELECT '411111******1111' AS pan, 1 AS n"
    assert statement["outcome"] == "success" and statement["decision"] == "unchecked"
    assert statement["kind"] == "query" and statement["stmt"] == 1
    assert statement["origin"] == "198.18.1.10:40000" and statement["object"] == "payments/payments"
    description = m.RowDescription((m.FieldDescription("pan", 0, 0, 25, -1, -1, 0),
                                    m.FieldDescription("n", 0, 0, 23, 4, -1, 0)))
    session.server_data(backend(description, *(m.DataRow((PAN.encode(), str(i).encode())) for i in range(3)),
                                m.CommandComplete("SELECT 3"), m.ReadyForQuery(b"I")))
    [result] = [r for r in read(audit_log) if r["type"] == "result"]
    assert (result["stmt"], result["tag"], result["rows"], result["masked"]) == (1, "SELECT 3", 3, 3)
    assert result["sample"] == {"columns": ["pan", "n"], "rows": [["411111******1111", "0"],
                                                                   ["411111******1111", "1"]], "truncated": True}
    assert PAN not in json.dumps(read(audit_log))


def test_parameters_are_recorded_scrubbed_with_nulls(audit_log: AuditLog):
    session, _io = ready_session([AuditAddon(audit_log, _scrub)])
    session.client_data(frontend(m.Parse("s", "SELECT $1::text, $2::text", ()),
                                 m.Bind("", "s", (0,), (PAN.encode(), None), ()), m.Execute("", 0), m.Sync()))
    [statement] = [r for r in read(audit_log) if r["type"] == "statement"]
    assert statement["kind"] == "execute" and statement["statement_name"] == "s"
    assert statement["params"] == ["411111******1111", None]


def test_sql_execute_and_a_bind_of_a_sql_prepared_statement_are_recorded_with_the_text_that_runs(
        audit_log: AuditLog):
    session, _io = ready_session([AuditAddon(audit_log, _scrub)])
    session.client_data(frontend(m.Parse("s1", f"UPDATE cards SET pan = '{PAN}' WHERE id = $1", ()), m.Sync()))
    session.server_data(backend(m.ParseComplete(), m.ReadyForQuery(b"I")))
    session.client_data(frontend(m.Query("EXECUTE s1(7)")))
    session.server_data(backend(m.CommandComplete("UPDATE 1"), m.ReadyForQuery(b"I")))
    session.client_data(frontend(m.Query("PREPARE s2 AS SELECT brand FROM cards WHERE id = $1")))
    session.server_data(backend(m.CommandComplete("PREPARE"), m.ReadyForQuery(b"I")))
    session.client_data(frontend(m.Bind("", "s2", (), (b"7",), ()), m.Execute("", 0), m.Sync()))
    executed, _prepare, bound = [r for r in read(audit_log) if r["type"] == "statement"]
    assert executed["text"] == "EXECUTE s1(7)"
    assert executed["executes"] == [{"name": "s1", "text": "UPDATE cards SET pan = '411111******1111' WHERE id = $1"}]
    assert (bound["kind"], bound["statement_name"], bound["text"], bound["params"]) == (
        "execute", "s2", "SELECT brand FROM cards WHERE id = $1", ["7"])
    assert_verifiable(audit_log)


def test_a_blocked_statement_is_recorded_as_a_failure_and_has_no_result(audit_log: AuditLog):
    session, io = ready_session([Blocker(), AuditAddon(audit_log, _scrub)])
    session.client_data(frontend(m.Query("TRUNCATE cards")))
    [sent] = io.server_got()
    assert sent.query.encode() == BLOCKED_SQL
    session.server_data(backend(m.ErrorResponse.build("ERROR", "42601", "syntax"), m.ReadyForQuery(b"I")))
    records = read(audit_log)
    [statement] = [r for r in records if r["type"] == "statement"]
    assert statement["outcome"] == "failure" and statement["sqlstate"] == "42501"
    assert statement["message"] == "no truncating"
    assert not [r for r in records if r["type"] == "result"]


def test_an_error_result_carries_its_sqlstate(audit_log: AuditLog):
    session, _io = ready_session([AuditAddon(audit_log, _scrub)])
    session.client_data(frontend(m.Query("SELECT 1/0")))
    session.server_data(backend(m.ErrorResponse.build("ERROR", "22012", "division by zero"), m.ReadyForQuery(b"I")))
    [result] = [r for r in read(audit_log) if r["type"] == "result"]
    assert result["outcome"] == "failure" and result["sqlstate"] == "22012"


def test_session_start_end_and_refusal_records(audit_log: AuditLog):
    session, _io = ready_session([AuditAddon(audit_log, _scrub)])
    session.client_closed()
    types = [r["type"] for r in read(audit_log)]
    assert types[-3:] == ["auth.success", "session.start", "session.end"]
    start, end = read(audit_log)[-2:]
    assert start["session"] == end["session"] and start["session"] == session.info.key
    assert start["user"] == "unidentified@198.18.1.10" and end["statements"] == 0


def test_in_fsync_mode_the_statement_waits_for_the_record_to_be_durable(tmp_path: Path):
    config = AuditConfig(tmp_path / "audit", origin="tollgate.test/addon", durability="fsync")
    init_audit_dir(config)

    async def scenario() -> list[Any]:
        log = AuditLog.open(config, version="test")
        log.start(asyncio.get_running_loop())
        try:
            session, io = ready_session([AuditAddon(log, _scrub)])
            session.client_data(frontend(m.Query("SELECT 1")))
            assert io.server_got() == [] and len(io.waits) == 1  # not before it is on disk
            awaitable, done = io.waits[0]
            try:
                await awaitable
                done(None, None)
            except BaseException as exc:  # noqa: BLE001 - handed to the session like the shell does
                done(None, exc)
            return [log.durable_size, io.server_got()]
        finally:
            await asyncio.to_thread(log.close, "test over")

    durable, sent = asyncio.run(scenario())
    assert [x.query for x in sent] == ["SELECT 1"]
    assert durable >= 3  # log.start, the statement, and whatever came between


def test_the_log_is_told_how_many_statements_are_in_flight(audit_log: AuditLog):
    """Forwarded and not answered: what decides whether a sync may run on the loop's thread."""
    session, _io = ready_session([Blocker(), AuditAddon(audit_log, _scrub)])
    other, _other_io = ready_session([AuditAddon(audit_log, _scrub)])
    session.client_data(frontend(m.Query("SELECT 1")))
    other.client_data(frontend(m.Query("SELECT 2")))
    assert audit_log._commit.inflight == 2
    session.server_data(backend(m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"I")))
    assert audit_log._commit.inflight == 1
    session.client_data(frontend(m.Query("TRUNCATE cards")))  # refused: not in flight
    session.server_data(backend(m.ErrorResponse.build("ERROR", "42601", "syntax"), m.ReadyForQuery(b"I")))
    assert audit_log._commit.inflight == 1
    assert audit_log._commit.sessions == 2
    other.client_closed()  # its statement was never answered: not in flight any more
    assert audit_log._commit.inflight == 0 and audit_log._commit.sessions == 1


# ---- text that isn't UTF-8: written escaped, never dropped ----------------------------------------

def raw_lines(log: AuditLog) -> list[bytes]:
    lines: list[bytes] = []
    for segment in sorted((log.config.dir / "segments").glob("*.jsonl")):
        lines += [line for line in segment.read_bytes().splitlines() if line]
    return lines


def assert_verifiable(log: AuditLog) -> None:
    """Every line passes the verifier's record checks: canonical JSON, 10.2.2 fields, no clear PAN."""
    for line in raw_lines(log):
        _obj, problems = record_problems(line)
        assert problems == [], (line, problems)


def unescape(text: str) -> bytes:
    """What docs/audit-format.md tells a reader to do with a string listed in ``escaped``."""
    return re.sub(rb"\\\\|\\x([0-9a-f]{2})",
                  lambda mo: bytes.fromhex(mo.group(1).decode()) if mo.group(1) else b"\\",
                  text.encode("utf-8"))


def test_a_column_name_and_value_that_arent_utf8_are_recorded_escaped(audit_log: AuditLog):
    # A LATIN9 session: the column "€\" and the value "café" arrive as bytes 0xA4 and 0xE9.
    session, _io = ready_session([SamplingAuditAddon(audit_log, _scrub)])
    session.client_data(frontend(m.Query("SELECT 1")))
    column = b"\xa4\\".decode("utf-8", "surrogateescape")
    description = m.RowDescription((m.FieldDescription(column, 0, 0, 25, -1, -1, 0),))
    session.server_data(backend(description, m.DataRow((b"caf\xe9",)), m.CommandComplete("SELECT 1"),
                                m.ReadyForQuery(b"I")))
    [result] = [r for r in read(audit_log) if r["type"] == "result"]
    assert result["sample"]["columns"] == ["\\xa4\\\\"] and result["sample"]["rows"] == [["caf\\xe9"]]
    assert result["escaped"] == ["/sample/columns/0", "/sample/rows/0/0"]
    assert unescape(result["sample"]["columns"][0]) == b"\xa4\\"
    assert unescape(result["sample"]["rows"][0][0]).decode("iso8859_15") == "café"
    assert_verifiable(audit_log)


def test_a_statement_that_isnt_utf8_runs_and_is_recorded_escaped(audit_log: AuditLog):
    session, io = ready_session([AuditAddon(audit_log, _scrub)])
    text = b"SELECT 'caf\xe9' AS \"\\\"".decode("utf-8", "surrogateescape")
    session.client_data(frontend(m.Parse("stmt\udcff", text, ()), m.Bind("", "stmt\udcff", (), (), ()),
                                 m.Execute("", 0), m.Sync()))
    assert io.server_got()  # recorded, so forwarded
    [statement] = [r for r in read(audit_log) if r["type"] == "statement"]
    assert statement["outcome"] == "success"
    assert statement["text"] == "SELECT 'caf\\xe9' AS \"\\\\\""
    assert statement["statement_name"] == "stmt\\xff"
    assert sorted(statement["escaped"]) == ["/statement_name", "/text"]
    assert unescape(statement["text"]) == text.encode("utf-8", "surrogateescape")
    assert_verifiable(audit_log)


def test_a_card_number_next_to_bytes_that_arent_utf8_is_scrubbed_before_escaping(audit_log: AuditLog):
    # Escaped, byte 0x99 is "\x99": its digits run into the card number after it, and the
    # 18-digit run of the written text is no card number: the search of the bytes finds it.
    session, _io = ready_session([SamplingAuditAddon(audit_log, _scrub)])
    session.client_data(frontend(m.Query("SELECT 1")))
    column = b"\x99".decode("utf-8", "surrogateescape") + PAN
    description = m.RowDescription((m.FieldDescription(column, 0, 0, 23, 4, -1, 0),))
    session.server_data(backend(description, m.DataRow((b"1",)), m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"I")))
    [result] = [r for r in read(audit_log) if r["type"] == "result"]
    assert result["sample"]["columns"] == ["\\x99411111******1111"]
    assert PAN not in json.dumps(read(audit_log))
    assert_verifiable(audit_log)


def test_an_application_name_that_isnt_utf8_keeps_its_session_records(audit_log: AuditLog):
    session, _io = new_session([AuditAddon(audit_log, _scrub)])
    session.client_data(startup(application_name="agent-\udce9"))
    session.upstream_connected()
    session.server_data(m.AuthenticationOk().encode() + m.BackendKeyData(*UPSTREAM_KEY).encode()
                        + m.ReadyForQuery(b"I").encode())
    session.client_closed()
    records = read(audit_log)
    [start] = [r for r in records if r["type"] == "session.start"]
    assert start["application_name"] == "agent-\\xe9" and start["escaped"] == ["/application_name"]
    assert [r["type"] for r in records][-2:] == ["session.start", "session.end"]
    assert_verifiable(audit_log)


def test_a_record_that_cant_be_made_is_recorded_as_unrecorded(audit_log: AuditLog):
    addon = AuditAddon(audit_log, _scrub)
    # A value outside the record model (bytes where text belongs): the record can't be made.
    addon.policy_reloaded("/etc/tollgate/policy.toml", b"\xab" * 32, 2, None)  # type: ignore[arg-type]
    [note] = [r for r in read(audit_log) if r["type"] == "audit.unrecorded"]
    assert note["records"] == {"policy.reload": 1} and note["outcome"] == "failure"
    assert "bytes is not JSON serializable" in note["error"]
    assert not [r for r in read(audit_log) if r["type"] == "policy.reload"]
    assert_verifiable(audit_log)


def _pad_until_refused(log: AuditLog) -> None:
    for _ in range(10_000):
        log.append({"type": "admin", "user": "tollgate", "origin": "local", "object": "test", "outcome": "success",
                    "action": "padding"})


def test_records_lost_while_the_disk_is_full_are_recorded_once_it_has_room(tiny_fs: Path):
    config = AuditConfig(tiny_fs / "audit", origin="tollgate.test/addon", durability="write")
    init_audit_dir(config)
    log = AuditLog.open(config, version="test")
    try:
        addon = AuditAddon(log, _scrub)
        session, _io = ready_session([addon])
        fill(tiny_fs / "filler")
        with pytest.raises(AuditUnavailable):  # until the segment's last page is full too
            _pad_until_refused(log)
        session.client_closed()  # its session.end can't be written
        assert not [r for r in read(log) if r["type"] == "session.end"]
        (tiny_fs / "filler").unlink()
        ready_session([addon])  # the next session's records: the note comes first
        types = [r["type"] for r in read(log)]
        start = types.index("audit.failure")
        assert types[start:] == ["audit.failure", "audit.unrecorded", "auth.success", "session.start"]
        [note] = [r for r in read(log) if r["type"] == "audit.unrecorded"]
        assert note["records"] == {"session.end": 1} and "No space left" in note["error"]
        assert_verifiable(log)
    finally:
        log.close("test over")


# ---- fsync mode: one write per loop iteration, and a batch that can't be written -------------------

def test_a_full_disk_mid_batch_refuses_every_statement_of_the_batch_and_forwards_none(tiny_fs: Path):
    """Eight sessions' statements appended in one loop iteration are written together; when
    that write fails (the disk is full) every one of them is refused, none reaches the
    database, their records are not in the log, and the log says what it lost."""
    config = AuditConfig(tiny_fs / "audit", origin="tollgate.test/addon", durability="fsync")
    init_audit_dir(config)

    async def scenario() -> tuple[list[Any], int, int]:
        log = AuditLog.open(config, version="test")
        log.start(asyncio.get_running_loop())
        try:
            addon = AuditAddon(log, _scrub)
            sessions = [ready_session([addon]) for _ in range(8)]
            await asyncio.sleep(0)  # their session records: written and (lazily) synced
            await asyncio.to_thread(log.append_durable, {"type": "admin", "user": "t", "outcome": "success",
                                                          "origin": "local", "object": "test"})
            durable = log.durable_size
            fill(tiny_fs / "filler")
            padding = "x" * 1500  # more than a page's worth in all: the write can't fit in the last page
            for session, _io in sessions:
                session.client_data(frontend(m.Query(f"SELECT '{padding}'")))
            outcomes = []
            for _session, io in sessions:
                assert io.server_got() == [] and len(io.waits) == 1  # waiting for the record
                awaitable, done = io.waits[0]
                try:
                    await awaitable
                    done(None, None)
                    outcomes.append(None)
                except BaseException as exc:  # noqa: BLE001 - handed to the session as the shell does
                    done(None, exc)
                    outcomes.append(exc)
            got = []
            for session, io in sessions:
                sent = io.server_got()  # only the placeholder that keeps the server in step
                session.server_data(backend(m.ErrorResponse.build("ERROR", "42601", "syntax"), m.ReadyForQuery(b"I")))
                got.append((sent, io.client_got()))
            (tiny_fs / "filler").unlink()
            await asyncio.to_thread(log.append_durable, {"type": "admin", "user": "t", "outcome": "success",
                                                          "origin": "local", "object": "test"})
            return [outcomes, got], durable, log.size
        finally:
            await asyncio.to_thread(log.close, "test over")

    (outcomes, got), durable, _size = asyncio.run(scenario())
    assert all(isinstance(o, AuditUnavailable) for o in outcomes)
    for server_got, client_got in got:
        assert [q.query.encode() for q in server_got] == [BLOCKED_SQL]  # the statement itself never went
        errors = [x for x in client_got if isinstance(x, m.ErrorResponse)]
        assert errors and dict(errors[0].fields)["C"] == "53100"
    records = read_config(config)
    assert not [r for r in records if r["type"] == "statement"]  # the batch's records were rolled back
    failure = next(r for r in records if r["type"] == "audit.failure")
    assert failure["seq"] == durable and failure["lost"]["from"] == durable
    assert failure["refused"] == 8  # the eight statements of the batch, counted as they were refused
    assert "No space left" in failure["error"]


def read_config(config: AuditConfig) -> list[dict[str, Any]]:
    from appliance.audit.reader import AuditReader
    return [json.loads(e.line) for e in AuditReader(config.dir).records()]


def test_a_latin9_session_is_recorded_in_unicode_with_its_encoding(audit_log: AuditLog):
    # The login's client_encoding is the one the session's text is read in (issue 14):
    # statement text and text parameters are recorded converted from it, card numbers
    # scrubbed in the converted text, and session.start says which encoding it was.
    session, _io = new_session([AuditAddon(audit_log, _scrub)])
    session.client_data(startup(client_encoding="LATIN9"))
    session.upstream_connected()
    session.server_data(m.AuthenticationOk().encode() + m.ParameterStatus("client_encoding", "LATIN9").encode()
                        + m.BackendKeyData(*UPSTREAM_KEY).encode() + m.ReadyForQuery(b"I").encode())
    wire = lambda text: text.encode("iso8859_15").decode("utf-8", "surrogateescape")  # noqa: E731
    session.client_data(frontend(m.Parse("", wire(f"SELECT '€ café {PAN}', $1::text"), ()),
                                 m.Bind("", "", (0,), ("œ ".encode("iso8859_15") + b"\xa4" + PAN.encode(),), ()),
                                 m.Execute("", 0), m.Sync()))
    records = read(audit_log)
    [start] = [r for r in records if r["type"] == "session.start"]
    assert start["client_encoding"] == "LATIN9"
    [statement] = [r for r in records if r["type"] == "statement"]
    assert statement["text"] == "SELECT '€ café 411111******1111', $1::text"
    assert statement["params"] == ["œ €411111******1111"]
    assert "escaped" not in statement
    assert_verifiable(audit_log)


def test_a_latin9_result_is_sampled_in_unicode(audit_log: AuditLog):
    # The case: `select … as "€"` with client_encoding latin9 lost its result record.
    session, _io = new_session([SamplingAuditAddon(audit_log, _scrub)])
    session.client_data(startup(client_encoding="LATIN9"))
    session.upstream_connected()
    session.server_data(m.AuthenticationOk().encode() + m.ParameterStatus("client_encoding", "LATIN9").encode()
                        + m.BackendKeyData(*UPSTREAM_KEY).encode() + m.ReadyForQuery(b"I").encode())
    session.client_data(frontend(m.Query("SELECT 1")))
    wire = lambda text: text.encode("iso8859_15").decode("utf-8", "surrogateescape")  # noqa: E731
    description = m.RowDescription((m.FieldDescription(wire("€"), 0, 0, 25, -1, -1, 0),))
    session.server_data(backend(description, m.DataRow(("café œ".encode("iso8859_15"),)),
                                m.DataRow((b"\xa4" + PAN.encode(),)), m.CommandComplete("SELECT 2"),
                                m.ReadyForQuery(b"I")))
    [result] = [r for r in read(audit_log) if r["type"] == "result"]
    assert result["sample"]["columns"] == ["€"]
    assert result["sample"]["rows"] == [["café œ"], ["€411111******1111"]]
    assert "escaped" not in result
    assert_verifiable(audit_log)
