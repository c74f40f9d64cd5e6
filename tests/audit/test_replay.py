"""Sessions and replays rendered from records (the shapes of docs/audit-format.md)."""

from __future__ import annotations

from typing import Any

from appliance.audit.replay import (
    CELL_WIDTH,
    replay_lines,
    sample_table,
    sessions_table,
    summarize,
)

T = "2026-05-01T12:00:0{}.123456Z"
BASE = {"user": "alice@example.com", "origin": "10.0.0.5:51234", "object": "payments/cards", "session": "r1-1"}


def session() -> list[dict[str, Any]]:
    return [
        {"type": "auth.success", "time": T.format(0), **BASE, "outcome": "success", "groups": ["agents", "read"],
         "identity_source": "certificate", "cert_serial": "1a2b", "target": "payments"},
        {"type": "session.start", "time": T.format(0), **BASE, "outcome": "success", "groups": ["agents", "read"],
         "identity_source": "certificate", "cert_serial": "1a2b", "target": "payments", "database": "cards",
         "db_user": "app", "application_name": "psql", "client_tls": "TLSv1.3 TLS_AES_256_GCM_SHA384",
         "upstream_tls": "TLSv1.3", "backend_pid": 4242},
        {"type": "statement", "time": T.format(1), **BASE, "outcome": "success", "stmt": 1, "kind": "query",
         "text": "SELECT id, pan\nFROM cards\nWHERE id = $1", "params": ["5", None], "decision": "mask",
         "rule": "mask-pan", "classes": ["pan"]},
        {"type": "result", "time": T.format(2), **BASE, "outcome": "success", "stmt": 1, "tag": "SELECT 2",
         "rows": 2, "masked": 2, "duration_us": 1234,
         "sample": {"columns": ["id", "pan"], "rows": [["1", "411111******1111"], ["22", None]], "truncated": True}},
        {"type": "statement", "time": T.format(3), **BASE, "outcome": "failure", "stmt": 2, "kind": "query",
         "text": "DELETE FROM cards", "decision": "block", "rule": "no-delete", "sqlstate": "42501",
         "message": "blocked by policy rule no-delete"},
        {"type": "approval.request", "time": T.format(4), **BASE, "outcome": "success", "approval": "apr-7F3K2Q",
         "stmt": 3, "requester": "alice@example.com", "target": "payments", "sql": "COPY cards TO STDOUT",
         "classes": ["pan"], "rule": "hold-export", "approvers": ["dba"], "min_approvals": 1},
        {"type": "approval.decision", "time": T.format(5), "user": "bob@example.com", "outcome": "success",
         "origin": "10.0.0.1:443", "object": "payments/cards", "approval": "apr-7F3K2Q", "decision": "approve",
         "approver": "bob@example.com", "reason": "ticket 42", "grant_minutes": 30},
        {"type": "statement", "time": T.format(6), **BASE, "outcome": "success", "stmt": 3, "kind": "execute",
         "text": "COPY cards TO STDOUT", "decision": "hold", "rule": "hold-export", "approval": "apr-7F3K2Q",
         "classes": ["pan"]},
        {"type": "result", "time": T.format(7), **BASE, "outcome": "failure", "stmt": 3, "sqlstate": "57014",
         "rows": 0, "masked": 0, "duration_us": 20_000},
        {"type": "session.end", "time": T.format(8), **BASE, "outcome": "success", "reason": "client closed",
         "statements": 3, "masked": 2, "duration_us": 8_000_000},
    ]


def test_replay_tells_the_session_in_order() -> None:
    text = "\n".join(replay_lines(session()))
    lines = text.splitlines()
    assert lines[0] == "── 2026-05-01 (UTC) ──"
    assert "authenticated alice@example.com (via certificate, certificate serial 1a2b) for payments" in text
    assert "identity  certificate  certificate serial 1a2b" in text
    assert "target    payments database cards as app  (application psql)" in text
    assert "TLS       agent: TLSv1.3 TLS_AES_256_GCM_SHA384; database: TLSv1.3; backend pid 4242" in text
    assert "12:00:01.123456  #1 query  MASK (rule mask-pan; classes pan)" in lines
    assert lines[lines.index("12:00:01.123456  #1 query  MASK (rule mask-pan; classes pan)") + 1:][:4] == [
        "      SELECT id, pan", "      FROM cards", "      WHERE id = $1", "      params: ['5', NULL]"]
    assert "12:00:02.123456  #1 → SELECT 2 · 2 rows · 2 masked · 1.2 ms" in lines
    assert "12:00:03.123456  #2 query  BLOCK (rule no-delete)  — REFUSED" in lines
    assert "      → 42501 blocked by policy rule no-delete" in lines
    assert ("12:00:05.123456  approval apr-7F3K2Q: APPROVE by bob@example.com (grant 30 min) — ticket 42"
            in lines)
    assert "12:00:06.123456  #3 execute  HOLD (rule hold-export; approval apr-7F3K2Q; classes pan)" in lines
    assert "12:00:07.123456  #3 → ERROR 57014 · 0 rows · 20.0 ms" in lines
    assert lines[-1] == "12:00:08.123456  session ended: client closed — 3 statements, 2 values masked, 8.0s"
    order = [text.index(s) for s in ("#1 query", "#1 →", "#2 query", "requested by", "APPROVE", "#3 execute",
                                     "session ended")]
    assert order == sorted(order)


def test_sampled_rows_as_an_aligned_table() -> None:
    text = "\n".join(replay_lines(session()))
    assert ("      id | pan\n"
            "      ---+-----------------\n"
            "      1  | 411111******1111\n"
            "      22 | NULL\n"
            "      … (more rows not kept)") in text
    quiet = "\n".join(replay_lines(session(), results=False))
    assert "411111******1111" not in quiet and "#1 → SELECT 2" in quiet
    wide = sample_table({"columns": ["v"], "rows": [["x" * 100], ["a\nb"]], "truncated": False}, indent="")
    assert wide[2] == "x" * (CELL_WIDTH - 1) + "…" and wide[3] == "a\\nb"


def test_sessions_table() -> None:
    other = [{"type": "auth.failure", "time": "2026-05-01T13:00:00.000000Z", "user": "unknown",
              "origin": "10.0.0.6:1", "object": "payments/?", "outcome": "failure", "session": "r1-2",
              "reason": "no certificate", "target": "payments"},
             {"type": "session.start", "time": "2026-05-01T14:00:00.000000Z", **BASE, "session": "r1-3",
              "outcome": "success"}]
    rows = summarize(session() + other)
    assert [(r.session, r.state, r.statements, r.blocked, r.masked) for r in rows] == [
        ("r1-1", "ended", 3, 1, 2), ("r1-2", "refused", 0, 0, 0), ("r1-3", "open", 0, 0, 0)]
    table = sessions_table(rows).splitlines()
    assert table[0].split() == ["SESSION", "USER", "GROUPS", "SOURCE", "TARGET/DB", "START", "(UTC)", "END", "/",
                                "DURATION", "STMTS", "BLOCKED", "MASKED"]
    assert table[1].split() == ["r1-1", "alice@example.com", "agents,read", "10.0.0.5:51234", "payments/cards",
                                "2026-05-01", "12:00:00", "12:00:08", "/", "8.0s", "3", "1", "2"]
    assert "refused 13:00:00" in table[2] and "(open)" in table[3]
    assert len({len(line) for line in table[:2]}) == 1  # aligned


def test_replay_says_which_client_encoding_the_text_was_converted_from() -> None:
    records = session()
    records[1] = {**records[1], "client_encoding": "SJIS"}
    records[2] = {**records[2], "text": "SELECT 'ソ' FROM cards"}
    text = "\n".join(replay_lines(records))
    assert "      encoding  SJIS (statement text below converted from it)" in text
    assert "      SELECT 'ソ' FROM cards" in text
    records[1] = {**records[1], "client_encoding": "UTF8"}
    assert "encoding  " not in "\n".join(replay_lines(records))


def test_replay_shows_the_sessions_flow() -> None:
    """The eBPF ledger's record of the session's connection (appliance.flows) carries its id."""
    flow = {"type": "flow", "time": T.format(9), **BASE, "outcome": "success", "object": "flow:10.0.0.9:5432",
            "verdict": "intercepted", "reason": "", "end": "closed", "packets_in": 12, "packets_out": 10,
            "bytes_in": 1500, "bytes_out": 4200, "tcp_flags_in": "FSPA", "tcp_flags_out": "FSPA"}
    lines = list(replay_lines([*session(), flow]))
    assert lines[-1] == ("12:00:09.123456  flow 10.0.0.5:51234 → 10.0.0.9:5432 intercepted, closed: packets 12/10, "
                         "bytes 1500/4200, TCP flags FSPA/FSPA")
