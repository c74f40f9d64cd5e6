"""Identity ↔ certificate encoding: the exact layout, the round trip, and every malformed input."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from appliance.identity import IDENTITY_EXTENSION_OID, Identity, IdentityError, identity_from_certificate
from appliance.identity.certs import (
    add_client_identity,
    decode_identity_extension,
    encode_identity_extension,
    parse_identity_uri,
)
from tests.identity import ALICE, BOT, ec_key, make_csr, new_ca

# --- the model ------------------------------------------------------------------------------


def test_uri_percent_encodes_the_subject_and_display_prefers_email():
    ident = Identity("ci-bot/build 7@x", "agent")
    assert ident.uri == "tollgate:identity:agent:ci-bot%2Fbuild%207%40x"
    assert parse_identity_uri(ident.uri) == ("agent", "ci-bot/build 7@x")
    assert ident.display == "ci-bot/build 7@x"
    assert ALICE.display == "alice@example.com"


def test_groups_are_a_sorted_set():
    a = Identity("bob", "person", ["b", "a", "b"])
    assert a.groups == ("a", "b")
    assert a == Identity("bob", "person", ("a", "b"))


@pytest.mark.parametrize("kwargs, message", [
    ({"subject": "", "kind": "person"}, "subject is empty"),
    ({"subject": "bob\nroot", "kind": "person"}, "control characters"),
    ({"subject": " bob", "kind": "person"}, "whitespace"),
    ({"subject": "x" * 65, "kind": "person"}, "longer than 64 bytes"),
    ({"subject": "bob", "kind": "robot"}, "kind must be one of person, agent, legacy"),
    ({"subject": "bob", "kind": "person", "groups": "admins"}, "not one string"),
    ({"subject": "bob", "kind": "person", "groups": ("ok", "")}, "group name is empty"),
    ({"subject": "bob", "kind": "person", "email": "bob"}, "not an ASCII addr-spec"),
    ({"subject": "bob", "kind": "person", "email": "bøb@example.com"}, "not an ASCII addr-spec"),
])
def test_invalid_identities_are_refused_with_the_reason(kwargs, message):
    with pytest.raises(IdentityError, match=message):
        Identity(**kwargs)


# --- the identity extension -----------------------------------------------------------------


def test_extension_der_is_exactly_the_documented_layout():
    der = encode_identity_extension(Identity("a", "agent", ("g2", "g1"), issuer="i"))
    assert der == bytes.fromhex(
        "3017"                      # SEQUENCE, 23 bytes
        "020101"                    # version INTEGER 1
        "0c056167656e74"            # kind UTF8String "agent"
        "30080c0267310c026732"  # groups SEQUENCE OF UTF8String, sorted
        "800169"                    # issuer [0] IMPLICIT UTF8String "i"
    )
    assert decode_identity_extension(der) == ("agent", ("g1", "g2"), "i")


def test_extension_round_trips_long_form_lengths_and_no_issuer():
    ident = Identity("a", "person", tuple(f"group-{i:03}-ü" for i in range(40)))
    der = encode_identity_extension(ident)
    assert der[1] == 0x82  # two length octets: the long form is exercised
    assert decode_identity_extension(der) == ("person", ident.groups, None)


@pytest.mark.parametrize("der, message", [
    (bytes.fromhex("3003020101"), "truncated"),
    (bytes.fromhex("30080201010e01613000"), "expected tag 0x0c, found 0x0e"),
    (bytes.fromhex("30080201020c01613000"), "version 2 is not supported"),
    (bytes.fromhex("30080201010c01613000") + b"\x00", "trailing data"),
    (bytes.fromhex("30080201010c01ff3000"), "not valid UTF-8"),
    (bytes.fromhex("300b0201010c016130000c0161"), "expected tag 0x80"),
    (bytes.fromhex("30800201010c01613000"), "invalid length"),
    (bytes.fromhex("3081080201010c01613000"), "invalid length"),  # long form for a short length
])
def test_malformed_extensions_are_rejected(der, message):
    with pytest.raises(IdentityError, match=message):
        decode_identity_extension(der)


# --- certificates -------------------------------------------------------------------------


def test_round_trip_identity_to_certificate_and_back(tmp_path):
    ca = new_ca(tmp_path)
    for ident in (ALICE, BOT, Identity("jörg", "legacy"), Identity("svc", "agent", issuer="https://idp")):
        cert = ca.issue_client(make_csr(ec_key()), ident)
        assert identity_from_certificate(cert) == ident


def test_certificate_layout(tmp_path):
    cert = new_ca(tmp_path).issue_client(make_csr(ec_key(), cn="alice"), ALICE)
    assert cert.subject == x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, "alice"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tollgate"),
    ])
    san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    assert list(san.value) == [x509.UniformResourceIdentifier("tollgate:identity:person:alice"),
                               x509.RFC822Name("alice@example.com")]
    ext = cert.extensions.get_extension_for_oid(IDENTITY_EXTENSION_OID)
    assert IDENTITY_EXTENSION_OID.dotted_string == "1.3.6.1.4.1.32473.7468.1"
    assert ext.critical is False
    assert decode_identity_extension(ext.value.value) == ("person", ("engineering", "payments-readers"),
                                                          "https://idp.example")
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def _self_signed(subject_cn: str | None, identity: Identity | None = None,
                 sans: list[x509.GeneralName] | None = None, extension: bytes | None = None) -> x509.Certificate:
    """A certificate shaped however a test needs, for the reader to judge."""
    key = ec_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)] if subject_cn else [])
    now = datetime.now(UTC)
    builder = (x509.CertificateBuilder().issuer_name(name).public_key(key.public_key()).serial_number(1)
               .not_valid_before(now).not_valid_after(now + timedelta(hours=1)))
    builder = add_client_identity(builder, identity) if identity is not None else builder.subject_name(name)
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if extension is not None:
        builder = builder.add_extension(x509.UnrecognizedExtension(IDENTITY_EXTENSION_OID, extension), critical=False)
    return builder.sign(key, hashes.SHA256())


def _uri(text: str) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(text)


GOOD_EXT = encode_identity_extension(Identity("bob", "person"))


@pytest.mark.parametrize("cert_args, message", [
    ({"subject_cn": "bob"}, "no subjectAltName"),
    ({"subject_cn": "bob", "sans": [x509.DNSName("bob.example")]}, "no tollgate:identity:… URI"),
    ({"subject_cn": "bob", "sans": [_uri("tollgate:identity:person:bob"), _uri("tollgate:identity:person:eve")]},
     "names 2 identities"),
    ({"subject_cn": "bob", "sans": [_uri("tollgate:identity:root:bob")], "extension": GOOD_EXT},
     "does not name a kind"),
    ({"subject_cn": "bob", "sans": [_uri("tollgate:identity:person:%ff")], "extension": GOOD_EXT}, "not valid percent"),
    ({"subject_cn": "eve", "sans": [_uri("tollgate:identity:person:bob")], "extension": GOOD_EXT},
     r"CN \('eve'\) does not match its identity URI \(subject 'bob'\)"),
    ({"subject_cn": None, "sans": [_uri("tollgate:identity:person:bob")], "extension": GOOD_EXT}, r"CN \(none\)"),
    ({"subject_cn": "bob", "sans": [_uri("tollgate:identity:person:bob")]}, "no Tollgate identity extension"),
    ({"subject_cn": "bob", "sans": [_uri("tollgate:identity:agent:bob")], "extension": GOOD_EXT},
     "extension says kind 'person' but its URI says 'agent'"),
    ({"subject_cn": "bob", "sans": [_uri("tollgate:identity:person:bob"), x509.RFC822Name("a@x"),
                                    x509.RFC822Name("b@x")], "extension": GOOD_EXT}, "2 email addresses"),
])
def test_malformed_certificates_are_rejected_with_the_reason(cert_args, message):
    with pytest.raises(IdentityError, match=message):
        identity_from_certificate(_self_signed(**cert_args))


def test_a_hand_built_well_formed_certificate_is_read(tmp_path):
    cert = _self_signed("bob", sans=[_uri("tollgate:identity:person:bob")], extension=GOOD_EXT)
    assert identity_from_certificate(cert) == Identity("bob", "person")
