"""``tollgate audit retain``: retention of PCI DSS 10.5.1 — twelve months kept, three online.

Run by a timer (daily: ``tollgate audit retain -c /etc/tollgate/tollgate.toml``), it

1. **seals** each closed calendar month (UTC, by the records' ``time``) not sealed yet,
   oldest first: the month's records exported as a bundle (the rest of the log proved by
   hashes), verified with the pinned root key and the off-box checkpoint copies, checked
   to continue the previous sealed bundle (:mod:`~appliance.audit.verify_chain`), and only
   then moved into the archive as ``ARCHIVE/YYYY-MM.tar.gz`` (with ``YYYY-MM.seal.json``
   saying which records it holds). A month that fails stops the run: nothing after it is
   sealed and nothing is pruned.
2. **prunes** the online log: segments holding only records of months older than
   ``online_months`` leave the audit directory — after the whole archive's chain was
   verified again and every record of those segments was found, leaf hash for leaf hash,
   in a sealed bundle. What stays is their compact range (:mod:`store_pruned`), so the
   writer, exports and the verifier work on as before. The writer's current segment never
   leaves.
3. **expires** sealed bundles of months older than ``retain_months``.
4. **records** what it did (an ``admin`` record, ``audit.retain``).

The archive is a directory (``[audit] archive_dir``, default ``DIR/archive``); put it on
other storage, or copy it off the box, for the archive to outlive the appliance. An assessor
checks it alone: ``tollgate-verify --chain ARCHIVE --root-key KEY``.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from appliance.audit import merkle
from appliance.audit.keys import fsync_dir, make_dir, write_atomic
from appliance.audit.reader import AuditReader, record_time
from appliance.audit.store_pruned import PRUNED_FILE, load_pruned, pruned_data
from appliance.audit.store_segments import list_segments
from appliance.audit.verify_chain import Span, check_chain, read_span
from appliance.config import Config, ConfigError

log = logging.getLogger("tollgate.audit.retention")

PARTIAL = ".partial"


class RetentionError(Exception):
    """Retention stopped (the message says why); nothing unsealed left the online log."""


@dataclass
class Retained:
    sealed: list[str] = field(default_factory=list)  # months sealed by this run
    pruned_through: int | None = None  # records [0, this) are off the online log now
    removed_segments: int = 0
    expired: list[str] = field(default_factory=list)  # sealed months deleted (past retain_months)


def month_of(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m")


def add_months(month: str, n: int) -> str:
    year, mon = int(month[:4]), int(month[5:7])
    index = year * 12 + (mon - 1) + n
    return f"{index // 12:04d}-{index % 12 + 1:02d}"


def month_bounds(month: str) -> tuple[datetime, datetime]:
    """The first and the last microsecond of ``month``."""
    start = datetime(int(month[:4]), int(month[5:7]), 1, tzinfo=UTC)
    following = add_months(month, 1)
    end = datetime(int(following[:4]), int(following[5:7]), 1, tzinfo=UTC) - timedelta(microseconds=1)
    return start, end


def sealed_months(archive: Path) -> dict[str, Path]:
    return {p.name[:7]: p for p in sorted(archive.glob("????-??.tar.gz"))} if archive.is_dir() else {}


def retain(config: Config, now: datetime | None = None, *, access: Any = None) -> Retained:
    from appliance.audit.export import LogAccess, cli_identity
    audit = config.audit
    if audit is None:
        raise ConfigError(f"{config.path}: has no [audit] section")
    current = month_of(now or datetime.now(UTC))
    own = access is None
    access = access or LogAccess(config, version="retain")
    result = Retained()
    try:
        archive = audit.archive
        make_dir(archive)
        root = (audit.keys_dir / "root.pub").read_text().strip()
        offbox = [audit.offbox_dir] if audit.offbox_dir is not None else []
        for month in _closed_months(AuditReader(audit.dir), current):
            if month not in sealed_months(archive):
                _seal(config, access, archive, month, root, offbox)
                result.sealed.append(month)
        _prune(audit.dir, archive, add_months(current, -audit.online_months), root, offbox, result)
        for month, path in sealed_months(archive).items():
            if month < add_months(current, -audit.retain_months):
                path.unlink()
                path.with_name(f"{month}.seal.json").unlink(missing_ok=True)
                result.expired.append(month)
        if result.expired:
            fsync_dir(archive)
        user, origin = cli_identity()
        if result.sealed or result.removed_segments or result.expired:
            access.append_admin({"action": "audit.retain", "user": user, "origin": origin, "object": "audit-log",
                                 "outcome": "success", "sealed": ",".join(result.sealed),
                                 "expired": ",".join(result.expired),
                                 **({"pruned_through": result.pruned_through}
                                    if result.pruned_through is not None else {})})
    finally:
        if own:
            access.close("audit retain done")
    return result


def _closed_months(reader: AuditReader, current: str) -> list[str]:
    """Months before ``current`` that hold records, in order; their records must be
    contiguous (a month that comes back after a later one can't be sealed as one run)."""
    months: list[str] = []
    for entry in reader.records():
        stamp = record_time(entry.line)
        month = stamp[:7] if stamp else None
        if month is None or (months and month == months[-1]):
            continue
        if months and month < months[-1]:
            raise RetentionError(f"record {entry.seq} is of {month}, after records of {months[-1]}: the record "
                                 "times go back, so the months can't be sealed as runs (the clock was set back?)")
        if month >= current:
            break
        months.append(month)
    return months


def _seal(config: Config, access: Any, archive: Path, month: str, root: str, offbox: list[Path]) -> None:
    from appliance.audit.export import ExportError, export
    from appliance.audit.verifier import verify_bundle
    partial = archive / PARTIAL
    make_dir(partial)
    bundle = partial / f"{month}.tar.gz"
    bundle.unlink(missing_ok=True)
    frm, to = month_bounds(month)
    try:
        summary = export(config, bundle, frm, to, access=access)
    except ExportError as exc:
        raise RetentionError(f"{month}: could not export it to seal it: {exc}") from None
    report = verify_bundle(bundle, root, offbox, workers=1)
    if not report.ok:
        raise RetentionError(f"{month}: its bundle does not verify, so it is not sealed: "
                             + "; ".join(str(f) for f in report.failures[:3]))
    earlier = [p for m, p in sealed_months(archive).items() if m < month]
    if earlier:
        chain = check_chain([earlier[-1], bundle])
        if not chain.ok:
            raise RetentionError(f"{month}: does not continue {earlier[-1].name}: {'; '.join(chain.failures)}")
    span = read_span(bundle)
    target = archive / f"{month}.tar.gz"
    os.replace(bundle, target)
    write_atomic(archive / f"{month}.seal.json", json.dumps({
        "month": month, "first_seq": span.first, "last_seq": span.end - 1, "log_size": summary.log_size,
        "sha256": summary.sha256, "verified": True}).encode() + b"\n")
    fsync_dir(archive)
    log.info("audit: sealed %s (records %d-%d) into %s", month, span.first, span.end - 1, target)


def _prune(directory: Path, archive: Path, cutoff: str, root: str, offbox: list[Path], result: Retained) -> None:
    """Take off the online log the segments whose records are all of sealed months before ``cutoff``."""
    from appliance.audit.verifier import verify_bundle
    bundles = sealed_months(archive)
    leaving = [m for m in bundles if m < cutoff]
    if not leaving:
        return
    # Only what the archive still proves leaves: the whole chain is verified again first.
    paths = list(bundles.values())
    verified = {p.name: verify_bundle(p, root, offbox, workers=1).ok for p in paths}
    chain = check_chain(paths, verified)
    if not chain.ok:
        raise RetentionError("the archive's sealed bundles do not verify as a chain, so nothing leaves the "
                             "online log: " + "; ".join(chain.failures))
    spans = [read_span(bundles[m]) for m in leaving]
    through = spans[-1].end  # records [0, through) are sealed in months leaving the online log
    segments = list_segments(directory)
    prefix = load_pruned(directory)
    if prefix is None:
        prefix = merkle.CompactRange()
    removable = []
    for (start, path), (following, _) in itertools.pairwise(segments):
        if start < prefix.end:
            continue
        if following > through:
            break
        removable.append((start, following, path))
    if not removable:
        return
    tree = merkle.CompactRange(0, prefix.end, prefix.hashes)
    for start, following, path in removable:
        if tree.end != start:
            raise RetentionError(f"{path}: starts at {start}, but the pruned log ends at {tree.end}")
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
        if lines[-1] != b"" or len(lines) - 1 != following - start:
            raise RetentionError(f"{path}: does not hold exactly records {start}-{following - 1}")
        for seq, line in enumerate(lines[:-1], start):
            leaf = merkle.leaf_hash(line)
            if leaf != _sealed_leaf(spans, seq):
                raise RetentionError(f"record {seq} ({path.name}) is not the one its sealed bundle holds: "
                                     "nothing was pruned")
            tree.append_leaf(leaf)
    write_atomic(directory / PRUNED_FILE, pruned_data(tree, spans[-1].name[:7]))
    for _start, _following, path in removable:
        path.unlink()
    fsync_dir(removable[0][2].parent)
    result.pruned_through = tree.end
    result.removed_segments = len(removable)
    log.info("audit: %d segment(s) left the online log (records 0-%d are in the archive)", len(removable),
             tree.end - 1)


def _sealed_leaf(spans: list[Span], seq: int) -> bytes | None:
    for span in spans:
        if span.first <= seq < span.end:
            return span.leaves[seq - span.first]
    return None
