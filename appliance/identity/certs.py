"""How an :class:`Identity` is written into an X.509 certificate, and read back out.

Layout of a Tollgate client certificate (the CA builds all of it from the Identity):

* subject: ``CN=<identity.subject>, O=Tollgate``
* subjectAltName: ``URI:tollgate:identity:<kind>:<percent-encoded subject>`` and, when the
  identity has an email address, ``email:<address>`` (rfc822Name)
* extension :data:`IDENTITY_EXTENSION_OID` (non-critical), DER::

      TollgateIdentity ::= SEQUENCE {
          version  INTEGER (1),
          kind     UTF8String,               -- "person" | "agent" | "legacy"
          groups   SEQUENCE OF UTF8String,   -- sorted, unique
          issuer   [0] IMPLICIT UTF8String OPTIONAL }

* extendedKeyUsage clientAuth (server certificates: serverAuth)

The URI SAN is the authoritative name; the CN repeats it for humans and tools, and must
agree with it when read back.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from appliance.model.identity import IDENTITY_KINDS, IDENTITY_URI_PREFIX, Identity, IdentityError

# 32473 is the IANA Private Enterprise Number reserved for documentation (RFC 5612);
# 7468 is Tollgate's sub-arc under it. Replace the arc with a registered PEN before
# certificates leave a lab: nothing else may assume this OID is ours.
TOLLGATE_OID_ARC = "1.3.6.1.4.1.32473.7468"
IDENTITY_EXTENSION_OID = x509.ObjectIdentifier(f"{TOLLGATE_OID_ARC}.1")
IDENTITY_EXTENSION_VERSION = 1
ORGANIZATION = "Tollgate"

_SEQUENCE, _INTEGER, _UTF8STRING, _ISSUER_TAG = 0x30, 0x02, 0x0C, 0x80


# --- the identity extension: a few lines of strict DER ---------------------------------

def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    length = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(length))) + length + content


def _read_tlv(data: bytes, pos: int, expect: int) -> tuple[bytes, int]:
    """One element at ``pos`` with tag ``expect``: (content, position after it)."""
    if pos + 2 > len(data):
        raise IdentityError("identity extension is truncated")
    tag, first = data[pos], data[pos + 1]
    if tag != expect:
        raise IdentityError(f"identity extension: expected tag 0x{expect:02x}, found 0x{tag:02x}")
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        # DER: no indefinite lengths, no over-long length encodings.
        if count == 0 or count > 4 or pos + count > len(data) or data[pos] == 0:
            raise IdentityError("identity extension has an invalid length encoding")
        length = int.from_bytes(data[pos:pos + count], "big")
        if length < 0x80:
            raise IdentityError("identity extension has an invalid length encoding")
        pos += count
    if pos + length > len(data):
        raise IdentityError("identity extension is truncated")
    return data[pos:pos + length], pos + length


def _read_utf8(data: bytes, pos: int, what: str, tag: int = _UTF8STRING) -> tuple[str, int]:
    raw, pos = _read_tlv(data, pos, tag)
    try:
        return raw.decode("utf-8"), pos
    except UnicodeDecodeError:
        raise IdentityError(f"identity extension: {what} is not valid UTF-8") from None


def encode_identity_extension(identity: Identity) -> bytes:
    """The DER ``TollgateIdentity`` value for ``identity`` (see the module docstring)."""
    fields = [
        _tlv(_INTEGER, bytes((IDENTITY_EXTENSION_VERSION,))),
        _tlv(_UTF8STRING, identity.kind.encode()),
        _tlv(_SEQUENCE, b"".join(_tlv(_UTF8STRING, g.encode()) for g in identity.groups)),
    ]
    if identity.issuer is not None:
        fields.append(_tlv(_ISSUER_TAG, identity.issuer.encode()))
    return _tlv(_SEQUENCE, b"".join(fields))


def decode_identity_extension(der: bytes) -> tuple[str, tuple[str, ...], str | None]:
    """(kind, groups, issuer) from a DER ``TollgateIdentity``; strict, raises IdentityError."""
    body, end = _read_tlv(der, 0, _SEQUENCE)
    if end != len(der):
        raise IdentityError("identity extension has trailing data")
    version, pos = _read_tlv(body, 0, _INTEGER)
    if version != bytes((IDENTITY_EXTENSION_VERSION,)):
        raise IdentityError(f"identity extension version {int.from_bytes(version, 'big', signed=True)} "
                            f"is not supported (expected {IDENTITY_EXTENSION_VERSION})")
    kind, pos = _read_utf8(body, pos, "kind")
    group_data, pos = _read_tlv(body, pos, _SEQUENCE)
    groups, gpos = [], 0
    while gpos < len(group_data):
        group, gpos = _read_utf8(group_data, gpos, "a group name")
        groups.append(group)
    issuer = None
    if pos < len(body):
        issuer, pos = _read_utf8(body, pos, "issuer", _ISSUER_TAG)
    if pos != len(body):
        raise IdentityError("identity extension has unexpected trailing fields")
    return kind, tuple(groups), issuer


# --- writing ----------------------------------------------------------------------------

def identity_name(identity: Identity) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, identity.subject),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
    ])


def identity_general_names(identity: Identity) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
    if identity.email is not None:
        names.append(x509.RFC822Name(identity.email))
    return names


def add_client_identity(builder: x509.CertificateBuilder, identity: Identity) -> x509.CertificateBuilder:
    """Subject, SANs, identity extension and clientAuth EKU for ``identity``."""
    return (
        builder.subject_name(identity_name(identity))
        .add_extension(x509.SubjectAlternativeName(identity_general_names(identity)), critical=False)
        .add_extension(x509.UnrecognizedExtension(IDENTITY_EXTENSION_OID, encode_identity_extension(identity)),
                       critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )


# --- reading ----------------------------------------------------------------------------

def parse_identity_uri(uri: str) -> tuple[str, str]:
    """(kind, subject) from ``tollgate:identity:<kind>:<percent-encoded subject>``."""
    if not uri.startswith(IDENTITY_URI_PREFIX):
        raise IdentityError(f"{uri!r} is not a Tollgate identity URI")
    kind, sep, encoded = uri[len(IDENTITY_URI_PREFIX):].partition(":")
    if not sep or kind not in IDENTITY_KINDS:
        raise IdentityError(f"identity URI {uri!r} does not name a kind ({', '.join(IDENTITY_KINDS)})")
    try:
        subject = unquote(encoded, errors="strict")
    except UnicodeDecodeError:
        raise IdentityError(f"identity URI {uri!r} is not valid percent-encoded UTF-8") from None
    if not subject:
        raise IdentityError(f"identity URI {uri!r} has an empty subject")
    return kind, subject


def identity_from_certificate(cert: x509.Certificate) -> Identity:
    """The Identity a Tollgate client certificate carries; IdentityError says what is wrong.

    This reads the certificate only: call ``CertificateAuthority.verify_client_chain``
    (and check revocation) before trusting the result.
    """
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except x509.ExtensionNotFound:
        raise IdentityError("certificate has no subjectAltName, so it names no Tollgate identity") from None
    uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith(IDENTITY_URI_PREFIX)]
    if not uris:
        raise IdentityError(f"certificate has no {IDENTITY_URI_PREFIX}… URI in its subjectAltName")
    if len(uris) > 1:
        raise IdentityError(f"certificate names {len(uris)} identities in its subjectAltName; expected one")
    kind, subject = parse_identity_uri(uris[0])

    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if cns != [subject]:
        shown = ", ".join(repr(c) for c in cns) or "none"
        raise IdentityError(f"certificate subject CN ({shown}) does not match its identity URI (subject {subject!r})")

    try:
        ext = cert.extensions.get_extension_for_oid(IDENTITY_EXTENSION_OID).value
    except x509.ExtensionNotFound:
        raise IdentityError(
            f"certificate has no Tollgate identity extension ({IDENTITY_EXTENSION_OID.dotted_string})"
        ) from None
    ext_kind, groups, issuer = decode_identity_extension(ext.value)
    if ext_kind != kind:
        raise IdentityError(f"certificate identity extension says kind {ext_kind!r} but its URI says {kind!r}")

    emails = san.get_values_for_type(x509.RFC822Name)
    if len(emails) > 1:
        raise IdentityError(f"certificate carries {len(emails)} email addresses; expected at most one")
    return Identity(subject, kind, groups, emails[0] if emails else None, issuer)  # type: ignore[arg-type]


# --- small helpers shared by the CA, the registry and the CLI ----------------------------

def certificate_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def private_key_pem(key: object) -> bytes:
    """Unencrypted PKCS#8 PEM: callers write it to a 0600 file."""
    return key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 over the DER certificate, lowercase hex."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def utc(dt: datetime) -> datetime:
    """An aware UTC datetime (cryptography < 42 hands out naive UTC ones)."""
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def not_valid_before(cert: x509.Certificate) -> datetime:
    value = getattr(cert, "not_valid_before_utc", None)  # cryptography >= 42
    return value if value is not None else utc(cert.not_valid_before)


def not_valid_after(cert: x509.Certificate) -> datetime:
    value = getattr(cert, "not_valid_after_utc", None)
    return value if value is not None else utc(cert.not_valid_after)


def utcnow() -> datetime:
    return datetime.now(UTC)
