"""Enrollment: an OIDC token plus a CSR in, a short-lived client certificate out.

``POST /v1/enroll`` takes ``{"token": ..., "csr": ...}`` (or the token as
``Authorization: Bearer``). People present an ID token, agents a client-credentials access
token; either is validated against the configured issuer and mapped to an
:class:`~appliance.model.identity.Identity`. The CSR only proves possession of a key: the
certificate's names come from the identity, and a CSR that names anyone else is refused
(403) rather than silently corrected, so a confused or malicious client learns why.

A token enrolls one certificate: its ``jti`` (required) is remembered in the registry until
the token expires, shared by every worker process. A revoked identity (``tollgate certs
revoke --subject``) can't enroll until an operator reinstates it. Both are checked again,
with the certificate's recording, in one registry transaction.

Status codes: 400 malformed request or CSR, 401 token refused (with an RFC 6750
``WWW-Authenticate``; a token without ``jti`` is refused), 403 CSR claims another identity
(``csr_identity_mismatch``), the identity is revoked (``identity_revoked``) or the token
already enrolled a certificate (``token_already_used``), 413 body too large, 503 issuer
unreachable, 500 the appliance could not issue or record. Every error is JSON
``{"error", "detail"}``. Tokens are never logged nor echoed; refusal reasons come from
:class:`~appliance.identity.oidc.TokenError`, which never contains the token.

With an ``[audit]`` section, every issued certificate is recorded in the audit log (an
``admin`` record, action ``certificate.issue``) before it is returned: through the proxy's
control socket when the proxy runs (it is then the log's only writer), else by opening the
log here, as every local command does. Issuance fails closed: when the record can't be
made either way, the certificate is revoked in the registry and never returned, and the
client gets 503 ``audit_unavailable`` with a ``Retry-After``. Without ``[audit]`` there is
no log to record in.

This is the one process that reads the CA key (through the CA's signer, at signing time).
``GET /v1/ca.pem`` serves the CA certificate for clients using ``sslmode=verify-full``.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from flask import Blueprint, Flask, Response, current_app, jsonify, request

from appliance.audit.export import ExportError, LogAccess
from appliance.audit.store_errors import AuditError
from appliance.config import Config, ConfigError

# The CA's own CSR rules, run here first so each refusal gets its own HTTP status;
# issue_client applies them again, so this can only refuse more, never less.
from appliance.identity.ca import CertificateAuthority, check_client_key, check_csr_claims
from appliance.identity.certs import certificate_pem, not_valid_after
from appliance.identity.oidc import IssuerError, OIDCValidator, TokenError, identity_from_claims
from appliance.identity.registry import (
    CertificateRegistry,
    RegistryError,
    SubjectRevoked,
    TokenAlreadyUsed,
    format_serial,
)
from appliance.model.identity import Identity, IdentityError
from appliance.model.oidc import OIDCSettings
from appliance.state.db import StateError
from webui import bearer_refused, error_response

log = logging.getLogger(__name__)

bp = Blueprint("enroll", __name__)

EXTENSION = "tollgate.enroll"
REALM = "tollgate-enroll"
# How long a client should wait before retrying when the issuer is unreachable.
RETRY_AFTER_SECONDS = 30
# RFC 6750 §3: error_description is a quoted-string of printable ASCII without '"' or '\'.


@dataclass
class Enrollment:
    """What the blueprint needs: who to trust for tokens, whom to issue with, where to record."""

    validator: OIDCValidator
    settings: OIDCSettings
    ca: CertificateAuthority
    registry: CertificateRegistry
    lifetime: timedelta
    config: Config | None = None  # where issuance is recorded (its [audit] and control socket)

    @classmethod
    def from_config(cls, config: Config, *, validator: OIDCValidator | None = None,
                    ca: CertificateAuthority | None = None,
                    registry: CertificateRegistry | None = None) -> Enrollment:
        identity = config.identity
        if identity is None:
            raise ConfigError(f"{config.path}: identity: enrollment needs an [identity] section")
        if validator is None:
            if identity.oidc is None:
                raise ConfigError(f"{config.path}: identity.oidc: enrollment needs an OIDC issuer "
                                  "([identity.oidc] with issuer and audience)")
            validator = OIDCValidator(identity.oidc)
        if ca is None:
            ca = CertificateAuthority.load(identity.ca_cert, identity.ca_key)
        if not ca.can_issue:
            raise IdentityError("the enrollment service needs a CA that can issue (loaded with its key)")
        if registry is None:
            if not isinstance(identity.registry, str) and not identity.registry.exists():  # a state_url checks itself
                raise RegistryError(f"no certificate registry at {identity.registry} "
                                    f"(run: tollgate ca init --state-dir {identity.state_dir})")
            registry = CertificateRegistry(identity.registry, create=False)
        if config.audit is not None and config.proxy.control_socket is None:
            raise ConfigError(f"{config.path}: proxy.control_socket: enrollment records each certificate in the "
                              "audit log through the proxy's control socket; set it (or drop [audit])")
        return cls(validator, validator.settings, ca, registry, timedelta(hours=identity.client_cert_hours), config)

    def close(self) -> None:
        self.registry.close()


def init_app(app: Flask, config: Config, **overrides: Any) -> None:
    app.extensions[EXTENSION] = Enrollment.from_config(config, **overrides)


def _enrollment() -> Enrollment:
    return current_app.extensions[EXTENSION]


# --- responses ---------------------------------------------------------------------------

def _token_refused(detail: str, error: str = "invalid_token") -> tuple[Response, int]:
    return bearer_refused(REALM, detail, error)


def _refused_enrollment(identity: Identity, exc: SubjectRevoked | TokenAlreadyUsed) -> tuple[Response, int]:
    code = "identity_revoked" if isinstance(exc, SubjectRevoked) else "token_already_used"
    log.warning("enrollment refused for %s from %s: %s", identity.uri, request.remote_addr, code)
    return error_response(403, code, str(exc))


def identity_json(identity: Identity) -> dict[str, Any]:
    return {"subject": identity.subject, "kind": identity.kind, "groups": list(identity.groups),
            "email": identity.email, "issuer": identity.issuer, "uri": identity.uri}


# --- request parsing ---------------------------------------------------------------------

class BadRequest(Exception):
    """A request we can't even read: becomes a 400 with this message."""


def _read_body() -> dict[str, Any]:
    # get_data enforces MAX_CONTENT_LENGTH (413) before we parse anything.
    raw = request.get_data(cache=False)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, not {type(body).__name__}")
    return body


def _token(body: dict[str, Any]) -> str | None:
    """The token from the body or a Bearer header; both at once must agree."""
    in_body = body.get("token")
    if in_body is not None and not isinstance(in_body, str):
        raise BadRequest(f"'token' must be a string, not {type(in_body).__name__}")
    in_header = None
    authorization = request.headers.get("Authorization")
    if authorization is not None:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise BadRequest("the Authorization header must be 'Bearer <token>'")
        in_header = value.strip()
    if in_body is not None and in_header is not None and in_body.strip() != in_header:
        raise BadRequest("the request carries two different tokens (body and Authorization header)")
    token = (in_header or in_body or "").strip()
    return token or None


def _csr(body: dict[str, Any]) -> x509.CertificateSigningRequest:
    text = body.get("csr")
    if text is None:
        raise BadRequest("'csr' is required: a PEM certificate signing request")
    if not isinstance(text, str):
        raise BadRequest(f"'csr' must be a string (PEM), not {type(text).__name__}")
    try:
        csr = x509.load_pem_x509_csr(text.encode())
    except ValueError as exc:
        raise BadRequest(f"'csr' is not a PEM certificate signing request: {exc}") from None
    try:
        check_client_key(csr.public_key())
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise BadRequest(f"the CSR's key or signature is unusable: {exc}") from None
    except IdentityError as exc:
        raise BadRequest(str(exc)) from None
    if not valid:
        raise BadRequest("the CSR's signature is invalid: it was altered or not signed by its key's owner")
    return csr


# --- endpoints ---------------------------------------------------------------------------

@bp.post("/v1/enroll")
def enroll() -> Any:
    enrollment = _enrollment()
    try:
        body = _read_body()
        token = _token(body)
        if token is None:
            return _token_refused("no token: send it as 'token' in the body or as 'Authorization: Bearer'",
                                  error="missing_token")
        csr = _csr(body)
    except BadRequest as exc:
        return error_response(400, "bad_request", str(exc))

    try:
        claims = enrollment.validator.validate(token)
        identity = identity_from_claims(claims, enrollment.settings)
    except IssuerError as exc:
        log.warning("enrollment unavailable: %s", exc.reason)
        response, status = error_response(503, "issuer_unavailable",
                                          f"cannot check the token right now: {exc.reason}")
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return response, status
    except TokenError as exc:
        log.info("enrollment refused from %s: token: %s", request.remote_addr, exc.reason)
        return _token_refused(exc.reason)

    jti = claims.get("jti")
    if not isinstance(jti, str) or not jti.strip():
        log.info("enrollment refused for %s from %s: token has no jti", identity.uri, request.remote_addr)
        return _token_refused("the token has no 'jti' claim (a non-empty string): enrollment needs tokens that "
                              "can be told apart, so that each enrolls one certificate only")
    token_issuer = str(claims["iss"])
    # Remembered while the validator would still accept the token: its exp plus the leeway.
    token_expires = datetime.fromtimestamp(math.ceil(float(claims["exp"]) + enrollment.settings.leeway_seconds), UTC)

    try:
        check_csr_claims(csr, identity)
    except IdentityError as exc:
        log.warning("enrollment refused for %s from %s: %s", identity.uri, request.remote_addr, exc)
        return error_response(403, "csr_identity_mismatch", str(exc))

    try:
        # A first look, so a refused identity or token costs no signature; the same checks
        # are made again, atomically, when the certificate is recorded.
        block = enrollment.registry.revoked_subject(identity.subject)
        if block is not None:
            return _refused_enrollment(identity, SubjectRevoked(block))
        used_at = enrollment.registry.token_used(token_issuer, jti)
        if used_at is not None:
            return _refused_enrollment(identity, TokenAlreadyUsed(jti, used_at))
    except (StateError, sqlite3.Error) as exc:
        log.error("enrollment for %s: the registry failed: %s", identity.uri, exc)
        return error_response(500, "registry_failed", f"the appliance could not read its registry: {exc}")

    try:
        cert = enrollment.ca.issue_client(body["csr"], identity, enrollment.lifetime)
    except IdentityError as exc:
        log.error("could not issue a certificate for %s: %s", identity.uri, exc)
        return error_response(500, "issuance_failed", f"the appliance could not issue a certificate: {exc}")
    try:
        record = enrollment.registry.record_enrollment(cert, identity, issuer=token_issuer, jti=jti,
                                                       token_expires=token_expires)
    except (SubjectRevoked, TokenAlreadyUsed) as exc:
        # Revoked, or the token used, between the first look and now: the certificate is dropped.
        return _refused_enrollment(identity, exc)
    except (RegistryError, StateError, sqlite3.Error) as exc:
        # Not returned: a certificate the registry doesn't know could not be listed or revoked.
        log.error("issued %s for %s but could not record it: %s", format_serial(cert.serial_number),
                  identity.uri, exc)
        return error_response(500, "registry_failed", f"the appliance could not record the certificate: {exc}")

    not_after = not_valid_after(cert)
    refused = _record_issuance(enrollment, identity, record.serial_hex, not_after, token_issuer)
    if refused is not None:
        return refused
    log.info("enrolled %s (groups: %s) from %s: certificate %s, valid until %s", identity.uri,
             ", ".join(identity.groups) or "none", request.remote_addr, record.serial_hex,
             not_after.strftime("%Y-%m-%d %H:%M:%SZ"))
    return jsonify(
        certificate=certificate_pem(cert).decode(),
        ca=enrollment.ca.certificate_pem.decode(),
        identity=identity_json(identity),
        serial=record.serial_hex,
        not_after=not_after.isoformat().replace("+00:00", "Z"),
    )


def _record_issuance(enrollment: Enrollment, identity: Identity, serial: str, not_after: datetime,
                     token_issuer: str) -> tuple[Response, int] | None:
    """Record the issuance; on failure revoke the certificate and answer 503 (fail closed)."""
    if enrollment.config is None or enrollment.config.audit is None:
        return None  # no audit log to record in
    record = {"action": "certificate.issue", "user": identity.uri, "origin": request.remote_addr or "unknown",
              "object": serial, "outcome": "success", "subject": identity.subject, "kind": identity.kind,
              "groups": ",".join(identity.groups), "token_issuer": token_issuer,
              "not_after": not_after.strftime("%Y-%m-%dT%H:%M:%SZ")}
    try:
        access = LogAccess(enrollment.config, version="enroll")  # the proxy if it answers, else the log itself
        try:
            access.append_admin(record)
        finally:
            access.close("certificate issuance recorded")
    except (ExportError, AuditError, ConfigError, OSError) as exc:
        log.error("issued %s for %s but could not record it in the audit log, revoking it: %s", serial,
                  identity.uri, exc)
        try:
            enrollment.registry.revoke(int(serial.replace(":", ""), 16),
                                       "issuance could not be recorded in the audit log", "tollgate")
        except (RegistryError, StateError, sqlite3.Error) as revoke_exc:
            # Never returned either way; the registry just lists it as live until it expires.
            log.error("could not revoke the unrecorded certificate %s: %s", serial, revoke_exc)
        response, status = error_response(503, "audit_unavailable",
                                          f"the appliance could not record the certificate in its audit log: {exc}")
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return response, status
    return None


@bp.get("/v1/ca.pem")
def ca_pem() -> Response:
    return Response(_enrollment().ca.certificate_pem, mimetype="application/x-pem-file")
