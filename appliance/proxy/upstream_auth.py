"""Client side of PostgreSQL password authentication, for the appliance's own logins.

The appliance authenticates to the database with credentials it holds; the agent never
sees them. SCRAM-SHA-256 (RFC 5802 / RFC 7677, as PostgreSQL implements it), md5, and
cleartext — the last only over TLS, which the caller enforces. Sans-io: bytes in, bytes out.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets
import stringprep
import unicodedata


class AuthError(Exception):
    """Upstream authentication can't proceed; the message is safe to show the agent."""


def md5_password(user: str, password: str, salt: bytes) -> bytes:
    """The md5 PasswordMessage payload: 'md5' + md5(md5(password + user) + salt)."""
    inner = hashlib.md5((password + user).encode()).hexdigest().encode()
    return b"md5" + hashlib.md5(inner + salt).hexdigest().encode()


@functools.lru_cache(maxsize=256)
def saslprep(password: str) -> bytes:
    """RFC 4013 SASLprep, falling back to the raw bytes as PostgreSQL itself does.

    Cached like :func:`salted_password`: the same few passwords are prepared for every
    login, and the stringprep tables cost about 60 µs a time."""
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch
        for ch in password
        if not stringprep.in_table_b1(ch)
    )
    normalized = unicodedata.normalize("NFKC", mapped)
    prohibited = (
        stringprep.in_table_c12, stringprep.in_table_c21_c22, stringprep.in_table_c3,
        stringprep.in_table_c4, stringprep.in_table_c5, stringprep.in_table_c6,
        stringprep.in_table_c7, stringprep.in_table_c8, stringprep.in_table_c9,
    )
    if not normalized or any(check(ch) for ch in normalized for check in prohibited):
        return password.encode()
    return normalized.encode()


@functools.lru_cache(maxsize=256)
def salted_password(password: bytes, salt: bytes, rounds: int) -> bytes:
    """PBKDF2 over the password; cached, because a role's salt and iteration count only
    change with its password, and 4096 rounds per login would dominate connection set-up.
    The proxy holds the password itself, so keeping the derived key adds no exposure."""
    return hashlib.pbkdf2_hmac("sha256", password, salt, rounds)


class ScramSha256:
    """One SCRAM-SHA-256 exchange without channel binding.

    We never use SCRAM-SHA-256-PLUS upstream: channel binding would tie the login to the
    appliance's TLS session, which is right, but PostgreSQL only offers -PLUS over TLS and
    plain SCRAM is always offered alongside it.
    """

    MECHANISM = "SCRAM-SHA-256"

    def __init__(self, password: str, nonce: str | None = None, username: str = ""):
        # PostgreSQL ignores the SCRAM user name (the startup packet's counts), so we send
        # none; the parameter exists for RFC test vectors.
        self._password = saslprep(password)
        self._nonce = nonce or base64.b64encode(secrets.token_bytes(18)).decode()
        saslname = username.replace("=", "=3D").replace(",", "=2C")
        self._client_first_bare = f"n={saslname},r={self._nonce}"
        self._expected_server_signature: bytes | None = None

    def client_first(self) -> bytes:
        return ("n,," + self._client_first_bare).encode()

    def client_final(self, server_first: bytes) -> bytes:
        attrs = _parse_attributes(server_first)
        nonce, salt_b64, iterations = attrs.get("r"), attrs.get("s"), attrs.get("i")
        if not nonce or not salt_b64 or not iterations or not iterations.isdigit():
            raise AuthError("upstream SCRAM server-first-message is malformed")
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce):
            raise AuthError("upstream SCRAM server nonce does not extend ours")
        try:
            salt = base64.b64decode(salt_b64, validate=True)
        except ValueError:
            raise AuthError("upstream SCRAM salt is not base64") from None
        rounds = int(iterations)
        if not 1 <= rounds <= 10_000_000:
            raise AuthError(f"upstream SCRAM iteration count {rounds} is out of range")
        salted = salted_password(self._password, salt, rounds)
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = f"c=biws,r={nonce}"
        auth_message = f"{self._client_first_bare},{server_first.decode()},{without_proof}".encode()
        signature = hmac.digest(stored_key, auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        server_key = hmac.digest(salted, b"Server Key", "sha256")
        self._expected_server_signature = hmac.digest(server_key, auth_message, "sha256")
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify_server_final(self, server_final: bytes) -> None:
        attrs = _parse_attributes(server_final)
        if "e" in attrs:
            raise AuthError(f"upstream SCRAM failed: {attrs['e']}")
        if self._expected_server_signature is None:
            raise AuthError("upstream SCRAM final message arrived out of order")
        try:
            signature = base64.b64decode(attrs.get("v", ""), validate=True)
        except ValueError:
            raise AuthError("upstream SCRAM server signature is not base64") from None
        # A server that can't prove it knows the password is not the database we trust.
        if not hmac.compare_digest(signature, self._expected_server_signature):
            raise AuthError("upstream SCRAM server signature does not match: not the expected server")


def _parse_attributes(message: bytes) -> dict[str, str]:
    try:
        text = message.decode("utf-8")
    except UnicodeDecodeError:
        raise AuthError("upstream SCRAM message is not UTF-8") from None
    attrs: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if sep and len(key) == 1:
            attrs.setdefault(key, value)
    return attrs
