"""Tests of ``appliance.identity``, and the helpers they (and the state tests) share."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from appliance.identity import CertificateAuthority, Identity

ALICE = Identity("alice", "person", ("payments-readers", "engineering"), "alice@example.com", "https://idp.example")
BOT = Identity("ci-bot/build 7", "agent", ("agents",))


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key: object, cn: str | None = None, sans: list[x509.GeneralName] | None = None,
             extra_subject: list[x509.NameAttribute] | None = None) -> bytes:
    """A PEM CSR over ``key``, naming whatever the test wants it to claim."""
    attrs = ([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn is not None else []) + (extra_subject or [])
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]


def new_ca(directory: Path) -> CertificateAuthority:
    return CertificateAuthority.create(directory)
