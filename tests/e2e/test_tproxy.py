"""The same data path with the tproxy method: no NAT, the proxy answers as the database."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from appliance.lab import Lab
from tests.e2e.conftest import psql, python_json, run

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def tproxy_lab(lab_host: None) -> Iterator[Lab]:
    # Protocol fidelity through the other method: the allow-all policy (masking still on).
    with Lab.create(owner_pid=os.getpid(), proxy=True, method="tproxy", policy="permissive") as lab:
        yield lab


def test_psql_through_tproxy(tproxy_lab: Lab):
    out = psql(tproxy_lab, "SELECT inet_server_addr(), current_user, count(*) > 0 FROM cards")
    assert out.strip() == "198.18.2.10|app|t"


def test_ipv6_through_tproxy(tproxy_lab: Lab):
    out = run(tproxy_lab, "agent", ["psql", "-X", "-A", "-t", tproxy_lab.conninfo(ipv6=True), "-c",
                                    "SELECT inet_server_addr()"]).stdout.decode()
    assert out.strip() == "fd7a:6c67:2::10"


def test_tproxy_session_is_proxied_and_gets_the_real_backend_pid(tproxy_lab: Lab):
    got = python_json(tproxy_lab, """
        import json, sys, psycopg
        with psycopg.connect(sys.argv[1]) as conn:
            print(json.dumps([conn.info.backend_pid == conn.execute("SELECT pg_backend_pid()").fetchone()[0],
                              conn.execute("SELECT inet_client_addr()::text").fetchone()[0]]))
    """, tproxy_lab.conninfo())
    # tproxy keeps the agent's address on the agent side only; upstream is the appliance.
    # The pid is the backend's own (Tollgate substitutes only the cancel secret).
    assert got == [True, "198.18.2.1/32"]


def test_pgbench_extended_through_tproxy(tproxy_lab: Lab):
    run(tproxy_lab, "agent", ["pgbench", "-i", "-s", "1", "-q", tproxy_lab.conninfo()])
    out = run(tproxy_lab, "agent", ["pgbench", "-n", "-M", "extended", "-c", "4", "-j", "2", "-t", "100",
                                    tproxy_lab.conninfo()]).stdout.decode()
    assert "number of transactions actually processed: 400/400" in out
