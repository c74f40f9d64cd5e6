"""Fixtures for the dbadmin tests: a real PostgreSQL with a small payments database.

Each test gets a database of its own (and roles named after it), built by the superuser:
``cards`` with Luhn-valid test PANs owned by a NOLOGIN owner role, ``accounts`` with two
int8 id columns that are not card numbers (random 16-digit ids, about one in ten of which
passes Luhn with an issuer prefix; Luhn-valid ids with no issuer prefix), undeclared
copies of the PANs in ``legacy.card_backup`` (a domain over varchar) and
``legacy.wallets`` (an int8 array), and an agent login role.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.lab.pans import make_test_pans
from appliance.pan.detector import luhn_complete
from tests.masking.conftest import Postgres, postgres  # noqa: F401 -- re-exported as a fixture

PANS = [str(p) for p in make_test_pans(20261207, 60)]


@dataclass
class Database:
    pg: Postgres
    name: str
    owner: str
    agent: str
    config: Path

    def dsn(self, user: str = "postgres") -> str:
        return f"host={self.pg.socket_dir} port={self.pg.port} user={user} dbname={self.name}"

    def connect(self, user: str = "postgres"):  # type: ignore[no-untyped-def]
        import psycopg

        return psycopg.connect(self.dsn(user), autocommit=True)


def _random_ids(rng: random.Random, n: int) -> list[int]:
    return [int("4" + "".join(rng.choice("0123456789") for _ in range(15))) for _ in range(n)]


def _non_issuer_luhn_ids(rng: random.Random, n: int) -> list[int]:
    # 16 digits starting with 9: Luhn-valid, but no issuer uses the prefix.
    return [int(luhn_complete("9" + "".join(rng.choice("0123456789") for _ in range(14)))) for _ in range(n)]


@pytest.fixture
def database(postgres: Postgres, tmp_path: Path) -> Iterator[Database]:  # noqa: F811 -- the fixture above
    tag = secrets.token_hex(4)
    db = Database(postgres, f"pay_{tag}", f"owner_{tag}", f"agent_{tag}", tmp_path / "tollgate.toml")
    rng = random.Random(tag)
    rows = ",".join(f"({i}, '{pan}', '{pan[-4:]}', 'visa')" for i, pan in enumerate(PANS, start=1))
    ids = ",".join(f"({a}, {b})" for a, b in zip(_random_ids(rng, 200), _non_issuer_luhn_ids(rng, 200), strict=True))
    backup = ",".join(f"('{pan}')" for pan in PANS[:30])
    wallets = ",".join(f"({i}, '{{{PANS[i]},{PANS[i + 1]}}}')" for i in range(10))
    with postgres.connect() as conn:
        conn.execute(f"CREATE ROLE {db.owner} NOLOGIN")
        conn.execute(f"CREATE ROLE {db.agent} LOGIN PASSWORD 'lab-only'")
        conn.execute(f"CREATE DATABASE {db.name} OWNER {db.owner}")
    with db.connect() as conn:
        conn.execute(f"SET ROLE {db.owner}")
        conn.execute(f"""
            CREATE TABLE cards (id int PRIMARY KEY, pan text NOT NULL, pan_last4 text NOT NULL, brand text NOT NULL);
            INSERT INTO cards VALUES {rows};
            CREATE TABLE accounts (id int8 PRIMARY KEY, ref int8 NOT NULL);
            INSERT INTO accounts VALUES {ids};
            CREATE SCHEMA legacy;
            CREATE DOMAIN legacy.card_number AS varchar(19);
            CREATE TABLE legacy.card_backup (pan legacy.card_number);
            INSERT INTO legacy.card_backup VALUES {backup};
            CREATE TABLE legacy.wallets (id int, pans int8[]);
            INSERT INTO legacy.wallets VALUES {wallets};
            GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public, legacy TO {db.agent};
            GRANT USAGE ON SCHEMA legacy TO {db.agent};
            ANALYZE;
        """)
    (tmp_path / "pw").write_text("lab-only\n")
    db.config.write_text(f"""
[[targets]]
name = "payments"
addresses = ["127.0.0.1:{postgres.port}"]
tls = "disable"

[targets.credentials.app]
upstream_user = "{db.agent}"
password_file = "{tmp_path / 'pw'}"
""")
    try:
        yield db
    finally:
        with postgres.connect() as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {db.name} WITH (FORCE)")
            conn.execute(f"DROP ROLE IF EXISTS {db.agent}")
            conn.execute(f"DROP ROLE IF EXISTS {db.owner}")
