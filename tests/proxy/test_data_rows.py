"""The batched DataRow hook: the session hands an addon the DataRows of one read as one run.

Whatever the reads look like, an addon that rewrites rows through ``data_rows`` must leave
the agent with exactly what the same rewrite through ``data_row`` gives: the same bytes,
the same row counts, the same end for a malformed message.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# Not skipped when missing: `make test` builds the extensions, and a build that
# silently left them out must fail here.
from appliance.pgwire import _runs as runs_c
from appliance.pgwire import messages as m
from appliance.proxy import results
from appliance.proxy.hooks import Addon, AddonManager, Result, SessionInfo, row_spans
from tests.proxy.trace import backend, frontend, ready_session

FIELD = m.FieldDescription("pan", 0, 0, 25, -1, -1, 0)


@pytest.fixture(autouse=True, params=["compiled", "python"])
def framing(request, monkeypatch):
    """Every test here runs with the relay's run framing in C and in Python."""
    monkeypatch.setattr(results, "run_end", runs_c.run_end if request.param == "compiled" else results.run_end_py)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=120), st.integers(0, 130), st.integers(0, 130), st.sampled_from([0x44, 0x64, 0]),
       st.integers(-5, 40), st.integers(-5, 1 << 31))
def test_the_compiled_run_framing_is_the_python_loop(data, end, n, tag, low, high):
    """The same (end, count) from any buffer and bounds, or the same refusal."""
    n = min(n, len(data))
    # the caller's precondition: end is the end of a whole message within data[:n]
    end = min(end, n)
    assert runs_c.run_end(data, end, n, tag, low, high) == results.run_end_py(data, end, n, tag, low, high)


def test_the_compiled_run_framing_refuses_bounds_outside_the_data():
    with pytest.raises(ValueError, match="outside"):
        runs_c.run_end(b"D\x00\x00\x00\x04", 0, 6, 0x44, 4, 10)


def rewrite(row: bytes) -> bytes:
    return row.replace(b"4111", b"****")


class PerRow(Addon):
    """Rewrites row by row, and records the counts it saw."""

    name = "per-row"

    def __init__(self) -> None:
        self.calls = 0
        self.rows: list[int] = []

    def data_row(self, session: SessionInfo, result: Result, message: memoryview) -> bytes | None:
        self.calls += 1
        self.rows.append(result.rows)
        out = rewrite(bytes(message))
        return None if out == message else out

    def result_complete(self, session: SessionInfo, result: Result, tag: str | None, error: bool) -> None:
        self.rows.append(-result.rows)


class Batched(PerRow):
    """The same rewrite, a run at a time."""

    name = "batched"

    def __init__(self) -> None:
        super().__init__()
        self.runs: list[int] = []

    def data_rows(self, session: SessionInfo, result: Result, rows: memoryview) -> bytes | None:
        self.runs.append(len(list(row_spans(rows))))
        self.rows.append(result.rows)
        out = rewrite(bytes(rows))
        return None if out == rows else out


class Watcher(Addon):
    """A per-row-only addon after the batched one: it sees each rewritten row."""

    name = "watcher"

    def __init__(self) -> None:
        self.seen: list[bytes] = []

    def data_row(self, session: SessionInfo, result: Result, message: memoryview) -> bytes | None:
        self.seen.append(bytes(message))
        return None


def run(addons: list[Addon], reads: list[bytes]) -> tuple[bytes, bool]:
    session, io = ready_session(addons)
    session.client_data(frontend(m.Query("SELECT pan FROM cards")))
    io.server_got()
    closed = False
    for data in reads:
        try:
            session.server_data(data)
        except Exception:  # noqa: BLE001 - the end of the session is part of what is compared
            closed = True
            break
    return io.to_client, closed or bool(session.close_reason)


def test_the_rows_of_one_read_go_to_the_hook_as_one_run():
    batched = Batched()
    rows = [m.DataRow((b"4111111111111111",)), m.DataRow((b"x",)), m.DataRow((b"4111",))]
    reply = backend(m.RowDescription((FIELD,)), *rows, m.CommandComplete("SELECT 3"), m.ReadyForQuery(b"I"))
    got, closed = run([batched], [reply])
    assert not closed
    assert batched.runs == [3] and batched.calls == 0
    assert batched.rows == [3, -3]  # counted before the hook sees the run
    assert got == rewrite(reply)


def test_an_addon_without_the_batched_form_keeps_every_addon_per_row():
    batched, watcher = Batched(), Watcher()
    assert AddonManager([batched, watcher]).data_rows == []
    rows = [m.DataRow((b"4111111111111111",)), m.DataRow((b"x",))]
    reply = backend(m.RowDescription((FIELD,)), *rows, m.CommandComplete("SELECT 2"), m.ReadyForQuery(b"I"))
    got, _ = run([batched, watcher], [reply])
    assert batched.runs == [] and batched.calls == 2
    assert watcher.seen == [rewrite(r.encode()) for r in rows]
    assert got == rewrite(reply)


def _bad(length: int) -> bytes:
    return b"D" + struct.pack("!i", length) + b"\x00\x01"


messages = st.one_of(
    st.builds(lambda v: m.DataRow((v,)).encode(), st.sampled_from([b"4111111111111111", b"x", b"", b"41114111"])),
    st.builds(lambda n: m.DataRow((b"4111" * n,)).encode(), st.integers(0, 40)),
    st.just(m.NoticeResponse((("S", "NOTICE"), ("V", "NOTICE"), ("C", "00000"), ("M", "hi"))).encode()),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(messages, max_size=30), st.sampled_from([None, 2, 3, 1 << 30]),
       st.lists(st.integers(1, 90), max_size=20))
def test_runs_give_the_agent_exactly_what_rows_one_by_one_give(body, bad, cuts):
    stream = backend(m.RowDescription((FIELD,))) + b"".join(body)
    stream += _bad(bad) if bad is not None else backend(m.CommandComplete("SELECT"), m.ReadyForQuery(b"I"))
    reads, pos = [], 0
    for cut in cuts:
        if pos >= len(stream):
            break
        reads.append(stream[pos:pos + cut])
        pos += cut
    reads.append(stream[pos:])
    per_row, batched = PerRow(), Batched()
    assert run([batched], reads) == run([per_row], reads)
    # the same counts at the end of the result (a run is counted before its hook sees it)
    assert [r for r in batched.rows if r <= 0] == [r for r in per_row.rows if r <= 0]


# ---- COPY OUT: CopyData runs ----------------------------------------------------------------------

class PerMessageCopy(Addon):
    name = "per-message-copy"

    def __init__(self) -> None:
        self.runs: list[int] = []

    def copy_data(self, session: SessionInfo, result: Result | None, from_client: bool,
                  message: memoryview) -> bytes | None:
        out = rewrite(bytes(message))
        return None if out == message else out


class BatchedCopy(PerMessageCopy):
    name = "batched-copy"

    def copy_rows(self, session: SessionInfo, result: Result, rows: memoryview) -> bytes | None:
        assert result.copy_format == 0
        self.runs.append(len(list(row_spans(rows))))
        out = rewrite(bytes(rows))
        return None if out == rows else out


def copy_run(addons: list[Addon], reads: list[bytes]) -> tuple[bytes, bool]:
    session, io = ready_session(addons)
    session.client_data(frontend(m.Query("COPY cards TO STDOUT")))
    io.server_got()
    closed = False
    for data in reads:
        try:
            session.server_data(data)
        except Exception:  # noqa: BLE001 - the end of the session is part of what is compared
            closed = True
            break
    return io.to_client, closed or bool(session.close_reason)


def test_the_copy_data_of_one_read_go_to_the_hook_as_one_run():
    batched = BatchedCopy()
    reply = backend(m.CopyOutResponse(0, (0,)), m.CopyData(b"4111\n"), m.CopyData(b"x\n"), m.CopyDone(),
                    m.CommandComplete("COPY 2"), m.ReadyForQuery(b"I"))
    got, closed = copy_run([batched], [reply])
    assert not closed and batched.runs == [2]
    assert got == rewrite(reply)


copy_messages = st.one_of(st.builds(lambda v: m.CopyData(v).encode(), st.sampled_from([b"4111\n", b"x\n", b"", b"41"])),
                          st.builds(lambda n: m.CopyData(b"4111" * n).encode(), st.integers(0, 40)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(copy_messages, max_size=30), st.sampled_from([None, 2, 3, 1 << 30]),
       st.lists(st.integers(1, 90), max_size=20))
def test_copy_runs_give_the_agent_exactly_what_messages_one_by_one_give(body, bad, cuts):
    stream = backend(m.CopyOutResponse(0, (0,))) + b"".join(body)
    if bad is not None:
        stream += b"d" + struct.pack("!i", bad) + b"\x00\x01"
    else:
        stream += backend(m.CopyDone(), m.CommandComplete("COPY"), m.ReadyForQuery(b"I"))
    reads, pos = [], 0
    for cut in cuts:
        if pos >= len(stream):
            break
        reads.append(stream[pos:pos + cut])
        pos += cut
    reads.append(stream[pos:])
    assert copy_run([BatchedCopy()], reads) == copy_run([PerMessageCopy()], reads)
