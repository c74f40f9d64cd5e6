"""The proxy's certificate authenticator: TLS towards agents and who each connection is.

Plugs into the session's :class:`~appliance.proxy.agent_auth.AgentAuthenticator` seam.
Every target gets a server context presenting its appliance-issued certificate and asking
(optionally, so a refusal can be explained in the protocol) for a client certificate
issued by the appliance CA. At StartupMessage the certificate is checked — chain, validity,
revocation — and its identity attached to the session. The CA *key* is never loaded here.

OpenSSL's own check of validity dates is switched off (``X509_V_FLAG_NO_CHECK_TIME``) so an
expired certificate reaches our check and gets a FATAL saying so; a certificate from
another CA still fails the handshake, and the reason is remembered so that libpq's
``sslmode=prefer`` retry in clear is refused with it.

What a certificate's bytes prove never changes — signed by this CA, its constraints, its
identity — so that part is remembered per DER encoding (:class:`VerifiedCertificates`);
what changes is checked on every connection: the validity window against the clock and
revocation against the registry.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime
from typing import Any

from cryptography import x509

from appliance.config import Config, ConfigError, IdentityConfig, Target
from appliance.identity.ca import CertificateAuthority
from appliance.identity.certs import identity_from_certificate, utcnow
from appliance.identity.registry import CertificateRegistry, format_serial
from appliance.model.identity import Identity, IdentityError
from appliance.proxy.agent_auth import AuthFailure
from appliance.proxy.hooks import SessionInfo

log = logging.getLogger("tollgate.identity")

X509_V_FLAG_NO_CHECK_TIME = 0x200000
# Distinct certificates whose verification is remembered (an agent fleet's live ones).
VERIFIED_CACHE_SIZE = 1024
# How long a failed handshake is remembered to explain a retry in clear, and for how many clients.
FAILURE_MEMORY_SECONDS = 30.0
FAILURE_MEMORY_SIZE = 4096


class VerifiedCertificates:
    """Client certificates that passed :meth:`CertificateAuthority.verify_client_chain`,
    by their DER bytes, with the identity they name: a bounded LRU.

    Only what the bytes themselves prove is remembered (under the one CA it is built
    with): :meth:`verify` still checks the validity window every time, and the caller
    checks revocation. A certificate that fails is never remembered.
    """

    __slots__ = ("_entries", "ca", "clock", "size")

    def __init__(self, ca: CertificateAuthority, size: int = VERIFIED_CACHE_SIZE,
                 clock: Callable[[], datetime] = utcnow):
        self.ca, self.size, self.clock = ca, size, clock
        self._entries: OrderedDict[bytes, tuple[x509.Certificate, Identity]] = OrderedDict()

    def verify(self, der: bytes) -> tuple[x509.Certificate, Identity]:
        """The certificate and its identity, or IdentityError / ValueError saying why not."""
        entries = self._entries
        hit = entries.get(der)
        if hit is not None:
            entries.move_to_end(der)
            self.ca.check_validity(hit[0], now=self.clock())
            return hit
        cert = x509.load_der_x509_certificate(der)
        self.ca.verify_client_chain(cert, now=self.clock())
        verified = cert, identity_from_certificate(cert)
        entries[der] = verified
        if len(entries) > self.size:
            entries.popitem(last=False)
        return verified


class CertificateAuthenticator:
    """``agent_auth = "certificate"``: mTLS with appliance-issued client certificates."""

    def __init__(self, config: Config):
        if config.identity is None:
            raise ConfigError(f"{config.path}: proxy.agent_auth: 'certificate' needs an [identity] section")
        self.settings: IdentityConfig = config.identity
        where = f"{config.path}: identity.state_dir"
        if not self.settings.ca_cert.is_file():
            raise ConfigError(f"{where}: no appliance CA at {self.settings.ca_cert} "
                              f"(create it with: tollgate ca init --state-dir {self.settings.state_dir})")
        self.ca = CertificateAuthority.load(self.settings.ca_cert)
        self.registry = CertificateRegistry(self.settings.registry)
        self.verified = VerifiedCertificates(self.ca)
        self._contexts = {t.name: self._server_context(t, where) for t in config.targets}
        self._failures: OrderedDict[Any, tuple[float, str]] = OrderedDict()
        self._hint = (f"Enroll with: tollgate enroll --url {self.settings.enroll_url}"
                      if self.settings.enroll_url else "Enroll with: tollgate enroll")
        self._hint += " — it writes ~/.postgresql/postgresql.crt, which libpq then presents."

    def _server_context(self, target: Target, where: str) -> ssl.SSLContext:
        cert, key = self.settings.server_cert(target.name)
        if not cert.is_file() or not key.is_file():
            addresses = " ".join(f"--address {e.address}" for e in target.endpoints)
            raise ConfigError(f"{where}: no server certificate for target {target.name!r} at {cert} "
                              f"(issue one with: tollgate certs issue-server --state-dir {self.settings.state_dir} "
                              f"{addresses} --out-cert {cert} --out-key {key})")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(cert), str(key))
        context.load_verify_locations(cafile=str(self.settings.ca_cert))
        context.verify_mode = ssl.CERT_OPTIONAL
        context.verify_flags |= X509_V_FLAG_NO_CHECK_TIME
        # No TLS 1.3 session tickets (OpenSSL sends two per handshake by default): libpq
        # never resumes a session, so each would be encrypted and sent for nothing; a
        # resumed session would not have its chain verified again. PostgreSQL sends none.
        context.num_tickets = 0
        return context

    # -- AgentAuthenticator --

    def server_context(self, target: Target) -> ssl.SSLContext | None:
        return self._contexts.get(target.name)

    def tls_failed(self, info: SessionInfo, reason: str) -> None:
        log.warning("TLS handshake from %s failed: %s", info.client, reason)
        failures = self._failures
        failures[info.client.address] = (time.monotonic(), reason)
        failures.move_to_end(info.client.address)
        while len(failures) > FAILURE_MEMORY_SIZE:
            failures.popitem(last=False)

    def authenticate(self, info: SessionInfo, peer_certificate: bytes | None) -> Identity:
        if info.client_tls is None:
            return self._without_tls(info)
        if peer_certificate is None:
            raise AuthFailure("Tollgate requires a client certificate, and none was presented", self._hint)
        try:
            cert, identity = self.verified.verify(peer_certificate)
        except (IdentityError, ValueError) as exc:
            raise AuthFailure(f"client certificate refused: {exc}", self._hint) from None
        if self.registry.is_revoked(cert.serial_number):
            raise AuthFailure(self._revoked_message(cert.serial_number), self._hint)
        info.certificate_serial = cert.serial_number
        info.identity_source = "certificate"
        return identity

    def _without_tls(self, info: SessionInfo) -> Identity:
        for source in self.settings.legacy_sources:
            if info.client.address in source.network:
                # Opt-in and marked on the session: the address vouches, not a certificate.
                info.identity_source = "legacy-source-address"
                return Identity(source.subject, "legacy", source.groups)
        message = "Tollgate requires TLS with a client certificate; this connection did not use TLS"
        seen = self._failures.get(info.client.address)
        if seen is not None and time.monotonic() - seen[0] < FAILURE_MEMORY_SECONDS:
            message += f" (the TLS handshake just before it failed: {seen[1]})"
        raise AuthFailure(message, self._hint)

    def _revoked_message(self, serial: int) -> str:
        record = self.registry.get(serial)
        when = f" at {record.revoked_at:%Y-%m-%d %H:%M:%S} UTC" if record and record.revoked_at else ""
        reason = f": {record.revoked_reason}" if record and record.revoked_reason else ""
        return f"client certificate {format_serial(serial)} was revoked{when}{reason}"

    # -- revocation of live sessions --

    def revocations(self, since: int) -> tuple[int, frozenset[int]]:
        """Serials revoked after revision ``since``, and the current revision."""
        return self.registry.revoked_serials(since)

    def revoked_message(self, serial: int) -> str:
        return self._revoked_message(serial)
