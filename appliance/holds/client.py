"""A small HTTPS client for the approvals API (``webui.approvals``), for ``tollgate approvals``.

TLS is always verified — against the given CA file (the appliance CA, ``[approvals]
api_ca_file``) or the system's trusted CAs — redirects are never followed (they could take
the bearer token somewhere we never chose), and only ``https://`` URLs are used. The token
is sent in the ``Authorization`` header and never printed.
"""

from __future__ import annotations

import ipaddress
import json
import os
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

API_PATH = "/api/v1/approvals"
# The lab's addresses (RFC 2544's benchmarking range): never routed from the host itself.
LAB_RANGE = ipaddress.ip_network("198.18.0.0/15")
MAX_RESPONSE_BYTES = 8 << 20
DEFAULT_TIMEOUT = 30.0


class ClientError(Exception):
    """The API could not be reached or refused the call; ``code`` is the API's error code."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.code = message, status, code


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def in_named_network_namespace() -> bool:
    """Whether this process runs in a named network namespace (``ip netns``, /run/netns/…):
    the lab's are; the host's own is not."""
    try:
        mine = os.stat("/proc/self/ns/net").st_ino
        named = os.listdir("/run/netns")
    except OSError:
        return False
    for name in named:
        try:
            if os.stat(f"/run/netns/{name}").st_ino == mine:
                return True
        except OSError:
            continue
    return False


def refuse_lab_address_outside_lab(url: str) -> None:
    """A lab's address (198.18.0.0/15) is reachable only inside the lab's namespaces: from the
    host's own, the request would leave by the host's default route. Refuse, saying where to
    run the command instead."""
    host = urlsplit(url).hostname or ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return
    if address in LAB_RANGE and not in_named_network_namespace():
        raise ClientError(f"{url} is a lab address ({LAB_RANGE}), reachable only inside the lab's network "
                          "namespaces; run this command there: tollgate lab exec gw -- "
                          f"{Path(sys.executable).with_name('tollgate')} approvals …")


class ApprovalsClient:
    """Calls to ``<url>/api/v1/approvals`` as the holder of ``token``."""

    def __init__(self, url: str, token: str, *, ca_file: Path | None = None, timeout: float = DEFAULT_TIMEOUT):
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ClientError(f"the approvals API URL {url!r} must be https://HOST[:PORT]")
        refuse_lab_address_outside_lab(url)
        self.base = url.rstrip("/") + API_PATH
        self._token = token
        self.timeout = timeout
        try:
            context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise ClientError(f"cannot load CA file {ca_file}: {exc}") from None
        self._ca_file = ca_file
        self._opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), _NoRedirect)

    def list(self, status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        query = {"limit": str(limit), **({"status": status} if status else {})}
        return self._call("GET", "?" + urlencode(query))["approvals"]

    def get(self, request_id: str) -> dict[str, Any]:
        return self._call("GET", "/" + quote(request_id, safe=""))

    def approve(self, request_id: str, reason: str, grant_minutes: int | None = None,
                grant_scope: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"reason": reason}
        if grant_minutes is not None:
            body["grant_minutes"] = grant_minutes
        if grant_scope is not None:
            body["grant_scope"] = grant_scope
        return self._call("POST", f"/{quote(request_id, safe='')}/approve", body)

    def deny(self, request_id: str, reason: str) -> dict[str, Any]:
        return self._call("POST", f"/{quote(request_id, safe='')}/deny", {"reason": reason})

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        url = self.base + path
        headers = {"Accept": "application/json", "Authorization": f"Bearer {self._token}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                status, raw = response.status, response.read(MAX_RESPONSE_BYTES)
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read(MAX_RESPONSE_BYTES)
            exc.close()
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, ssl.SSLCertVerificationError):
                hint = ("" if self._ca_file
                        else " (pass the appliance CA with --ca-file, or set [approvals] api_ca_file)")
                raise ClientError(f"cannot verify the TLS certificate of {url}: "
                                  f"{reason.verify_message}{hint}") from None
            raise ClientError(f"cannot reach the approvals API at {url}: {reason}") from None
        except (OSError, ValueError) as exc:
            raise ClientError(f"cannot reach the approvals API at {url}: {exc}") from None
        try:
            document = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            snippet = raw[:200].decode(errors="replace").strip()
            raise ClientError(f"{url} answered HTTP {status} with something that is not JSON: {snippet!r}",
                              status) from None
        if not isinstance(document, dict):
            raise ClientError(f"{url} answered HTTP {status} with JSON that is not an object", status)
        if status >= 400 or (300 <= status < 400):
            code = document.get("error") if isinstance(document.get("error"), str) else None
            detail = document.get("detail") or code or "no reason given"
            raise ClientError(str(detail), status, code)
        return document


__all__ = ["API_PATH", "ApprovalsClient", "ClientError"]
