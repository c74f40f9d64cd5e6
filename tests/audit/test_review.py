"""``tollgate audit review``: each planted anomaly is found, alerted (webhook and syslog)
and the review recorded; a clean log yields nothing, and a second review starts where the
first stopped."""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
import types
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from appliance.audit import cli as audit_cli
from appliance.audit import store_checkpoints
from appliance.audit.keys import init_audit_dir
from appliance.audit.reader import AuditReader, parse
from appliance.audit.review import review
from appliance.audit.store import AuditLog
from appliance.config import Config, load_config
from tests.audit.records import session_records

ORIGIN = "tollgate.test/review"
PAN = "4111 1111 1111 1111"


def write_config(tmp_path: Path) -> Config:
    path = tmp_path / "tollgate.toml"
    path.write_text(f'[audit]\ndir = "audit"\norigin = "{ORIGIN}"\nheartbeat_seconds = 60\n')
    config = load_config(path)
    assert config.audit is not None
    init_audit_dir(config.audit)
    return config


class Webhook:
    """A real HTTP server that keeps what is POSTed to it."""

    def __init__(self) -> None:
        bodies: list[dict[str, Any]] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.bodies = bodies
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


@pytest.fixture
def syslog(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = tmp_path / "log.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    yield f"unix:{path}", sock
    sock.close()


class Clock:
    """The checkpoints' clock, which the test moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        fake = types.SimpleNamespace(time=lambda: time.time() + self.offset, monotonic=time.monotonic,
                                     strftime=time.strftime, gmtime=time.gmtime)
        monkeypatch.setattr(store_checkpoints, "time", fake)


def run_review(config: Config, *extra: str) -> int:
    parser = argparse.ArgumentParser()
    audit_cli.register(parser.add_subparsers(required=True))
    args = parser.parse_args(["audit", "review", "-c", str(config.path), *extra])
    return args.handler(args)


def base(**fields: Any) -> dict[str, Any]:
    return {"user": "agent-x", "origin": "10.0.0.9:5555", "object": "payments/cards", "outcome": "failure",
            **fields}


def test_a_clean_log_gives_no_finding_and_the_next_review_starts_where_it_stopped(
        tmp_path: Path, webhook: Webhook, syslog: tuple[str, socket.socket],
        capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    assert config.audit is not None
    log = AuditLog.open(config.audit, version="t")
    for sid in ("A", "B"):
        for record in session_records(sid, 5, approval=f"apr-{sid}"):
            log.append(record)
        log.append(base(type="approval.decision", outcome="success", approval=f"apr-{sid}", decision="approve",
                        approver="dba-1", reason="fine"))
    log.close()

    address, sock = syslog
    assert run_review(config, "--alert-webhook", webhook.url, "--alert-syslog", address) == 0
    out = capsys.readouterr().out
    assert "verified" in out and "0 finding(s)" in out
    assert webhook.bodies == []
    with pytest.raises(BlockingIOError):
        sock.recv(65536)

    reviews = [parse(e.line) for e in AuditReader(config.audit.dir).records() if b'"type":"review"' in e.line]
    [first] = reviews
    assert first["outcome"] == "success" and first["verified"] is True and first["findings"] == 0
    assert first["from_seq"] == 0

    second = review(config)
    assert second.clean and second.from_seq == first["to_seq"]


def test_each_planted_anomaly_is_found_recorded_and_alerted(
        tmp_path: Path, webhook: Webhook, syslog: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_config(tmp_path)
    assert config.audit is not None
    clock = Clock()
    clock.install(monkeypatch)
    log = AuditLog.open(config.audit, version="t")
    for record in session_records("A", 3):
        log.append(record)
    planted = {
        "blocked_statement": base(type="statement", session="A", stmt=9, kind="query", text="DROP TABLE cards",
                                  decision="block", rule="no-ddl", sqlstate="42501", message="blocked by no-ddl"),
        "approval_denied": base(type="approval.decision", approval="apr-1", decision="deny", approver="dba-1",
                                reason="not today"),
        "approval_timeout": base(type="approval.decision", approval="apr-2", decision="timeout",
                                 approver="tollgate", reason="nobody decided"),
        "auth_failure": base(type="auth.failure", session="C", reason="certificate revoked"),
        "session_refused": base(type="session.refused", session="D", reason="no such target"),
        "fail_closed": base(type="session.end", session="E", outcome="success",
                            reason="Tollgate failed closed: RuntimeError: masking broke"),
        "pan_in_record": base(type="statement", session="F", stmt=1, kind="query", decision="allow",
                              outcome="success", text=f"SELECT '{PAN}'"),
        "unmatched_flow": base(type="flow.unmatched", user="unknown", origin="198.18.0.7:40000",
                               object="flow:198.19.0.5:5432"),
    }
    seqs = {kind: log.append(dict(record)) for kind, record in planted.items()}
    log.checkpoint_now()
    clock.offset = 3600.0  # an hour with no checkpoint while the writer runs: a heartbeat gap
    log.append(base(type="statement", session="G", stmt=1, kind="query", decision="allow", outcome="success",
                    text="SELECT 1"))
    log.checkpoint_now()
    log.close()

    address, sock = syslog
    assert run_review(config, "--alert-webhook", webhook.url, "--alert-syslog", address) == 3

    [alert] = webhook.bodies
    counts = alert["counts"]
    for kind in planted:
        assert counts.get(kind) == 1, (kind, counts)
    assert counts.get("heartbeat_gap") == 1
    # the only verification failure is the planted card number, which the verifier finds too
    assert counts.get("verification") == 1 and alert["verified"] is False
    by_kind = {f["kind"]: f for f in alert["listed"]}
    for kind, seq in seqs.items():
        assert by_kind[kind]["seq"] == seq
    assert "3600 s without a checkpoint" in by_kind["heartbeat_gap"]["summary"]
    assert PAN not in json.dumps(alert) and PAN.replace(" ", "") not in json.dumps(alert)

    line = sock.recv(65536).decode()
    assert line.startswith("<84>") and "tollgate-review findings 10" in line

    [recorded] = [parse(e.line) for e in AuditReader(config.audit.dir).records() if b'"type":"review"' in e.line]
    assert recorded["outcome"] == "failure" and recorded["findings"] == 10
    assert recorded["counts"] == counts and recorded["seq"] == alert["record_seq"]


def test_with_the_proxy_running_the_review_is_recorded_through_its_control_socket(tmp_path: Path) -> None:
    from tests.audit.running import running_proxy
    path = write_config(tmp_path).path
    path.write_text(f'[proxy]\ncontrol_socket = "{tmp_path / "control.sock"}"\n' + path.read_text())
    config = load_config(path)
    assert config.audit is not None
    with running_proxy(config) as log:
        log.append(base(type="auth.failure", session="C", reason="unknown certificate"))
        result = review(config)
        assert result.counts == {"auth_failure": 1} and result.verified
        assert result.record_seq is not None
        entry = AuditReader(config.audit.dir).find(result.record_seq)
        assert entry is not None
        recorded = parse(entry.line)
    assert recorded["type"] == "review" and recorded["run"] == log.run  # the proxy's writer appended it
