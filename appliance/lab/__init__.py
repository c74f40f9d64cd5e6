"""The lab: an agent → appliance → database network in namespaces, for tests and demos.

``tollgate lab up`` (or :meth:`Lab.create`) builds, per lab ``NAME``:

- namespace ``tgNAME-agent``: the agent, 198.18.1.10 and fd7a:6c67:1::10, default routes via gw;
- namespace ``tgNAME-gw``: the appliance, 198.18.1.1/198.18.2.1 and fd7a:6c67:1::1/fd7a:6c67:2::1,
  forwarding on, Tollgate running from ``<lab>/tollgate.toml`` (unless ``proxy=False``);
- namespace ``tgNAME-db``: PostgreSQL 15 on 198.18.2.10 / fd7a:6c67:2::10 (protected: the
  appliance intercepts them) and 198.18.2.11 / fd7a:6c67:2::11 (direct: not intercepted),
  TLS with a lab CA, database ``payments`` with seeded, Luhn-valid test PANs, roles ``app``
  (SCRAM), ``legacy_md5`` (MD5), ``clear_tls`` (cleartext, TLS only). The whole database
  subnet is protected: the gateway drops agent traffic to it that isn't diverted;
- namespace ``tgNAME-direct``: 198.18.3.10 / fd7a:6c67:3::10, routed via gw: where clients
  of the direct address run (the benchmark, the driver suites' direct run);
- namespace ``tgNAME-witness``: the audit log's witness (:mod:`appliance.witness`),
  198.18.4.10:7380, reachable from gw only.

State lives in ``/run/tollgate-lab/NAME/`` (``state.json`` and every file of the lab); a lab
with an owner pid is collected by ``tollgate lab gc`` once that process is gone.

Whatever runs on the agent node runs in a view of its own (:mod:`appliance.lab.agent_view`):
its home ``NAME/agent-home`` (``~/.postgresql``, its client secret, copies of the CA
certificates it trusts) and nothing else of any lab — no appliance file, no control socket.
The dev issuer's admin API listens on gw's loopback and wants the secret in
``NAME/identity/issuer-admin.token`` (``tollgate lab rotate-issuer-key``).

Python use (tests)::

    from appliance.lab import Lab
    with Lab.create(owner_pid=os.getpid(), proxy=False) as lab:
        lab.exec("direct", ["psql", lab.conninfo(direct=True), "-c", "SELECT 1"], check=True)
        lab.status()  # the same dict as `tollgate lab status --json`

``status()`` keys: name, phase, healthy, created_at, owner_pid, state_dir, namespaces
{agent,gw,db,witness,direct}, namespaces_present, addresses {agent, gw, db{protected,direct},
witness, direct}, database
{host, host_ipv6, direct_host, direct_host_ipv6, port, dbname, tls_ca, socket_dir, data_dir,
log, pid, running}, roles {ROLE: {password, auth, password_file, lab_only}}, roles_note, proxy
{enabled, method, port, pid, running, config, log, control_socket, target, audit, audit_dir,
agent_direct}, witness {name, key, url, dir, pid, running, log}, agent_conninfo,
conninfo {agent, agent_ipv6, direct, direct_ipv6}.
"""

from appliance.lab.lab import DIRECT_NODE, Lab, LabError, gc, list_labs
from appliance.lab.pans import brand_of, is_luhn_valid, luhn_check_digit, make_test_pans
from appliance.lab.topology import (
    AGENT_SUBNET_V4,
    AGENT_SUBNET_V6,
    AGENT_V4,
    AGENT_V6,
    DB_DIRECT_V4,
    DB_DIRECT_V6,
    DB_PROTECTED_V4,
    DB_PROTECTED_V6,
    GW_AGENT_V4,
    GW_AGENT_V6,
    GW_DB_V4,
    GW_DB_V6,
)

__all__ = [
    "AGENT_SUBNET_V4",
    "AGENT_SUBNET_V6",
    "AGENT_V4",
    "AGENT_V6",
    "DB_DIRECT_V4",
    "DB_DIRECT_V6",
    "DB_PROTECTED_V4",
    "DB_PROTECTED_V6",
    "DIRECT_NODE",
    "GW_AGENT_V4",
    "GW_AGENT_V6",
    "GW_DB_V4",
    "GW_DB_V6",
    "Lab",
    "LabError",
    "brand_of",
    "gc",
    "is_luhn_valid",
    "list_labs",
    "luhn_check_digit",
    "make_test_pans",
]
