"""Running pgbench in a lab namespace and parsing what it prints.

The parser reads pgbench's summary (PostgreSQL 13–16 formats); it is pure text in, a
:class:`PgbenchResult` out, so it is unit-tested on captured output. pgbench prints the
summary on stdout and progress lines and errors on stderr; a run that lost clients
("Run was aborted") still prints a summary, so the exit status and the stderr errors are
kept alongside it and a caller decides whether to trust it.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PGBENCH = "pgbench"  # found on the lab's PATH (PostgreSQL 15's bin directory first)


class PgbenchError(Exception):
    """pgbench could not run, failed, or printed no summary; the message says why."""


@dataclass(frozen=True, slots=True)
class Statement:
    """One line of ``-r``'s per-statement report."""

    latency_ms: float
    failures: int | None
    command: str


@dataclass(slots=True)
class PgbenchResult:
    """pgbench's summary. Absent lines are ``None`` (e.g. no stddev without ``-P``)."""

    tps: float
    tps_kind: str                            # "without initial connection time", "including reconnection times", …
    latency_avg_ms: float | None = None
    latency_stddev_ms: float | None = None
    initial_connection_ms: float | None = None
    average_connection_ms: float | None = None   # with -C: every transaction connects
    transactions: int | None = None
    transactions_expected: int | None = None     # with -t: "processed: N/M"
    failed: int | None = None
    transaction_type: str | None = None
    scaling_factor: int | None = None
    query_mode: str | None = None
    clients: int | None = None
    threads: int | None = None
    duration_s: int | None = None
    max_tries: int | None = None
    pgbench_version: str | None = None
    server_version: str | None = None            # only printed when it differs from pgbench's
    statements: list[Statement] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)   # "pgbench: error: …" lines from stderr
    aborted: bool = False                        # "Run was aborted; the above results are incomplete"

    @property
    def reconnects(self) -> bool:
        """True when every transaction opened its own connection (``-C``)."""
        return self.average_connection_ms is not None or "reconnection" in self.tps_kind

    @property
    def latency_from_tps_ms(self) -> float | None:
        """Mean time per transaction per client, ``clients / tps`` — what pgbench's own
        average is (without ``-P``/``--rate``), at a resolution it does not print."""
        if not self.clients or not self.tps:
            return None
        return 1000.0 * self.clients / self.tps

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["reconnects"] = self.reconnects
        d["latency_from_tps_ms"] = self.latency_from_tps_ms
        return d


_NUM = r"([0-9]+(?:\.[0-9]+)?)"
# Summary lines start at column 0; per-script sections indent theirs with " - ", so the
# anchors below never pick those up.
_LINES: dict[str, re.Pattern[str]] = {
    "transaction_type": re.compile(r"^transaction type: (.+)$", re.M),
    "scaling_factor": re.compile(r"^scaling factor: ([0-9]+)$", re.M),
    "query_mode": re.compile(r"^query mode: (\S+)$", re.M),
    "clients": re.compile(r"^number of clients: ([0-9]+)$", re.M),
    "threads": re.compile(r"^number of threads: ([0-9]+)$", re.M),
    "max_tries": re.compile(r"^maximum number of tries: ([0-9]+)$", re.M),
    "duration_s": re.compile(r"^duration: ([0-9]+) s$", re.M),
    "latency_avg_ms": re.compile(rf"^latency average = {_NUM} ms$", re.M),
    "latency_stddev_ms": re.compile(rf"^latency stddev = {_NUM} ms$", re.M),
    "initial_connection_ms": re.compile(rf"^initial connection time = {_NUM} ms$", re.M),
    "average_connection_ms": re.compile(rf"^average connection time = {_NUM} ms$", re.M),
}
_INTS = {"scaling_factor", "clients", "threads", "max_tries", "duration_s"}
_STRS = {"transaction_type", "query_mode"}
_VERSION = re.compile(r"^pgbench \((.+?)(?:, server (.+))?\)$", re.M)
_PROCESSED = re.compile(r"^number of transactions actually processed: ([0-9]+)(?:/([0-9]+))?$", re.M)
_FAILED = re.compile(r"^number of failed transactions: ([0-9]+)", re.M)
_TPS = re.compile(rf"^tps = {_NUM} \(([^)]*)\)$", re.M)
_STATEMENTS_HEADER = re.compile(r"^statement latencies in milliseconds.*:$", re.M)
_STATEMENT = re.compile(r"^\s+([0-9]+\.[0-9]+)\s+(?:([0-9]+)\s+)?(\S.*)$")
_ERROR = re.compile(r"^pgbench: (?:error|fatal): (.*)$", re.M)
_ABORTED = "Run was aborted"


def parse(stdout: str, stderr: str = "") -> PgbenchResult:
    """Parse pgbench's output; raise :class:`PgbenchError` if it printed no tps line."""
    tps_lines = _TPS.findall(stdout)
    errors = [e.strip() for e in _ERROR.findall(stderr)]
    if not tps_lines:
        why = "; ".join(errors) or (stderr.strip().splitlines() or ["no output"])[-1]
        raise PgbenchError(f"pgbench printed no summary: {why}")
    # PostgreSQL ≤ 13 prints two lines (including / excluding connections establishing):
    # the one without connection set-up is the data path's figure, as 14+ prints alone.
    tps, kind = next(((v, k) for v, k in tps_lines if k.startswith("excluding")), tps_lines[0])
    result = PgbenchResult(tps=float(tps), tps_kind=kind.strip())
    for name, pattern in _LINES.items():
        m = pattern.search(stdout)
        if m:
            value = m.group(1).strip()
            setattr(result, name, value if name in _STRS else int(value) if name in _INTS else float(value))
    if m := _VERSION.search(stdout):
        result.pgbench_version, result.server_version = m.group(1), m.group(2)
    if m := _PROCESSED.search(stdout):
        result.transactions = int(m.group(1))
        result.transactions_expected = int(m.group(2)) if m.group(2) else None
    if m := _FAILED.search(stdout):
        result.failed = int(m.group(1))
    if m := _STATEMENTS_HEADER.search(stdout):
        for line in stdout[m.end():].splitlines()[1:]:
            sm = _STATEMENT.match(line)
            if not sm:
                break
            result.statements.append(Statement(float(sm.group(1)), int(sm.group(2)) if sm.group(2) else None,
                                               sm.group(3).strip()))
    result.errors = errors
    result.aborted = any(_ABORTED in e for e in errors) or _ABORTED in stderr
    return result


# --- running ---------------------------------------------------------------------------

@dataclass(slots=True)
class PgbenchRun:
    """One pgbench invocation: what ran, how it ended, and the parsed summary (if any)."""

    argv: list[str]
    returncode: int | None
    wall_s: float
    stdout: str
    stderr: str
    result: PgbenchResult | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.result is not None

    def to_dict(self, *, raw: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {"argv": self.argv, "returncode": self.returncode, "wall_s": round(self.wall_s, 3),
                             "ok": self.ok, "error": self.error,
                             "result": self.result.to_dict() if self.result else None}
        if raw or not self.ok:
            d["stdout"], d["stderr"] = self.stdout, self.stderr[-4000:]
        return d


def build_argv(options: Sequence[str], conninfo: str, *, duration: int, script: Path | None = None) -> list[str]:
    """``pgbench -n -T duration OPTIONS [-f script] CONNINFO`` (conninfo as the dbname)."""
    argv = [PGBENCH, "-n", "-T", str(duration), *options]
    if script is not None:
        argv += ["-f", str(script)]
    return [*argv, conninfo]


def run(lab: Any, node: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
        timeout: float) -> PgbenchRun:
    """Run pgbench in ``node``'s namespace; never raises for a failed run (see ``.error``)."""
    started = time.monotonic()
    try:
        proc = lab.exec(node, list(argv), env=env, capture_output=True, text=True, timeout=timeout,
                        stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return PgbenchRun(list(argv), None, time.monotonic() - started, out, err,
                          error=f"pgbench did not finish within {timeout:.0f}s (killed)")
    wall = time.monotonic() - started
    run_ = PgbenchRun(list(argv), proc.returncode, wall, proc.stdout, proc.stderr)
    try:
        run_.result = parse(proc.stdout, proc.stderr)
    except PgbenchError as exc:
        run_.error = str(exc)
        return run_
    if proc.returncode != 0 or run_.result.aborted:
        detail = "; ".join(run_.result.errors) or f"exit status {proc.returncode}"
        run_.error = f"pgbench failed (exit {proc.returncode}): {detail}"
    elif run_.result.failed:
        run_.error = f"{run_.result.failed} failed transactions"
    return run_


def initialize(lab: Any, node: str, conninfo: str, *, scale: int, env: Mapping[str, str] | None = None,
               timeout: float = 600) -> str:
    """``pgbench -i -s scale`` (drops and recreates the pgbench tables); returns its log."""
    proc = lab.exec(node, [PGBENCH, "-i", "-q", "-s", str(scale), conninfo], env=env, capture_output=True,
                    text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise PgbenchError(f"pgbench -i -s {scale} failed (exit {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc.stderr


def version(lab: Any) -> str:
    """``pgbench --version``'s line, e.g. ``pgbench (PostgreSQL) 15.18 (Debian …)``."""
    proc = subprocess.run([PGBENCH, "--version"], env=lab.env(), capture_output=True, text=True, timeout=30)
    return proc.stdout.strip() or proc.stderr.strip()
