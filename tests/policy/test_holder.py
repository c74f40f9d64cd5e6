"""The policy holder: reload on change, keep the old policy on error, callbacks, SIGHUP."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

import pytest

from appliance.model.decision import Action
from appliance.policy.engine import Policy
from appliance.policy.holder import PolicyHolder
from appliance.policy.rules import PolicyError

ALLOW_READS = '[[rule]]\nname = "reads"\nclasses = ["read"]\naction = "allow"\n'
BLOCK_READS = '[[rule]]\nname = "no-reads"\nclasses = ["read"]\naction = "block"\n'
BROKEN = '[[rule]]\nname = "reads"\nclasses = ["reed"]\naction = "allow"\n'
# Only a hang reaches this: a test that works never waits for it, however loaded the machine.
SAFETY = 60.0


def write(path: Path, text: str) -> None:
    """Replace the file the way editors do (new inode), so the change is always visible."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(ALLOW_READS)
    return path


def test_first_load_failure_raises(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(BROKEN)
    with pytest.raises(PolicyError, match=r"policy.toml:3: rule 'reads': unknown class 'reed'"):
        PolicyHolder(path)
    with pytest.raises(PolicyError, match="cannot read"):
        PolicyHolder(tmp_path / "missing.toml")


def test_reload_on_change(policy_file: Path) -> None:
    holder = PolicyHolder(policy_file, reload_seconds=0.05)
    assert holder.current.decide([], "t", "select 1").action is Action.ALLOW
    assert holder.check() is False  # nothing changed
    before = holder.digest
    write(policy_file, BLOCK_READS)
    assert holder.check() is True
    assert holder.current.decide([], "t", "select 1").action is Action.BLOCK
    assert holder.generation == 1
    assert holder.digest != before and len(holder.digest) == 64
    assert holder.last_error is None


def test_invalid_file_keeps_old_policy(policy_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    holder = PolicyHolder(policy_file)
    old = holder.current
    write(policy_file, BROKEN)
    with caplog.at_level(logging.ERROR, logger="tollgate.policy"):
        assert holder.check() is False
    assert holder.current is old
    assert (holder.last_error or "").startswith(f"{policy_file}:3: rule 'reads': unknown class 'reed'")
    assert f"{policy_file}:3: rule 'reads': unknown class 'reed'" in caplog.text
    assert holder.check() is False  # unchanged since: not retried, not logged again
    write(policy_file, BLOCK_READS)  # fixed: takes effect
    assert holder.check() is True
    assert holder.last_error is None
    assert holder.current.decide([], "t", "select 1").action is Action.BLOCK


def test_deleted_file_keeps_old_policy(policy_file: Path) -> None:
    holder = PolicyHolder(policy_file)
    old = holder.current
    policy_file.unlink()
    assert holder.check() is False
    assert holder.current is old
    assert "missing" in (holder.last_error or "")
    write(policy_file, BLOCK_READS)
    assert holder.check() is True


def test_on_reload_callbacks(policy_file: Path) -> None:
    holder = PolicyHolder(policy_file)
    seen: list[Policy] = []
    holder.on_reload(seen.append)

    @holder.on_reload
    def broken(policy: Policy) -> None:
        raise RuntimeError("a callback failing must not stop the reload")

    write(policy_file, ALLOW_READS)  # same content: no change of policy, no callback
    assert holder.check() is False
    assert seen == []
    write(policy_file, BLOCK_READS)
    assert holder.reload() is True
    assert seen == [holder.current]
    write(policy_file, BROKEN)
    assert holder.reload() is False
    assert len(seen) == 1


def test_watch_task_reloads(policy_file: Path) -> None:
    async def scenario() -> None:
        holder = PolicyHolder(policy_file, reload_seconds=0.02)
        changed = asyncio.Event()
        holder.on_reload(lambda policy: changed.set())
        task = asyncio.create_task(holder.watch())
        try:
            # Whenever the watcher first looks, the file's signature differs from the one
            # loaded: no need to let it start first.
            write(policy_file, BLOCK_READS)
            await asyncio.wait_for(changed.wait(), SAFETY)
            assert holder.current.decide([], "t", "select 1").action is Action.BLOCK
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    asyncio.run(scenario())


def test_sighup_reloads(policy_file: Path) -> None:
    async def scenario() -> None:
        holder = PolicyHolder(policy_file, reload_seconds=3600)
        reloaded = asyncio.Event()
        holder.on_reload(lambda policy: reloaded.set())
        loop = asyncio.get_running_loop()
        holder.install_sighup(loop)
        try:
            write(policy_file, BLOCK_READS)
            os.kill(os.getpid(), signal.SIGHUP)
            await asyncio.wait_for(reloaded.wait(), SAFETY)  # no poll for an hour: only the signal reloads
            assert holder.current.decide([], "t", "select 1").action is Action.BLOCK
        finally:
            loop.remove_signal_handler(signal.SIGHUP)
    asyncio.run(scenario())
