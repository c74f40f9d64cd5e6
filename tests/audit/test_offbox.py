"""Checkpoints copied off the box: a directory on other storage, syslog; a failing sink never blocks."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from appliance.audit.offbox import (
    LOG_AUTHPRIV,
    DirectorySink,
    Shipper,
    SyslogSink,
    parse_syslog_message,
    sinks_for,
    syslog_message,
)
from appliance.config import AuditConfig

NOTE = ("tollgate.test/offbox\n7\nq5Hk1Jm3r8yH9T4UGgY0rX3kzSDD6YVFxQ5P5rB4AHs=\ntime 2026-01-02T03:04:05Z\n"
        "\n— tollgate.test/offbox AAAA\n")


def test_directory_sink_writes_one_file_per_checkpoint(tmp_path: Path) -> None:
    sink = DirectorySink(tmp_path)
    sink.deliver(NOTE, 7, 1767323045)
    sink.deliver(NOTE, 7, 1767323045)  # the same again: nothing new
    other = NOTE.replace("AAAA", "BBBB")
    sink.deliver(other, 7, 1767323045)  # same size and second, another signature (a key rotation)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint-7-1767323045.2.note", "checkpoint-7-1767323045.note"]
    assert (tmp_path / "checkpoint-7-1767323045.note").read_text() == NOTE
    assert (tmp_path / "checkpoint-7-1767323045.2.note").read_text() == other


def test_directory_sink_does_not_create_a_missing_mount(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="is the other storage mounted"):
        DirectorySink(tmp_path / "not-mounted").deliver(NOTE, 7, 1)
    assert not (tmp_path / "not-mounted").exists()


def test_syslog_message_shape() -> None:
    data = syslog_message(NOTE, hostname="gate-1", when=0)
    assert data.startswith(b"<86>")  # authpriv (10) * 8 + info (6)
    assert b" gate-1 tollgate[" in data and b"]: tollgate-checkpoint " in data
    assert b"\n" not in data and len(data) < 1024
    assert parse_syslog_message(data) == NOTE


def test_syslog_sink_over_a_unix_datagram_socket(tmp_path: Path) -> None:
    path = tmp_path / "log.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(5)
        SyslogSink(f"unix:{path}").deliver(NOTE, 7, 1)
        data = server.recv(65536)
    assert data.startswith(f"<{LOG_AUTHPRIV * 8 + 6}>".encode())
    assert parse_syslog_message(data) == NOTE


@pytest.mark.parametrize("family, host, address", [(socket.AF_INET, "127.0.0.1", "127.0.0.1"),
                                                    (socket.AF_INET6, "::1", "[::1]")])
def test_syslog_over_udp(family: socket.AddressFamily, host: str, address: str) -> None:
    with socket.socket(family, socket.SOCK_DGRAM) as server:
        try:
            server.bind((host, 0))
        except OSError as exc:
            pytest.skip(f"no {host} here: {exc.strerror}")
        server.settimeout(5)
        port = server.getsockname()[1]
        sink = SyslogSink(f"udp:{address}:{port}")
        assert sink.name == f"syslog:udp:{address}:{port}"
        sink.deliver(NOTE, 7, 1)
        data = server.recv(65536)
    assert parse_syslog_message(data) == NOTE


def test_syslog_addresses_refused() -> None:
    for bad in ("udp:host", "unix:relative", "tcp:1.2.3.4:514"):
        with pytest.raises(ValueError, match=r"want (unix|udp)|must be absolute"):
            SyslogSink(bad)


def test_sinks_from_config(tmp_path: Path) -> None:
    config = AuditConfig(tmp_path, origin="o", offbox_dir=tmp_path, offbox_syslog="unix:/dev/log")
    assert [s.name for s in sinks_for(config)] == [f"dir:{tmp_path}", "syslog:unix:/dev/log"]
    assert sinks_for(AuditConfig(tmp_path, origin="o")) == []


def test_a_failing_sink_is_loud_and_retried(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    target = tmp_path / "mount"
    good = DirectorySink(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").mkdir()
    shipper = Shipper([DirectorySink(target), good])
    try:
        with caplog.at_level(logging.ERROR, logger="tollgate.audit.offbox"):
            shipper.submit(NOTE, 7, 100)
            assert shipper.flush(10)
        assert "cannot copy checkpoint 7 off the box" in caplog.text
        [failing, fine] = shipper.status()
        assert failing["pending"] == 1 and "mounted" in failing["error"]
        assert fine == {"sink": good.name, "delivered": 1, "pending": 0, "error": None}  # not held up
        target.mkdir()  # the storage is back
        shipper.submit(NOTE.replace("7\n", "8\n", 1), 8, 101)
        assert shipper.flush(10)
        assert shipper.status()[0] == {"sink": f"dir:{target}", "delivered": 2, "pending": 0, "error": None}
        assert sorted(p.name for p in target.iterdir()) == ["checkpoint-7-100.note", "checkpoint-8-101.note"]
    finally:
        shipper.close()
