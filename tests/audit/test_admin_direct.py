"""Admin actions recorded when no proxy answers: the process that acts opens the audit log
itself (what the ``tollgate`` entry point installs), and never writes beside a running proxy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.audit.export import append_admin_direct
from appliance.proxy import control
from tests.audit.running import running_proxy
from tests.audit.test_export import last_admin, write_config

ACTION = {"action": "certificate.issue", "user": "enroll", "outcome": "success", "origin": "127.0.0.1",
          "object": "0a:0b"}


@pytest.fixture
def direct_writer() -> Iterator[None]:
    control.install_direct_writer(append_admin_direct)
    yield
    control.install_direct_writer(None)


def test_without_a_proxy_the_record_is_written_directly(tmp_path: Path, direct_writer: None) -> None:
    config = write_config(tmp_path, control=True)  # a control socket nobody listens on
    seq = control.record_admin(config, dict(ACTION))
    assert seq is not None
    record = last_admin(config)
    assert record["seq"] == seq and record["action"] == "certificate.issue" and record["object"] == "0a:0b"


def test_without_a_writer_installed_it_is_unrecorded(tmp_path: Path) -> None:
    config = write_config(tmp_path, control=True)
    with pytest.raises(control.AdminUnrecorded, match="cannot reach"):
        control.record_admin(config, dict(ACTION))


def test_a_proxy_holding_the_log_is_never_written_beside(tmp_path: Path, direct_writer: None) -> None:
    # The proxy holds the log but its control socket is not where this config says: the
    # direct writer must not open the log a second time.
    held = write_config(tmp_path, control=True)
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    config = write_config(elsewhere, control=True)
    object.__setattr__(config, "audit", held.audit)
    with running_proxy(held), pytest.raises(control.AdminUnrecorded, match="directly failed"):
        control.record_admin(config, dict(ACTION))
