"""Audit exports started from the console, run in the background with their progress kept.

An export of a long range reads every record of the log; the page that started it must not
wait on one request. :func:`start` runs :func:`appliance.audit.export.export` in a thread
and keeps its state in a small JSON file beside the bundle, under
``<identity.state_dir>/console-exports/`` — files, not memory, because the web service has
several worker processes and the page that polls may reach another one. A job's files are
its starter's (checked by the pages), and finished jobs older than a day are removed when a
new one starts.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from appliance.config import Config

log = logging.getLogger(__name__)

KEEP_SECONDS = 24 * 3600
_JOB = re.compile(r"[a-z0-9]{16}")


def _dir(config: Config) -> Path:
    assert config.identity is not None  # the console needs [identity]
    return config.identity.state_dir / "console-exports"


def bundle_path(config: Config, job: str) -> Path:
    return _dir(config) / f"{job}.tar.gz"


def read(config: Config, job: str) -> dict[str, Any] | None:
    """The job's state (``state``: running, done or failed; ``done``/``total`` records), or None."""
    if not _JOB.fullmatch(job):
        return None
    try:
        return json.loads((_dir(config) / f"{job}.json").read_text())
    except (OSError, ValueError):
        return None


def _write(config: Config, job: str, state: dict[str, Any]) -> None:
    path = _dir(config) / f"{job}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)


def _sweep(config: Config) -> None:
    now = time.time()
    for path in _dir(config).glob("*"):
        try:
            if now - path.stat().st_mtime > KEEP_SECONDS:
                path.unlink()
        except OSError:
            continue


def start(config: Config, frm: datetime | None, to: datetime | None, who: tuple[str, str]) -> str:
    """Start an export of [frm, to] made by ``who`` (user, origin); its job id."""
    _dir(config).mkdir(mode=0o700, parents=True, exist_ok=True)
    _sweep(config)
    job = secrets.token_hex(8)
    state: dict[str, Any] = {"user": who[0], "state": "running", "done": 0, "total": None,
                             "from": frm.isoformat() if frm else None, "to": to.isoformat() if to else None,
                             "started": time.time()}
    _write(config, job, state)

    def progress(done: int, total: int) -> None:
        _write(config, job, {**state, "done": done, "total": total})

    def run() -> None:
        from appliance.audit.export import export
        try:
            summary = export(config, bundle_path(config, job), frm, to, progress=progress, who=who)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the page says so
            log.error("console export %s failed: %s", job, exc)
            _write(config, job, {**state, "state": "failed", "error": str(exc)})
            return
        _write(config, job, {**state, "state": "done", "done": summary.log_size, "total": summary.log_size,
                             "records": summary.records, "bytes": summary.bytes, "sha256": summary.sha256,
                             "warnings": summary.warnings})

    threading.Thread(target=run, name=f"console-export-{job}", daemon=True).start()
    return job


__all__ = ["bundle_path", "read", "start"]
