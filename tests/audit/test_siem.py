"""SIEM export: every record reaches a real TLS syslog receiver (RFC 5424, octet
counting) and a JSON-lines file, across a receiver stop/restart and a writer restart;
a full backlog either drops the export (recorded) or blocks statements."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.audit.addon import AuditAddon
from appliance.audit.keys import init_audit_dir
from appliance.audit.reader import AuditReader, parse
from appliance.audit.siem import BACKLOG_SQLSTATE, Forwarder, SiemGate, position_path
from appliance.audit.store import AuditLog
from appliance.config import Config, load_config
from appliance.pan.scanner import scrub
from appliance.pgwire import messages as m
from appliance.proxy.pipeline import BLOCKED_SQL
from tests.audit.records import statement
from tests.audit.running import running_proxy
from tests.identity.tls_helpers import TlsFiles, make_tls_files
from tests.proxy.trace import backend, frontend, ready_session

_SEQ = re.compile(rb'\[tollgate@32473 seq="(\d+)"')


class Receiver:
    """A real RFC 5425 receiver: TLS over TCP, octet-counted RFC 5424 messages."""

    def __init__(self, tls: TlsFiles) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(tls.cert_file, tls.key_file)
        self.messages: list[bytes] = []
        self.changed = threading.Condition()
        self.port = 0
        self.listener: socket.socket | None = None
        self.conns: list[ssl.SSLSocket] = []

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        self.port = listener.getsockname()[1]
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                raw, _ = listener.accept()
                conn = self.context.wrap_socket(raw, server_side=True)
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: ssl.SSLSocket) -> None:
        data = b""
        while True:
            try:
                chunk = conn.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            data += chunk
            while b" " in data:
                length, _, rest = data.partition(b" ")
                if len(rest) < int(length):
                    break
                with self.changed:
                    self.messages.append(rest[:int(length)])
                    self.changed.notify_all()
                data = rest[int(length):]

    def stop(self) -> None:
        assert self.listener is not None
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        self.listener.close()
        self.listener = None
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # wakes its reader; what it read is counted already
            conn.close()
        self.conns = []

    def seqs(self) -> list[int]:
        with self.changed:
            return [int(_SEQ.search(msg).group(1)) for msg in self.messages]  # type: ignore[union-attr]

    def wait_for(self, size: int, timeout: float = 60) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: set(range(size)) <= set(self._seqs_locked()), timeout), \
                f"the receiver has {sorted(set(self._seqs_locked()))[-3:]}, waiting for {size - 1}"

    def _seqs_locked(self) -> list[int]:
        return [int(_SEQ.search(msg).group(1)) for msg in self.messages]  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def receiver(tls: TlsFiles) -> Iterator[Receiver]:
    receiver = Receiver(tls)
    receiver.start()
    yield receiver
    if receiver.listener is not None:
        receiver.stop()


def write_config(tmp_path: Path, siem: str, control: bool = False, durability: str = "fsync") -> Config:
    text = f'[audit]\ndir = "audit"\norigin = "tollgate.test/siem"\ndurability = "{durability}"\n\n[siem]\n{siem}\n'
    if control:
        text = f'[proxy]\ncontrol_socket = "{tmp_path / "control.sock"}"\n\n' + text
    path = tmp_path / "tollgate.toml"
    path.write_text(text)
    config = load_config(path)
    assert config.audit is not None
    init_audit_dir(config.audit)
    return config


@pytest.fixture
def forwarding() -> Iterator[list[threading.Event]]:
    stops: list[threading.Event] = []
    yield stops
    for stop in stops:
        stop.set()


def start_forwarder(config: Config, stops: list[threading.Event]) -> Forwarder:
    forwarder = Forwarder(config, backoff_max=0.5)
    stop = threading.Event()
    stops.append(stop)
    threading.Thread(target=forwarder.run, args=(stop,), daemon=True).start()
    return forwarder


def test_nothing_is_lost_across_a_receiver_restart_and_a_writer_restart(
        tmp_path: Path, tls: TlsFiles, receiver: Receiver, forwarding: list[threading.Event]) -> None:
    jsonl = tmp_path / "siem.jsonl"
    config = write_config(tmp_path, f'syslog_tls = "127.0.0.1:{receiver.port}"\nca_file = "{tls.ca_file}"\n'
                                    f'jsonl = "{jsonl}"\n')
    assert config.audit is not None
    log = AuditLog.open(config.audit, version="t")
    start_forwarder(config, forwarding)
    for i in range(40):
        log.append(statement(i))
    receiver.wait_for(log.size)

    receiver.stop()  # mid-stream: records keep coming while it is down
    for i in range(40, 80):
        log.append(statement(i))
    log.close()  # and the writer restarts (log.stop, log.start)
    log = AuditLog.open(config.audit, version="t")
    for i in range(80, 100):
        log.append(statement(i))
    receiver.start()  # the same port
    receiver.wait_for(log.size)
    size = log.size
    log.close()
    receiver.wait_for(AuditReader(config.audit.dir).size())

    lines = {e.seq: e.line for e in AuditReader(config.audit.dir).records()}
    got = receiver.seqs()
    assert set(got) == set(lines)  # nothing lost
    assert len(got) - len(set(got)) <= 500  # duplicates: at most the batch not acknowledged when it went down
    message = next(msg for msg in receiver.messages if b'seq="5"' in msg)
    assert message.startswith(b"<86>1 ") and b" tollgate - statement " in message
    assert message.endswith(b"\xef\xbb\xbf" + lines[5])  # the record's own line, as signed
    assert size >= 104  # 100 statements, log.start x2, key.generate, log.stop

    # The JSON-lines sink has every record too, in order (no outage on that side).
    written = [parse(line)["seq"] for line in jsonl.read_bytes().splitlines()]
    assert written[: len(lines) - 1] == sorted(lines)[: len(lines) - 1]


def test_a_full_backlog_drops_the_export_and_says_so(tmp_path: Path) -> None:
    out = tmp_path / "not-yet" / "siem.jsonl"
    config = write_config(tmp_path, f'jsonl = "{out}"\nmax_backlog = 10\non_full = "drop"\n', control=True)
    assert config.audit is not None
    with running_proxy(config) as log:
        forwarder = Forwarder(config)
        for i in range(30):
            log.append(statement(i))
        size = log.size
        assert forwarder.step() == 0  # the file can't be written: nothing acknowledged
        assert forwarder.dropped == [(0, size - 6)]  # down to half the limit: the newest five wait
        assert forwarder.positions["jsonl"] == size - 5
        out.parent.mkdir()
        while forwarder.step(retry=True):
            pass
        records = [parse(e.line) for e in AuditReader(config.audit.dir).records()]
    [drop] = [r for r in records if r.get("action") == "siem.drop"]
    assert (drop["first_seq"], drop["last_seq"], drop["outcome"]) == (0, size - 6, "failure")
    sent = [parse(line)["seq"] for line in out.read_bytes().splitlines()]
    assert sent == list(range(size - 5, len(records)))  # the newest five, then what came after (the drop)


def test_a_full_backlog_blocks_statements_when_set_to(tmp_path: Path) -> None:
    # "write": the synchronous session harness has no event loop to wait for an fsync on
    config = write_config(tmp_path, f'jsonl = "{tmp_path / "siem.jsonl"}"\nmax_backlog = 3\non_full = "block"\n',
                          durability="write")
    assert config.audit is not None
    log = AuditLog.open(config.audit, version="t")
    try:
        for i in range(5):
            log.append(statement(i))
        gate = SiemGate(config, check_seconds=0)
        addon = AuditAddon(log, lambda text: scrub(text, "pci"), gate=gate)
        session, io = ready_session([addon])
        session.client_data(frontend(m.Query("SELECT 1")))
        [sent] = io.server_got()
        assert sent.query.encode() == BLOCKED_SQL  # the statement itself never reached the database
        session.server_data(backend(m.ErrorResponse.build("ERROR", "42601", "syntax"), m.ReadyForQuery(b"I")))
        [error] = [msg for msg in io.client_got() if isinstance(msg, m.ErrorResponse)]
        fields = dict(error.fields)
        assert fields["C"] == BACKLOG_SQLSTATE and "SIEM export" in fields["M"]
        refused = [parse(e.line) for e in AuditReader(config.audit.dir).records()
                   if b'"text":"SELECT 1"' in e.line]
        assert refused[-1]["outcome"] == "failure" and refused[-1]["sqlstate"] == BACKLOG_SQLSTATE

        # The forwarder catches up: statements run again.
        forwarder = Forwarder(config)
        while forwarder.step():
            pass
        assert json.loads(position_path(config).read_text())["jsonl"] == log.size
        session.client_data(frontend(m.Query("SELECT 2")))
        [sent] = io.server_got()
        assert sent.query == "SELECT 2"
    finally:
        log.close()




def test_records_pruned_before_they_were_forwarded_are_named_not_mistaken(tmp_path: Path) -> None:
    from appliance.audit import merkle
    from appliance.audit.store_pruned import PRUNED_FILE, pruned_data
    from appliance.audit.store_segments import list_segments
    out = tmp_path / "siem.jsonl"
    config = write_config(tmp_path, f'jsonl = "{out}"\n')
    assert config.audit is not None
    path = config.path
    path.write_text(path.read_text().replace('durability = "fsync"', 'durability = "fsync"\nsegment_bytes = 4096'))
    config = load_config(path)
    assert config.audit is not None
    log = AuditLog.open(config.audit, version="t")
    for i in range(60):
        log.append(statement(i))
    log.close()
    position_path(config).parent.mkdir(parents=True, exist_ok=True)
    position_path(config).write_text('{"jsonl": 0}\n')  # the forwarder had sent nothing yet
    # Retention's pruning, by hand: the first two segments leave, their compact range stays.
    segments = list_segments(config.audit.dir)
    pruned = segments[2][0]
    tree = merkle.CompactRange()
    for entry in AuditReader(config.audit.dir).records(0, pruned):
        tree.append_leaf(merkle.leaf_hash(entry.line))
    (config.audit.dir / PRUNED_FILE).write_bytes(pruned_data(tree, "2025-01"))
    for _, segment in segments[:2]:
        segment.unlink()

    forwarder = Forwarder(config)
    while forwarder.step(retry=True):
        pass
    assert forwarder.dropped == [(0, pruned - 1)]
    sent = [parse(line)["seq"] for line in out.read_bytes().splitlines()]
    assert sent[0] == pruned and sent == list(range(pruned, pruned + len(sent)))
    [drop] = [parse(e.line) for e in AuditReader(config.audit.dir).records() if b'"siem.drop"' in e.line]
    assert (drop["first_seq"], drop["last_seq"]) == (0, pruned - 1) and "retention" in drop["reason"]
