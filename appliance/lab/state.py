"""Where a lab's state lives, and the garbage collection of labs nobody owns any more.

Each lab has a directory ``/run/tollgate-lab/<name>/`` holding ``state.json`` and every
file the lab makes (database cluster, certificates, secrets, logs). ``state.json`` is
written before anything else is created and rewritten after each step, so whatever a
crashed or killed ``lab up`` left behind is on record, and ``lab down`` / ``lab gc`` can
undo it. The directory is removed last, only once nothing of the lab remains.

A lab is *orphaned* when its owner process (``--owner-pid``; a test session) is gone, or
when the process building or tearing it down died midway. Processes are identified by pid
*and* start time, so a recycled pid never keeps a dead lab alive. A lab without an owner
(the demo's) is only ever removed by an explicit ``lab down``.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LAB_ROOT = Path("/run/tollgate-lab")
STATE_FILE = "state.json"
# tg<name>-agent must fit IFNAMSIZ-ish limits other tools apply to namespace-derived names.
NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,10}$")

State = dict[str, Any]


class StateError(Exception):
    """A lab's state is missing, unreadable or ambiguous."""


def validate_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise StateError(f"lab name {name!r} must be 1-11 lowercase letters/digits, starting with a letter")
    return name


def generate_name() -> str:
    return "t" + secrets.token_hex(3)


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (state, ppid, ...), or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm (field 2) may contain spaces and parentheses: split after its closing paren.
    return stat[stat.rindex(")") + 2:].split()


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields else None


def process_identity(pid: int) -> dict[str, int]:
    start = process_start_time(pid)
    if start is None:
        raise StateError(f"process {pid} does not exist")
    return {"pid": pid, "start_time": start}


def process_alive(identity: dict[str, int] | None) -> bool:
    """True if that very process (pid and start time) still runs; a zombie has exited."""
    if not identity:
        return False
    fields = _proc_stat(identity["pid"])
    return bool(fields) and fields[0] not in ("Z", "X") and int(fields[19]) == identity.get("start_time")


def lab_dir(name: str, root: Path = LAB_ROOT) -> Path:
    return root / name


def ensure_root(root: Path = LAB_ROOT) -> None:
    # 0755 all the way: postgres must traverse it to reach its data directory.
    root.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chmod(root, 0o755)


def save(directory: Path, state: State) -> None:
    """Atomically replace state.json (0600: it holds lab passwords)."""
    tmp = directory / f".{STATE_FILE}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(state, fh, indent=2, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, directory / STATE_FILE)


def load(directory: Path) -> State:
    path = directory / STATE_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StateError(f"{path} does not exist: no lab there") from None
    except (OSError, ValueError) as exc:
        raise StateError(f"{path}: unreadable lab state: {exc}") from None


def list_labs(root: Path = LAB_ROOT) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / STATE_FILE).is_file())


def resolve_name(name: str | None, root: Path = LAB_ROOT) -> str:
    """``name`` itself, or the only lab there is."""
    if name:
        validate_name(name)
        if not (lab_dir(name, root) / STATE_FILE).is_file():
            raise StateError(f"no lab named {name!r} (labs: {', '.join(list_labs(root)) or 'none'})")
        return name
    labs = list_labs(root)
    if not labs:
        raise StateError("no lab is up (start one with `tollgate lab up`)")
    if len(labs) > 1:
        raise StateError(f"several labs are up ({', '.join(labs)}): choose one with --name")
    return labs[0]


def orphan_reason(state: State) -> str | None:
    """Why this lab may be collected, or None if someone still answers for it."""
    phase = state.get("phase")
    operator = state.get("operator")
    if phase in ("building", "tearing-down") and operator and not process_alive(operator):
        return f"the process {'building' if phase == 'building' else 'tearing down'} it (pid {operator['pid']}) died"
    if phase in ("building", "tearing-down") and operator:
        return None  # still being worked on by a live process
    owner = state.get("owner")
    if owner and not process_alive(owner):
        return f"its owner (pid {owner['pid']}) is gone"
    return None


@contextmanager
def gc_lock(root: Path = LAB_ROOT) -> Iterator[None]:
    """Serialise collectors, so two test sessions never tear down the same lab at once."""
    ensure_root(root)
    # Lock the directory itself: no lock file is left lying around.
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def gc(teardown: Callable[[str], None], root: Path = LAB_ROOT) -> list[tuple[str, str]]:
    """Tear down every orphaned lab; return (name, reason) for each one collected.

    ``teardown(name)`` does the work (it lives with the Lab, which knows what a lab holds);
    a failure there is reported and the next lab is still tried.
    """
    collected: list[tuple[str, str]] = []
    errors: list[str] = []
    with gc_lock(root):
        for name in list_labs(root):
            try:
                state = load(lab_dir(name, root))
            except StateError:
                continue  # vanished meanwhile (a concurrent `lab down`)
            reason = orphan_reason(state)
            if reason is None:
                continue
            try:
                teardown(name)
                collected.append((name, reason))
            except Exception as exc:  # noqa: BLE001 - a failed teardown is reported; the next lab is still tried
                errors.append(f"{name}: {exc}")
    if errors:
        raise StateError("gc could not remove: " + "; ".join(errors))
    return collected
