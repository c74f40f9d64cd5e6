"""What ``tollgate-verify`` found: the :class:`Report` (counts, failures, notes) it prints.

Every failure names where it is (file, line, seq, checkpoint size or manifest entry) and
what kind it is; see docs/audit-format.md ("What tollgate-verify checks").
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

MAX_FAILURES_PER_KIND = 500


@dataclass(frozen=True)
class Failure:
    """One thing that does not hold, and where."""

    kind: str  # bundle, trust, manifest, file, checkpoint, proof, record, fields, pan, offbox, tail-cut,
    # witness
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


@dataclass
class Report:
    """What a verification found; ``ok`` when everything holds."""

    bundle: str
    origin: str | None = None
    log_size: int | None = None
    manifest_key: str | None = None
    checkpoints_total: int = 0
    checkpoints_valid: int = 0
    records_total: int = 0
    records_valid: int = 0
    files_total: int = 0
    files_valid: int = 0
    proofs_total: int = 0
    proofs_valid: int = 0
    left_out: int = 0
    offbox_total: int = 0
    offbox_valid: int = 0
    offbox_not_checkable: int = 0
    offbox_ignored: int = 0
    witness_quorum: int = 0  # cosignatures required on the checkpoint relied on (0: none)
    witnessed_size: int | None = None  # the largest checkpoint size with that quorum
    witnessed_at: int | None = None  # the newest time (witness-signed) a quorum cosigned one of its checkpoints
    witness_views: int = 0  # witnesses' latest checkpoints compared with the bundle
    failures: list[Failure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    suppressed: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    _listed: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def fail(self, kind: str, where: str, message: str) -> None:
        """Add a failure; past MAX_FAILURES_PER_KIND of a kind, only count it (a bundle
        with millions of bad records still gives a report one can read)."""
        n = self._listed.get(kind, 0) + 1
        self._listed[kind] = n
        if n > MAX_FAILURES_PER_KIND:
            self.suppressed[kind] = self.suppressed.get(kind, 0) + 1
        else:
            self.failures.append(Failure(kind, where, message))

    @property
    def ok(self) -> bool:
        return not self.failures and not self.suppressed

    @property
    def failure_count(self) -> int:
        return len(self.failures) + sum(self.suppressed.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "bundle": self.bundle,
            "ok": self.ok,
            "origin": self.origin,
            "log_size": self.log_size,
            "manifest_key": self.manifest_key,
            "checkpoints": {"valid": self.checkpoints_valid, "total": self.checkpoints_total},
            "records": {"valid": self.records_valid, "total": self.records_total, "left_out": self.left_out},
            "files": {"valid": self.files_valid, "total": self.files_total},
            "proofs": {"valid": self.proofs_valid, "total": self.proofs_total},
            "offbox": {"valid": self.offbox_valid, "total": self.offbox_total,
                       "not_checkable": self.offbox_not_checkable, "ignored": self.offbox_ignored},
            "witnesses": {"quorum": self.witness_quorum, "witnessed_size": self.witnessed_size,
                          "witnessed_at": self.witnessed_at, "views": self.witness_views},
            "failures": [{"kind": f.kind, "where": f.where, "message": f.message} for f in self.failures],
            "failures_not_listed": dict(self.suppressed),
            "notes": list(self.notes),
            "seconds": round(self.seconds, 3),
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, ensure_ascii=False) + "\n"

    def summary(self) -> str:
        lines = [f"Results for bundle {self.bundle}:"]
        lines.append(f" {self.checkpoints_valid}/{self.checkpoints_total} checkpoints valid")
        lines.append(f" {self.records_valid}/{self.records_total} records valid"
                     + (f" ({self.left_out} left out of the bundle, covered by proofs)" if self.left_out else ""))
        lines.append(f" {self.files_valid}/{self.files_total} files valid")
        lines.append(f" {self.proofs_valid}/{self.proofs_total} proofs valid")
        if self.offbox_total:
            extra = []
            if self.offbox_not_checkable:
                extra.append(f"{self.offbox_not_checkable} not checkable")
            if self.offbox_ignored:
                extra.append(f"{self.offbox_ignored} of other origins ignored")
            lines.append(f" {self.offbox_valid}/{self.offbox_total} off-box checkpoints consistent"
                         + (f" ({', '.join(extra)})" if extra else ""))
        if self.witness_quorum:
            at = ""
            if self.witnessed_at is not None:
                at = time.strftime(", newest cosignature %Y-%m-%dT%H:%M:%SZ", time.gmtime(self.witnessed_at))
            lines.append(f" witnessed up to size {self.witnessed_size} (quorum {self.witness_quorum}{at}); "
                         f"{self.witness_views} witness view(s) compared")
        if self.log_size is not None:
            lines.append(f" log size {self.log_size}, origin {self.origin}, "
                         f"manifest signed by {self.manifest_key or '-'}")
        lines.extend(f" note: {note}" for note in self.notes)
        lines.extend(f"FAILED {f.kind}: {f}" for f in self.failures)
        lines.extend(f"FAILED {kind}: … and {n} more not listed" for kind, n in self.suppressed.items())
        if self.ok:
            lines.append("Bundle verified: everything holds.")
        else:
            lines.append(f"Bundle FAILED verification: {self.failure_count} problem(s).")
        return "\n".join(lines) + "\n"
