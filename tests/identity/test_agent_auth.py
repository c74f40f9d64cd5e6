"""The proxy's certificate authenticator: a certificate verified once is remembered by its
bytes, and still refused the moment it is revoked or expires; the agent-facing TLS."""

from __future__ import annotations

import ipaddress
import ssl
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from appliance.config import Config, Endpoint, IdentityConfig, InterceptConfig, ProxyConfig, Target
from appliance.identity.agent_auth import CertificateAuthenticator
from appliance.identity.ca import CertificateAuthority
from appliance.identity.certs import certificate_pem, not_valid_after, private_key_pem, utcnow
from appliance.identity.registry import CertificateRegistry
from appliance.proxy.agent_auth import AuthFailure
from appliance.proxy.hooks import SessionInfo
from tests.identity import ALICE, BOT, ec_key, make_csr

ENDPOINT = Endpoint(ipaddress.ip_address("198.51.100.7"), 5432)


@pytest.fixture
def appliance(tmp_path: Path) -> tuple[CertificateAuthenticator, CertificateAuthority]:
    settings = IdentityConfig(state_dir=tmp_path / "state")
    ca = CertificateAuthority.create(settings.ca_cert.parent)
    cert, key = ca.issue_server([ENDPOINT.address])
    cert_path, key_path = settings.server_cert("db")
    cert_path.parent.mkdir(parents=True)
    cert_path.write_bytes(certificate_pem(cert))
    key_path.write_bytes(private_key_pem(key))
    config = Config(tmp_path / "tollgate.toml", ProxyConfig(agent_auth="certificate"), InterceptConfig(),
                    (Target("db", (ENDPOINT,), {}),), identity=settings)
    return CertificateAuthenticator(config), ca


def client_certificate(ca: CertificateAuthority, registry_path: Path, identity=ALICE,  # type: ignore[no-untyped-def]
                       lifetime: timedelta = timedelta(hours=8)) -> tuple[bytes, int]:
    cert = ca.issue_client(make_csr(ec_key()), identity, lifetime)
    CertificateRegistry(registry_path).record_issued(cert, identity)
    return cert.public_bytes(serialization.Encoding.DER), cert.serial_number


def tls_session() -> SessionInfo:
    info = SessionInfo(client=Endpoint(ipaddress.ip_address("198.18.1.10"), 40000), destination=ENDPOINT)
    info.client_tls = "TLSv1.3"
    return info


def test_a_remembered_certificate_is_refused_once_revoked(appliance, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    auth, ca = appliance
    der, serial = client_certificate(ca, auth.settings.registry)
    assert auth.authenticate(tls_session(), der) == ALICE
    assert auth.authenticate(tls_session(), der) == ALICE  # from what was remembered
    # Revoked from elsewhere (the CLI's own connection to the registry).
    CertificateRegistry(auth.settings.registry).revoke(serial, "laptop lost", "admin")
    with pytest.raises(AuthFailure, match="was revoked"):
        auth.authenticate(tls_session(), der)


def test_a_remembered_certificate_is_refused_once_expired(appliance) -> None:  # type: ignore[no-untyped-def]
    auth, ca = appliance
    der, _ = client_certificate(ca, auth.settings.registry, lifetime=timedelta(hours=1))
    assert auth.authenticate(tls_session(), der) == ALICE
    expiry = not_valid_after(auth.verified.verify(der)[0])
    auth.verified.clock = lambda: expiry + timedelta(hours=1)
    with pytest.raises(AuthFailure, match="expired at"):
        auth.authenticate(tls_session(), der)
    auth.verified.clock = utcnow
    assert auth.authenticate(tls_session(), der) == ALICE  # the clock, not a remembered failure


def test_each_certificate_is_its_own_identity_and_a_forgery_is_not_remembered(appliance, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    auth, ca = appliance
    alice, _ = client_certificate(ca, auth.settings.registry)
    bot, _ = client_certificate(ca, auth.settings.registry, BOT)
    other = CertificateAuthority.create(tmp_path / "other-ca")
    forged, _ = client_certificate(other, tmp_path / "other.db", ALICE)
    for _ in range(2):
        assert auth.authenticate(tls_session(), alice) == ALICE
        assert auth.authenticate(tls_session(), bot) == BOT
        with pytest.raises(AuthFailure, match="not issued by this appliance's CA"):
            auth.authenticate(tls_session(), forged)
    # One changed byte is another certificate: verified afresh (its signature fails).
    tampered = bytearray(alice)
    tampered[-1] ^= 1
    with pytest.raises(AuthFailure, match="not issued by this appliance's CA"):
        auth.authenticate(tls_session(), bytes(tampered))


def test_the_memory_is_bounded(appliance) -> None:  # type: ignore[no-untyped-def]
    auth, ca = appliance
    auth.verified.size = 2
    certs = [client_certificate(ca, auth.settings.registry)[0] for _ in range(3)]
    for der in certs:
        assert auth.authenticate(tls_session(), der) == ALICE
    assert len(auth.verified._entries) == 2
    assert certs[0] not in auth.verified._entries  # least recently used goes first


def test_no_session_tickets_to_agents(appliance) -> None:  # type: ignore[no-untyped-def]
    auth, _ = appliance
    server = auth.server_context(Target("db", (ENDPOINT,), {}))
    assert server is not None
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c, s = client.wrap_bio(c_in, c_out), server.wrap_bio(s_in, s_out, server_side=True)
    with pytest.raises(ssl.SSLWantReadError):
        c.do_handshake()
    s_in.write(c_out.read())
    with pytest.raises(ssl.SSLWantReadError):
        s.do_handshake()
    c_in.write(s_out.read())
    c.do_handshake()
    s_in.write(c_out.read())
    s.do_handshake()  # the client's Finished: done
    assert s.version() == "TLSv1.3"
    assert s_out.read() == b""  # nothing after the handshake: no NewSessionTicket
