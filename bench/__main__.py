"""``python -m bench``: one lab, one bench database, every case on every path, one report.

Order: lab up (Tollgate in gw) → database ``bench`` owned by ``app`` → ``pgbench -i`` over
the direct path → pgbouncer in gw → a check per path (it answers; which legs use TLS) →
a warm-up → for each case, for each repeat: direct, pgbouncer, tollgate → table, summary
line, JSON in ``bench/results/``. pgbouncer and the lab go away at the end whatever happens
(failure, ^C, SIGTERM, SIGHUP).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import BASELINE, CASES, REFERENCE, ROUTES, Case, Route, pgbench, pgbouncer, report
from bench.report import CaseResult, PathResult

log = logging.getLogger("bench")

DB_NAME = "bench"
ROLE = "app"
SCALE = 10
DEFAULT_DURATION = 15
QUICK_DURATION = 3
RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
# libpq variables that would change where or how a client connects: the harness says
# everything explicitly, so none of them may leak in from the caller's environment.
_PG_ENV = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGPASSWORD", "PGPASSFILE", "PGSERVICE",
           "PGSERVICEFILE", "PGSSLMODE", "PGREQUIRESSL", "PGOPTIONS", "PGAPPNAME", "PGCONNECT_TIMEOUT",
           "PGTARGETSESSIONATTRS", "PGGSSENCMODE", "PGCHANNELBINDING")


class BenchError(Exception):
    """The benchmark could not be set up; the message says why."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM/SIGHUP, turned into an exception so every cleanup runs."""


_OWNER_PID = os.getpid()


def _on_signal(signum: int, _frame: Any) -> None:
    # A child forked from Python (a library's helper process) inherits this handler: raising
    # there would unwind the parent's stack in the child and run its clean-ups (which once
    # removed the bench's work directory mid-run). A child just goes.
    if os.getpid() != _OWNER_PID:
        os._exit(128 + signum)
    raise Interrupted(signal.Signals(signum).name)


# Setup steps a case may ask for by name (``Case.needs``): name → fn(context), run once.
SETUPS: dict[str, Callable[[Context], None]] = {}
# Conditions held only while one case runs (``Case.during``): name → context manager factory.
DURING: dict[str, Callable[[Context], contextlib.AbstractContextManager[None]]] = {}

PAN_ROWS = 1_000_000
PAN_ROWS_SQL = f"""
CREATE FUNCTION pg_temp.luhn_digit(body text) RETURNS int LANGUAGE sql IMMUTABLE AS $$
  SELECT ((10 - sum(CASE WHEN (length(body) - i) % 2 = 0
                         THEN (d * 2) - CASE WHEN d * 2 > 9 THEN 9 ELSE 0 END ELSE d END) % 10) % 10)::int
    FROM (SELECT i, substr(body, i, 1)::int AS d FROM generate_series(1, length(body)) i) s $$;
CREATE TABLE bench_cards (id int PRIMARY KEY, pan text NOT NULL, brand text NOT NULL);
INSERT INTO bench_cards
  SELECT n, body || pg_temp.luhn_digit(body), 'visa'
    FROM (SELECT n, '4' || lpad(n::text, 14, '0') AS body FROM generate_series(1, {PAN_ROWS}) n) g;
ALTER TABLE bench_cards OWNER TO {{role}};
ANALYZE bench_cards;
"""


def setup_pan_rows(ctx: Context) -> None:
    """bench_cards: PAN_ROWS rows of distinct Luhn-valid Visa numbers (made in SQL, fast)."""
    log.info("bench: creating bench_cards (%d rows with PANs)", PAN_ROWS)
    superuser_sql(ctx.lab, PAN_ROWS_SQL.format(role=ROLE), dbname=DB_NAME)


SETUPS["pan_rows"] = setup_pan_rows


@contextlib.contextmanager
def holds_pending(ctx: Context, count: int = 20) -> Iterator[None]:
    """``count`` agent sessions, each with an UPDATE waiting for approval, for the duration."""
    from appliance.config import load_config
    from appliance.proxy.control import control_request

    config = load_config(ctx.lab.config_path)
    procs = []
    try:
        for i in range(count):
            # Not a comprehension: if a start fails, finally: must still see the sessions already started.
            procs.append(  # noqa: PERF401
                ctx.lab.popen("agent", ["psql", "-X", "-q", ctx.lab.conninfo(), "-c",
                                        f"UPDATE cards SET brand = brand WHERE id = {i + 1}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 60
        while True:
            held = sum(1 for s in control_request(config, {"op": "sessions"})["sessions"] if s["held"])
            if held >= count:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"only {held} of {count} statements were held after 60 s")
            time.sleep(0.1)
        yield
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


DURING["holds20"] = holds_pending


# --- the environment -------------------------------------------------------------------

def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return []


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def git_revision() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def uvloop_version() -> str | None:
    try:
        import uvloop
    except ImportError:
        return None
    return getattr(uvloop, "__version__", "installed")


def reset_peak_rss(pid: int | None) -> None:
    """Start the process's peak-RSS count (VmHWM) afresh: writing 5 to clear_refs does that."""
    if pid is None:
        return
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_rss_kb(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def process_cpu_s(pid: int | None) -> float | None:
    """user + system CPU seconds of ``pid`` (all its threads) so far."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_s(pid: int, tid: int) -> float | None:
    """user + system CPU seconds of one thread of ``pid``."""
    try:
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def cpu_parts_s(pid: int | None) -> dict[str, float] | None:
    """CPU seconds so far of the proxy's parts: its main thread (with workers, the
    primary's event loop, through which every audit record passes: the serial part), the
    whole primary process, and its children (the workers)."""
    if pid is None:
        return None
    main, whole = thread_cpu_s(pid, pid), process_cpu_s(pid)
    if main is None or whole is None:
        return None
    children = [process_cpu_s(c) for c in child_pids(pid)]
    return {"primary_loop": main, "primary": whole, "workers": sum(c for c in children if c is not None),
            "processes": 1 + len(children)}


# --- the run ---------------------------------------------------------------------------

class Context:
    """What a case run needs: the lab, pgbouncer, the password and where the proxies run."""

    def __init__(self, lab: Any, bouncer: pgbouncer.PgBouncer | None, workdir: Path):
        self.lab = lab
        self.bouncer = bouncer
        self.workdir = workdir
        self.password = lab.password(ROLE)

    def conninfo(self, route: Route, extra: dict[str, str] | None = None) -> str:
        # sslmode=prefer (libpq's default, said explicitly): TLS wherever the server offers
        # it — PostgreSQL does, neither proxy does on its client side in this set-up.
        params = {"host": route.host, "port": str(route.port), "dbname": DB_NAME, "user": ROLE,
                  "sslmode": "prefer", "connect_timeout": "10", "application_name": f"bench-{route.name}"}
        params.update(extra or {})
        return " ".join(f"{k}={v}" for k, v in params.items())

    def env(self, route: Route) -> dict[str, str]:
        return {"PGPASSWORD": self.password} if route.password else {}

    def proxy_pid(self, route: Route) -> int | None:
        if route.name == "pgbouncer":
            return self.bouncer.pid if self.bouncer else None
        if route.name == "tollgate":
            return self.lab.status()["proxy"]["pid"]
        return None


def superuser_sql(lab: Any, sql: str, dbname: str = "postgres") -> str:
    """SQL as the postgres superuser over the db namespace's Unix socket."""
    db = lab.status()["database"]
    proc = lab.exec("db", ["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", db["socket_dir"],
                           "-p", str(db["port"]), "-U", "postgres", "-d", dbname, "-c", sql],
                    capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise BenchError(f"SQL as postgres failed ({sql!r}): {proc.stderr.strip()}")
    return proc.stdout.strip()


PROBE_SQL = ("SELECT s.ssl, coalesce(s.version, '') FROM pg_stat_ssl s WHERE s.pid = pg_backend_pid()")


def probe_path(ctx: Context, route: Route) -> dict[str, Any]:
    """One query over ``route``: does it work, and which legs are encrypted.

    ``db_leg_tls``: what PostgreSQL sees on the connection serving us (pg_stat_ssl);
    ``client_leg_tls``: what libpq negotiated with whatever answered the agent.
    """
    proc = ctx.lab.exec(route.node, ["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", ctx.conninfo(route),
                                  "-c", PROBE_SQL, "-c", "\\conninfo"],
                        env=ctx.env(route), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        return {"ok": False, "error": (proc.stderr or proc.stdout).strip()[-1000:]}
    lines = proc.stdout.strip().splitlines()
    ssl, _, version = lines[0].partition("|") if lines else ("", "", "")
    return {"ok": True, "db_leg_tls": version if ssl == "t" else None,
            "client_leg_tls": "SSL connection" in proc.stdout}


def run_case(ctx: Context, case: Case, paths: list[str], *, duration: int, repeat: int,
             script: Path | None, progress: Callable[[str], None]) -> CaseResult:
    result = CaseResult(case, {p: PathResult(p) for p in paths})
    timeout = duration + 120
    for rep in range(repeat):
        for path in paths:  # interleaved: drift during the case hits every path alike
            route = ROUTES[path]
            argv = pgbench.build_argv(case.args, ctx.conninfo(route, dict(case.conninfo)), duration=duration,
                                      script=script)
            pid = ctx.proxy_pid(route)
            during = DURING[case.during](ctx) if case.during and path != BASELINE else contextlib.nullcontext()
            with during:
                reset_peak_rss(pid)
                cpu0 = cpu_parts_s(pid) if route.name == "tollgate" else process_cpu_s(pid)
                run = pgbench.run(ctx.lab, route.node, argv, env=ctx.env(route), timeout=timeout)
                cpu1 = cpu_parts_s(pid) if route.name == "tollgate" else process_cpu_s(pid)
                rss = peak_rss_kb(pid)
            pr = result.paths[path]
            pr.runs.append(run)
            if isinstance(cpu0, dict) and isinstance(cpu1, dict):
                parts = {k: cpu1[k] - cpu0[k] for k in ("primary_loop", "primary", "workers")}
                pr.proxy_cpu_parts.append({**parts, "processes": cpu1["processes"]})
                # Every process of the proxy: with workers, the primary and each worker.
                pr.proxy_cpu_s.append(parts["primary"] + parts["workers"])
            else:
                pr.proxy_cpu_parts.append(None)
                pr.proxy_cpu_s.append(cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None)
            pr.proxy_peak_rss_kb.append(rss)
            tag = f"{case.name} {path}" + (f" #{rep + 1}" if repeat > 1 else "")
            if run.ok:
                r = run.result
                progress(f"{tag}: {r.tps:,.0f} tps, {r.latency_avg_ms:.3f} ms avg")
            else:
                progress(f"{tag}: FAILED: {run.error}")
    return result


AUDIT_LOG_CASE = "audit-log"  # not pgbench: the audit log's own rates (bench/audit_log.py)
FLOW_FLOOD_CASE = "flow-flood"  # not pgbench: the flow ledger under 10,000 short connections (bench/flow_flood.py)
BPF_COST_CASE = "bpf-cost"  # not pgbench: the eBPF programs' time per packet (bench/bpf_cost.py)


def select_cases(names: list[str] | None) -> list[Case]:
    if not names:
        return list(CASES.values())
    names = [n for n in names if n not in (AUDIT_LOG_CASE, FLOW_FLOOD_CASE, BPF_COST_CASE)]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise BenchError(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
    return [CASES[n] for n in names]


def preconditions(paths: set[str]) -> None:
    if os.geteuid() != 0:
        raise BenchError("the bench needs root (it builds network namespaces)")
    from appliance.lab.database import PG_BIN
    for binary in ("postgres", "pgbench", "psql", "pg_isready"):
        if not (PG_BIN / binary).exists():
            raise BenchError(f"{PG_BIN / binary} is missing: run `make host-deps`")
    if "pgbouncer" in paths and not os.access(pgbouncer.PGBOUNCER, os.X_OK):
        raise BenchError(f"{pgbouncer.PGBOUNCER} is missing: run `make host-deps` (or leave out --path pgbouncer)")
    if not shutil.which("setpriv"):
        raise BenchError("setpriv (util-linux) is missing")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench",
                                description="pgbench through Tollgate vs a direct connection vs pgbouncer, in one lab.")
    p.add_argument("--duration", type=int, default=None, metavar="S",
                   help=f"seconds per pgbench run (default {DEFAULT_DURATION}; --quick: {QUICK_DURATION})")
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK_DURATION} s per run, 1 s warm-up")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="run each case N times per path (interleaved) and report medians")
    p.add_argument("--case", action="append", metavar="NAME", help="only this case (repeatable); see --list-cases")
    p.add_argument("--path", action="append", choices=list(ROUTES), help="only this path (repeatable)")
    p.add_argument("--scale", type=int, default=SCALE, help=f"pgbench -i scale factor (default {SCALE})")
    p.add_argument("--warmup", type=int, default=None, metavar="S",
                   help="seconds of select-only load on the direct path before measuring (default 5; --quick: 1)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help=f"where the JSON goes (default {RESULTS_DIR})")
    p.add_argument("--raw", action="store_true", help="keep every run's full pgbench output in the JSON")
    p.add_argument("--list-cases", action="store_true", help="list the registered cases and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    if args.duration is None:
        args.duration = QUICK_DURATION if args.quick else DEFAULT_DURATION
    if args.warmup is None:
        args.warmup = 1 if args.quick else 5
    if args.duration < 1 or args.repeat < 1 or args.scale < 1 or args.warmup < 0:
        p.error("--duration, --repeat and --scale must be ≥ 1, --warmup ≥ 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.list_cases:
        for c in CASES.values():
            print(f"{c.name:<14} pgbench {' '.join(c.args):<32} paths: {','.join(c.paths)}  {c.description}")
        return 0
    for name in _PG_ENV:
        os.environ.pop(name, None)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    try:
        return _main(args)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"bench: interrupted ({str(exc) or 'SIGINT'}); lab and pgbouncer torn down", file=sys.stderr)
        return 130


def progress(msg: str) -> None:
    print(f"  {msg}", file=sys.stderr, flush=True)


def measure(ctx: Context, args: argparse.Namespace, plan: list[tuple[Case, list[str]]], paths_used: set[str],
            meta: dict[str, Any], results: list[CaseResult]) -> None:
    """Everything inside the lab: database, pgbouncer, probes, warm-up, the cases."""
    from appliance.lab import LabError

    lab = ctx.lab
    meta["lab"] = {"name": lab.name, "proxy_method": lab.method}
    meta["versions"]["pgbench"] = pgbench.version(lab)
    meta["versions"]["postgresql"] = superuser_sql(lab, "SELECT version()")

    log.info("bench: creating database %s (owner %s), pgbench -i -s %d", DB_NAME, ROLE, args.scale)
    superuser_sql(lab, f"CREATE DATABASE {DB_NAME} OWNER {ROLE}")
    t0 = time.monotonic()
    pgbench.initialize(lab, ROUTES[BASELINE].node, ctx.conninfo(ROUTES[BASELINE]), scale=args.scale,
                       env=ctx.env(ROUTES[BASELINE]))
    meta["init_s"] = round(time.monotonic() - t0, 1)

    if "pgbouncer" in paths_used:
        settings = pgbouncer.Settings(listen_addr=ROUTES["pgbouncer"].host, listen_port=ROUTES["pgbouncer"].port,
                                      upstream_host=ROUTES["direct"].host, upstream_port=ROUTES["direct"].port,
                                      dbname=DB_NAME, user=ROLE, password=ctx.password)
        meta["versions"]["pgbouncer"] = pgbouncer.version()
        meta["pgbouncer"] = {k: v for k, v in dataclasses.asdict(settings).items() if k != "password"}
        ctx.bouncer = pgbouncer.PgBouncer(lab, settings)  # set first: the caller stops it whatever happens
        ctx.bouncer.start()
    if "tollgate" in paths_used:
        meta["tollgate_config"] = lab.config_path.read_text()

    probes = {p: probe_path(ctx, ROUTES[p]) for p in meta["settings"]["paths"]}
    meta["paths"] = {p: {"conninfo": ctx.conninfo(ROUTES[p]), "password_sent": ROUTES[p].password,
                         "description": ROUTES[p].description, **probes[p]} for p in probes}
    for p, probe in probes.items():
        if not probe["ok"]:
            log.error("bench: path %s does not work; its runs will fail: %s", p, probe["error"])
    for name in sorted({n for c, _ in plan for n in c.needs}):
        SETUPS[name](ctx)

    if args.warmup:
        log.info("bench: warming up (%d s, direct path)", args.warmup)
        warm = pgbench.run(lab, ROUTES[BASELINE].node, pgbench.build_argv(("-S", "-c", "8", "-j", "2"),
                                                            ctx.conninfo(ROUTES[BASELINE]), duration=args.warmup),
                           env=ctx.env(ROUTES[BASELINE]), timeout=args.warmup + 120)
        if not warm.ok:
            log.warning("bench: the warm-up failed: %s", warm.error)

    from bench.audit_log import fdatasync_median
    disk = lab.audit_dir.parent if lab.audit_dir.parent.is_dir() else Path("/var/tmp")
    meta["audit_disk"] = {"before": fdatasync_median(disk)}
    print(header(meta), flush=True)
    for case, paths in plan:
        try:
            results.append(_run_one(ctx, args, case, paths))
        except (pgbench.PgbenchError, LabError, OSError) as exc:
            # One case's failure is reported with the others, not the end of the run.
            log.error("bench: case %s failed: %s", case.name, exc)
            results.append(failed_case(case, paths, f"{type(exc).__name__}: {exc}"))
    meta["audit_disk"]["after"] = fdatasync_median(disk)


def _run_one(ctx: Context, args: argparse.Namespace, case: Case, paths: list[str]) -> CaseResult:
    if "tollgate" in paths and (ctx.lab.audit, ctx.lab.without, ctx.lab.workers) != \
            (case.audit, tuple(sorted(case.without)), case.workers):
        log.info("bench: restarting the proxy with audit %s", case.setting)
        ctx.lab.set_audit(case.audit, case.without, workers=case.workers)
    if "tollgate" in paths and ctx.lab.flows != case.flows:
        log.info("bench: restarting the proxy with flows %s", case.flows)
        ctx.lab.set_flows(case.flows)
    script = None
    if case.script is not None:
        script = ctx.workdir / f"{case.name}.sql"
        script.write_text(case.script)
    progress(f"{case.name}: pgbench {' '.join(case.args)} -T {args.duration} "
             f"({', '.join(paths)}{f', ×{args.repeat}' if args.repeat > 1 else ''})")
    return run_case(ctx, case, paths, duration=args.duration, repeat=args.repeat, script=script, progress=progress)


def failed_case(case: Case, paths: list[str], error: str) -> CaseResult:
    """A case that could not run at all, as one failed run on each of its paths."""
    def failed(path: str) -> PathResult:
        return PathResult(path, runs=[pgbench.PgbenchRun(argv=[], returncode=None, wall_s=0.0, stdout="", stderr="",
                                                         error=error)],
                          proxy_cpu_s=[None], proxy_peak_rss_kb=[None])
    return CaseResult(case, {p: failed(p) for p in paths})


def _main(args: argparse.Namespace) -> int:
    from appliance.lab import Lab, LabError  # after arg parsing: --help/--list-cases need no lab

    cases = select_cases(args.case)
    wanted = set(args.path or ROUTES)
    plan = [(c, [p for p in c.paths if p in wanted]) for c in cases]
    plan = [(c, ps) for c, ps in plan if ps]
    audit_log_case = not args.case or AUDIT_LOG_CASE in args.case
    flow_flood_case = not args.case or FLOW_FLOOD_CASE in args.case
    if not plan and not flow_flood_case:
        if args.case and BPF_COST_CASE in args.case:
            from bench import bpf_cost
            print(bpf_cost.line(bpf_cost.measure()))
            if not audit_log_case:
                return 0
        if audit_log_case:
            return _audit_log_only()
        raise BenchError("nothing to run: no selected case runs on the selected paths")
    paths_used = {p for _, ps in plan for p in ps} | ({"tollgate"} if flow_flood_case else set())
    missing = sorted({n for c, _ in plan for n in c.needs if n not in SETUPS})
    if missing:
        raise BenchError(f"cases need setup steps the harness does not have: {', '.join(missing)}")
    preconditions(paths_used)

    started = datetime.now(UTC)
    load_before = loadavg()
    meta: dict[str, Any] = {
        "started_at": started.isoformat(timespec="seconds"),
        "settings": {"duration_s": args.duration, "repeat": args.repeat, "scale": args.scale,
                     "warmup_s": args.warmup, "quick": args.quick, "interleaved": True,
                     "paths": sorted(paths_used, key=list(ROUTES).index)},
        "host": {"cpu_count": os.cpu_count(), "cpu_affinity": len(os.sched_getaffinity(0)),
                 "cpu_model": cpu_model(), "kernel": platform.release(), "machine": platform.machine(),
                 "python": platform.python_version(), "loadavg_before": load_before},
        "versions": {"pgbench": None, "pgbouncer": None, "postgresql": None, "tollgate": git_revision(),
                     "uvloop": uvloop_version()},
    }
    workdir = Path(tempfile.mkdtemp(prefix="tollgate-bench-"))
    results: list[CaseResult] = []

    try:
        log.info("bench: bringing up a lab (load average %s)", " ".join(map(str, load_before)))
        with Lab.create(owner_pid=os.getpid(), proxy="tollgate" in paths_used) as lab:
            ctx = Context(lab, None, workdir)
            try:
                measure(ctx, args, plan, paths_used, meta, results)
                if flow_flood_case:
                    from bench import flow_flood
                    lab.set_audit("fsync")  # as shipped: the guard, and its records written durably
                    lab.set_flows("guard")
                    meta["flow_flood"] = flow_flood.measure(lab, progress=progress)
            finally:
                if ctx.bouncer is not None:
                    ctx.bouncer.stop()  # before the lab goes (its teardown would only kill it)
    except (LabError, pgbench.PgbenchError, pgbouncer.PgBouncerError) as exc:
        raise BenchError(str(exc)) from exc
    finally:
        if os.getpid() == _OWNER_PID:
            shutil.rmtree(workdir, ignore_errors=True)

    if audit_log_case:
        from bench import audit_log
        meta["audit_log"] = audit_log.measure(progress=progress)
    if not args.case or BPF_COST_CASE in args.case:
        from bench import bpf_cost
        try:
            meta["bpf_cost"] = bpf_cost.measure()
        except Exception as exc:  # noqa: BLE001 - reported with the rest, not the end of the run
            meta["bpf_cost"] = {"error": f"{type(exc).__name__}: {exc}"}

    meta["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    meta["host"]["loadavg_after"] = loadavg()
    doc = report.document(meta, results, raw=args.raw)
    print()
    print(report.render_table(results))
    print()
    audit_rows = report.audit_rows(results)
    if audit_rows:
        print()
        print(report.render_audit_table(audit_rows))
    print()
    print(report.summary_line(results))
    for line in report.derived_lines(results):
        print(line)
    if meta.get("audit_disk", {}).get("after"):
        print(f"audit disk after the cases: {_fdatasync_text(meta['audit_disk']['after'])}")
    for line in report.target_lines(report.targets(results, report.fdatasync_median_us(meta))):
        print(line)
    if "audit_log" in meta:
        print(_audit_log_line(meta["audit_log"]))
    if "flow_flood" in meta:
        from bench import flow_flood
        print(flow_flood.line(meta["flow_flood"]))
    if "bpf_cost" in meta:
        from bench import bpf_cost
        print(bpf_cost.line(meta["bpf_cost"]))
    out = report.write_json(doc, args.results_dir, report.timestamp(started))
    print(f"\nload average after: {' '.join(map(str, meta['host']['loadavg_after']))}; results: {out}")
    failed = [f"{cr.case.name}/{p}" for cr in results for p, pr in cr.paths.items()
              if len(pr.ok_runs) < len(pr.runs)]
    if failed:
        print(f"bench: some runs failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _audit_log_line(result: dict[str, Any]) -> str:
    durable = ", ".join(f"{rate:,} with {n} appenders" for n, rate in result["durable_records_per_s"].items())
    return (f"audit log: durable records/s (fsync, group commit): {durable}; verified records/s: "
            f"{result['verified_records_per_s']:,} ({'ok' if result['verified_ok'] else 'VERIFY FAILED'})")


def _audit_log_only() -> int:
    from bench import audit_log
    result = audit_log.measure(progress=progress)
    print(_audit_log_line(result))
    return 0 if result["verified_ok"] else 1


def _fdatasync_text(figures: dict[str, Any]) -> str:
    return (f"fdatasync median {figures['median_us']:,.0f} µs (p90 {figures['p90_us']:,.0f} µs; "
            f"{figures['count']} record-sized appends in {figures['dir']})")


def header(meta: dict[str, Any]) -> str:
    s, h, v = meta["settings"], meta["host"], meta["versions"]
    tls = "; ".join(f"{p}: db leg {info.get('db_leg_tls') or 'plain'}, agent leg "
                    f"{'TLS' if info.get('client_leg_tls') else 'plain'}"
                    for p, info in meta.get("paths", {}).items() if info.get("ok"))
    repeats = f" × {s['repeat']} (medians)" if s["repeat"] > 1 else ""
    lines = [
        (
            f"Tollgate bench — lab {meta['lab']['name']}, {s['duration_s']} s per run{repeats}, "
            f"pgbench -n, scale {s['scale']}, paths interleaved per case"
        ),
        (
            f"host: {h['cpu_count']} CPUs ({h['cpu_model']}), kernel {h['kernel']}, "
            f"load average before {' '.join(map(str, h['loadavg_before']))}"
        ),
        (
            f"versions: {v['pgbench']}; {v['pgbouncer'] or 'no pgbouncer'}; "
            f"{(v['postgresql'] or '').split(' on ')[0]}; uvloop {v['uvloop'] or 'absent'}"
        ),
        f"TLS: {tls}" if tls else "TLS: (no path answered)",
        *([f"audit disk: {_fdatasync_text(meta['audit_disk']['before'])}"] if meta.get("audit_disk") else []),
        f"ratios vs {BASELINE}; summary: tollgate vs {REFERENCE}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
