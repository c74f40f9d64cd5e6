"""Running the ``nft`` command: apply a ruleset atomically, check one, drop a table.

Rulesets are applied as text with ``nft -f -``, which nft commits as one kernel
transaction: either the whole text takes effect or none of it does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Any

from appliance.intercept.base import InterceptError
from appliance.intercept.ruleset import render_teardown

# nft lives in /usr/sbin, which isn't on every PATH (e.g. services, sudo -E).
_FALLBACK_PATHS = ("/usr/sbin/nft", "/sbin/nft")
_TIMEOUT = 30.0


def nft_binary() -> str:
    """The path of the nft binary; :class:`InterceptError` if it isn't installed."""
    found = shutil.which("nft")
    if found:
        return found
    for path in _FALLBACK_PATHS:
        if os.access(path, os.X_OK):
            return path
    raise InterceptError("nft not found: install the nftables package")


def _run(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [nft_binary(), *args]
    try:
        return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise InterceptError(f"{' '.join(cmd)} did not finish within {_TIMEOUT:.0f}s") from None
    except OSError as exc:
        raise InterceptError(f"cannot run {cmd[0]}: {exc.strerror}") from None


def apply(text: str, *, check: bool = False) -> None:
    """Apply nft ``text`` in one transaction (or with ``check``, only validate it).

    ``check`` (``nft -c``) still hands the transaction to the kernel, which builds every
    object (so a missing expression module fails) and then discards the uncommitted
    batch: it proves kernel support without changing anything.
    """
    args = ["-c", "-f", "-"] if check else ["-f", "-"]
    result = _run(args, stdin=text)
    if result.returncode != 0:
        what = "rejected the ruleset (dry run)" if check else "failed to apply the ruleset"
        detail = (result.stderr or result.stdout).strip() or f"exit status {result.returncode}"
        raise InterceptError(f"nft {what}:\n{detail}")


def dry_run(text: str) -> tuple[bool, str]:
    """Whether nft and the kernel accept ``text`` (``nft -c``), and a one-line reason."""
    try:
        apply(text, check=True)
    except InterceptError as exc:
        return False, str(exc)
    return True, f"{version()}: ruleset accepted by the kernel (dry run)"


def delete_table(name: str) -> None:
    """Delete table ``inet name``; succeeds whether or not it exists."""
    apply(render_teardown(name))


def table_exists(name: str) -> bool:
    """Whether table ``inet name`` exists."""
    result = _run(["list", "tables", "inet"])
    if result.returncode != 0:
        raise InterceptError(f"nft list tables failed:\n{result.stderr.strip()}")
    return any(line.split() == ["table", "inet", name] for line in result.stdout.splitlines())


def list_table_json(name: str) -> dict[str, Any] | None:
    """``nft -j list table inet name`` parsed, or None if the table doesn't exist."""
    if not table_exists(name):
        return None
    result = _run(["-j", "list", "table", "inet", name])
    if result.returncode != 0:
        raise InterceptError(f"nft list table inet {name} failed:\n{result.stderr.strip()}")
    try:
        listing = json.loads(result.stdout)
    except ValueError as exc:
        raise InterceptError(f"nft -j list table inet {name}: not JSON: {exc}") from None
    if not isinstance(listing, dict):
        raise InterceptError(f"nft -j list table inet {name}: unexpected output")
    return listing


def version() -> str:
    """nft's version line, e.g. ``nftables v1.0.6 (Lester Gooch #5)``."""
    result = _run(["--version"])
    return result.stdout.strip() or "nft (unknown version)"
