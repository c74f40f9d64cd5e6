"""The appliance's certificate authority: issues client and server certificates, verifies clients.

The CA key lives in one file (``ca.key``, 0600) and is read only at the moment of signing,
through a *signer* — by default :func:`sign_with_key_file`. So the proxy loads the CA with
the certificate alone (it verifies, never issues), and the key can sit on another file
system or behind another process that supplies its own signer.

Every time is injectable (``now=``), which is how tests make expired certificates.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import secrets
import stat
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from appliance.identity.certs import (
    ORGANIZATION,
    add_client_identity,
    certificate_pem,
    identity_general_names,
    not_valid_after,
    not_valid_before,
    private_key_pem,
    utc,
    utcnow,
)
from appliance.model.identity import Identity, IdentityError

CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
DEFAULT_CA_NAME = "Tollgate appliance CA"
DEFAULT_CLIENT_LIFETIME = timedelta(hours=8)
# The CA/Browser Forum ceiling for server certificates; some clients refuse longer ones.
DEFAULT_SERVER_LIFETIME_DAYS = 397
# Backdating absorbs a client clock slightly behind ours; the skew absorbs either clock.
BACKDATE = timedelta(minutes=1)
DEFAULT_SKEW = timedelta(seconds=60)
MIN_RSA_BITS = 2048
# A larger RSA key is no safer in practice and makes every handshake a CPU cost to us.
MAX_RSA_BITS = 8192
ACCEPTED_CURVES = (ec.SECP256R1, ec.SECP384R1)
ACCEPTED_KEYS = "EC P-256/P-384, RSA of at least 2048 bits, or Ed25519"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
Signer = Callable[[x509.CertificateBuilder], x509.Certificate]


# --- files --------------------------------------------------------------------------------

def write_file_atomically(path: str | Path, data: bytes, *, mode: int, overwrite: bool = False) -> None:
    """Write ``data`` to ``path`` with exactly ``mode``; readers see all of it or nothing.

    Without ``overwrite`` an existing file is an error, decided atomically by ``link``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    # Created with the final mode, so a private key is never readable by others, not even
    # for the instant before a chmod.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # the umask may have narrowed it; make it exact
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise IdentityError(f"{path} already exists; refusing to overwrite it") from None
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_private_key(path: str | Path) -> PrivateKey:
    """A PEM private key from a file only its owner can read."""
    path = Path(path)
    try:
        st = path.stat()
        data = path.read_bytes()
    except OSError as exc:
        raise IdentityError(f"cannot read CA key {path}: {exc.strerror}") from None
    if st.st_mode & 0o077:
        raise IdentityError(f"CA key {path} is accessible to other users (mode {stat.S_IMODE(st.st_mode):04o}); "
                            f"run: chmod 600 {path}")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise IdentityError(f"CA key {path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
        raise IdentityError(f"CA key {path} is a {type(key).__name__}; expected EC, RSA or Ed25519")
    return key


def _hash_for(key: PrivateKey) -> hashes.HashAlgorithm | None:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None  # Ed25519 hashes internally
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def sign_with_key_file(builder: x509.CertificateBuilder, key_path: str | Path) -> x509.Certificate:
    """The default signer: read the CA key, sign, forget the key.

    Only this function touches the key, so replacing it (another process, a token) keeps
    the key out of whatever runs the CA object.
    """
    key = load_private_key(key_path)
    return builder.sign(key, _hash_for(key))


# --- verification helpers -------------------------------------------------------------------

def _signed_by(cert: x509.Certificate, public_key: object) -> bool:
    """Whether ``public_key`` made ``cert``'s signature (cryptography 38 has no helper)."""
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
        elif isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(),
                              cert.signature_hash_algorithm)
        elif isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(cert.signature, cert.tbs_certificate_bytes)
        else:
            return False
    except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError):
        return False
    return True


def _describe_key(public_key: object) -> str:
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA-{public_key.key_size}"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return f"EC {public_key.curve.name}"
    return type(public_key).__name__.removeprefix("_").replace("PublicKey", "")


def check_client_key(public_key: object) -> None:
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return
    if isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(public_key.curve, ACCEPTED_CURVES):
        return
    if isinstance(public_key, rsa.RSAPublicKey) and MIN_RSA_BITS <= public_key.key_size <= MAX_RSA_BITS:
        return
    raise IdentityError(f"CSR key is {_describe_key(public_key)}; Tollgate accepts {ACCEPTED_KEYS}")


def _describe_general_name(name: x509.GeneralName) -> str:
    labels = {x509.UniformResourceIdentifier: "URI", x509.RFC822Name: "email", x509.DNSName: "DNS",
              x509.IPAddress: "IP"}
    return f"{labels.get(type(name), type(name).__name__)}:{name.value}"


def check_csr_claims(csr: x509.CertificateSigningRequest, identity: Identity) -> None:
    """Refuse a CSR that names anyone else. (Its names are never copied either way.)"""
    for cn in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        if cn.value != identity.subject:
            raise IdentityError(f"CSR subject claims CN={cn.value!r}, but the requester is authenticated "
                                f"as {identity.subject!r}")
    try:
        san = csr.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except x509.ExtensionNotFound:
        return
    except ValueError as exc:
        raise IdentityError(f"CSR extensions are malformed: {exc}") from None
    allowed = identity_general_names(identity)
    for name in san:
        if name not in allowed:
            raise IdentityError(f"CSR requests subjectAltName {_describe_general_name(name)}, which is not "
                                f"the requester's identity ({identity.uri})")


def _serial() -> int:
    # 128 random bits: unguessable (RFC 5280 wants >= 64) and within the 20-octet limit.
    serial = 0
    while serial == 0:
        serial = secrets.randbits(128)
    return serial


def _when(now: datetime | None) -> datetime:
    return utcnow() if now is None else utc(now)


def _stamp(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%d %H:%M:%SZ")


# --- the CA -------------------------------------------------------------------------------

class CertificateAuthority:
    """The appliance CA: its certificate, and (when it may issue) a signer for its key."""

    def __init__(self, certificate: x509.Certificate, signer: Signer | None = None):
        self.certificate = certificate
        self._signer = signer
        # Decoded once: cryptography re-decodes the key on every public_key() call (about
        # 0.2 ms with OpenSSL 3), and every agent connection verifies against it.
        self._public_key = certificate.public_key()

    @property
    def can_issue(self) -> bool:
        return self._signer is not None

    @property
    def certificate_pem(self) -> bytes:
        return certificate_pem(self.certificate)

    @classmethod
    def create(cls, directory: str | Path, name: str = DEFAULT_CA_NAME, lifetime_days: int = 3650, *,
               now: datetime | None = None) -> CertificateAuthority:
        """A new CA in ``directory`` (``ca.crt`` 0644, ``ca.key`` 0600); never overwrites one."""
        directory = Path(directory)
        if lifetime_days < 1:
            raise IdentityError(f"CA lifetime must be at least one day, not {lifetime_days}")
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
        for path in (cert_path, key_path):
            if path.exists():
                raise IdentityError(f"{path} already exists; refusing to overwrite an existing CA")
        start = _when(now)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        ])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(_serial())
            .not_valid_before(start - BACKDATE)
            .not_valid_after(start + timedelta(days=lifetime_days))
            # path_length 0: this CA signs leaves only, never another CA.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        # Key first: a crash in between leaves a key without a certificate, which `create`
        # then refuses to overwrite and the operator sees, rather than a dangling cert.
        write_file_atomically(key_path, private_key_pem(key), mode=0o600)
        write_file_atomically(cert_path, certificate_pem(cert), mode=0o644)
        return cls.load(cert_path, key_path)

    @classmethod
    def load(cls, cert_path: str | Path, key_path: str | Path | None = None, *,
             signer: Signer | None = None) -> CertificateAuthority:
        """The CA from its certificate; with ``key_path`` (or a ``signer``) it may issue too."""
        cert_path = Path(cert_path)
        try:
            data = cert_path.read_bytes()
        except OSError as exc:
            raise IdentityError(f"cannot read CA certificate {cert_path}: {exc.strerror}") from None
        try:
            cert = x509.load_pem_x509_certificate(data)
        except ValueError as exc:
            raise IdentityError(f"{cert_path} is not a PEM certificate: {exc}") from None
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise IdentityError(f"{cert_path} is not a CA certificate (basicConstraints CA is not set)")
        if key_path is not None:
            if signer is not None:
                raise IdentityError("give the CA a key file or a signer, not both")
            key = load_private_key(key_path)
            if _public_der(key.public_key()) != _public_der(cert.public_key()):
                raise IdentityError(f"CA key {key_path} does not belong to CA certificate {cert_path}")
            del key  # only the signer reads it again, at signing time
            signer = functools.partial(sign_with_key_file, key_path=Path(key_path))
        return cls(cert, signer)

    # --- issuing ------------------------------------------------------------------------

    def _sign(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        if self._signer is None:
            raise IdentityError("this CA was loaded without its private key: it can verify certificates "
                                "but not issue them")
        cert = self._signer(builder)
        # Guards a swapped key file or a misbehaving external signer.
        if not _signed_by(cert, self.certificate.public_key()):
            raise IdentityError("the CA signer produced a certificate the CA certificate does not verify "
                                "(is the key file this CA's key?)")
        return cert

    def _leaf_builder(self, public_key: object, start: datetime, lifetime: timedelta) -> x509.CertificateBuilder:
        ca_end = not_valid_after(self.certificate)
        if start >= ca_end:
            raise IdentityError(f"the appliance CA expired at {_stamp(ca_end)}; create a new one")
        # A leaf outliving its issuer could never verify; end it with the CA instead.
        end = min(start + lifetime, ca_end)
        return (
            x509.CertificateBuilder()
            .issuer_name(self.certificate.subject)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(_serial())
            .not_valid_before(start - BACKDATE)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)  # type: ignore[arg-type]
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.certificate.public_key()), critical=False)  # type: ignore[arg-type]
        )

    def issue_client(self, csr_pem: bytes | str, identity: Identity, lifetime: timedelta = DEFAULT_CLIENT_LIFETIME,
                     *, now: datetime | None = None) -> x509.Certificate:
        """A client certificate for ``identity`` over the CSR's key.

        The CSR proves possession of the key (its self-signature) and nothing more: the
        subject and every extension come from ``identity``.
        """
        if lifetime <= timedelta(0):
            raise IdentityError(f"certificate lifetime must be positive, not {lifetime}")
        if isinstance(csr_pem, str):
            csr_pem = csr_pem.encode()
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise IdentityError(f"not a PEM certificate signing request: {exc}") from None
        try:
            public_key = csr.public_key()
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise IdentityError(f"CSR public key is unusable: {exc}") from None
        check_client_key(public_key)
        try:
            valid = csr.is_signature_valid
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise IdentityError(f"CSR signature cannot be checked: {exc}") from None
        if not valid:
            raise IdentityError("CSR signature is invalid: the request was altered or not signed by its key's owner")
        check_csr_claims(csr, identity)
        builder = add_client_identity(self._leaf_builder(public_key, _when(now), lifetime), identity)
        return self._sign(builder)

    def issue_server(self, addresses: Iterable[str | IPAddress], dns_names: Iterable[str] = (),
                     lifetime_days: int = DEFAULT_SERVER_LIFETIME_DAYS, *,
                     now: datetime | None = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """A serverAuth certificate and new P-256 key for a target's addresses and names."""
        try:
            ips = [ipaddress.ip_address(a) for a in addresses]
        except ValueError as exc:
            raise IdentityError(str(exc)) from None
        names = list(dns_names)
        for name in names:
            if not name or not name.isascii() or " " in name:
                raise IdentityError(f"DNS name {name!r} must be a non-empty ASCII (A-label) name")
        if not ips and not names:
            raise IdentityError("a server certificate needs at least one address or DNS name")
        if lifetime_days < 1:
            raise IdentityError(f"server certificate lifetime must be at least one day, not {lifetime_days}")
        key = ec.generate_private_key(ec.SECP256R1())
        common_name = names[0] if names else str(ips[0])
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names] + [x509.IPAddress(ip) for ip in ips]
        builder = (
            self._leaf_builder(key.public_key(), _when(now), timedelta(days=lifetime_days))
            .subject_name(x509.Name([
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            ]))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        )
        return self._sign(builder), key

    # --- verifying ----------------------------------------------------------------------

    def verify_client_chain(self, cert: x509.Certificate, *, now: datetime | None = None,
                            skew: timedelta = DEFAULT_SKEW) -> None:
        """Raise IdentityError unless ``cert`` is a currently valid client certificate of this CA.

        Revocation is the registry's business, not checked here.
        """
        if cert.issuer != self.certificate.subject or not _signed_by(cert, self._public_key):
            raise IdentityError(f"certificate not issued by this appliance's CA "
                                f"(issuer: {cert.issuer.rfc4514_string() or 'empty'})")
        self.check_validity(cert, now=now, skew=skew)
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
            if constraints.ca:
                raise IdentityError("certificate is a CA certificate, not a client certificate")
        except x509.ExtensionNotFound:
            pass
        try:
            usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            raise IdentityError("certificate has no extendedKeyUsage; client certificates need clientAuth") from None
        if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
            raise IdentityError("certificate is not for client authentication (its extendedKeyUsage lacks clientAuth)")
        try:
            key_usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
            if not key_usage.digital_signature:
                raise IdentityError("certificate keyUsage does not allow digitalSignature")
        except x509.ExtensionNotFound:
            pass


    def check_validity(self, cert: x509.Certificate, *, now: datetime | None = None,
                       skew: timedelta = DEFAULT_SKEW) -> None:
        """Raise IdentityError unless this CA and ``cert`` are both valid at ``now``: the part
        of :meth:`verify_client_chain` that changes with time, alone."""
        when = _when(now)
        ca_end = not_valid_after(self.certificate)
        if when > ca_end + skew:
            raise IdentityError(f"the appliance CA expired at {_stamp(ca_end)}")
        start, end = not_valid_before(cert), not_valid_after(cert)
        if when + skew < start:
            raise IdentityError(f"certificate not valid until {_stamp(start)}")
        if when > end + skew:
            raise IdentityError(f"certificate expired at {_stamp(end)}")


def _key_usage(cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign, encipher_only=False, decipher_only=False,
    )


def _public_der(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
