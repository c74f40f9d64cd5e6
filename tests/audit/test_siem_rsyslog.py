"""The SIEM export against Debian's rsyslog (imtcp over TLS, gtls driver) in a network
namespace of its own, with ``tollgate audit forward`` running in that namespace: rsyslog
stopped and restarted mid-stream and the audit writer restarted, nothing lost."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.audit.keys import init_audit_dir
from appliance.audit.reader import AuditReader
from appliance.audit.store import AuditLog
from appliance.config import Config, load_config
from tests.audit.records import statement
from tests.identity.tls_helpers import make_tls_files

REPO = Path(__file__).resolve().parents[2]
RSYSLOGD = "/usr/sbin/rsyslogd"
_SEQ = re.compile(r'\[tollgate@32473 seq="(\d+)"')


def wait_for(condition, what: str, timeout: float = 60.0, interval: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)  # polling a file another process writes: there is no event to wait on


@pytest.fixture
def netns() -> Iterator[str]:
    if shutil.which("ip") is None or not os.access(RSYSLOGD, os.X_OK):
        pytest.fail("needs iproute2 and rsyslog (with rsyslog-gnutls): `make host-deps` installs them")
    name = f"tgsiem{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


class Rsyslog:
    def __init__(self, netns: str, directory: Path) -> None:
        self.netns = netns
        self.dir = directory
        (directory / "tls").mkdir()
        tls = make_tls_files(directory / "tls")
        self.ca_file = tls.ca_file
        self.out = directory / "received.log"
        (directory / "work").mkdir()
        self.conf = directory / "rsyslog.conf"
        self.conf.write_text(f'''
global(workDirectory="{directory / "work"}" DefaultNetstreamDriver="gtls"
       DefaultNetstreamDriverCAFile="{tls.ca_file}" DefaultNetstreamDriverCertFile="{tls.cert_file}"
       DefaultNetstreamDriverKeyFile="{tls.key_file}")
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="anon")
input(type="imtcp" port="6514" address="127.0.0.1")
template(name="raw" type="string" string="%rawmsg%\\n")
action(type="omfile" file="{self.out}" template="raw" flushOnTXEnd="on")
''')
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.netns, RSYSLOGD, "-n", "-f", str(self.conf),
                                      "-i", str(self.dir / "rsyslogd.pid")], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        wait_for(lambda: subprocess.run(["ip", "netns", "exec", self.netns, "ss", "-Htln", "sport", "= :6514"],
                                        capture_output=True, text=True).stdout.strip(), "rsyslog to listen")

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)  # rsyslog's orderly shutdown
        self.proc.wait(30)
        self.proc = None

    def seqs(self) -> list[int]:
        try:
            text = self.out.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [int(m.group(1)) for m in _SEQ.finditer(text)]


def write_config(tmp_path: Path, ca_file: Path) -> Config:
    path = tmp_path / "tollgate.toml"
    path.write_text(f'[audit]\ndir = "audit"\norigin = "tollgate.test/rsyslog"\n\n[siem]\n'
                    f'syslog_tls = "127.0.0.1:6514"\nca_file = "{ca_file}"\n')
    config = load_config(path)
    assert config.audit is not None
    init_audit_dir(config.audit)
    return config


def test_rsyslog_restarted_mid_stream_loses_nothing(tmp_path: Path, netns: str) -> None:
    rsyslog = Rsyslog(netns, tmp_path)
    rsyslog.start()
    config = write_config(tmp_path, rsyslog.ca_file)
    assert config.audit is not None
    log = AuditLog.open(config.audit, version="t")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    forwarder = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-m", "appliance.cli", "audit",
                                  "forward", "-c", str(config.path)], env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE)
    try:
        for i in range(50):
            log.append(statement(i))
        size = log.size
        wait_for(lambda: set(range(size)) <= set(rsyslog.seqs()), "the first records at rsyslog")

        rsyslog.stop()
        for i in range(50, 100):
            log.append(statement(i))
        log.close()  # the writer restarts while the receiver is down
        log = AuditLog.open(config.audit, version="t")
        for i in range(100, 120):
            log.append(statement(i))
        rsyslog.start()
        size = log.size
        wait_for(lambda: set(range(size)) <= set(rsyslog.seqs()), "every record at rsyslog after its restart")
    finally:
        forwarder.send_signal(signal.SIGTERM)
        forwarder.wait(30)
        log.close()
        if rsyslog.proc is not None:
            rsyslog.stop()
    every = {e.seq for e in AuditReader(config.audit.dir).records() if e.seq < size}
    assert every <= set(rsyslog.seqs())
    assert "tollgate - statement" in rsyslog.out.read_text()
