"""Getting tokens from a DevIssuer the way real clients do: the two OAuth grants."""

from __future__ import annotations

from urllib.parse import parse_qs, urlencode, urlsplit

from appliance.lab.oidc_issuer import DevIssuer
from tests.identity.tls_helpers import TlsFiles, https_json, https_request

AUDIENCE = "tollgate"  # also the id of the login client: an ID token's aud is its client
REDIRECT = "http://127.0.0.1:8765/callback"
AGENT_ID, AGENT_SECRET = "agent-ci", "ci-secret"


def client_credentials_token(issuer: DevIssuer, tls: TlsFiles) -> str:
    """An agent's access token through the client-credentials grant."""
    status, body = https_json(f"{issuer.url}/token", tls.ca_file, basic=(AGENT_ID, AGENT_SECRET),
                              form={"grant_type": "client_credentials"})
    assert status == 200, body
    return body["access_token"]


def id_token(issuer: DevIssuer, tls: TlsFiles, nonce: str = "n-0S6_WzA2Mj") -> str:
    """A person's ID token through the real authorization-code flow (auto-approved)."""
    query = urlencode({"response_type": "code", "client_id": AUDIENCE, "redirect_uri": REDIRECT,
                       "state": "st", "nonce": nonce})
    status, headers, _ = https_request(f"{issuer.url}/authorize?{query}", tls.ca_file)
    assert status == 302
    code = parse_qs(urlsplit(headers["Location"]).query)["code"][0]
    status, body = https_json(f"{issuer.url}/token", tls.ca_file, basic=(AUDIENCE, "tollgate-secret"),
                              form={"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT})
    assert status == 200, body
    return body["id_token"]
