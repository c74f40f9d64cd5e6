"""The appliance's durable state: small databases shared by the proxy, the CLI and the
web service — SQLite files on the appliance (the default), or schemas in a PostgreSQL
database that several appliances share.

``db`` is the SQLite helper (WAL, numbered migrations, a connection per thread), ``pg``
the PostgreSQL one with the same interface; :func:`open_database` picks by location. What
is stored belongs to the features: the certificate registry is
``appliance.identity.registry``, approvals are ``appliance.holds.store``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from appliance.state.db import Database, Migration


def open_database(location: str | Path, migrations: Sequence[Migration], *, name: str, create: bool = True) -> Any:
    """A store's database: ``location`` is a SQLite file, or a ``postgresql://`` URL whose
    database holds the store in schema ``tollgate_<name>``."""
    from appliance.state.pg import PgDatabase, is_url
    if is_url(location):
        return PgDatabase(str(location), migrations, name=name, create=create)
    return Database(location, migrations, create=create)
