"""``tollgate enroll``: get a client certificate from the appliance's enrollment service.

The private key is generated here (EC P-256) and never leaves this machine: only a CSR is
sent, with an empty subject, because the appliance decides the names from the token. The
token is an ID token from a file or stdin (people), or an access token this command gets
itself with the client-credentials grant (agents). The answer is checked before anything
is written — the certificate must be for our key and chain to the returned CA — and then
written where libpq looks by default: ``~/.postgresql/postgresql.crt`` (0644),
``postgresql.key`` (0600), and the appliance CA added to ``root.crt`` so
``sslmode=verify-full`` works.

TLS is always verified: the enrollment server against ``--ca-file`` or the system's
trusted CAs, the issuer against ``--issuer-ca-file`` or the system's. Nothing is ever
fetched insecurely, and redirects are never followed. Tokens and secrets are never printed.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import ssl
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from appliance.identity.ca import CertificateAuthority, write_file_atomically
from appliance.identity.certs import (
    certificate_pem,
    identity_from_certificate,
    not_valid_after,
    not_valid_before,
    private_key_pem,
    utcnow,
)
from appliance.model.identity import Identity, IdentityError

DEFAULT_OUT_DIR = Path("~/.postgresql")
CERT_FILE, KEY_FILE, ROOT_FILE = "postgresql.crt", "postgresql.key", "root.crt"
MAX_RESPONSE_BYTES = 1 << 20
DEFAULT_TIMEOUT = 30.0
_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


class EnrollError(Exception):
    """Enrollment failed; the message says why and, where it can, what to do."""


# --- HTTPS --------------------------------------------------------------------------------

class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a redirect could lead a token to a server we never chose


def _https(url: str, context: ssl.SSLContext, timeout: float, *, data: bytes | None = None,
           headers: dict[str, str] | None = None, trust_hint: str = "") -> tuple[int, bytes]:
    """One verified HTTPS request: (status, body) for any HTTP answer, EnrollError for none."""
    if urlsplit(url).scheme != "https":
        raise EnrollError(f"refusing {url}: only https:// URLs are used")
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), _NoRedirect)
    request = urllib.request.Request(url, data=data, headers={"Accept": "application/json", **(headers or {})})
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, response.read(MAX_RESPONSE_BYTES)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(MAX_RESPONSE_BYTES)
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise EnrollError(f"cannot verify the TLS certificate of {url}: {reason.verify_message}"
                              + (f" ({trust_hint})" if trust_hint else "")) from None
        raise EnrollError(f"cannot reach {url}: {reason}") from None
    except (OSError, ValueError) as exc:
        raise EnrollError(f"cannot reach {url}: {exc}") from None


def _json(url: str, status: int, body: bytes) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        snippet = body[:200].decode(errors="replace").strip()
        raise EnrollError(f"{url} answered HTTP {status} with something that is not JSON: {snippet!r}") from None
    if not isinstance(document, dict):
        raise EnrollError(f"{url} answered HTTP {status} with JSON that is not an object")
    return document


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """Verifying context: only ``ca_file`` if given, else the system's trusted CAs."""
    try:
        return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise EnrollError(f"cannot load CA file {ca_file}: {exc}") from None


# --- tokens -------------------------------------------------------------------------------

def read_token(token_file: Path | None, stdin: bool) -> str:
    """A token from a file or stdin, surrounding whitespace removed."""
    try:
        text = sys.stdin.read() if stdin else token_file.read_text()  # type: ignore[union-attr]
    except OSError as exc:
        raise EnrollError(f"cannot read the token file {token_file}: {exc.strerror}") from None
    token = text.strip()
    if not token:
        raise EnrollError(f"no token in {'stdin' if stdin else token_file}")
    return token


def client_credentials_token(issuer: str, client_id: str, secret: str, context: ssl.SSLContext, *,
                             scope: str | None = None, audience: str | None = None,
                             timeout: float = DEFAULT_TIMEOUT) -> str:
    """An access token from the issuer's token endpoint (found by discovery)."""
    discovery_url = issuer.rstrip("/") + "/.well-known/openid-configuration"
    hint = "is --issuer-ca-file the CA that issued the issuer's certificate?"
    status, body = _https(discovery_url, context, timeout, trust_hint=hint)
    if status != 200:
        raise EnrollError(f"cannot discover the issuer: {discovery_url} answered HTTP {status}")
    document = _json(discovery_url, status, body)
    # Only the path is ours to tolerate: a document for another issuer must not pick the endpoint.
    if str(document.get("issuer", "")).rstrip("/") != issuer.rstrip("/"):
        raise EnrollError(f"{discovery_url} names issuer {document.get('issuer')!r}, not {issuer!r}")
    endpoint = document.get("token_endpoint")
    if not isinstance(endpoint, str) or urlsplit(endpoint).scheme != "https":
        raise EnrollError(f"the issuer's discovery document has no https token_endpoint (got {endpoint!r})")
    form = {"grant_type": "client_credentials"}
    if scope:
        form["scope"] = scope
    if audience:
        form["audience"] = audience
    # client_secret_basic; RFC 6749 §2.3.1 form-encodes both parts before base64.
    basic = base64.b64encode(f"{quote(client_id, safe='')}:{quote(secret, safe='')}".encode()).decode()
    status, body = _https(endpoint, context, timeout, data=urlencode(form).encode(),
                          headers={"Authorization": f"Basic {basic}",
                                   "Content-Type": "application/x-www-form-urlencoded"}, trust_hint=hint)
    answer = _json(endpoint, status, body)
    if status != 200:
        detail = answer.get("error_description") or answer.get("error") or "no reason given"
        raise EnrollError(f"the issuer refused the client-credentials grant for {client_id!r} "
                          f"(HTTP {status}): {detail}")
    token = answer.get("access_token")
    if not isinstance(token, str) or not token:
        raise EnrollError(f"the issuer's token response from {endpoint} has no access_token")
    return token


# --- enrollment ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Enrolled:
    """What enrollment produced, checked: the certificate is for our key and from the CA."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    ca: x509.Certificate
    identity: Identity


def new_key_and_csr() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A fresh P-256 key and a CSR for it with an empty subject: the appliance picks the names."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return key, csr.public_bytes(serialization.Encoding.PEM)


def _public_der(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def enroll(url: str, token: str, context: ssl.SSLContext, *, timeout: float = DEFAULT_TIMEOUT) -> Enrolled:
    """Generate a key, send its CSR with ``token``, and check what comes back."""
    key, csr_pem = new_key_and_csr()
    endpoint = url.rstrip("/") + "/v1/enroll"
    # The token goes in the body rather than a header: bodies have room for large IdP tokens.
    payload = json.dumps({"token": token, "csr": csr_pem.decode()}).encode()
    status, body = _https(endpoint, context, timeout, data=payload, headers={"Content-Type": "application/json"},
                          trust_hint="pass the appliance CA with --ca-file; on the appliance it is "
                                     "<state_dir>/ca/ca.crt")
    answer = _json(endpoint, status, body)
    if status != 200:
        error = f"HTTP {status}" + (f" {answer['error']}" if answer.get("error") else "")
        raise EnrollError(f"enrollment refused ({error}): {answer.get('detail') or 'no reason given'}")
    try:
        cert = x509.load_pem_x509_certificate(str(answer["certificate"]).encode())
        ca = x509.load_pem_x509_certificate(str(answer["ca"]).encode())
    except (KeyError, ValueError) as exc:
        raise EnrollError(f"the enrollment response has no usable certificate and CA: {exc}") from None
    if _public_der(cert.public_key()) != _public_der(key.public_key()):
        raise EnrollError("the enrollment server returned a certificate for another key; nothing was written")
    try:
        # Checked as of its own start: our clock need not agree with the appliance's, and the
        # proxy checks validity when it matters. What counts here is who signed it, for what.
        CertificateAuthority(ca).verify_client_chain(cert, now=not_valid_before(cert))
        identity = identity_from_certificate(cert)
    except IdentityError as exc:
        raise EnrollError(f"the returned certificate is not usable: {exc}; nothing was written") from None
    return Enrolled(key, cert, ca, identity)


# --- files --------------------------------------------------------------------------------

def _with_root(existing: bytes, ca_pem: bytes) -> bytes | None:
    """``existing`` bundle plus the CA, or None when the CA is already in it."""
    present = []
    # By hand: cryptography 38 has no loader for a PEM bundle.
    for block in _PEM_CERTIFICATE.findall(existing):
        try:
            present.append(x509.load_pem_x509_certificate(block))
        except ValueError:
            continue  # a bad entry is the bundle owner's business; keep it as it is
    ca = x509.load_pem_x509_certificate(ca_pem)
    if any(c == ca for c in present):
        return None
    return existing + (b"" if not existing or existing.endswith(b"\n") else b"\n") + ca_pem


def write_files(enrolled: Enrolled, out_dir: Path, *, root: bool = True) -> dict[str, Path]:
    """Key (0600), certificate (0644) and, with ``root``, the CA in ``root.crt``; each atomic."""
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths = {"key": out_dir / KEY_FILE, "certificate": out_dir / CERT_FILE}
    # Key first, so a certificate on disk always has its key beside it.
    write_file_atomically(paths["key"], private_key_pem(enrolled.key), mode=0o600, overwrite=True)
    write_file_atomically(paths["certificate"], certificate_pem(enrolled.certificate), mode=0o644, overwrite=True)
    if root:
        # root.crt may trust other servers too: add the appliance CA, keep the rest.
        paths["root"] = out_dir / ROOT_FILE
        try:
            existing = paths["root"].read_bytes()
        except FileNotFoundError:
            existing = b""
        bundle = _with_root(existing, certificate_pem(enrolled.ca))
        if bundle is not None:
            write_file_atomically(paths["root"], bundle, mode=0o644, overwrite=True)
    return paths


def describe_remaining(until: datetime, now: datetime | None = None) -> str:
    """``in 7h59m``, ``in 2d3h``, ``in 42s`` — or ``already expired``."""
    left = until - (utcnow() if now is None else now)
    if left <= timedelta(0):
        return "already expired"
    seconds = int(left.total_seconds())
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        return f"in {days}d{hours}h"
    if hours:
        return f"in {hours}h{minutes:02d}m"
    return f"in {minutes}m" if minutes else f"in {seconds}s"


# --- CLI ----------------------------------------------------------------------------------

def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "enroll", help="get a client certificate from the appliance with an OIDC token",
        description="Generate a key locally, send a CSR and an OIDC token to the appliance, and write the "
                    "certificate where libpq finds it. The key never leaves this machine.")
    parser.add_argument("--url", required=True, help="the enrollment service, https://HOST:PORT")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--token-file", type=Path, metavar="FILE", help="read the token (e.g. an ID token) from FILE")
    source.add_argument("--token", metavar="-", help="read the token from stdin (only '-': a token on the "
                                                     "command line would show in ps)")
    source.add_argument("--client-id", metavar="ID", help="get an access token with the client-credentials "
                                                          "grant (needs --client-secret-file and --issuer)")
    parser.add_argument("--client-secret-file", type=Path, metavar="FILE")
    parser.add_argument("--issuer", metavar="URL", help="the OIDC issuer (its token endpoint is discovered)")
    parser.add_argument("--scope", help="scope to request with the client-credentials grant")
    parser.add_argument("--audience", help="audience to request (some issuers, e.g. Auth0, need it)")
    parser.add_argument("--ca-file", type=Path, metavar="FILE",
                        help="CA to trust for the enrollment server (the appliance CA); default: system CAs")
    parser.add_argument("--issuer-ca-file", type=Path, metavar="FILE",
                        help="CA to trust for the issuer; default: system CAs")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR,
                        help="where to write postgresql.crt/.key and root.crt (default: %(default)s)")
    parser.add_argument("--no-root", action="store_true", help="do not add the appliance CA to root.crt")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per HTTP request")
    parser.set_defaults(handler=cmd_enroll)


def _token_from_args(args: argparse.Namespace) -> str:
    if args.client_id is None:
        for name in ("client_secret_file", "issuer", "scope", "audience"):
            if getattr(args, name):
                raise EnrollError(f"--{name.replace('_', '-')} goes with --client-id")
    if args.token is not None:
        if args.token != "-":
            raise EnrollError("--token takes only '-' (stdin): a token on the command line shows in ps; "
                              "or use --token-file")
        return read_token(None, stdin=True)
    if args.token_file is not None:
        return read_token(args.token_file, stdin=False)
    if args.client_secret_file is None or args.issuer is None:
        raise EnrollError("--client-id needs --client-secret-file and --issuer")
    try:
        secret = args.client_secret_file.read_text().strip()
    except OSError as exc:
        raise EnrollError(f"cannot read the client secret file {args.client_secret_file}: {exc.strerror}") from None
    if not secret:
        raise EnrollError(f"the client secret file {args.client_secret_file} is empty")
    return client_credentials_token(args.issuer, args.client_id, secret, tls_context(args.issuer_ca_file),
                                    scope=args.scope, audience=args.audience, timeout=args.timeout)


def cmd_enroll(args: argparse.Namespace) -> int:
    try:
        if urlsplit(args.url).scheme != "https" or not urlsplit(args.url).hostname:
            raise EnrollError(f"--url {args.url!r} must be an https://HOST:PORT URL")
        token = _token_from_args(args)
        enrolled = enroll(args.url, token, tls_context(args.ca_file), timeout=args.timeout)
        paths = write_files(enrolled, args.out_dir.expanduser(), root=not args.no_root)
    except (EnrollError, IdentityError) as exc:
        print(f"tollgate enroll: {exc}", file=sys.stderr)
        return 1
    identity, end = enrolled.identity, not_valid_after(enrolled.certificate)
    print(f"enrolled as {identity.kind} {identity.display}"
          + (f" (subject {identity.subject})" if identity.display != identity.subject else ""))
    print(f"  groups:      {', '.join(identity.groups) or '(none)'}")
    print(f"  serial:      {enrolled.certificate.serial_number:032X}")
    print(f"  certificate: {paths['certificate']}")
    print(f"  key:         {paths['key']} (0600; generated here, never sent)")
    if "root" in paths:
        print(f"  root CA:     {paths['root']} (for sslmode=verify-full)")
    print(f"expires at {end:%Y-%m-%d %H:%M:%S} UTC ({describe_remaining(end)})")
    return 0
