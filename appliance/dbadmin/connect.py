"""Connections to a target: with the credentials the appliance holds, or an admin's conninfo.

Discovery connects as the proxy does (the target's first endpoint, its TLS mode and CA, a
held credential), so it sees the database as the agents' login role sees it. Provisioning
needs a role that may grant and own objects, which the appliance does not hold: the
operator gives its conninfo.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from appliance.config import Target


class TargetError(ValueError):
    """The target, credential or database named on the command line does not fit the config."""


def held_params(target: Target, database: str, role: str | None = None,
                connect_timeout: float = 10.0) -> dict[str, Any]:
    """psycopg connection keywords for ``target`` with the credential agents ask for as
    ``role`` (the first one when None)."""
    if not target.credentials:
        raise TargetError(f"target {target.name!r} holds no credentials")
    if role is None:
        credential = next(iter(target.credentials.values()))
    elif role in target.credentials:
        credential = target.credentials[role]
    else:
        raise TargetError(f"target {target.name!r} holds no credential for {role!r} "
                          f"(it holds: {', '.join(sorted(target.credentials))})")
    endpoint = target.endpoints[0]
    params: dict[str, Any] = {
        "host": target.tls_server_name or str(endpoint.address), "hostaddr": str(endpoint.address),
        "port": endpoint.port, "user": credential.upstream_user, "password": credential.password,
        "dbname": database, "connect_timeout": max(1, int(connect_timeout)),
        "application_name": "tollgate-dbadmin", "sslmode": target.tls,
    }
    if target.tls_ca_file is not None:
        params["sslrootcert"] = str(target.tls_ca_file)
    return params


def agent_roles(target: Target, agent_groups: Iterable[str] = ()) -> tuple[str, ...]:
    """The database roles the appliance may log agents in as on ``target``: every held
    credential an identity in ``agent_groups`` may use — one bound to no groups, or to one
    of them. Without ``agent_groups`` (the policy names none) every credential counts: who
    is an agent is then unknown, so all are provisioned."""
    agents = frozenset(agent_groups)
    return tuple(sorted({c.upstream_user for c in target.credentials.values()
                         if not agents or c.allows(agents)}))
