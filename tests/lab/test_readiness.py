"""Waiting for a service to serve (appliance.lab.readiness), against real processes on 127.0.0.1.

No namespaces and no root: the "service" is a small HTTPS server in a subprocess that logs to
a file, as the lab's services do. Every wait ends on an event — a line in the log, the
process exiting, the probe's answer — and the module's safety net is never reached.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.lab.readiness import NotReady, https_probe_argv, wait_for_answer, wait_for_line
from tests.identity.tls_helpers import TlsFiles, make_tls_files

SERVICE = """\
import http.server, ssl, sys
status, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
context.load_cert_chain(cert, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
print(f"svc: ready on https://127.0.0.1:{server.server_address[1]}", file=sys.stderr, flush=True)
server.serve_forever()
"""
READY = re.compile(r"svc: ready on (https://127\.0\.0\.1:\d+)")


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


class Services:
    """Starts scripts as the lab starts services: output to a log file, killed at the end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], log: Path | None = None) -> tuple[subprocess.Popen[bytes], Path]:
        log = log or self.directory / f"service-{len(self.procs)}.log"
        with open(log, "ab") as fh:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc, log

    def https(self, tls: TlsFiles, status: int = 200) -> tuple[subprocess.Popen[bytes], Path]:
        return self.start([sys.executable, "-c", SERVICE, str(status), str(tls.cert_file), str(tls.key_file)])

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    services = Services(tmp_path)
    yield services
    services.stop()


def url_in(log: Path) -> str:
    match = READY.search(log.read_text())
    assert match, log.read_text()
    return match.group(1)


def test_a_service_is_ready_once_it_said_so_and_answers(services: Services, tls: TlsFiles) -> None:
    proc, log = services.https(tls)
    wait_for_line(proc, log, "svc: ready", "svc")
    wait_for_answer(proc, log, "svc", https_probe_argv(url_in(log) + "/healthz", tls.ca_file))
    assert proc.poll() is None


def test_a_service_that_dies_after_its_ready_line_is_not_ready(services: Services, tls: TlsFiles) -> None:
    # gunicorn's way when a worker fails to boot: it listened and said so, then it stopped.
    script = ("import sys; print('svc: ready on https://127.0.0.1:9', file=sys.stderr, flush=True); "
              "print('Worker failed to boot.', file=sys.stderr); sys.exit(3)")
    proc, log = services.start([sys.executable, "-c", script])
    wait_for_line(proc, log, "svc: ready", "svc")
    with pytest.raises(NotReady, match=r"(?s)svc exited \(status 3\) before it was ready.*Worker failed to boot"):
        wait_for_answer(proc, log, "svc", https_probe_argv("https://127.0.0.1:9/healthz", tls.ca_file))


def test_a_service_that_exits_without_its_ready_line_says_why(services: Services) -> None:
    proc, log = services.start([sys.executable, "-c", "import sys; sys.exit('svc: bad config: kaboom')"])
    with pytest.raises(NotReady, match=r"(?s)svc exited \(status 1\) before it was ready.*kaboom"):
        wait_for_line(proc, log, "svc: ready", "svc")


def test_a_ready_line_from_an_earlier_run_does_not_count(services: Services, tmp_path: Path) -> None:
    log = tmp_path / "appended.log"
    log.write_text("svc: ready on https://127.0.0.1:9\n")  # the last run's
    offset = log.stat().st_size
    proc, _ = services.start([sys.executable, "-c", "import sys; sys.exit('svc: starting, then not')"], log)
    with pytest.raises(NotReady, match="svc exited"):
        wait_for_line(proc, log, "svc: ready", "svc", offset=offset)


def test_an_answer_that_is_not_2xx_is_not_ready(services: Services, tls: TlsFiles) -> None:
    proc, log = services.https(tls, status=503)
    wait_for_line(proc, log, "svc: ready", "svc")
    with pytest.raises(NotReady, match=r"svc is running but did not answer: .*HTTP 503"):
        wait_for_answer(proc, log, "svc", https_probe_argv(url_in(log) + "/healthz", tls.ca_file))


def test_an_untrusted_certificate_is_not_an_answer(services: Services, tls: TlsFiles, tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    other = make_tls_files(tmp_path / "other")
    proc, log = services.https(tls)
    wait_for_line(proc, log, "svc: ready", "svc")
    with pytest.raises(NotReady, match="CERTIFICATE_VERIFY_FAILED"):
        wait_for_answer(proc, log, "svc", https_probe_argv(url_in(log) + "/healthz", other.ca_file))
