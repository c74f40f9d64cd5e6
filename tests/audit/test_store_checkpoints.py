"""The checkpoint cadence on its own, with the clock passed in: requests (session ends)
sign at once, but at most one every REQUEST_INTERVAL, and never later than the cadence
would have signed the same records."""

from __future__ import annotations

from pathlib import Path

from appliance.audit.store_checkpoints import REQUEST_INTERVAL, Checkpointer
from tests.audit.records import make_config


def checkpointer(tmp_path: Path, **overrides: object) -> Checkpointer:
    config = make_config(tmp_path, **overrides)
    cp = Checkpointer(config, keyring=None, fdatasync=lambda fd: None)  # type: ignore[arg-type]
    cp.open()  # an empty checkpoints.jsonl: nothing signed yet, the clock starts now
    return cp


def signed(cp: Checkpointer, now: float, size: int) -> None:
    """What sign() does to the cadence, without a key or a tree."""
    cp.signed_size, cp._signed_mono, cp.first_unsigned_mono, cp._requested = size, now, None, False


def test_a_request_signs_at_once_when_none_was_signed_lately(tmp_path: Path) -> None:
    cp = checkpointer(tmp_path)
    signed(cp, 100.0, 5)
    now = 100.0 + REQUEST_INTERVAL
    cp.note_size(now, 7)
    assert not cp.due(now, 7)  # an hour of checkpoint_seconds, a million records to go
    cp.request()
    assert cp.due(now, 7)


def test_requests_in_a_burst_sign_once_per_interval(tmp_path: Path) -> None:
    cp = checkpointer(tmp_path)
    signed(cp, 100.0, 5)
    now = 100.0 + REQUEST_INTERVAL / 10
    cp.note_size(now, 6)
    cp.request()  # a session ended just after a checkpoint
    assert not cp.due(now, 6)
    assert cp.deadline() == 100.0 + REQUEST_INTERVAL  # the sync thread wakes for it
    assert cp.due(100.0 + REQUEST_INTERVAL, 6)
    signed(cp, 100.0 + REQUEST_INTERVAL, 6)
    assert not cp.due(100.0 + REQUEST_INTERVAL, 6)  # signed: the request is spent


def test_the_request_never_delays_the_cadence(tmp_path: Path) -> None:
    cp = checkpointer(tmp_path, checkpoint_seconds=0.05, checkpoint_records=3)
    signed(cp, 100.0, 5)
    cp.note_size(100.01, 6)
    cp.request()
    assert cp.deadline() == 100.01 + 0.05  # checkpoint_seconds comes first
    assert cp.due(100.07, 6)
    assert cp.due(100.01, 8)  # checkpoint_records unsigned: at once, request or not


def test_a_request_with_nothing_unsigned_waits_for_the_heartbeat(tmp_path: Path) -> None:
    cp = checkpointer(tmp_path, heartbeat_seconds=10.0)
    signed(cp, 100.0, 5)
    cp.request()
    assert not cp.due(100.0 + REQUEST_INTERVAL, 5)
    assert cp.due(110.0, 5)
