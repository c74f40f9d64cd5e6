"""The witness's HTTP interface, for both ends (c2sp.org/tlog-witness, plus one GET).

``POST <url>/add-checkpoint`` with the body::

    old <size the submitter believes the witness has>
    <base64 consistency proof hash>        (zero or more lines)

    <the signed checkpoint note>

answers 200 with the witness's cosignature line(s) (``text/x.tlog.signature``); 409 with
the witness's own size (``text/x.tlog.size``, "N\\n") when ``old`` is not it, or when the
checkpoint has that size with another root (a fork); 422 when the proof does not show
consistency; 404 for an origin the witness does not follow; 403 when no key it trusts for
that origin signed the checkpoint; 400 for a malformed request.

``GET <url>/checkpoint?origin=<origin>`` is Tollgate's own addition: the latest checkpoint
the witness cosigned for that log, with the log's signature and the witness's cosignature
(404 if none). An auditor's verifier asks it so that a log cut back to an earlier, once
cosigned, size is caught: the witness has seen more.

Stdlib only: the standalone verifier ships this module.
"""

from __future__ import annotations

import base64
import binascii
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ADD_CHECKPOINT = "/add-checkpoint"
LATEST = "/checkpoint"
SIGNATURE_TYPE = "text/x.tlog.signature"
SIZE_TYPE = "text/x.tlog.size"
MAX_BODY = 64 * 1024
MAX_PROOF = 63


class ProtocolError(ValueError):
    """A malformed add-checkpoint request or answer."""


@dataclass(frozen=True)
class AddCheckpoint:
    old: int
    proof: list[bytes]
    note: str


def format_add_checkpoint(old: int, proof: Sequence[bytes], note: str) -> bytes:
    lines = [f"old {old}\n"] + [base64.b64encode(h).decode() + "\n" for h in proof]
    return ("".join(lines) + "\n" + note).encode("utf-8")


def parse_add_checkpoint(body: bytes) -> AddCheckpoint:
    if len(body) > MAX_BODY:
        raise ProtocolError("request body too large")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("request body is not UTF-8") from None
    head, sep, note = text.partition("\n\n")
    if not sep:
        raise ProtocolError("no blank line between the proof and the checkpoint")
    lines = head.split("\n")
    first = lines[0]
    if not first.startswith("old ") or not first[4:].isdigit() or (len(first) > 5 and first[4] == "0"):
        raise ProtocolError("the first line must be 'old <size>'")
    proof = []
    for line in lines[1:]:
        try:
            h = base64.b64decode(line.encode("ascii"), validate=True)
        except (binascii.Error, ValueError, UnicodeEncodeError):
            raise ProtocolError("a proof line is not base64") from None
        if len(h) != 32:
            raise ProtocolError("a proof hash is not 32 bytes")
        proof.append(h)
    if len(proof) > MAX_PROOF:
        raise ProtocolError("proof too long")
    return AddCheckpoint(int(first[4:]), proof, note)


def ssl_context(ca_file: Path | str | None) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)


def latest_url(base: str, origin: str) -> str:
    return f"{base.rstrip('/')}{LATEST}?{urllib.parse.urlencode({'origin': origin})}"


def fetch_latest(base: str, origin: str, *, ca_file: Path | str | None = None, timeout: float = 10.0) -> str | None:
    """The witness's latest cosigned checkpoint of ``origin`` (None: it has none); OSError
    (urllib's errors are OSErrors) if it can't be asked."""
    url = latest_url(base, origin)
    context = ssl_context(ca_file) if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:
            return resp.read(MAX_BODY).decode("utf-8")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise
