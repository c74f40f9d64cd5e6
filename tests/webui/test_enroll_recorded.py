"""Certificate issuance and revocation land in the audit log through the proxy's control
socket; with the proxy down, issuance fails closed and a revocation stands but says it is
unrecorded."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from flask import Flask

from appliance.audit.keys import init_audit_dir
from appliance.audit.reader import AuditReader, parse
from appliance.audit.store import AuditLog
from appliance.config import Config, ConfigError, load_config
from appliance.identity import cli as identity_cli
from appliance.identity.registry import format_serial
from appliance.lab.oidc_issuer import DevIssuer
from tests.audit.running import running_proxy
from tests.identity import ec_key, make_csr
from tests.identity.dev_flows import id_token
from tests.identity.tls_helpers import TlsFiles, make_tls_files
from tests.webui import Appliance, make_appliance, start_issuer
from webui import create_app


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def issuer(tls: TlsFiles) -> Iterator[DevIssuer]:
    issuer = start_issuer(tls)
    yield issuer
    issuer.stop()


@pytest.fixture
def appliance(tmp_path: Path, issuer: DevIssuer, tls: TlsFiles) -> Appliance:
    appliance = make_appliance(tmp_path, issuer.url, tls.ca_file)
    text = appliance.config_path.read_text()
    appliance.config_path.write_text(f'[proxy]\ncontrol_socket = "{tmp_path / "control.sock"}"\n\n' + text
                                     + '\n[audit]\ndir = "audit"\norigin = "tollgate.test/admin"\n')
    config = appliance.config()
    assert config.audit is not None
    init_audit_dir(config.audit)
    return appliance


@pytest.fixture
def app(appliance: Appliance) -> Iterator[Flask]:
    app = create_app(appliance.config())
    yield app
    app.extensions["tollgate.enroll"].close()


def admin_records(config: Config) -> list[dict[str, Any]]:
    assert config.audit is not None
    return [r for r in (parse(e.line) for e in AuditReader(config.audit.dir).records()) if r["type"] == "admin"]


def enroll(app: Flask, issuer: DevIssuer, tls: TlsFiles) -> Any:
    csr = make_csr(ec_key()).decode()
    return app.test_client().post("/v1/enroll", json={"token": id_token(issuer, tls), "csr": csr})


def certs_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    identity_cli.register(parser.add_subparsers(required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_issuance_is_recorded_before_the_certificate_is_returned(
        app: Flask, appliance: Appliance, issuer: DevIssuer, tls: TlsFiles) -> None:
    config = appliance.config()
    with running_proxy(config):
        response = enroll(app, issuer, tls)
    assert response.status_code == 200, response.json
    serial = format_serial(x509.load_pem_x509_certificate(response.json["certificate"].encode()).serial_number)
    [record] = admin_records(config)
    assert record["action"] == "certificate.issue" and record["object"] == serial
    assert record["user"] == response.json["identity"]["uri"] and record["subject"] == "alice"
    assert record["groups"] == "dba,payments-ro" and record["outcome"] == "success"
    assert record["not_after"] == response.json["not_after"]


def test_with_the_proxy_down_issuance_is_recorded_by_opening_the_log(
        app: Flask, appliance: Appliance, issuer: DevIssuer, tls: TlsFiles) -> None:
    response = enroll(app, issuer, tls)
    assert response.status_code == 200, response.json
    [record] = admin_records(appliance.config())
    assert record["action"] == "certificate.issue" and record["object"] == response.json["serial"]


def test_issuance_fails_closed_when_the_log_cannot_be_written(
        app: Flask, appliance: Appliance, issuer: DevIssuer, tls: TlsFiles) -> None:
    config = appliance.config()
    assert config.audit is not None
    holder = AuditLog.open(config.audit, version="t")  # a writer holds the log, and answers no control socket
    try:
        response = enroll(app, issuer, tls)
    finally:
        holder.close()
    assert response.status_code == 503
    assert response.json["error"] == "audit_unavailable" and "in use by pid" in response.json["detail"]
    assert response.headers["Retry-After"]
    assert "certificate" not in response.json
    registry = appliance.registry()
    try:
        [issued] = registry.list(include_expired=True)
        assert issued.revoked and issued.revoked_reason == "issuance could not be recorded in the audit log"
    finally:
        registry.close()
    assert admin_records(config) == []


def test_audit_without_a_control_socket_is_refused_at_start(appliance: Appliance) -> None:
    text = appliance.config_path.read_text()
    appliance.config_path.write_text(text[text.index("[identity]"):])
    with pytest.raises(ConfigError, match=r"proxy\.control_socket"):
        create_app(load_config(appliance.config_path))


def test_revocations_and_reinstatements_are_recorded(
        app: Flask, appliance: Appliance, issuer: DevIssuer, tls: TlsFiles,
        capsys: pytest.CaptureFixture[str]) -> None:
    config = appliance.config()
    common = ("--state-dir", str(appliance.state_dir), "-c", str(appliance.config_path))
    with running_proxy(config):
        first = enroll(app, issuer, tls).json["serial"]
        enroll(app, issuer, tls)
        assert certs_cli("certs", "revoke", first, "--reason", "laptop lost", "--by", "ops", *common) == 0
        assert certs_cli("certs", "revoke", "--subject", "alice", "--reason", "left", "--by", "ops", *common) == 0
        assert certs_cli("certs", "reinstate", "--subject", "alice", "--reason", "back", "--by", "hr", *common) == 0
    actions = [(r["action"], r["user"], r.get("reason")) for r in admin_records(config)]
    assert actions[2:] == [("certificate.revoke", "ops", "laptop lost"), ("identity.revoke", "ops", "left"),
                           ("identity.reinstate", "hr", "back")]
    assert admin_records(config)[2]["object"] == first

    # The log can't be written (a writer holds it and answers no control socket): the
    # revocation stands (a revocation never waits), and the command says it is unrecorded.
    capsys.readouterr()
    registry = appliance.registry()
    try:
        second = next(r for r in registry.list(include_expired=True) if r.serial_hex != first)
        registry.reinstate_subject("alice", "test", "test")
    finally:
        registry.close()
    assert config.audit is not None
    holder = AuditLog.open(config.audit, version="t")
    try:
        assert certs_cli("certs", "revoke", "--subject", "alice", "--reason", "again", *common) == 1
    finally:
        holder.close()
    assert "NOT recorded in the audit log" in capsys.readouterr().err
    registry = appliance.registry()
    try:
        assert registry.revoked_subject("alice") is not None and registry.is_revoked(second.serial)
    finally:
        registry.close()
