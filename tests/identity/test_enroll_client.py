"""``tollgate enroll`` against a real ``tollgate enroll-server`` (gunicorn, TLS) and a real dev issuer.

Everything runs on 127.0.0.1: the issuer in this process, the server and the client as
subprocesses of the real CLI (the server and its fixtures: tests/identity/enroll_server.py,
tests/conftest.py).
"""

from __future__ import annotations

import stat
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance.identity import identity_from_certificate
from appliance.identity.certs import not_valid_after
from appliance.identity.enroll_client import _with_root, describe_remaining
from appliance.lab.oidc_issuer import DevIssuer
from tests.identity.dev_flows import AGENT_ID, AGENT_SECRET, id_token
from tests.identity.enroll_server import EnrollServer, tollgate
from tests.identity.tls_helpers import TlsFiles
from tests.webui import Appliance, agent, alice


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# tls, issuer, appliance and server: the shared enrollment fixtures of tests/conftest.py.
@pytest.fixture(scope="module")
def secret_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "client-secret"
    path.write_text(AGENT_SECRET + "\n")
    path.chmod(0o600)
    return path


def agent_enroll(server: EnrollServer, appliance: Appliance, issuer: DevIssuer, tls: TlsFiles, secret_file: Path,
                 out_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return tollgate("enroll", "--url", server.url, "--client-id", AGENT_ID, "--client-secret-file", str(secret_file),
                    "--issuer", issuer.url, "--issuer-ca-file", str(tls.ca_file),
                    "--ca-file", str(appliance.state_dir / "ca" / "ca.crt"),
                    "--out-dir", str(out_dir), *extra)


# --- end to end ------------------------------------------------------------------------------

def test_agent_enrolls_with_client_credentials_end_to_end(server: EnrollServer, appliance: Appliance,
                                                          issuer: DevIssuer, tls: TlsFiles, secret_file: Path,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "home" / ".postgresql"
    result = agent_enroll(server, appliance, issuer, tls, secret_file, out)
    assert result.returncode == 0, result.stderr

    # Files where libpq looks, with libpq's required modes, and nothing else left behind.
    assert sorted(p.name for p in out.iterdir()) == ["postgresql.crt", "postgresql.key", "root.crt"]
    assert mode(out) == 0o700
    assert mode(out / "postgresql.key") == 0o600
    assert mode(out / "postgresql.crt") == 0o644
    assert mode(out / "root.crt") == 0o644
    assert (out / "root.crt").read_bytes() == appliance.ca.certificate_pem

    key_pem = (out / "postgresql.key").read_bytes()
    key = serialization.load_pem_private_key(key_pem, password=None)
    cert = x509.load_pem_x509_certificate((out / "postgresql.crt").read_bytes())
    assert identity_from_certificate(cert) == agent(issuer)
    appliance.ca.verify_client_chain(cert)

    # The server saw only a CSR: what it recorded is over our public key, and the private key
    # exists nowhere but the out-dir (not in the state dir, not in the server's log).
    registry = appliance.registry()
    try:
        record = registry.get(cert.serial_number)
        recorded_pem = registry.db.connection().execute(
            "SELECT pem FROM certificates WHERE serial = ?", (f"{cert.serial_number:x}",)).fetchone()["pem"]
    finally:
        registry.close()
    assert record is not None and record.identity == agent(issuer)
    recorded = x509.load_pem_x509_certificate(recorded_pem.encode())
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    assert recorded.public_key().public_bytes(serialization.Encoding.DER, public) == \
        key.public_key().public_bytes(serialization.Encoding.DER, public)
    secret_body = b"".join(key_pem.splitlines()[1:-1])
    holders = [p for p in appliance.root.rglob("*")
               if p.is_file() and secret_body in p.read_bytes().replace(b"\n", b"")]
    assert holders == []
    assert secret_body.decode() not in "".join(server.log).replace("\n", "")

    # What the user is told.
    assert f"enrolled as agent {AGENT_ID}" in result.stdout
    assert "groups:      ci, payments-ro" in result.stdout
    assert f"serial:      {cert.serial_number:032X}" in result.stdout
    end = not_valid_after(cert)
    assert f"expires at {end:%Y-%m-%d %H:%M:%S} UTC (in 7h5" in result.stdout


def test_server_certificate_was_issued_by_the_appliance_ca(server: EnrollServer, appliance: Appliance) -> None:
    crt, key = appliance.state_dir / "servers" / "enroll.crt", appliance.state_dir / "servers" / "enroll.key"
    assert mode(crt) == 0o644 and mode(key) == 0o600
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_person_enrolls_with_an_id_token_on_stdin(server: EnrollServer, appliance: Appliance, issuer: DevIssuer,
                                                  tls: TlsFiles, tmp_path: Path) -> None:
    result = tollgate("enroll", "--url", server.url, "--token", "-", "--ca-file",
                      str(appliance.state_dir / "ca" / "ca.crt"), "--out-dir", str(tmp_path), "--no-root",
                      input=id_token(issuer, tls) + "\n")
    assert result.returncode == 0, result.stderr
    assert "enrolled as person alice@example.test (subject alice)" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["postgresql.crt", "postgresql.key"]
    cert = x509.load_pem_x509_certificate((tmp_path / "postgresql.crt").read_bytes())
    assert identity_from_certificate(cert) == alice(issuer)


def test_renewal_replaces_the_pair_and_keeps_root_crt_entries(server: EnrollServer, appliance: Appliance,
                                                               issuer: DevIssuer, tls: TlsFiles,
                                                               secret_file: Path, tmp_path: Path) -> None:
    other_ca = tls.ca_file.read_bytes()
    (tmp_path / "root.crt").write_bytes(other_ca)
    for _ in range(2):
        result = agent_enroll(server, appliance, issuer, tls, secret_file, tmp_path)
        assert result.returncode == 0, result.stderr
    # The other CA kept, the appliance CA added once.
    assert (tmp_path / "root.crt").read_bytes() == other_ca + appliance.ca.certificate_pem


# --- clear errors ---------------------------------------------------------------------------

def test_refusal_shows_the_servers_detail(server: EnrollServer, appliance: Appliance, issuer: DevIssuer,
                                          tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(issuer.mint(issuer.base_claims("alice", aud="billing")))
    result = tollgate("enroll", "--url", server.url, "--token-file", str(token_file), "--ca-file",
                      str(appliance.state_dir / "ca" / "ca.crt"), "--out-dir", str(tmp_path / "out"))
    assert result.returncode == 1
    assert result.stderr.strip() == ("tollgate enroll: enrollment refused (HTTP 401 invalid_token): "
                                     "audience mismatch: expected 'tollgate', got 'billing'")
    assert not (tmp_path / "out").exists()


def test_enrollment_server_not_trusted_is_a_clear_error(server: EnrollServer, tls: TlsFiles,
                                                        tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("x.y.z")
    result = tollgate("enroll", "--url", server.url, "--token-file", str(token_file), "--ca-file",
                      str(tls.ca_file), "--out-dir", str(tmp_path / "out"))
    assert result.returncode == 1
    assert result.stderr.startswith(f"tollgate enroll: cannot verify the TLS certificate of {server.url}/v1/enroll")
    assert "(pass the appliance CA with --ca-file" in result.stderr


def test_wrong_client_secret_is_a_clear_error(server: EnrollServer, appliance: Appliance, issuer: DevIssuer,
                                              tls: TlsFiles, tmp_path: Path) -> None:
    wrong = tmp_path / "secret"
    wrong.write_text("not-the-secret")
    result = agent_enroll(server, appliance, issuer, tls, wrong, tmp_path / "out")
    assert result.returncode == 1
    assert result.stderr.strip() == ("tollgate enroll: the issuer refused the client-credentials grant for "
                                     "'agent-ci' (HTTP 401): client authentication failed")


def test_token_on_the_command_line_is_refused(tmp_path: Path) -> None:
    result = tollgate("enroll", "--url", "https://127.0.0.1:1", "--token", "eyJhbGciOi...",
                      "--out-dir", str(tmp_path))
    assert result.returncode == 1
    assert "--token takes only '-' (stdin)" in result.stderr


# --- pieces -----------------------------------------------------------------------------------

@pytest.mark.parametrize("left, text", [
    (timedelta(hours=7, minutes=59, seconds=30), "in 7h59m"),
    (timedelta(days=2, hours=3), "in 2d3h"),
    (timedelta(minutes=5), "in 5m"),
    (timedelta(seconds=42), "in 42s"),
    (timedelta(seconds=-1), "already expired"),
])
def test_describe_remaining(left: timedelta, text: str) -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    assert describe_remaining(now + left, now) == text


def test_root_bundle_is_not_duplicated(appliance: Appliance) -> None:
    pem = appliance.ca.certificate_pem
    assert _with_root(b"", pem) == pem
    assert _with_root(pem, pem) is None
    assert _with_root(b"# comment", pem) == b"# comment\n" + pem
