"""Structured logging to journald's native protocol, against a real AF_UNIX datagram socket
standing in for /run/systemd/journal/socket."""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.proxy.journal import JournalHandler, encode_field, handler_for_stderr, priority, stderr_is_journal


def parse_entry(data: bytes) -> dict[str, str]:
    """journald's reading of a native datagram."""
    out: dict[str, str] = {}
    while data:
        newline = data.index(b"\n")
        line = data[:newline]
        if b"=" in line:
            name, value = line.split(b"=", 1)
            data = data[newline + 1:]
        else:
            name = line
            (size,) = struct.unpack("<Q", data[newline + 1:newline + 9])
            value = data[newline + 9:newline + 9 + size]
            assert data[newline + 9 + size:newline + 10 + size] == b"\n"
            data = data[newline + 10 + size:]
        out[name.decode()] = value.decode()
    return out


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "journal.socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30.0)  # a safety net, not a measure
    yield sock, path
    sock.close()


def test_structured_fields_reach_the_journal(journal: tuple[socket.socket, str]) -> None:
    sock, path = journal
    handler = JournalHandler(path)
    logger = logging.getLogger("tollgate.test-journal")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("session %s: blocked\nsecond line", 7,
                       extra={"session_id": 7, "identity": "alice@example.com", "decision": "block",
                              "rule": "no-ddl"})
    finally:
        logger.removeHandler(handler)
        handler.close()
    entry = parse_entry(sock.recv(65536))
    assert entry["MESSAGE"] == "session 7: blocked\nsecond line"
    assert entry["PRIORITY"] == "4"
    assert entry["SYSLOG_IDENTIFIER"] == "tollgate"
    assert entry["TOLLGATE_SESSION"] == "7"
    assert entry["TOLLGATE_IDENTITY"] == "alice@example.com"
    assert entry["TOLLGATE_DECISION"] == "block"
    assert entry["TOLLGATE_RULE"] == "no-ddl"
    assert "TOLLGATE_TARGET" not in entry
    assert entry["CODE_FUNC"] == "test_structured_fields_reach_the_journal"


def test_a_refused_entry_falls_back_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fallback = logging.StreamHandler(sys.stderr)
    handler = JournalHandler(str(tmp_path / "no-journal"), fallback=fallback)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    record = logging.LogRecord("tollgate", logging.ERROR, __file__, 1, "kept %s", ("anyway",), None)
    handler.handle(record)
    handler.close()
    assert "ERROR kept anyway" in capsys.readouterr().err


@pytest.mark.parametrize("level, prio", [(logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4),
                                         (logging.ERROR, 3), (logging.CRITICAL, 2)])
def test_priority(level: int, prio: int) -> None:
    assert priority(level) == prio


@given(st.text(), st.sampled_from(["MESSAGE", "TOLLGATE_IDENTITY"]))
def test_fields_round_trip(value: str, name: str) -> None:
    encoded = value.encode("utf-8", "replace").decode()
    assert parse_entry(encode_field(name, value)) == {name: encoded}


def test_stderr_is_the_journal_only_when_journal_stream_names_it(tmp_path: Path) -> None:
    with open(tmp_path / "stream", "w") as stream:
        st_ = os.fstat(stream.fileno())
        assert stderr_is_journal({"JOURNAL_STREAM": f"{st_.st_dev}:{st_.st_ino}"}, stream)
        assert not stderr_is_journal({"JOURNAL_STREAM": f"{st_.st_dev}:{st_.st_ino + 1}"}, stream)
        assert not stderr_is_journal({}, stream)
        assert not stderr_is_journal({"JOURNAL_STREAM": "garbage"}, stream)


def test_outside_systemd_logging_stays_plain(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert not isinstance(handler_for_stderr(), JournalHandler)
