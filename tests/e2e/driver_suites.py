"""Run the drivers' own test suites (from their sdists) in the lab, directly and through Tollgate.

The suites are those shipped in the sdists of the driver versions installed in the venv,
fetched with ``pip download`` into a cache. Only the test directory is unpacked, so the
suites exercise the *installed* driver (asyncpg's ``_testbase`` ships in the installed
package). Each suite runs as a separate pytest process, once from the lab's direct
namespace against the database's direct address and once from the agent namespace against
its protected address (diverted into Tollgate); a small plugin records every test's outcome,
and the two maps are compared.

Run by hand against a lab that has the suite role (``Lab(suite_role=True)``)::

    .venv/bin/python -m tests.e2e.driver_suites LABNAME [pg8000|asyncpg] [direct|tollgate]
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from appliance.lab import DB_DIRECT_V4, DB_PROTECTED_V4, DIRECT_NODE, Lab
from appliance.lab.database import PG_BIN, PG_PORT, SUITE_DB, SUITE_ROLE

CACHE = Path(os.environ.get("TOLLGATE_TEST_CACHE", "/var/cache/tollgate-test"))
PATHS = {"direct": DB_DIRECT_V4, "tollgate": DB_PROTECTED_V4}

# Test-only dependencies of pg8000's suite that the venv doesn't have (its tox deps): pytz
# (type conversion tests), pytest-mock (`mocker`), pytest-benchmark (`benchmark`). Installed
# with pip into the cache, never into the venv, and put on the suites' PYTHONPATH only.
SUITE_DEPS = ("pytz==2026.6", "pytest-mock==3.17.0", "pytest-benchmark==5.3.1", "py-cpuinfo==9.0.0")

PER_TEST_TIMEOUT = 90  # pytest-timeout, per test: a hang shows up as one failed test
RUN_TIMEOUT = 900  # one suite on one path


@dataclass(frozen=True)
class Suite:
    dist: str  # the distribution on PyPI and in the venv
    test_dir: str  # the sdist's test directory (copied as is)
    ini: str  # the pytest.ini the suite runs with
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)  # on both paths
    # node-id prefix → why it is not run (on either path)
    deselect: Mapping[str, str] = field(default_factory=dict)


# --- deselections: identical on both paths; only what the lab cannot offer or what is pathologically slow.

PG8000_DESELECT: dict[str, str] = {
    # (Its pytest-benchmark tests do run: --benchmark-disable runs each benchmark once, as an
    # ordinary test.)
    "test/test_readme.py::test_readme":
        "doctests pg8000's README.md, which is outside the test directory, and whose examples dial "
        "localhost as postgres/cpsnow: nothing there reaches the lab's database",
}

ASYNCPG_DESELECT: dict[str, str] = {
    # HotStandbyTestCase: starts a primary and a hot-standby cluster of its own on localhost
    # (asyncpg.cluster.TempCluster: initdb/pg_ctl as the current user, root here, which they
    # refuse). Nothing of it would reach the lab's database. asyncpg's other cluster-starting
    # classes skip themselves when PGHOST is set ("unmanaged cluster", "using remote cluster
    # for testing") and so are left to report as skipped, alike on both paths.
    "tests/test_connect.py::TestConnectionAttributes":
        "starts its own primary + hot-standby clusters on localhost (initdb; refused as root)",
}

PG8000_INI = """\
[pytest]
# pg8000's own CI runs `pytest -v -x -W error test` (tox); -x and -v are dropped here.
addopts = -W error --benchmark-disable
"""

ASYNCPG_INI = """\
[pytest]
# asyncpg's [tool.pytest.ini_options], as shipped.
addopts = --capture=no --assert=plain --strict-markers --tb=native --import-mode=importlib
testpaths = tests
filterwarnings = default
"""

SUITES: dict[str, Suite] = {
    "pg8000": Suite("pg8000", "test", PG8000_INI, deselect=PG8000_DESELECT),
    # asyncpg's tests assume the login database is "postgres" (their pools name it).
    "asyncpg": Suite("asyncpg", "tests", ASYNCPG_INI, deselect=ASYNCPG_DESELECT, env={"PGDATABASE": "postgres"}),
}

# The plugin every suite run loads: it records each test's outcome as JSON and points
# pg8000's hard-wired login role (its `db_kwargs` fixture says user="postgres", and only
# reads PGHOST, PGPORT and PGPASSWORD) at the lab's suite role.
PLUGIN = '''
import json, os, sys
import pytest

_out = {}
_RANK = {"passed": 0, "skipped": 1, "xfailed": 1, "xpassed": 1, "failed": 2, "error": 3}


def _message(report):
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None and getattr(crash, "message", None):
        return " ".join(crash.message.split())[:400]
    text = getattr(report, "longreprtext", "") or ""
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return (lines[-1] if lines else "")[:400]


def _record(nodeid, outcome, message):
    old = _out.get(nodeid)
    if old is None or _RANK[outcome] > _RANK[old["outcome"]]:
        _out[nodeid] = {"outcome": outcome, "message": message}


def pytest_runtest_logreport(report):
    xfail = hasattr(report, "wasxfail")
    if report.when == "call":
        if xfail:
            _record(report.nodeid, "xfailed" if report.skipped else "xpassed", str(report.wasxfail))
        else:
            _record(report.nodeid, report.outcome, _message(report) if not report.passed else "")
    elif report.failed:
        _record(report.nodeid, "error", f"in {report.when}: " + _message(report))
    elif report.skipped:
        _record(report.nodeid, "xfailed" if xfail else "skipped", _message(report))


def pytest_collectreport(report):
    if report.failed:
        _record(report.nodeid or "<collection>", "error", "collection: " + _message(report))


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    value = yield
    if fixturedef.argname == "db_kwargs" and isinstance(value, dict) and os.environ.get("TOLLGATE_SUITE_USER"):
        value["user"] = os.environ["TOLLGATE_SUITE_USER"]
    return value


def pytest_sessionfinish(session, exitstatus):
    driver = os.environ["TOLLGATE_SUITE_DRIVER"]
    module = sys.modules.get(driver) or __import__(driver)
    with open(os.environ["TOLLGATE_SUITE_RESULTS"], "w") as fh:
        json.dump({"outcomes": _out, "exitstatus": int(exitstatus), "driver_file": module.__file__,
                   "driver_version": getattr(module, "__version__", None)}, fh, indent=1, sort_keys=True)
'''


@dataclass
class SuiteRun:
    suite: str
    path: str
    outcomes: dict[str, dict[str, str]]
    seconds: float
    log: Path
    driver_file: str
    exitstatus: int

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for o in self.outcomes.values():
            out[o["outcome"]] = out.get(o["outcome"], 0) + 1
        return dict(sorted(out.items()))


# --- fetching --------------------------------------------------------------------------------

def installed_version(dist: str) -> str:
    return importlib.metadata.version(dist)


def pip(*args: str, timeout: float = 900) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"pip {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")


def sdist(dist: str, version: str, cache: Path = CACHE) -> Path:
    """The sdist of ``dist==version`` from PyPI, downloaded once into the cache."""
    where = cache / "sdists"
    where.mkdir(parents=True, exist_ok=True)
    names = {f"{dist}-{version}.tar.gz", f"{dist.replace('-', '_')}-{version}.tar.gz"}  # PEP 625 or older
    found = [where / n for n in sorted(names) if (where / n).is_file()]
    if not found:
        # pip builds the sdist's metadata (in an isolated environment) before it saves it;
        # for asyncpg that means fetching Cython: a minute or two, once.
        pip("download", "--no-binary", ":all:", "--no-deps", "--dest", str(where), f"{dist}=={version}")
        found = [where / n for n in sorted(names) if (where / n).is_file()]
    if not found:
        raise RuntimeError(f"pip download left no sdist of {dist}=={version} in {where}")
    return found[0]


def suite_deps(cache: Path = CACHE) -> Path:
    """A directory holding SUITE_DEPS (pip install --target), reused while the pins match."""
    target = cache / "suite-deps"
    stamp = target / ".pins"
    wanted = "\n".join(SUITE_DEPS)
    if not (stamp.is_file() and stamp.read_text() == wanted):
        if target.exists():
            shutil.rmtree(target)
        pip("install", "--no-deps", "--target", str(target), *SUITE_DEPS)
        stamp.write_text(wanted)
    return target


def unpack_tests(archive: Path, suite: Suite, dest: Path) -> Path:
    """A fresh working directory with only the suite's test directory, its config and the plugin."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        top = tar.getmembers()[0].name.split("/")[0]
        prefix = f"{top}/{suite.test_dir}/"
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and (m.isfile() or m.isdir())]
        if not any(m.isfile() for m in members):
            raise RuntimeError(f"{archive.name} has no {suite.test_dir}/ directory")
        for member in members:
            member.name = member.name[len(top) + 1:]
            if member.name.startswith("/") or ".." in Path(member.name).parts:
                raise RuntimeError(f"{archive.name}: refusing to unpack {member.name!r}")
            member.mode = 0o755 if member.isdir() else 0o644
        tar.extractall(dest, members=members)  # regular files and directories only, checked above
    (dest / "pytest.ini").write_text(suite.ini)
    (dest / "tollgate_suite_plugin.py").write_text(PLUGIN)
    os.chmod(dest, 0o755)
    return dest


# --- running ---------------------------------------------------------------------------------

RESET_DATABASES = """\
ALTER SYSTEM RESET ALL;
SELECT pg_reload_conf();
SELECT format('DROP DATABASE %I WITH (FORCE);', datname) FROM pg_database
 WHERE datname NOT IN ('template0', 'template1', {keep}) \\gexec
CREATE DATABASE postgres;
CREATE DATABASE {suite_db} OWNER {suite_role};
"""
DROP_ROLES = """\
SELECT format('{verb} %I{tail};', rolname) FROM pg_roles
 WHERE rolname !~ '^pg_' AND rolname NOT IN ({roles}) \\gexec
"""


def reset_server(lab: Lab) -> None:
    """Put the server back as the lab made it, so that each run starts alike: the suites'
    databases (``postgres`` and ``suite``) afresh, and no roles, databases or ALTER SYSTEM
    settings of an earlier run (a suite whose test fails midway — as some do only through
    Tollgate — leaves such things behind). The lab's own roles and ``payments`` stay."""
    from appliance.lab import database
    ns = lab.namespace("db")
    quote = lambda names: ", ".join(f"'{n}'" for n in names)  # noqa: E731 (lab names: plain words)
    roles = quote(["postgres", *lab.state["roles"]])
    database.psql(lab.paths, ns, RESET_DATABASES.format(keep=quote([database.DB_NAME]), suite_db=SUITE_DB,
                                                        suite_role=SUITE_ROLE), dbname="template1")
    # DROP OWNED acts on one database (and shared objects): the fresh ones hold nothing.
    for db in ("template1", database.DB_NAME):
        database.psql(lab.paths, ns, DROP_ROLES.format(verb="DROP OWNED BY", tail=" CASCADE", roles=roles), dbname=db)
    database.psql(lab.paths, ns, DROP_ROLES.format(verb="DROP ROLE", tail="", roles=roles), dbname="template1")
    # pg8000's type tests round-trip hstore values (a contrib module, shipped with the server).
    database.psql(lab.paths, ns, "CREATE EXTENSION hstore;\n", dbname=SUITE_DB)


def suite_env(lab: Lab, path: str, workdir: Path, suite: Suite, results: Path, deps: Path) -> dict[str, str]:
    """A clean environment: none of the caller's PG*/PYTEST_* variables leak into the suite."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PG", "PYTEST", "TOLLGATE_", "ASYNCPG", "USE_UVLOOP", "PYTHON"))}
    home = workdir / "home"
    home.mkdir(exist_ok=True)
    env.update({
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), str(PG_BIN), env.get("PATH", "/usr/bin:/bin")]),
        "HOME": str(home),  # no ~/.pgpass, ~/.postgresql of the caller's
        "PYTHONPATH": os.pathsep.join([str(workdir), str(deps)]),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PGHOST": PATHS[path],
        "PGPORT": str(PG_PORT),
        "PGUSER": SUITE_ROLE,
        "PGDATABASE": SUITE_DB,
        "TOLLGATE_SUITE_USER": SUITE_ROLE,
        "TOLLGATE_SUITE_DRIVER": suite.dist,
        "TOLLGATE_SUITE_RESULTS": str(results),
        **suite.env,
    })
    if path == "direct":
        # Directly, the suite must log in itself. Through Tollgate it is given no password:
        # the agent never knows it (pg8000 then sends its default "pw", asyncpg none; the
        # suite lab's agent_auth = "trust" never asks, and Tollgate logs in upstream with the
        # password it holds).
        env["PGPASSWORD"] = lab.password(SUITE_ROLE)
    return env


def run_suite(lab: Lab, name: str, path: str, base: Path, *, cache: Path = CACHE,
              only: Sequence[str] = ()) -> SuiteRun:
    """Run one suite on one path: "direct" from the direct namespace, "tollgate" from the
    agent's; with ``only``, just those node ids."""
    suite = SUITES[name]
    archive = sdist(suite.dist, installed_version(suite.dist), cache)
    deps = suite_deps(cache)
    workdir = unpack_tests(archive, suite, base / f"{name}-{path}{'-again' if only else ''}")
    results = workdir / "outcomes.json"
    log = workdir / "pytest.log"
    argv = [sys.executable, "-m", "pytest", *(only or [suite.test_dir]), "-p", "no:cacheprovider",
            "-p", "tollgate_suite_plugin",
            "-p", "timeout", f"--timeout={PER_TEST_TIMEOUT}", "-q", "-rfE",
            f"--junitxml={workdir / 'junit.xml'}", *suite.args]
    for prefix in suite.deselect:
        argv += ["--deselect", prefix]
    env = suite_env(lab, path, workdir, suite, results, deps)
    reset_server(lab)
    # lab.command points HOME at the enrolled agent's home; the suites get a home of their own.
    argv = ["env", f"HOME={env['HOME']}", *argv]
    started = time.monotonic()
    with open(log, "wb") as fh:
        # Directly from the direct namespace: the agent's can't reach the direct address.
        node = DIRECT_NODE if path == "direct" else "agent"
        proc = subprocess.run(lab.command(node, argv), cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                              stdout=fh, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT)
    seconds = time.monotonic() - started
    if not results.is_file():
        raise RuntimeError(f"{name} on {path}: pytest exited {proc.returncode} without results; see {log}:\n"
                           + "\n".join(log.read_text(errors="replace").splitlines()[-30:]))
    data = json.loads(results.read_text())
    return SuiteRun(name, path, data["outcomes"], seconds, log, data["driver_file"], data["exitstatus"])


# --- comparing -------------------------------------------------------------------------------

@dataclass
class Difference:
    test: str
    direct: str
    tollgate: str
    direct_message: str
    tollgate_message: str
    allowed: str | None  # the allow-list's reason, if listed


def compare(direct: SuiteRun, tollgate: SuiteRun, allow: Mapping[str, str],
            symptoms: Sequence[tuple[str, str, bool]] = ()) -> list[Difference]:
    """Tests whose outcome differs, each with the reason it is allowed (or None).

    ``allow`` names tests. ``symptoms`` are (regex, reason, cascade) for a difference that
    passes directly and fails through Tollgate with a message matching the regex: a known
    defect that strikes tests at random rather than a fixed few. A ``cascade`` symptom (the
    leftovers of a test struck before it could clean up) is allowed only in a test class in
    which a test was struck by a non-cascade symptom in the same run.
    """
    missing = {"outcome": "absent", "message": ""}
    diffs = []
    for test in sorted(set(direct.outcomes) | set(tollgate.outcomes)):
        d = direct.outcomes.get(test, missing)
        t = tollgate.outcomes.get(test, missing)
        if d["outcome"] != t["outcome"]:
            diffs.append(Difference(test, d["outcome"], t["outcome"], d["message"], t["message"], allow.get(test)))
    struck: set[str] = set()
    for cascade in (False, True):
        for diff in diffs:
            if diff.allowed is not None or (diff.direct, diff.tollgate) != ("passed", "failed"):
                continue
            cls = diff.test.rpartition("::")[0]
            for pattern, why, is_cascade in symptoms:
                if is_cascade is cascade and re.search(pattern, diff.tollgate_message) \
                        and (not cascade or cls in struck):
                    diff.allowed = why
                    if not cascade:
                        struck.add(cls)
                    break
    return diffs


def unused_allowances(direct: SuiteRun, tollgate: SuiteRun, allow: Mapping[str, str]) -> list[str]:
    """Allow-listed tests that no longer differ: the list should shrink with them."""
    return [test for test in allow
            if test in direct.outcomes and test in tollgate.outcomes
            and direct.outcomes[test]["outcome"] == tollgate.outcomes[test]["outcome"]]


def table(diffs: list[Difference], width: int = 110) -> str:
    rows = [f"{'test':<70} {'direct':<8} {'tollgate':<8} note"]
    for d in diffs:
        note = f"allowed: {d.allowed}" if d.allowed else "UNEXPECTED"
        rows.append(f"{d.test:<70} {d.direct:<8} {d.tollgate:<8} {note[:width]}")
        for label, msg in (("direct", d.direct_message), ("tollgate", d.tollgate_message)):
            if msg:
                rows.append(f"    {label}: {msg[:width * 2]}")
    return "\n".join(rows)


def summary(run: SuiteRun) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in run.counts().items())
    return f"{run.suite} via {run.path}: {counts} ({run.seconds:.0f}s, driver {run.driver_file})"


def main(argv: list[str]) -> int:
    import tempfile
    lab = Lab.open(argv[0])
    names = [argv[1]] if len(argv) > 1 else list(SUITES)
    paths = [argv[2]] if len(argv) > 2 else list(PATHS)
    base = Path(tempfile.mkdtemp(prefix="driver-suites-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    runs = {}
    for name in names:
        for path in paths:
            runs[name, path] = r = run_suite(lab, name, path, base)
            print(summary(r), flush=True)
        if len(paths) == 2:
            from tests.e2e.test_driver_suites import ALLOW, SYMPTOMS
            print(table(compare(runs[name, "direct"], runs[name, "tollgate"], ALLOW.get(name, {}),
                                SYMPTOMS.get(name, ()))))
    print(f"work directory: {base}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
