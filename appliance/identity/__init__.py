"""Who is connecting: identities, and the appliance CA that binds them to mTLS client certificates.

``model`` is the validated :class:`Identity`; ``certs`` writes an identity into a
certificate and reads it back; ``ca`` is the appliance CA (issue client and server
certificates, verify clients); ``cli`` adds ``tollgate ca …`` and ``tollgate certs …``.
Revocations live in :mod:`appliance.identity.registry`.
"""

from appliance.identity.ca import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    DEFAULT_CLIENT_LIFETIME,
    CertificateAuthority,
    sign_with_key_file,
    write_file_atomically,
)
from appliance.identity.certs import (
    IDENTITY_EXTENSION_OID,
    certificate_pem,
    fingerprint,
    identity_from_certificate,
    private_key_pem,
)
from appliance.model.identity import IDENTITY_KINDS, Identity, IdentityError, IdentityKind

__all__ = [
    "CA_CERT_FILE", "CA_KEY_FILE", "DEFAULT_CLIENT_LIFETIME", "IDENTITY_EXTENSION_OID", "IDENTITY_KINDS",
    "CertificateAuthority", "Identity", "IdentityError", "IdentityKind", "certificate_pem", "fingerprint",
    "identity_from_certificate", "private_key_pem", "sign_with_key_file", "write_file_atomically",
]
