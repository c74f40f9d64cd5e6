"""The witness's HTTP service: ``POST /add-checkpoint`` and ``GET /checkpoint?origin=``.

:func:`add_checkpoint` decides a request (see :mod:`appliance.audit.witness_protocol` for
the answers); :func:`serve` runs a threaded HTTP(S) server around it. The order of checks
follows c2sp.org/tlog-witness: a well-formed request (400), an origin the witness follows
(404), a signature by one of that log's keys (403), ``old`` not beyond the checkpoint
(400), ``old`` equal to the witness's size (409 with its size), the same root when the
size is unchanged (409), a consistency proof that verifies (422). Only then is the new
state written, durably, and the cosignature given.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from appliance.audit import merkle
from appliance.audit.cosignature import Cosigner
from appliance.audit.note import NoteError, open_note, parse_checkpoint, split_note
from appliance.audit.witness_protocol import (
    ADD_CHECKPOINT,
    LATEST,
    MAX_BODY,
    SIGNATURE_TYPE,
    SIZE_TYPE,
    ProtocolError,
    parse_add_checkpoint,
)
from appliance.witness.state import Latest, WitnessState

log = logging.getLogger("tollgate.witness")
READY_LINE = "tollgate-witness: ready"
REQUEST_TIMEOUT = 30.0


@dataclass(frozen=True)
class Answer:
    status: int
    body: str
    content_type: str = "text/plain; charset=utf-8"


def add_checkpoint(state: WitnessState, cosigner: Cosigner, body: bytes, now: int | None = None) -> Answer:
    """Decide one add-checkpoint request; cosign and record it if it may be."""
    try:
        req = parse_add_checkpoint(body)
        text, _sigs = split_note(req.note)
        cp = parse_checkpoint(text)
    except (ProtocolError, NoteError) as exc:
        return Answer(400, f"malformed request: {exc}\n")
    keys = state.log_keys(cp.origin)
    if not keys:
        return Answer(404, f"unknown log origin {cp.origin!r}\n")
    try:
        open_note(req.note, keys)
    except NoteError as exc:
        return Answer(403, f"the checkpoint is not signed by a key of {cp.origin!r}: {exc}\n")
    if req.old > cp.size:
        return Answer(400, f"old size {req.old} is beyond the checkpoint's size {cp.size}\n")
    with state.lock:
        latest = state.latest(cp.origin)
        size = latest.size if latest else 0
        if req.old != size:
            return Answer(409, f"{size}\n", SIZE_TYPE)
        if latest is not None and cp.size == latest.size and cp.root != latest.root:
            log.warning("witness: refused a fork of %s at size %d", cp.origin, cp.size)
            return Answer(409, f"{size}\n", SIZE_TYPE)
        if latest is not None and cp.size > latest.size and not merkle.verify_consistency(
                latest.size, cp.size, latest.root, cp.root, req.proof):
            log.warning("witness: refused %s at size %d: no consistency with size %d", cp.origin, cp.size, size)
            return Answer(422, f"the consistency proof from size {latest.size} does not verify\n")
        if latest is None and req.proof:
            return Answer(422, "a first checkpoint takes no consistency proof\n")
        line = cosigner.cosign(text, int(time.time()) if now is None else now)
        state.set_latest(cp.origin, Latest(cp.size, cp.root, req.note.rstrip("\n") + "\n" + line))
    return Answer(200, line, SIGNATURE_TYPE)


def latest_checkpoint(state: WitnessState, query: str) -> Answer:
    origins = urllib.parse.parse_qs(query).get("origin", [])
    if len(origins) != 1:
        return Answer(400, "want ?origin=ORIGIN\n")
    latest = state.latest(origins[0])
    if latest is None:
        return Answer(404, f"no checkpoint of {origins[0]!r} cosigned here\n")
    return Answer(200, latest.note)


def make_server(state: WitnessState, cosigner: Cosigner, host: str, port: int,
                tls: tuple[Path, Path] | None = None) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        server_version = "tollgate-witness"
        timeout = REQUEST_TIMEOUT  # a client that stalls mid-request is dropped, not waited for

        def _send(self, answer: Answer) -> None:
            data = answer.body.encode("utf-8")
            self.send_response(answer.status)
            self.send_header("Content-Type", answer.content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            if urllib.parse.urlsplit(self.path).path != ADD_CHECKPOINT:
                self._send(Answer(404, "not found\n"))
                return
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self._send(Answer(411, "Content-Length required\n"))
                return
            if not 0 <= length <= MAX_BODY:
                self._send(Answer(413, "request too large\n"))
                return
            body = self.rfile.read(length)
            try:
                answer = add_checkpoint(state, cosigner, body)
            except Exception:
                log.exception("witness: add-checkpoint failed")
                answer = Answer(500, "internal error\n")
            self._send(answer)

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            if url.path != LATEST:
                self._send(Answer(404, "not found\n"))
                return
            self._send(latest_checkpoint(state, url.query))

        def log_message(self, format: str, *args: object) -> None:
            log.info("%s %s", self.address_string(), format % args)

    bare_host = host.strip("[]")

    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in bare_host else socket.AF_INET
        daemon_threads = True

    server = Server((bare_host, port), Handler)
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(tls[0]), str(tls[1]))
        server.socket = context.wrap_socket(server.socket, server_side=True)
    return server


def serve(state: WitnessState, cosigner: Cosigner, host: str, port: int, tls: tuple[Path, Path] | None = None) -> None:
    server = make_server(state, cosigner, host, port, tls)
    # One line saying where it listens (port 0 picks one) and with which key.
    print(f"{READY_LINE} {host}:{server.server_address[1]} {cosigner.key}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        state.close()
