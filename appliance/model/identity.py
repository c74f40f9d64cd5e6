"""Who is on the other end of a connection: the validated :class:`Identity`.

An Identity is built only from something the appliance trusts (its identity provider, an
operator, or a certificate it issued itself) and is validated on construction, so code
holding one never re-checks it. Certificates are built *from* an Identity, never from what
a client claims in a CSR.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote

IdentityKind = Literal["person", "agent", "legacy"]
IDENTITY_KINDS: tuple[IdentityKind, ...] = ("person", "agent", "legacy")
IDENTITY_URI_PREFIX = "tollgate:identity:"
# RFC 5280's ub-common-name; newer `cryptography` releases refuse longer CNs, and the
# subject is the certificate's CN.
MAX_SUBJECT_BYTES = 64
MAX_GROUP_BYTES = 255


class IdentityError(Exception):
    """An identity, certificate or CSR that can't be trusted, with the precise reason."""


def _check_text(what: str, value: object, max_bytes: int) -> str:
    if not isinstance(value, str):
        raise IdentityError(f"{what} must be a string, not {type(value).__name__}")
    if not value:
        raise IdentityError(f"{what} is empty")
    if value != value.strip():
        raise IdentityError(f"{what} {value!r} has leading or trailing whitespace")
    # Control and format characters would let a name forge lines in logs and listings.
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in value):
        raise IdentityError(f"{what} {value!r} contains control characters")
    if len(value.encode()) > max_bytes:
        raise IdentityError(f"{what} {value[:40]!r}… is longer than {max_bytes} bytes (UTF-8)")
    return value


@dataclass(frozen=True, slots=True)
class Identity:
    """A person, an agent or a legacy (shared-credential) client, with its groups.

    Groups are a set: they are stored sorted and de-duplicated, so two identities with
    the same groups compare equal and encode to identical certificates.
    """

    subject: str
    kind: IdentityKind
    groups: tuple[str, ...] = ()
    email: str | None = None
    issuer: str | None = None

    def __post_init__(self) -> None:
        _check_text("identity subject", self.subject, MAX_SUBJECT_BYTES)
        if self.kind not in IDENTITY_KINDS:
            raise IdentityError(f"identity kind must be one of {', '.join(IDENTITY_KINDS)}, not {self.kind!r}")
        if isinstance(self.groups, str):
            raise IdentityError("identity groups must be a sequence of names, not one string")
        groups = tuple(self.groups)
        for group in groups:
            _check_text("group name", group, MAX_GROUP_BYTES)
        object.__setattr__(self, "groups", tuple(sorted(set(groups))))
        if self.email is not None:
            _check_text("email address", self.email, 254)
            local, at, domain = self.email.rpartition("@")
            # The address goes into an rfc822Name SAN, which is IA5 (ASCII) only.
            if not at or not local or not domain or not self.email.isascii() or " " in self.email:
                raise IdentityError(f"email address {self.email!r} is not an ASCII addr-spec (local@domain)")
        if self.issuer is not None:
            _check_text("identity issuer", self.issuer, 1024)

    @property
    def uri(self) -> str:
        """``tollgate:identity:<kind>:<percent-encoded subject>``, the certificate's URI SAN."""
        return f"{IDENTITY_URI_PREFIX}{self.kind}:{quote(self.subject, safe='')}"

    @property
    def display(self) -> str:
        """How to name this identity to a human: the email address if known."""
        return self.email or self.subject

    def __str__(self) -> str:
        return f"{self.kind} {self.display}"
