"""Which result columns are the masked ones: table OIDs and attribute numbers, by name.

A RowDescription names each column's source as (table OID, attribute number), never by
name, and an alias changes only the name shown. So the columns a policy masks
("payments.cards.cvv") are looked up in the catalog of each database agents use, with the
credentials the appliance holds, and results are matched by OID. Lookups run in a thread,
off the event loop: when a session first needs a database's map, the enforcement addon
holds that one statement until the lookup is done. The data path only reads dictionaries.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from appliance.config import Target

log = logging.getLogger("tollgate.masking.catalog")

_QUERY = """
SELECT c.oid::int8, a.attnum::int4, n.nspname, c.relname, a.attname
  FROM pg_catalog.pg_attribute a
  JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE a.attnum > 0 AND NOT a.attisdropped
   AND (n.nspname || '.' || c.relname || '.' || a.attname) = ANY(%s)
"""
RETRY_SECONDS = 10.0  # a failed lookup is tried again after this long, not on every statement

Key = tuple[str, str]  # (target name, database)


class CatalogUnavailable(Exception):
    """A database's catalog could not be read, so its masked columns can't be recognised."""


class PgColumnCatalog:
    """Maps (target, database, table OID, attnum) to "schema.table.column" for masked columns."""

    def __init__(self, targets: Iterable[Target], connect_timeout: float = 5.0):
        self._targets = {t.name: t for t in targets}
        self._connect_timeout = connect_timeout
        self._columns: tuple[str, ...] = ()
        self._maps: dict[Key, dict[tuple[int, int], str]] = {}
        self._errors: dict[Key, tuple[str, float]] = {}
        self._loading: dict[Key, asyncio.Future[None]] = {}
        self._generation = 0

    @property
    def columns(self) -> tuple[str, ...]:
        return self._columns

    def set_columns(self, columns: Iterable[str]) -> None:
        """The policy's masked columns changed: every map is looked up again when next needed."""
        wanted = tuple(sorted(set(columns)))
        if wanted != self._columns:
            self._columns = wanted
            self._maps.clear()
            self._errors.clear()
            self._generation += 1

    def column_name(self, target: str, database: str, table_oid: int, attnum: int) -> str | None:
        if not self._columns:
            return None
        mapping = self._maps.get((target, database))
        if mapping is None:
            why = self._errors.get((target, database), ("not looked up yet", 0.0))[0]
            raise CatalogUnavailable(f"the masked columns of {target}/{database} are not known: {why}")
        return mapping.get((table_oid, attnum))

    def ready(self, target: str, database: str) -> asyncio.Future[None] | None:
        """None when the map for this database is usable now; else a future that completes
        when a lookup (started here if none is running) has finished, well or not."""
        key = (target, database)
        if not self._columns or key in self._maps:
            return None
        failed = self._errors.get(key)
        if failed is not None and time.monotonic() - failed[1] < RETRY_SECONDS:
            return None  # recently failed: results fail closed rather than wait again
        running = self._loading.get(key)
        if running is None:
            running = asyncio.get_running_loop().create_future()
            self._loading[key] = running
            asyncio.get_running_loop().create_task(self._load(key, running))
        return running

    async def _load(self, key: Key, done: asyncio.Future[None]) -> None:
        generation, columns = self._generation, self._columns
        try:
            mapping = await asyncio.to_thread(self._query, self._targets[key[0]], key[1], columns)
            if generation == self._generation:
                self._maps[key] = mapping
                self._errors.pop(key, None)
        except Exception as exc:  # noqa: BLE001 - any failure: that database's masked results fail closed
            text = str(exc).strip()
            why = text.splitlines()[0] if text else type(exc).__name__
            log.error("cannot read the catalog of %s/%s: %s", key[0], key[1], why)
            if generation == self._generation:
                self._errors[key] = (why, time.monotonic())
        finally:
            self._loading.pop(key, None)
            if not done.done():
                done.set_result(None)

    def _query(self, target: Target, database: str, columns: tuple[str, ...]) -> dict[tuple[int, int], str]:
        import psycopg  # late: only the proxy needs it, and only when columns are masked

        credential = next(iter(target.credentials.values()))
        endpoint = target.endpoints[0]
        params: dict[str, object] = {
            "host": target.tls_server_name or str(endpoint.address), "hostaddr": str(endpoint.address),
            "port": endpoint.port, "user": credential.upstream_user, "password": credential.password,
            "dbname": database, "connect_timeout": max(1, int(self._connect_timeout)),
            "application_name": "tollgate-catalog", "sslmode": target.tls,
        }
        if target.tls_ca_file is not None:
            params["sslrootcert"] = str(target.tls_ca_file)
        mapping: dict[tuple[int, int], str] = {}
        with psycopg.connect(**params) as conn:  # type: ignore[arg-type]
            for oid, attnum, schema, table, column in conn.execute(_QUERY, (list(columns),)):
                mapping[(int(oid), int(attnum))] = f"{schema}.{table}.{column}"
        return mapping
