"""A synthetic but realistic signed log, and bundles of it, for the bundle and verifier tests.

:func:`make_log` makes 300 records in three segments, signed checkpoints every 37 records
with a key rotation at 150 and an idle heartbeat at the end; :func:`write_bundle` exports
it (whole, filtered, cut) with the real writer and :func:`unpack` lays a bundle out as a
directory to tamper with. The ``log`` fixture (conftest.py) is one such log, shared.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from appliance.audit import canonical
from appliance.audit.bundle_reader import open_bundle
from appliance.audit.bundle_writer import BundleSummary, BundleWriter
from appliance.audit.merkle import leaf_hash, root_of
from appliance.audit.note import SigningKey, make_checkpoint, sign_note
from appliance.audit.trust import TrustEntry, build_trust

ORIGIN = "tollgate.test/audit"
T0 = datetime(2025, 3, 1, 9, 0, 0, tzinfo=UTC)
TYPES = ["session.start", "statement", "result", "statement", "result", "session.end", "auth.failure", "policy.reload"]


def rtime(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def ctime(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def record(seq: int, t: datetime, session: str = "s-1") -> dict[str, Any]:
    kind = TYPES[seq % len(TYPES)]
    rec = {
        "seq": seq, "time": rtime(t), "type": kind, "user": f"agent-{seq % 3}",
        "outcome": "failure" if kind == "auth.failure" else "success",
        "origin": f"10.0.0.{seq % 7 + 2}:5{seq % 1000:04d}", "object": "payments/cards", "run": "0123456789ab",
        "session": session,
    }
    if kind == "statement":
        rec.update({"stmt": seq, "kind": "query", "decision": "mask", "classes": ["pan"],
                    "text": f"SELECT pan FROM cards WHERE pan = '411111******1111' AND created > {1700000000000 + seq}",
                    "params": ["4111-11**-****-1111", None, "\\x3131"]})
    if kind == "result":
        rec.update({"stmt": seq - 1, "tag": "SELECT 1", "rows": 1, "masked": 1, "duration_us": 1234 + seq,
                    "sample": {"columns": ["pan"], "rows": [["5500********0004"]], "truncated": False}})
    return rec


@dataclass
class Log:
    """The records, their leaf hashes and signed checkpoints; the keys that signed them."""

    root: SigningKey
    old: SigningKey
    new: SigningKey
    rotate_at: int
    trust_note: str
    lines: list[bytes]
    hashes: list[bytes]
    checkpoints: list[dict[str, Any]]
    segment_size: int
    times: list[datetime] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.lines)

    def segment(self, seq: int) -> str:
        return f"{seq - seq % self.segment_size:012d}"

    def checkpoint(self, size: int, when: datetime, key: SigningKey | None = None) -> dict[str, Any]:
        key = key or (self.old if size < self.rotate_at else self.new)
        text = make_checkpoint(ORIGIN, size, root_of(self.hashes[:size]), ctime(when))
        return {"note": sign_note(text, key), "size": size, "time": ctime(when)}

    def checkpoints_upto(self, size: int) -> list[dict[str, Any]]:
        return [c for c in self.checkpoints if c["size"] <= size]


def make_log(n: int = 300, segment_size: int = 100, every: int = 37, rotate_at: int = 150,
             sessions: Callable[[int], str] | None = None) -> Log:
    root = SigningKey.generate(f"{ORIGIN}/root")
    old, new = SigningKey.generate(ORIGIN), SigningKey.generate(ORIGIN)
    entries = [TrustEntry(old.verifier, 0, rotate_at), TrustEntry(new.verifier, rotate_at, None)]
    trust_note = build_trust(ORIGIN, entries, root)
    times = [T0 + timedelta(seconds=seq * 2) for seq in range(n)]
    lines = [canonical.dumps(record(seq, times[seq], sessions(seq) if sessions else "s-1")) for seq in range(n)]
    log = Log(root, old, new, rotate_at, trust_note, lines, [leaf_hash(x) for x in lines], [], segment_size, times)
    sizes = sorted({*range(every, n, every), rotate_at, n})
    for size in sizes:
        when = times[size - 1] + timedelta(seconds=1)
        log.checkpoints.append(log.checkpoint(size, when))
    # An idle heartbeat: same size, newer time.
    log.checkpoints.append(log.checkpoint(n, times[-1] + timedelta(seconds=30)))
    return log


def write_bundle(log: Log, path: Path, include: Callable[[int], bool] = lambda seq: True, *,
                 upto: int | None = None, frm: str | None = None, to: str | None = None,
                 session: str | None = None, first_checkpoint: int = 0, created: str | None = None) -> BundleSummary:
    size = log.size if upto is None else upto
    cps = [c for c in log.checkpoints_upto(size) if c["size"] >= first_checkpoint]
    with BundleWriter(path, origin=ORIGIN, signing_key=log.new if size >= log.rotate_at else log.old,
                      trust_note=log.trust_note, root_verifier_key=log.root.verifier_key(),
                      verifier_keys=[log.old.verifier_key(), log.new.verifier_key()], checkpoints=cps,
                      frm=frm, to=to, session=session, created=created) as w:
        for seq in range(size):
            w.add(seq, log.hashes[seq], log.lines[seq] if include(seq) else None, log.segment(seq))
        return w.close()


def unpack(bundle: Path, into: Path) -> Path:
    """The bundle's files in a directory (read through the safe reader)."""
    with open_bundle(bundle) as b:
        for name in b.names:
            target = into / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b.read(name))
    return into
