"""`tollgate run` refuses to start when the bypass guard can't attach, unless told to run
without it; each case in a network namespace of its own (nothing of the host's touched)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import lab_unavailable

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def netns() -> Iterator[str]:
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    name = f"tgflows-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def config(tmp_path: Path, flows: str) -> Path:
    path = tmp_path / "tollgate.toml"
    path.write_text(
        "[proxy]\nlisten_port = 15432\nlisten_addresses = ['127.0.0.1']\n"
        "[intercept]\nagent_subnets = ['198.18.1.0/24']\nagent_interfaces = ['agents9']\n"
        f"[flows]\nmode = '{flows}'\n"
        "[[targets]]\nname = 'a'\naddresses = ['198.18.2.10:5432']\n"
        "[targets.credentials.app]\npassword = 'x'\n")
    return path


def run(netns: str, path: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-m", "appliance.cli", "run", "-c",
                             str(path), "--no-intercept"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_the_proxy_does_not_start_without_its_guard(netns: str, tmp_path: Path) -> None:
    proc = run(netns, config(tmp_path, "guard"))
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert "the bypass guard could not attach, so the proxy does not start" in err
    assert "interface 'agents9' does not exist here" in err
    assert "tollgate: ready" not in err


def test_with_the_guard_configured_off_it_starts_and_says_so(netns: str, tmp_path: Path) -> None:
    proc = run(netns, config(tmp_path, "ledger"))
    try:
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("tollgate: ready"):
                break
        assert lines and lines[-1].startswith("tollgate: ready"), "".join(lines)
        assert any("the ledger is not running" in line and "agents9" in line for line in lines)
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
