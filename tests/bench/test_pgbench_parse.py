"""pgbench's summary parser, on output captured from pgbench 15 (and 13's two-tps format)."""

from __future__ import annotations

import pytest

from bench.pgbench import PgbenchError, build_argv, parse

SELECT_ONLY = """\
pgbench (15.18 (Debian 15.18-0+deb12u1))
transaction type: <builtin: select only>
scaling factor: 10
query mode: extended
number of clients: 8
number of threads: 2
maximum number of tries: 1
duration: 15 s
number of transactions actually processed: 663105
number of failed transactions: 0 (0.000%)
latency average = 0.181 ms
initial connection time = 39.659 ms
tps = 44199.376912 (without initial connection time)
"""

RECONNECT = """\
pgbench (15.18 (Debian 15.18-0+deb12u1))
transaction type: <builtin: select only>
scaling factor: 1
query mode: simple
number of clients: 2
number of threads: 1
maximum number of tries: 1
duration: 2 s
number of transactions actually processed: 210
number of failed transactions: 0 (0.000%)
latency average = 19.069 ms
average connection time = 9.167 ms
tps = 104.882060 (including reconnection times)
"""

PROGRESS_PER_STATEMENT = """\
pgbench (15.18 (Debian 15.18-0+deb12u1))
transaction type: <builtin: select only>
scaling factor: 1
query mode: simple
number of clients: 1
number of threads: 1
maximum number of tries: 1
duration: 2 s
number of transactions actually processed: 30870
number of failed transactions: 0 (0.000%)
latency average = 0.059 ms
latency stddev = 0.099 ms
initial connection time = 8.179 ms
tps = 15485.249635 (without initial connection time)
statement latencies in milliseconds and failures:
         0.000           0  \\set aid random(1, 100000 * :scale)
         0.058           0  SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
"""
PROGRESS_STDERR = """\
progress: 1.0 s, 15714.7 tps, lat 0.057 ms stddev 0.075, 0 failed
progress: 2.0 s, 15153.4 tps, lat 0.060 ms stddev 0.117, 0 failed
"""

TRANSACTION_COUNT = """\
pgbench (15.18 (Debian 15.18-0+deb12u1))
transaction type: <builtin: select only>
scaling factor: 1
query mode: simple
number of clients: 2
number of threads: 1
maximum number of tries: 1
number of transactions per client: 100
number of transactions actually processed: 200/200
number of failed transactions: 0 (0.000%)
latency average = 0.195 ms
initial connection time = 23.975 ms
tps = 10264.305876 (without initial connection time)
"""

ABORTED = """\
pgbench (15.18 (Debian 15.18-0+deb12u1))
transaction type: <builtin: select only>
scaling factor: 1
query mode: simple
number of clients: 2
number of threads: 1
maximum number of tries: 1
duration: 4 s
number of transactions actually processed: 35957
number of failed transactions: 0 (0.000%)
latency average = 0.112 ms
initial connection time = 18.602 ms
tps = 17931.260095 (without initial connection time)
"""
ABORTED_STDERR = """\
pgbench: error: client 1 script 0 aborted in command 1 query 0: FATAL:  terminating connection due to administrator command
pgbench: error: client 0 script 0 aborted in command 1 query 0: FATAL:  terminating connection due to administrator command
pgbench: error: Run was aborted; the above results are incomplete.
"""  # noqa: E501 - pgbench's output, verbatim

BAD_PASSWORD_STDERR = """\
pgbench: error: connection to server at "198.18.2.11", port 5432 failed: FATAL:  password authentication failed for user "app"
connection to server at "198.18.2.11", port 5432 failed: FATAL:  password authentication failed for user "app"
pgbench: error: could not create connection for setup
"""  # noqa: E501 - pgbench's output, verbatim

# PostgreSQL 13: two tps lines, a server version that differs from pgbench's.
PG13 = """\
starting vacuum...end.
pgbench (13.14, server 15.6)
transaction type: <builtin: select only>
scaling factor: 10
query mode: prepared
number of clients: 4
number of threads: 4
duration: 10 s
number of transactions actually processed: 251234
latency average = 0.159 ms
tps = 25112.300000 (including connections establishing)
tps = 25130.700000 (excluding connections establishing)
"""

# Several scripts: per-script sections indent their figures with " - ".
MULTI_SCRIPT = """\
pgbench (15.18 (Debian 15.18-0+deb12u1))
transaction type: multiple scripts
scaling factor: 1
query mode: simple
number of clients: 1
number of threads: 1
maximum number of tries: 1
duration: 2 s
number of transactions actually processed: 1000
number of failed transactions: 0 (0.000%)
latency average = 2.000 ms
initial connection time = 5.000 ms
tps = 500.000000 (without initial connection time)
SQL script 1: <builtin: select only>
 - weight: 1 (targets 50.0% of total)
 - 500 transactions (50.0% of total, tps = 250.000000)
 - number of failed transactions: 0 (0.000%)
 - latency average = 0.100 ms
 - latency stddev = 0.010 ms
SQL script 2: <builtin: simple update>
 - weight: 1 (targets 50.0% of total)
 - 500 transactions (50.0% of total, tps = 250.000000)
 - number of failed transactions: 0 (0.000%)
 - latency average = 3.900 ms
 - latency stddev = 0.500 ms
"""


def test_select_only_summary() -> None:
    r = parse(SELECT_ONLY)
    assert r.tps == pytest.approx(44199.376912)
    assert r.tps_kind == "without initial connection time"
    assert r.latency_avg_ms == pytest.approx(0.181)
    assert r.latency_stddev_ms is None
    assert r.initial_connection_ms == pytest.approx(39.659)
    assert r.average_connection_ms is None
    assert (r.transactions, r.transactions_expected, r.failed) == (663105, None, 0)
    assert r.transaction_type == "<builtin: select only>"
    assert (r.scaling_factor, r.query_mode, r.clients, r.threads, r.duration_s, r.max_tries) == \
        (10, "extended", 8, 2, 15, 1)
    assert r.pgbench_version == "15.18 (Debian 15.18-0+deb12u1)"
    assert r.server_version is None
    assert r.statements == [] and r.errors == [] and not r.aborted and not r.reconnects


def test_latency_from_tps_is_clients_over_tps() -> None:
    r = parse(SELECT_ONLY)
    assert r.latency_from_tps_ms == pytest.approx(1000 * 8 / 44199.376912)
    assert r.latency_from_tps_ms == pytest.approx(r.latency_avg_ms, abs=0.0005)


def test_reconnect_per_transaction() -> None:
    r = parse(RECONNECT)
    assert r.tps == pytest.approx(104.88206)
    assert r.tps_kind == "including reconnection times"
    assert r.average_connection_ms == pytest.approx(9.167)
    assert r.initial_connection_ms is None
    assert r.reconnects


def test_progress_stddev_and_per_statement_latencies() -> None:
    r = parse(PROGRESS_PER_STATEMENT, PROGRESS_STDERR)
    assert r.latency_stddev_ms == pytest.approx(0.099)
    assert [(s.latency_ms, s.failures) for s in r.statements] == [(0.0, 0), (0.058, 0)]
    assert r.statements[0].command == "\\set aid random(1, 100000 * :scale)"
    assert r.statements[1].command.startswith("SELECT abalance FROM pgbench_accounts")
    assert r.errors == [] and not r.aborted


def test_transaction_count_run() -> None:
    r = parse(TRANSACTION_COUNT)
    assert (r.transactions, r.transactions_expected, r.duration_s) == (200, 200, None)


def test_aborted_run_keeps_summary_and_errors() -> None:
    r = parse(ABORTED, ABORTED_STDERR)
    assert r.tps == pytest.approx(17931.260095)
    assert r.aborted
    assert len(r.errors) == 3
    assert "terminating connection due to administrator command" in r.errors[0]


def test_no_summary_is_an_error_naming_the_cause() -> None:
    with pytest.raises(PgbenchError, match="password authentication failed"):
        parse("", BAD_PASSWORD_STDERR)
    with pytest.raises(PgbenchError, match="no output"):
        parse("", "")


def test_pg13_prefers_the_tps_without_connection_setup() -> None:
    r = parse(PG13)
    assert r.tps == pytest.approx(25130.7)
    assert r.tps_kind == "excluding connections establishing"
    assert (r.pgbench_version, r.server_version) == ("13.14", "15.6")
    assert r.query_mode == "prepared"
    assert r.max_tries is None and r.failed is None


def test_per_script_sections_do_not_override_the_totals() -> None:
    r = parse(MULTI_SCRIPT)
    assert r.tps == pytest.approx(500.0)
    assert r.latency_avg_ms == pytest.approx(2.0)
    assert r.latency_stddev_ms is None
    assert r.failed == 0


def test_to_dict_is_json_ready() -> None:
    import json
    d = parse(PROGRESS_PER_STATEMENT).to_dict()
    assert json.loads(json.dumps(d))["statements"][1]["latency_ms"] == 0.058
    assert d["latency_from_tps_ms"] == pytest.approx(1000 / 15485.249635)


def test_build_argv_puts_conninfo_last() -> None:
    argv = build_argv(("-S", "-c", "8"), "host=h dbname=bench", duration=15)
    assert argv == ["pgbench", "-n", "-T", "15", "-S", "-c", "8", "host=h dbname=bench"]
    from pathlib import Path
    assert build_argv((), "x", duration=3, script=Path("/tmp/s.sql"))[-3:] == ["-f", "/tmp/s.sql", "x"]
