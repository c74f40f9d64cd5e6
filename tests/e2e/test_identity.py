"""Identity end to end: the lab's agent enrolled by OIDC, mTLS on an unchanged conninfo.

Each refusal is its own test and is read the way an agent reads it: psql's stderr.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from appliance.identity import CertificateAuthority, Identity, certificate_pem, private_key_pem
from appliance.identity.registry import CertificateRegistry
from appliance.lab import Lab
from tests.e2e.conftest import live_sessions_during, run

pytestmark = pytest.mark.lab


def identity_status(lab: Lab) -> dict:
    return lab.status()["identity"]


def new_key_and_csr() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return key, csr.public_bytes(serialization.Encoding.PEM)


def issue(lab: Lab, identity: Identity, directory: Path, *, now: dt.datetime | None = None,
          lifetime: dt.timedelta = dt.timedelta(hours=1), record: bool = True) -> int:
    """A client certificate from the lab's appliance CA, written where libpq can be pointed at it."""
    state = Path(identity_status(lab)["state_dir"])
    ca = CertificateAuthority.load(state / "ca" / "ca.crt", state / "ca" / "ca.key")
    key, csr = new_key_and_csr()
    kwargs = {"now": now} if now is not None else {}
    cert = ca.issue_client(csr, identity, lifetime, **kwargs)
    if record:
        CertificateRegistry(state / "certificates.db").record_issued(cert, identity, **kwargs)
    write_pair(directory, certificate_pem(cert), private_key_pem(key))
    return cert.serial_number


def write_pair(directory: Path, cert_pem: bytes, key_pem: bytes) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "postgresql.crt").write_bytes(cert_pem)
    (directory / "postgresql.key").write_bytes(key_pem)
    os.chmod(directory / "postgresql.key", 0o600)


def psql_with(lab: Lab, directory: Path, sql: str = "SELECT 1", **env: str):
    """psql from the agent with the certificate in ``directory`` (or none there)."""
    return run(lab, "agent", ["psql", "-X", "-A", "-t", lab.conninfo(), "-c", sql], check=False,
               env={"PGSSLCERT": str(directory / "postgresql.crt"), "PGSSLKEY": str(directory / "postgresql.key"),
                    **env})


def test_enrolled_agent_connects_with_an_unchanged_conninfo_and_is_identified(lab: Lab):
    sessions, _ = live_sessions_during(lab, "SELECT current_user")
    [mine] = [s for s in sessions if s["phase"] == "ready"]
    expected = identity_status(lab)["agent"]
    assert mine["identity"] == expected["subject"] and mine["identity_kind"] == "agent"
    assert mine["groups"] == expected["groups"]
    assert mine["identity_source"] == "certificate" and mine["client_tls"].startswith("TLSv1.")


def test_no_certificate_is_refused_with_how_to_enroll(lab: Lab, tmp_path: Path):
    proc = psql_with(lab, tmp_path / "nothing-here")
    assert proc.returncode != 0
    err = proc.stderr.decode()
    assert "Tollgate requires a client certificate, and none was presented" in err
    assert "tollgate enroll" in err


@pytest.mark.parametrize("sslmode", ["prefer", "require"])
def test_certificate_from_another_ca_is_refused(lab: Lab, tmp_path: Path, sslmode: str):
    other = CertificateAuthority.create(tmp_path / "other-ca", name="Tollgate appliance CA")
    key, csr = new_key_and_csr()
    cert = other.issue_client(csr, Identity("mallory", "agent", ("payments-agents",)))
    write_pair(tmp_path / "m", certificate_pem(cert), private_key_pem(key))
    log_before = lab.proxy_log.stat().st_size
    proc = psql_with(lab, tmp_path / "m", PGSSLMODE=sslmode)
    # Refused inside the TLS handshake (OpenSSL checks the chain), with the alert that says
    # why — what PostgreSQL itself answers a client certificate it doesn't trust.
    assert proc.returncode != 0
    assert b"SSL error: tlsv1 alert unknown ca" in proc.stderr
    with open(lab.proxy_log, "rb") as fh:
        fh.seek(log_before)
        assert b"certificate verify failed" in fh.read()


def test_expired_certificate_is_refused(lab: Lab, tmp_path: Path):
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    issue(lab, Identity("old-agent", "agent", ("payments-agents",)), tmp_path / "old", now=long_ago,
          lifetime=dt.timedelta(hours=8))
    proc = psql_with(lab, tmp_path / "old")
    assert proc.returncode != 0
    assert b"client certificate refused" in proc.stderr and b"expired" in proc.stderr


def test_revoked_certificate_is_refused_for_new_connections(lab: Lab, tmp_path: Path):
    serial = issue(lab, Identity("to-revoke", "agent", ("payments-agents",)), tmp_path / "r")
    assert psql_with(lab, tmp_path / "r").returncode == 0
    state = identity_status(lab)["state_dir"]
    run(lab, "gw", [sys.executable, "-m", "appliance.cli", "certs", "revoke", f"{serial:X}",
                    "--reason", "laptop lost", "--state-dir", state])
    proc = psql_with(lab, tmp_path / "r")
    assert proc.returncode != 0
    assert b"was revoked" in proc.stderr and b"laptop lost" in proc.stderr


def test_revoking_closes_a_live_session(lab: Lab, tmp_path: Path):
    serial = issue(lab, Identity("live-revoke", "agent", ("payments-agents",)), tmp_path / "l")
    script = """
        import json, sys, time, psycopg
        conn = psycopg.connect(sys.argv[1], autocommit=True, sslcert=sys.argv[2] + "/postgresql.crt",
                               sslkey=sys.argv[2] + "/postgresql.key")
        conn.execute("SELECT 1")
        print("connected", flush=True)
        sys.stdin.readline()
        # Until the proxy ends the session (it looks for revocations every second); the
        # deadline is a safety net for one it never ends, not a bound on how fast it does.
        deadline = time.monotonic() + 60
        outcome = "still open after 60 s"
        while time.monotonic() < deadline:
            try:
                conn.execute("SELECT 1")
            except psycopg.OperationalError as exc:
                outcome = str(exc)
                break
            time.sleep(0.05)
        print(json.dumps(outcome), flush=True)
    """
    proc = lab.popen("agent", [sys.executable, "-c", textwrap.dedent(script), lab.conninfo(), str(tmp_path / "l")],
                     stdin=-1, stdout=-1, stderr=-1)
    try:
        assert proc.stdout.readline().strip() == b"connected"
        run(lab, "gw", [sys.executable, "-m", "appliance.cli", "certs", "revoke", f"{serial:X}",
                        "--reason", "incident 42", "--state-dir", identity_status(lab)["state_dir"]])
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        message = json.loads(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()
    assert "was revoked" in message and "incident 42" in message


def test_fifty_concurrent_agents_are_each_attributed_correctly(lab: Lab, tmp_path: Path):
    names = [f"agent-{i:02d}" for i in range(50)]
    for i, name in enumerate(names):
        issue(lab, Identity(name, "agent", ("payments-agents", f"team-{i % 5}")), tmp_path / name)
    # The agent's side holds 50 sessions open until told; the appliance's side lists them
    # meanwhile (the agent cannot reach the control socket).
    script = """
        import json, sys, psycopg
        base, root = sys.argv[1], sys.argv[2]
        names = [f"agent-{i:02d}" for i in range(50)]
        conns = [psycopg.connect(base, autocommit=True, application_name=n,
                                 sslcert=f"{root}/{n}/postgresql.crt", sslkey=f"{root}/{n}/postgresql.key")
                 for n in names]
        print(json.dumps({"ok": all(c.execute("SELECT 1").fetchone()[0] == 1 for c in conns)}), flush=True)
        sys.stdin.readline()
    """
    proc = lab.popen("agent", [sys.executable, "-c", textwrap.dedent(script), lab.conninfo(), str(tmp_path)],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = proc.stdout.readline()
        assert line, proc.communicate()[1].decode()
        assert json.loads(line)["ok"]
        sessions = json.loads(run(lab, "gw", [sys.executable, "-m", "appliance.cli", "sessions", "--live", "-c",
                                              str(lab.config_path), "--json"]).stdout)
    finally:
        proc.kill()
        proc.wait()
    by_app = {s["application_name"]: s for s in sessions if s["application_name"] in names}
    assert set(by_app) == set(names)
    for i, name in enumerate(names):
        assert by_app[name]["identity"] == name
        assert by_app[name]["groups"] == ["payments-agents", f"team-{i % 5}"]


def test_issuer_key_rotation_is_followed_without_a_restart(lab: Lab, tmp_path: Path):
    from appliance.lab import identity as lab_identity
    from appliance.lab import state as lab_state

    enroll_service = lab.state["pids"]["enroll"]
    # The issuer's admin API: gw's loopback and the admin secret (the agent reaches neither).
    run(lab, "gw", lab_identity.rotate_argv(lab.paths, drop_old=True))
    argv = lab_identity.enroll_agent_argv(lab.paths)
    argv[argv.index("--out-dir") + 1] = str(tmp_path / "after-rotation")
    out = run(lab, "agent", argv).stdout.decode()
    assert "expires at" in out
    assert (tmp_path / "after-rotation" / "postgresql.crt").is_file()
    assert lab_state.process_alive(enroll_service)  # the same enrollment service, never restarted
