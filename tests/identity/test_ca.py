"""The appliance CA: files and modes, issuing from CSRs it must not trust, verifying, and real TLS."""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.identity import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    CertificateAuthority,
    IdentityError,
    certificate_pem,
    cli,
    identity_from_certificate,
    private_key_pem,
    sign_with_key_file,
)
from appliance.identity.certs import not_valid_after, not_valid_before
from tests.identity import ALICE, BOT, ec_key, make_csr, new_ca

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- creating and loading ---------------------------------------------------------------------


def test_create_writes_cert_0644_and_key_0600(tmp_path):
    old = os.umask(0o077)  # the modes must not depend on the caller's umask
    try:
        ca = CertificateAuthority.create(tmp_path / "ca", now=T0)
    finally:
        os.umask(old)
    assert mode(tmp_path / "ca" / CA_CERT_FILE) == 0o644
    assert mode(tmp_path / "ca" / CA_KEY_FILE) == 0o600
    assert sorted(p.name for p in (tmp_path / "ca").iterdir()) == ["ca.crt", "ca.key"]  # no temp files left
    cert = ca.certificate
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Tollgate appliance CA"
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey) and cert.public_key().curve.name == "secp256r1"
    assert not_valid_after(cert) == T0 + timedelta(days=3650)
    assert ca.can_issue


def test_create_refuses_to_overwrite_an_existing_ca(tmp_path):
    first = new_ca(tmp_path)
    before = (tmp_path / CA_KEY_FILE).read_bytes()
    with pytest.raises(IdentityError, match=r"ca\.crt already exists; refusing to overwrite"):
        CertificateAuthority.create(tmp_path)
    (tmp_path / CA_CERT_FILE).unlink()  # a lone key (a crash mid-create) is protected too
    with pytest.raises(IdentityError, match=r"ca\.key already exists"):
        CertificateAuthority.create(tmp_path)
    assert (tmp_path / CA_KEY_FILE).read_bytes() == before
    assert first.certificate is not None


def test_loaded_without_key_it_verifies_but_cannot_issue(tmp_path):
    issuer = new_ca(tmp_path)
    cert = issuer.issue_client(make_csr(ec_key()), ALICE)
    verifier = CertificateAuthority.load(tmp_path / CA_CERT_FILE)
    assert not verifier.can_issue
    verifier.verify_client_chain(cert)
    with pytest.raises(IdentityError, match="loaded without its private key"):
        verifier.issue_client(make_csr(ec_key()), ALICE)


def test_load_refuses_a_key_of_another_ca_and_a_readable_key(tmp_path):
    new_ca(tmp_path / "a")
    new_ca(tmp_path / "b")
    with pytest.raises(IdentityError, match="does not belong to CA certificate"):
        CertificateAuthority.load(tmp_path / "a" / CA_CERT_FILE, tmp_path / "b" / CA_KEY_FILE)
    (tmp_path / "a" / CA_KEY_FILE).chmod(0o644)
    with pytest.raises(IdentityError, match=r"accessible to other users \(mode 0644\); run: chmod 600"):
        CertificateAuthority.load(tmp_path / "a" / CA_CERT_FILE, tmp_path / "a" / CA_KEY_FILE)


def test_load_refuses_a_leaf_as_ca(tmp_path):
    leaf = new_ca(tmp_path).issue_client(make_csr(ec_key()), ALICE)
    (tmp_path / "leaf.crt").write_bytes(certificate_pem(leaf))
    with pytest.raises(IdentityError, match="not a CA certificate"):
        CertificateAuthority.load(tmp_path / "leaf.crt")


def test_the_key_is_read_at_signing_time_not_held(tmp_path):
    ca = new_ca(tmp_path)
    ca.issue_client(make_csr(ec_key()), ALICE)
    (tmp_path / CA_KEY_FILE).rename(tmp_path / "elsewhere.key")
    with pytest.raises(IdentityError, match="cannot read CA key"):
        ca.issue_client(make_csr(ec_key()), ALICE)


def test_a_separate_signer_can_hold_the_key(tmp_path):
    new_ca(tmp_path / "ca")
    calls = []

    def remote_signer(builder):  # stands in for a process that alone can read the key
        calls.append(builder)
        return sign_with_key_file(builder, tmp_path / "ca" / CA_KEY_FILE)

    ca = CertificateAuthority.load(tmp_path / "ca" / CA_CERT_FILE, signer=remote_signer)
    cert = ca.issue_client(make_csr(ec_key()), BOT)
    assert len(calls) == 1
    ca.verify_client_chain(cert)

    new_ca(tmp_path / "other")
    wrong = CertificateAuthority.load(tmp_path / "ca" / CA_CERT_FILE,
                                      signer=lambda b: sign_with_key_file(b, tmp_path / "other" / CA_KEY_FILE))
    with pytest.raises(IdentityError, match="does not verify"):
        wrong.issue_client(make_csr(ec_key()), BOT)


# --- issuing client certificates ------------------------------------------------------------


def test_client_certificate_fields(tmp_path):
    ca = CertificateAuthority.create(tmp_path, now=T0 - timedelta(days=1))
    key = ec_key()
    cert = ca.issue_client(make_csr(key, cn="alice"), ALICE, now=T0)
    assert not_valid_before(cert) == T0 - timedelta(minutes=1)
    assert not_valid_after(cert) == T0 + timedelta(hours=8)
    assert cert.issuer == ca.certificate.subject
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert 0 < cert.serial_number < 1 << 128
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    assert ExtendedKeyUsageOID.CLIENT_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert identity_from_certificate(cert) == ALICE
    other = ca.issue_client(make_csr(key), ALICE, lifetime=timedelta(minutes=15), now=T0)
    assert other.serial_number != cert.serial_number
    assert not_valid_after(other) == T0 + timedelta(minutes=15)


def test_a_client_certificate_never_outlives_the_ca(tmp_path):
    ca = CertificateAuthority.create(tmp_path, lifetime_days=1, now=T0)
    cert = ca.issue_client(make_csr(ec_key()), ALICE, lifetime=timedelta(days=5), now=T0)
    assert not_valid_after(cert) == not_valid_after(ca.certificate)
    with pytest.raises(IdentityError, match="appliance CA expired at 2030-01-02 12:00:00Z"):
        ca.issue_client(make_csr(ec_key()), ALICE, now=T0 + timedelta(days=2))


def test_the_subject_comes_from_the_identity_not_the_csr(tmp_path):
    csr = make_csr(ec_key(), cn="alice", extra_subject=[x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Evil Corp")])
    cert = new_ca(tmp_path).issue_client(csr, ALICE)
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "Tollgate"


def test_a_csr_naming_the_identity_itself_is_accepted(tmp_path):
    csr = make_csr(ec_key(), cn="alice", sans=[x509.UniformResourceIdentifier(ALICE.uri),
                                                x509.RFC822Name("alice@example.com")])
    assert identity_from_certificate(new_ca(tmp_path).issue_client(csr, ALICE)) == ALICE


@pytest.mark.parametrize("cn, sans, message", [
    ("mallory", None, r"CSR subject claims CN='mallory', but the requester is authenticated as 'alice'"),
    ("alice", [x509.UniformResourceIdentifier("tollgate:identity:person:mallory")],
     "subjectAltName URI:tollgate:identity:person:mallory, which is not the requester's identity"),
    (None, [x509.UniformResourceIdentifier("tollgate:identity:agent:alice")], "URI:tollgate:identity:agent:alice"),
    (None, [x509.RFC822Name("mallory@example.com")], "email:mallory@example.com"),
    (None, [x509.DNSName("db.example")], "DNS:db.example"),
])
def test_a_csr_claiming_another_identity_is_rejected(tmp_path, cn, sans, message):
    with pytest.raises(IdentityError, match=message):
        new_ca(tmp_path).issue_client(make_csr(ec_key(), cn=cn, sans=sans), ALICE)


def test_a_csr_altered_after_signing_is_rejected(tmp_path):
    der = x509.load_pem_x509_csr(make_csr(ec_key(), cn="alicf")).public_bytes(serialization.Encoding.DER)
    assert der.count(b"alicf") == 1
    tampered = x509.load_der_x509_csr(der.replace(b"alicf", b"alice")).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(IdentityError, match="CSR signature is invalid"):
        new_ca(tmp_path).issue_client(tampered, ALICE)


def test_garbage_is_not_a_csr(tmp_path):
    with pytest.raises(IdentityError, match="not a PEM certificate signing request"):
        new_ca(tmp_path).issue_client(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                                      ALICE)


@pytest.mark.parametrize("make_key", [
    lambda: ec.generate_private_key(ec.SECP256R1()),
    lambda: ec.generate_private_key(ec.SECP384R1()),
    lambda: rsa.generate_private_key(65537, 2048),
    ed25519.Ed25519PrivateKey.generate,
], ids=["P-256", "P-384", "RSA-2048", "Ed25519"])
def test_accepted_key_types(tmp_path, make_key):
    cert = new_ca(tmp_path).issue_client(make_csr(make_key()), BOT)
    assert identity_from_certificate(cert) == BOT


@pytest.mark.parametrize("make_key, described", [
    (lambda: rsa.generate_private_key(65537, 1024), "RSA-1024"),
    (lambda: ec.generate_private_key(ec.SECP521R1()), "EC secp521r1"),
    (lambda: ec.generate_private_key(ec.SECP256K1()), "EC secp256k1"),
])
def test_weak_or_unexpected_keys_are_rejected(tmp_path, make_key, described):
    with pytest.raises(IdentityError,
                       match=f"CSR key is {described}; Tollgate accepts EC P-256/P-384, RSA of at least 2048"):
        new_ca(tmp_path).issue_client(make_csr(make_key()), BOT)


def test_lifetime_must_be_positive(tmp_path):
    with pytest.raises(IdentityError, match="lifetime must be positive"):
        new_ca(tmp_path).issue_client(make_csr(ec_key()), BOT, lifetime=timedelta(0))


# --- verifying -----------------------------------------------------------------------------


def test_expired_and_not_yet_valid_certificates_are_rejected(tmp_path):
    ca = CertificateAuthority.create(tmp_path, now=T0 - timedelta(days=30))
    cert = ca.issue_client(make_csr(ec_key()), ALICE, now=T0)  # valid 11:59 to 20:00
    ca.verify_client_chain(cert, now=T0 + timedelta(hours=7, minutes=59))
    ca.verify_client_chain(cert, now=T0 + timedelta(hours=8, seconds=30))  # within the skew
    with pytest.raises(IdentityError, match="certificate expired at 2030-01-01 20:00:00Z"):
        ca.verify_client_chain(cert, now=T0 + timedelta(hours=8, minutes=2))
    with pytest.raises(IdentityError, match="certificate not valid until 2030-01-01 11:59:00Z"):
        ca.verify_client_chain(cert, now=T0 - timedelta(minutes=5))


def test_a_certificate_of_another_ca_is_rejected_even_with_the_same_name(tmp_path):
    ours, theirs = new_ca(tmp_path / "ours"), new_ca(tmp_path / "theirs")
    assert ours.certificate.subject == theirs.certificate.subject
    foreign = theirs.issue_client(make_csr(ec_key()), ALICE)
    with pytest.raises(IdentityError, match="certificate not issued by this appliance's CA"):
        ours.verify_client_chain(foreign)


def test_a_server_certificate_is_not_a_client_certificate(tmp_path):
    ca = new_ca(tmp_path)
    server, _ = ca.issue_server(["198.18.2.10"], [])
    with pytest.raises(IdentityError, match="lacks clientAuth"):
        ca.verify_client_chain(server)
    with pytest.raises(IdentityError, match="is a CA certificate"):
        ca.verify_client_chain(ca.certificate)


# --- server certificates and real TLS -------------------------------------------------------


def test_server_certificate_fields(tmp_path):
    ca = new_ca(tmp_path)
    cert, key = ca.issue_server(["198.18.2.10", "fd7a:6c67:2::10"], ["db.example"])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["198.18.2.10", "fd7a:6c67:2::10"]
    assert san.get_values_for_type(x509.DNSName) == ["db.example"]
    assert (list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
            == [ExtendedKeyUsageOID.SERVER_AUTH])
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert not_valid_after(cert) - not_valid_before(cert) == timedelta(days=397, minutes=1)
    with pytest.raises(IdentityError, match="at least one address"):
        ca.issue_server([], [])
    with pytest.raises(IdentityError, match="does not appear to be an IPv4 or IPv6 address"):
        ca.issue_server(["db.example"], [])


def _write_pair(directory: Path, name: str, cert: x509.Certificate, key: object) -> tuple[str, str]:
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(certificate_pem(cert))
    key_path.write_bytes(private_key_pem(key))
    return str(cert_path), str(key_path)


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str) -> dict:
    """A real TLS handshake over a socketpair; what each side saw, or the error it raised."""
    a, b = socket.socketpair()
    # 60 s: a safety net for a handshake that hangs, never a bound on a slow one.
    a.settimeout(60)
    b.settimeout(60)
    seen: dict = {}

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(a, server_side=True) as s:
                seen["client_cert"] = s.getpeercert()
                s.sendall(b"ok")
        except (ssl.SSLError, OSError) as exc:
            seen["server_error"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(b, server_hostname=server_hostname) as c:
            seen["server_cert"] = c.getpeercert()
            seen["reply"] = c.recv(2)  # TLS 1.3 reports a refused client certificate only here
    except (ssl.SSLError, OSError) as exc:
        seen["client_error"] = exc
    finally:
        thread.join(60)
    assert not thread.is_alive(), "the server side of the handshake hung"
    return seen


@pytest.fixture
def tls(tmp_path):
    """A CA, a server certificate for 198.18.2.10 and server/client contexts trusting the CA."""
    ca = new_ca(tmp_path / "ca")
    server_files = _write_pair(tmp_path, "server", *ca.issue_server(["198.18.2.10"], []))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(*server_files)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_verify_locations(str(tmp_path / "ca" / CA_CERT_FILE))

    def client(issuer: CertificateAuthority = ca) -> ssl.SSLContext:
        key = ec_key()
        files = _write_pair(tmp_path, "client", issuer.issue_client(make_csr(key), ALICE), key)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname + CERT_REQUIRED: libpq's verify-full
        ctx.load_verify_locations(str(tmp_path / "ca" / CA_CERT_FILE))
        ctx.load_cert_chain(*files)
        return ctx

    return ca, server_ctx, client


def test_tls_verify_full_against_the_target_address_with_a_client_certificate(tls):
    _, server_ctx, client = tls
    seen = _handshake(server_ctx, client(), "198.18.2.10")
    assert seen.get("reply") == b"ok", seen
    assert ("IP Address", "198.18.2.10") in seen["server_cert"]["subjectAltName"]
    assert ("URI", ALICE.uri) in seen["client_cert"]["subjectAltName"]
    assert seen["client_cert"]["subject"] == ((("commonName", "alice"),), (("organizationName", "Tollgate"),))


def test_tls_client_refuses_a_server_certificate_for_another_address(tls):
    _, server_ctx, client = tls
    seen = _handshake(server_ctx, client(), "198.18.2.11")
    assert isinstance(seen.get("client_error"), ssl.SSLCertVerificationError), seen
    assert "IP address mismatch" in str(seen["client_error"])


def test_tls_server_refuses_a_client_certificate_of_another_ca(tls, tmp_path):
    _, server_ctx, client = tls
    seen = _handshake(server_ctx, client(new_ca(tmp_path / "rogue")), "198.18.2.10")
    assert "reply" not in seen
    assert "certificate verify failed" in str(seen.get("server_error")), seen


# --- the CLI: ca init, certs issue-server ---------------------------------------------------
# (certs list/revoke are exercised with the registry in tests/state/test_certificates.py)


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_cli_ca_init_and_issue_server(tmp_path, capsys):
    state = tmp_path / "state"
    assert run_cli("ca", "init", "--state-dir", str(state)) == 0
    assert mode(state / "ca" / CA_KEY_FILE) == 0o600
    assert mode(state / "certificates.db") == 0o600
    assert run_cli("ca", "init", "--state-dir", str(state)) == 1
    assert "refusing to overwrite an existing CA" in capsys.readouterr().err

    out_cert, out_key = tmp_path / "t.crt", tmp_path / "t.key"
    argv = ("certs", "issue-server", "--state-dir", str(state), "--address", "198.18.2.10", "fd7a:6c67:2::10",
            "--out-cert", str(out_cert), "--out-key", str(out_key))
    assert run_cli(*argv) == 0
    assert mode(out_key) == 0o600
    cert = x509.load_pem_x509_certificate(out_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["198.18.2.10", "fd7a:6c67:2::10"]
    key = serialization.load_pem_private_key(out_key.read_bytes(), None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()

    assert run_cli(*argv) == 1
    assert "already exists (--force replaces it)" in capsys.readouterr().err
    assert run_cli(*argv, "--force") == 0
    assert x509.load_pem_x509_certificate(out_cert.read_bytes()).serial_number != cert.serial_number


def test_cli_issue_server_without_a_ca_says_so(tmp_path, capsys):
    assert run_cli("certs", "issue-server", "--state-dir", str(tmp_path), "--address", "198.18.2.10",
                   "--out-cert", str(tmp_path / "c"), "--out-key", str(tmp_path / "k")) == 1
    assert "cannot read CA certificate" in capsys.readouterr().err
    assert not (tmp_path / "k").exists()
