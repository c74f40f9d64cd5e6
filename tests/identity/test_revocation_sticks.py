"""Revocation sticks, through the real ``tollgate enroll-server`` (gunicorn, two workers) and
the real CLI: a revoked identity can't re-enroll until reinstated, and a token enrolls once."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from appliance.lab.oidc_issuer import DevIssuer
from tests.identity import ec_key, make_csr
from tests.identity.dev_flows import AGENT_ID, AGENT_SECRET, client_credentials_token
from tests.identity.enroll_server import EnrollServer, tollgate
from tests.identity.tls_helpers import TlsFiles, client_context
from tests.webui import Appliance

WORKERS = 2


@pytest.fixture(scope="module")
def server(appliance: Appliance) -> Iterator[EnrollServer]:  # overrides conftest's: more than one worker
    server = EnrollServer(appliance, workers=WORKERS)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "client-secret"
    path.write_text(AGENT_SECRET + "\n")
    path.chmod(0o600)
    return path


def agent_enroll(server: EnrollServer, appliance: Appliance, issuer: DevIssuer, tls: TlsFiles,
                 secret_file: Path, out_dir: Path) -> subprocess.CompletedProcess[str]:
    return tollgate("enroll", "--url", server.url, "--client-id", AGENT_ID, "--client-secret-file", str(secret_file),
                    "--issuer", issuer.url, "--issuer-ca-file", str(tls.ca_file),
                    "--ca-file", str(appliance.state_dir / "ca" / "ca.crt"), "--out-dir", str(out_dir), "--no-root")


def certs(appliance: Appliance, *args: str) -> subprocess.CompletedProcess[str]:
    return tollgate("certs", *args, "--state-dir", str(appliance.state_dir))


def test_revoked_agent_cannot_re_enroll_with_its_secret_until_reinstated(
        server: EnrollServer, appliance: Appliance, issuer: DevIssuer, tls: TlsFiles, secret_file: Path,
        tmp_path: Path) -> None:
    first = agent_enroll(server, appliance, issuer, tls, secret_file, tmp_path / "a")
    assert first.returncode == 0, first.stderr

    revoked = certs(appliance, "revoke", "--subject", AGENT_ID, "--reason", "secret leaked", "--by", "ops")
    assert revoked.returncode == 0, revoked.stderr
    assert f"'{AGENT_ID}' cannot enroll again until reinstated" in revoked.stdout

    again = agent_enroll(server, appliance, issuer, tls, secret_file, tmp_path / "b")
    assert again.returncode == 1
    assert again.stderr.strip().startswith(f"tollgate enroll: enrollment refused (HTTP 403 identity_revoked): "
                                           f"identity '{AGENT_ID}' was revoked at ")
    assert "by ops: secret leaked; it cannot enroll until an operator reinstates it" in again.stderr
    assert not (tmp_path / "b" / "postgresql.crt").exists()

    reinstated = certs(appliance, "reinstate", "--subject", AGENT_ID, "--reason", "secret rotated", "--by", "ops")
    assert reinstated.returncode == 0, reinstated.stderr
    assert f"reinstated '{AGENT_ID}'" in reinstated.stdout
    after = agent_enroll(server, appliance, issuer, tls, secret_file, tmp_path / "c")
    assert after.returncode == 0, after.stderr

    listed = certs(appliance, "list", "--json")
    statuses = sorted(r["status"] for r in json.loads(listed.stdout) if r["subject"] == AGENT_ID)
    assert statuses == ["revoked", "valid"]


def test_a_token_file_enrolls_once(server: EnrollServer, appliance: Appliance, issuer: DevIssuer, tls: TlsFiles,
                                   tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(client_credentials_token(issuer, tls))
    ca = str(appliance.state_dir / "ca" / "ca.crt")
    first = tollgate("enroll", "--url", server.url, "--token-file", str(token_file), "--ca-file", ca,
                     "--out-dir", str(tmp_path / "a"), "--no-root")
    assert first.returncode == 0, first.stderr
    second = tollgate("enroll", "--url", server.url, "--token-file", str(token_file), "--ca-file", ca,
                      "--out-dir", str(tmp_path / "b"), "--no-root")
    assert second.returncode == 1
    assert second.stderr.startswith("tollgate enroll: enrollment refused (HTTP 403 token_already_used): "
                                    "this token (jti '")


def test_one_token_sent_at_once_to_every_worker_enrolls_one_certificate(
        server: EnrollServer, appliance: Appliance, issuer: DevIssuer, tls: TlsFiles) -> None:
    import urllib.error
    import urllib.request

    token = client_credentials_token(issuer, tls)
    context = client_context(appliance.state_dir / "ca" / "ca.crt")

    def attempt(_: int) -> tuple[int, str | None]:
        body = json.dumps({"token": token, "csr": make_csr(ec_key()).decode()}).encode()
        request = urllib.request.Request(f"{server.url}/v1/enroll", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, context=context, timeout=60) as response:
                return response.status, None
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())["error"]

    with ThreadPoolExecutor(8) as pool:
        statuses = sorted(pool.map(attempt, range(8)), key=lambda s: (s[0], s[1] or ""))
    assert statuses == [(200, None)] + [(403, "token_already_used")] * 7
