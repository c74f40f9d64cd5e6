"""A chain of sealed bundles (retention's archive): each verifies, and each continues the
last — one tree, no gap, no overlap.

Retention seals each closed period (a calendar month) into a bundle of that period's
records; the records before are left out, proved by a compact range ``[0, first)`` (the
bundle's first proof), and those after by proofs to the log size. Two consecutive
bundles *A*, *B* chain when *B*'s records start right after *A*'s, and *A*'s own prefix
range extended by *A*'s record leaves gives exactly *B*'s prefix range: the Merkle tree
*B* was proved against holds *A*'s records at their places, so a bundle missing from the
chain, altered, or from another log is found. This needs only the bundles (and the
pinned root key each is verified with): an assessor checks the archive alone.

``tollgate-verify --chain DIR --root-key KEY`` runs it on every ``*.tar.gz`` of ``DIR`` in
name order (retention names them ``YYYY-MM.tar.gz``).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.audit.bundle_layout import PROOFS
from appliance.audit.bundle_reader import BundleError, open_bundle
from appliance.audit.merkle import CompactRange


@dataclass
class Span:
    """What one sealed bundle holds: records ``[first, end)`` and the range before them."""

    name: str
    first: int
    end: int
    prefix: CompactRange  # [0, first)
    leaves: list[bytes]


@dataclass
class ChainReport:
    bundles: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    spans: list[tuple[str, int, int]] = field(default_factory=list)  # (bundle, first seq, last seq)

    @property
    def ok(self) -> bool:
        return bool(self.bundles) and not self.failures

    def summary(self) -> str:
        lines = [f"Chain of {len(self.bundles)} sealed bundle(s):"]
        lines += [f" {name}: records {first}–{last}" for name, first, last in self.spans]
        lines += [f"FAILED chain: {f}" for f in self.failures]
        lines.append("Chain verified: one tree, no gap." if self.ok else
                     f"Chain FAILED: {len(self.failures) or 'no'} problem(s)"
                     + ("" if self.bundles else " (no bundles)") + ".")
        return "\n".join(lines) + "\n"


def read_span(path: Path) -> Span:
    """The records' range and the prefix proof of a (verified) sealed bundle."""
    with open_bundle(path) as bundle:
        proofs = [json.loads(line) for line in bundle.read(PROOFS).splitlines() if line.strip()]
        stems = sorted(n for n in bundle.names if n.startswith("records/") and n.endswith(".leaves"))
        leaves: list[bytes] = []
        first = None
        for name in stems:
            data = bundle.read(name)
            leaves += [data[i:i + 32] for i in range(0, len(data), 32)]
            if first is None:
                jsonl = bundle.read(name[: -len(".leaves")] + ".jsonl")
                head = jsonl.split(b"\n", 1)[0]
                if head:
                    first = int(json.loads(head)["seq"])
    if first is None:
        raise ValueError("holds no records")
    prefix = CompactRange()
    for proof in proofs:
        if proof["start"] == 0 and first > 0:
            prefix = CompactRange(0, int(proof["end"]), [base64.b64decode(h) for h in proof["hashes"]])
    if prefix.end != first:
        raise ValueError(f"its records start at {first} but its first proof covers [0, {prefix.end})")
    inner = [p for p in proofs if first < int(p["start"]) < first + len(leaves)]
    if inner:
        raise ValueError("its records are not one contiguous run (a sealed period is)")
    return Span(path.name, first, first + len(leaves), prefix, leaves)


def check_chain(paths: Sequence[Path], verified: dict[str, bool] | None = None) -> ChainReport:
    """Check consecutive bundles continue one another; ``verified``: each bundle's own
    verification (a bundle that failed it breaks the chain)."""
    report = ChainReport(bundles=[p.name for p in paths])
    previous: Span | None = None
    for path in paths:
        if verified is not None and not verified.get(path.name, False):
            report.failures.append(f"{path.name}: does not verify")
            previous = None
            continue
        try:
            span = read_span(path)
        except (OSError, BundleError, ValueError, KeyError, TypeError) as exc:
            report.failures.append(f"{path.name}: {exc}")
            previous = None
            continue
        report.spans.append((span.name, span.first, span.end - 1))
        if previous is not None:
            _link(previous, span, report)
        previous = span
    return report


def _link(a: Span, b: Span, report: ChainReport) -> None:
    if b.first > a.end:
        report.failures.append(f"{b.name}: starts at record {b.first}, but {a.name} ends at {a.end - 1}: "
                               f"records {a.end}–{b.first - 1} are in no sealed bundle (one missing?)")
        return
    if b.first < a.end:
        report.failures.append(f"{b.name}: starts at record {b.first}, inside {a.name} (ends at {a.end - 1})")
        return
    tree = CompactRange(0, a.prefix.end, a.prefix.hashes)
    for leaf in a.leaves:
        tree.append_leaf(leaf)
    if tree.hashes != b.prefix.hashes:
        report.failures.append(f"{b.name}: its tree before record {b.first} is not the one {a.name}'s records "
                               "make: not the same log")


def chain_json(report: ChainReport) -> dict[str, Any]:
    return {"ok": report.ok, "bundles": report.bundles, "failures": report.failures,
            "spans": [{"bundle": n, "first": f, "last": last} for n, f, last in report.spans]}
