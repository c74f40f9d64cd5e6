"""Fixtures shared by the whole suite: whether this host can run a lab at all, an
enrollment service (the real ``tollgate enroll-server``) for the tests that talk to one,
and the state stores' two backends (``state_where``)."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from appliance.lab import gc
from appliance.lab.database import PG_BIN

if TYPE_CHECKING:  # the fixtures import them when used: a suite that needs none stays light
    from appliance.lab.oidc_issuer import DevIssuer
    from tests.identity.enroll_server import EnrollServer
    from tests.identity.tls_helpers import TlsFiles
    from tests.webui import Appliance


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """A failure's traceback the moment it happens, not only in the final summary: a later
    crash of the whole run (a segfault in an extension) must not take the evidence with it."""
    if report.failed:
        sys.stderr.write(f"\n--- FAILED {report.nodeid} ({report.when})\n{report.longreprtext}\n---\n")
        sys.stderr.flush()


def lab_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces)"
    if not shutil.which("ip"):
        return "iproute2 `ip` is missing"
    if not (PG_BIN / "postgres").exists():
        return f"PostgreSQL 15 is missing ({PG_BIN}); run `make host-deps`"
    return None


@pytest.fixture(scope="session")
def lab_host() -> None:
    """Skip lab tests on a host that can't run a lab; collect labs of dead earlier runs."""
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    gc()


# --- an enrollment service: `tollgate enroll-server` with its appliance and dev issuer -----------
# Shared by the enrollment client tests (tests/identity) and the approvals CLI tests
# (tests/holds, which override `issuer` with one that also knows the approvers). Module
# scope: each module gets its own issuer, appliance and server.

@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A throwaway CA and a 127.0.0.1 server certificate, for the dev issuer."""
    from tests.identity.tls_helpers import make_tls_files
    return make_tls_files(tmp_path_factory.mktemp("issuer-tls"))


@pytest.fixture(scope="module")
def issuer(tls: TlsFiles) -> Iterator[DevIssuer]:
    """A dev OIDC issuer on 127.0.0.1 (bound, and so answering, once it is returned)."""
    from tests.webui import start_issuer
    issuer = start_issuer(tls)
    yield issuer
    issuer.stop()


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory, issuer: DevIssuer, tls: TlsFiles) -> Appliance:
    """An appliance state directory (CA, registry) and a config trusting ``issuer``."""
    from tests.webui import make_appliance
    return make_appliance(tmp_path_factory.mktemp("appliance"), issuer.url, tls.ca_file)


@pytest.fixture(scope="module")
def server(appliance: Appliance) -> Iterator[EnrollServer]:
    """``tollgate enroll-server`` for ``appliance``, started once a worker answers."""
    from tests.identity.enroll_server import EnrollServer
    server = EnrollServer(appliance)
    yield server
    server.stop()


# --- the state stores' backends (tests/state_backends.py) ------------------------------------

@pytest.fixture(scope="session")
def state_postgres() -> Iterator[Any]:
    from tests.state_backends import running_postgres
    with running_postgres() as pg:
        yield pg


@pytest.fixture(params=["sqlite", "postgresql"])
def state_where(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """Where a state store lives, by store name: a SQLite file in ``tmp_path``, or a fresh
    PostgreSQL database (the stores of one test share it, each in its own schema)."""
    if request.param == "sqlite":
        return lambda name: tmp_path / "state" / f"{name}.db"
    from tests.state_backends import fresh_database
    url = fresh_database(request.getfixturevalue("state_postgres"))
    return lambda name: url
