"""The lab's PostgreSQL 15: cluster, TLS, authentication rules, roles and sample data.

The server runs as the ``postgres`` OS user inside the db namespace, with its data
directory, socket and log under the lab's state directory, listening on the db's four
addresses only. Authentication is varied on purpose, so the appliance's upstream login is
exercised with every method it must speak: ``app`` uses SCRAM-SHA-256, ``legacy_md5`` MD5,
``clear_tls`` cleartext password (TLS connections only).

``app`` owns the payments tables, as an application's own role does: the protocol tests
(pg_dump through the proxy byte for byte, pgbench -i, the approved UPDATEs of the holds
tests) log in as it. ``agent`` (SCRAM) is the least-privilege agent role, provisioned —
like ``legacy_md5`` and ``clear_tls``, which only the authentication tests use — by
:mod:`appliance.dbadmin.provision` exactly as ``tollgate db provision --apply`` does, for
the lab policy's cardholder columns (``public.cards.pan``): it can't read them in clear
(its search_path shows the masked view), write the cards, create objects or temporary
ones, or run the denied functions.

Administration goes over the Unix socket as the ``postgres`` superuser (trusted locally;
the socket directory is 0700, so only root and postgres can use it). Every process this
module starts runs inside the db namespace, so a teardown that empties the namespace also
stops an initdb or psql left behind by a builder that was killed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import pwd
import secrets
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.dbadmin import provision as dbprovision
from appliance.dbadmin.declaration import column_masks, declared_columns
from appliance.lab import schema, topology
from appliance.lab.layout import Paths
from appliance.lab.policy import LAB_POLICY
from appliance.lab.readiness import tail
from appliance.policy.engine import Policy

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_PORT = 5432
DB_NAME = "payments"
PG_USER = "postgres"
# role → the pg_hba method it must authenticate with
ROLES: dict[str, str] = {"app": "scram-sha-256", "legacy_md5": "md5", "clear_tls": "password",
                         "agent": "scram-sha-256"}
# The login roles provisioned as agent roles (for the lab policy's cardholder columns and
# column masks): every one the appliance holds a credential for except ``app``, the owner.
AGENT_ROLES = ("agent", "legacy_md5", "clear_tls")
LOOPBACKS = ("127.0.0.1/32", "::1/128")
# Opt-in (``Lab(suite_role=True)``): a superuser and its own database for third-party test
# suites (the drivers' own tests, run from the agent through Tollgate and directly). SCRAM,
# through the catch-all host line of pg_hba; never created in a lab that did not ask for it.
SUITE_ROLE = "suite"
SUITE_DB = "suite"
# A safety net for starting the server (pg_ctl -w -t, pg_isready -t): never a bound on a
# server that works, only on one that hangs.
START_TIMEOUT_SECONDS = 120


class DatabaseError(Exception):
    """PostgreSQL could not be set up, started or stopped."""


def new_password() -> str:
    # URL-safe alphabet: no quotes, so it can be embedded in SQL and conninfo strings as is.
    return secrets.token_urlsafe(18)


def _postgres_ids() -> tuple[int, int]:
    try:
        pw = pwd.getpwnam(PG_USER)
    except KeyError:
        raise DatabaseError("there is no `postgres` OS user: install postgresql-15 (make host-deps)") from None
    return pw.pw_uid, pw.pw_gid


def _chown_postgres(path: Path) -> None:
    uid, gid = _postgres_ids()
    os.chown(path, uid, gid)


def _run(argv: list[str], what: str, *, input: str | None = None, cwd: Path | None = None,
         timeout: float = 120) -> str:
    try:
        proc = subprocess.run(argv, input=input, capture_output=True, text=True, cwd=cwd, timeout=timeout,
                              stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise DatabaseError(f"{what}: timed out after {timeout}s") from None
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise DatabaseError(f"{what} failed (exit {proc.returncode}): {detail[-2000:]}")
    return proc.stdout


# --- TLS ---------------------------------------------------------------------------------

def make_tls(paths: Paths) -> None:
    """A throwaway lab CA and a server certificate for the db's addresses (IP SANs)."""
    paths.tls_dir.mkdir(mode=0o755, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tollgate lab"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "Tollgate lab CA (lab only)")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(a)) for a in topology.DB_ADDRESSES]
    sans.append(x509.DNSName("db.lab"))
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tollgate lab"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, topology.DB_PROTECTED_V4)]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(paths.ca_key, _key_pem(ca_key), 0o600)
    _write(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    # PostgreSQL refuses a key readable by others; it must own it (or be root-owned 0640).
    _write(paths.server_key, _key_pem(server_key), 0o600)
    _chown_postgres(paths.server_key)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)


# --- configuration -----------------------------------------------------------------------

def render_conf(paths: Paths) -> str:
    listen = ",".join(topology.DB_ADDRESSES)
    return f"""
# --- Tollgate lab (appended by appliance.lab.database) ---
listen_addresses = '{listen}'
port = {PG_PORT}
unix_socket_directories = '{paths.socket_dir}'
unix_socket_permissions = 0700
max_connections = 200
shared_buffers = 32MB
# A lab's data is regenerated on every `lab up`: durability buys nothing here.
fsync = off
synchronous_commit = off
full_page_writes = off
ssl = on
ssl_cert_file = '{paths.server_cert}'
ssl_key_file = '{paths.server_key}'
password_encryption = 'scram-sha-256'
log_statement = 'none'
log_connections = off
log_min_messages = warning
"""


def render_hba() -> str:
    """Authentication rules: first match wins, so the per-role lines precede the catch-all."""
    sources = topology.LAB_SUBNETS + LOOPBACKS
    lines = [
        "# Tollgate lab: generated, lab-only. First matching line wins.",
        "# TYPE   DATABASE  USER        ADDRESS                 METHOD",
        f"local    all       {PG_USER:<11} {'':<23} trust",
    ]
    lines.extend(f"hostssl  all       {'clear_tls':<11} {src:<23} password" for src in sources)
    # Cleartext passwords never cross an unencrypted connection.
    lines.append(f"host     all       {'clear_tls':<11} {'all':<23} reject")
    lines.extend(f"host     all       {role:<11} {src:<23} {ROLES[role]}"
                 for role in ("legacy_md5", "app") for src in sources)
    lines.extend(f"host     all       {'all':<11} {src:<23} scram-sha-256" for src in sources)
    return "\n".join(lines) + "\n"


def roles_sql(passwords: dict[str, str]) -> str:
    """Create the lab roles; legacy_md5's password is hashed with MD5 so md5 auth can work."""
    out = []
    for role in ROLES:
        pw = passwords[role]
        if ROLES[role] == "md5":
            out.append("SET password_encryption = 'md5';")
        out.append(f"CREATE ROLE {role} LOGIN PASSWORD '{pw}';")
        if ROLES[role] == "md5":
            out.append("SET password_encryption = 'scram-sha-256';")
    out.append(f"CREATE DATABASE {DB_NAME} OWNER app;")
    return "\n".join(out) + "\n"


def suite_sql(password: str) -> str:
    """The test-suite superuser and its database (the default database of its logins)."""
    return (f"CREATE ROLE {SUITE_ROLE} SUPERUSER LOGIN PASSWORD '{password}';\n"
            f"CREATE DATABASE {SUITE_DB} OWNER {SUITE_ROLE};\n")


GRANTS_SQL = """\
GRANT USAGE ON SCHEMA public TO legacy_md5, clear_tls;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO legacy_md5, clear_tls;
"""


# --- lifecycle ---------------------------------------------------------------------------

def init_cluster(paths: Paths, netns: str) -> None:
    """initdb (as postgres), our settings appended to postgresql.conf, our pg_hba.conf."""
    for binary in ("initdb", "pg_ctl", "postgres", "psql", "pg_isready"):
        if not (PG_BIN / binary).exists():
            raise DatabaseError(f"{PG_BIN / binary} is missing: install postgresql-15 (make host-deps)")
    for d in (paths.data, paths.socket_dir):
        d.mkdir(mode=0o700)
        _chown_postgres(d)
    paths.log.touch(mode=0o640)
    _chown_postgres(paths.log)
    # In the db namespace like every process of the lab, so teardown's namespace sweep
    # catches it even if the builder was killed while it ran.
    _run(["ip", "netns", "exec", netns, "runuser", "-u", PG_USER, "--", str(PG_BIN / "initdb"),
          "-D", str(paths.data), "-U", PG_USER, "-E", "UTF8", "--locale=C.UTF-8", "--auth-local=trust",
          "--auth-host=scram-sha-256", "--no-sync", "--no-instructions"], "initdb", cwd=paths.root)
    with open(paths.data / "postgresql.conf", "a") as fh:
        fh.write(render_conf(paths))
    (paths.data / "pg_hba.conf").write_text(render_hba())


def start(paths: Paths, netns: str) -> int:
    """Start the server in ``netns`` and return the postmaster's pid once it accepts
    connections on every lab address.

    ``pg_ctl -w`` returns when the server says it is ready (its postmaster.pid reads
    "ready", written once its sockets listen); ``pg_isready`` then asks it over TCP on each
    address, from inside the namespace, where alone they are routed. The timeouts are
    safety nets: a server that works is waited for only as long as it takes.
    """
    try:
        _run(["ip", "netns", "exec", netns, "runuser", "-u", PG_USER, "--", str(PG_BIN / "pg_ctl"),
              "-D", str(paths.data), "-l", str(paths.log), "-w", "-t", str(START_TIMEOUT_SECONDS), "start"],
             f"starting PostgreSQL in {netns}", cwd=paths.root, timeout=START_TIMEOUT_SECONDS + 30)
    except DatabaseError as exc:
        raise DatabaseError(f"{exc}\nlast lines of {paths.log}:\n{tail(paths.log)}") from None
    pid = postmaster_pid(paths)
    if pid is None:
        raise DatabaseError(f"PostgreSQL reported started but {paths.data}/postmaster.pid is missing")
    for address in topology.DB_ADDRESSES:
        try:
            _run(["ip", "netns", "exec", netns, str(PG_BIN / "pg_isready"), "-h", address, "-p", str(PG_PORT),
                  "-t", str(START_TIMEOUT_SECONDS)], f"PostgreSQL accepting connections on {address}:{PG_PORT}",
                 timeout=START_TIMEOUT_SECONDS + 30)
        except DatabaseError as exc:
            raise DatabaseError(f"{exc}\nlast lines of {paths.log}:\n{tail(paths.log)}") from None
    return pid


def postmaster_pid(paths: Paths) -> int | None:
    try:
        first = (paths.data / "postmaster.pid").read_text().split("\n", 1)[0]
    except (FileNotFoundError, NotADirectoryError):
        return None
    return int(first) if first.strip().isdigit() else None


def stop(paths: Paths) -> None:
    """Fast shutdown (disconnects clients), waiting until it is done; nothing if not running.

    pg_ctl signals by pid, so this needs no namespace and works even if the namespace is gone.
    """
    if postmaster_pid(paths) is None:
        return
    _run(["runuser", "-u", PG_USER, "--", str(PG_BIN / "pg_ctl"), "-D", str(paths.data),
          "-m", "fast", "-w", "-t", "30", "stop"], "stopping PostgreSQL", cwd=paths.root, timeout=60)


def psql(paths: Paths, netns: str, sql: str, dbname: str = "postgres", role: str | None = None) -> str:
    """Run ``sql`` as the superuser over the socket (optionally as ``role`` via SET ROLE)."""
    script = (f"SET ROLE {role};\n" if role else "") + sql
    return _run(["ip", "netns", "exec", netns, str(PG_BIN / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                 "-h", str(paths.socket_dir), "-p", str(PG_PORT), "-U", PG_USER, "-d", dbname, "-f", "-"],
                f"running SQL in {dbname}", input=script)


def provision(paths: Paths, netns: str, passwords: dict[str, str], seed: int = schema.DEFAULT_SEED) -> None:
    """Roles, the payments database and its sample data (tables owned by ``app``); the
    test-suite superuser too if ``passwords`` has one for it."""
    psql(paths, netns, roles_sql(passwords))
    if SUITE_ROLE in passwords:
        psql(paths, netns, suite_sql(passwords[SUITE_ROLE]))
        # The drivers' suites round-trip hstore values (a contrib module, shipped with the server).
        psql(paths, netns, "CREATE EXTENSION hstore;\n", dbname=SUITE_DB)
    psql(paths, netns, schema.database_sql(seed), dbname=DB_NAME, role="app")
    psql(paths, netns, GRANTS_SQL, dbname=DB_NAME, role="app")
    provision_agents(paths)


def provision_agents(paths: Paths) -> None:
    """The agent roles' least privilege, by the code ``tollgate db provision --apply`` runs,
    over the superuser's Unix socket (not namespaced: root reaches it from anywhere); the
    check that follows must find nothing."""
    import psycopg

    policy = Policy.parse(LAB_POLICY, "lab policy")
    declared, masks = declared_columns(policy), column_masks(policy)
    try:
        with psycopg.connect(host=str(paths.socket_dir), port=PG_PORT, user=PG_USER, dbname=DB_NAME,
                             autocommit=True) as conn:
            snapshot = dbprovision.read_snapshot(conn, declared, list(AGENT_ROLES), masks)
            dbprovision.apply(conn, dbprovision.plan(snapshot))
            result = dbprovision.verify(conn, dbprovision.read_snapshot(conn, declared, list(AGENT_ROLES), masks))
    except (psycopg.Error, dbprovision.ProvisionError) as exc:
        raise DatabaseError(f"provisioning the agent role: {exc}") from None
    if not result.ok:
        raise DatabaseError("the agent role can still: " + "; ".join(map(str, result.findings)))
