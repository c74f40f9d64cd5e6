"""The lab's ``payments`` database: schema and seeded sample data, as SQL text.

Pure functions of a seed, so every lab (and every test run) sees the same rows: the PANs
come from :mod:`appliance.lab.pans`, names, amounts and timestamps from the same seeded
generator. The SQL is run by :mod:`appliance.lab.database` as the ``app`` role, which
therefore owns every table.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta

from appliance.lab.pans import make_test_pans

DEFAULT_SEED = 20240601
CUSTOMERS = 120
CARDS = 300
PAYMENTS = 1200

SCHEMA_SQL = """\
CREATE TABLE customers (
    id          integer PRIMARY KEY,
    name        text NOT NULL,
    email       text NOT NULL,
    created_at  timestamptz NOT NULL
);

CREATE TABLE cards (
    id           integer PRIMARY KEY,
    customer_id  integer NOT NULL REFERENCES customers(id),
    pan          text NOT NULL UNIQUE,
    pan_last4    text NOT NULL,
    expiry       text NOT NULL,          -- MM/YY, as printed on the card
    brand        text NOT NULL
);

CREATE TABLE payments (
    id          bigint PRIMARY KEY,
    card_id     integer NOT NULL REFERENCES cards(id),
    amount      numeric(12, 2) NOT NULL,
    currency    text NOT NULL,
    created_at  timestamptz NOT NULL,
    merchant    text NOT NULL,
    status      text NOT NULL
);

CREATE INDEX payments_card_id ON payments (card_id);
CREATE INDEX cards_customer_id ON cards (customer_id);
"""

_FIRST = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Margaret",
          "Dennis", "Radia", "Leslie", "Hedy", "John", "Sophie", "Tim", "Katherine", "Niklaus")
_LAST = ("Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson",
         "Hamilton", "Ritchie", "Perlman", "Lamport", "Lamarr", "Backus", "Wilson", "Berners-Lee",
         "Johnson", "Wirth")
_MERCHANTS = ("Acme Hardware", "Blue Bottle Coffee", "City Parking", "Delta Books", "Eagle Air",
              "Fern Grocery", "Globex Cloud", "Harbor Hotel", "Initech Supplies", "Juniper Pharmacy",
              "Kite Streaming", "Lumen Energy")
_CURRENCIES = ("EUR", "USD", "GBP", "CHF")
_STATUSES = ("captured", "captured", "captured", "authorized", "refunded", "declined")
_EPOCH = datetime(2024, 1, 1, tzinfo=UTC)


class _Raw(str):
    """A literal written into SQL as-is (a numeric we formatted ourselves)."""


def _quote(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, (int, float, _Raw)):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def _insert(table: str, columns: Sequence[str], rows: Iterable[Sequence[object]], batch: int = 200) -> str:
    rows = list(rows)
    out = []
    for start in range(0, len(rows), batch):
        values = ",\n".join("(" + ", ".join(_quote(v) for v in row) + ")" for row in rows[start:start + batch])
        out.append(f"INSERT INTO {table} ({', '.join(columns)}) VALUES\n{values};\n")
    return "".join(out)


def data_sql(seed: int = DEFAULT_SEED) -> str:
    """INSERT statements for customers, cards and payments, determined by ``seed``."""
    rng = random.Random(seed)
    customers = []
    for cid in range(1, CUSTOMERS + 1):
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        created = _EPOCH + timedelta(minutes=rng.randrange(0, 60 * 24 * 90))
        customers.append((cid, f"{first} {last}", f"{first}.{last}.{cid}@example.com".lower(), created.isoformat()))

    cards = []
    for card_id, pan in enumerate(make_test_pans(seed, CARDS), start=1):
        expiry = f"{rng.randint(1, 12):02d}/{rng.randint(26, 33)}"
        cards.append((card_id, rng.randint(1, CUSTOMERS), str(pan), pan.last4, expiry, pan.brand))

    payments = []
    for pid in range(1, PAYMENTS + 1):
        created = _EPOCH + timedelta(seconds=rng.randrange(0, 3600 * 24 * 180))
        # formatted here, written unquoted: a numeric literal with exactly two decimals
        amount = _Raw(f"{rng.randint(100, 250_000) / 100:.2f}")
        payments.append((pid, rng.randint(1, CARDS), amount, rng.choice(_CURRENCIES),
                         created.isoformat(), rng.choice(_MERCHANTS), rng.choice(_STATUSES)))

    return (
        _insert("customers", ("id", "name", "email", "created_at"), customers)
        + _insert("cards", ("id", "customer_id", "pan", "pan_last4", "expiry", "brand"), cards)
        + _insert("payments", ("id", "card_id", "amount", "currency", "created_at", "merchant", "status"),
                  payments)
    )


def database_sql(seed: int = DEFAULT_SEED) -> str:
    """The whole script: schema, then data, then fresh statistics, in one transaction."""
    return "BEGIN;\n" + SCHEMA_SQL + data_sql(seed) + "COMMIT;\nANALYZE customers, cards, payments;\n"
