"""A real witness process (``tollgate witness serve``) on loopback, for the witness and tamper tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.audit.cosignature import WitnessKey, parse_witness_key
from appliance.witness.server import READY_LINE

REPO = Path(__file__).resolve().parents[2]


@dataclass
class WitnessProcess:
    dir: Path
    url: str
    key: WitnessKey
    proc: subprocess.Popen[str]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def init_witness_dir(directory: Path, name: str, logs: list[tuple[str, str]]) -> WitnessKey:
    argv = [sys.executable, "-m", "appliance.cli", "witness", "init", str(directory), "--name", name]
    for origin, key in logs:
        argv += ["--log", f"{origin}={key}"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, env=_env())
    return parse_witness_key(out.stdout.strip())


def start_witness(directory: Path, tls: tuple[Path, Path] | None = None, port: int = 0) -> WitnessProcess:
    """Start ``tollgate witness serve`` on 127.0.0.1 (port 0: any); return once its ready line says the port."""
    tls_args = ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])] if tls else []
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "witness", "serve", str(directory),
                             "--listen", f"127.0.0.1:{port}", *tls_args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=_env())
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until the server listens (or exits: empty line)
    if not line.startswith(READY_LINE):
        proc.kill()
        raise RuntimeError(f"the witness did not start: {line!r}, exit {proc.wait()}")
    address, key = line[len(READY_LINE):].split()
    scheme = "https" if tls else "http"
    return WitnessProcess(directory, f"{scheme}://{address}", parse_witness_key(key), proc)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


@pytest.fixture
def witness_factory() -> Iterator[list[WitnessProcess]]:
    """Witness processes a test starts (``start_witness``) are stopped after it."""
    started: list[WitnessProcess] = []
    yield started
    for w in started:
        w.stop()
