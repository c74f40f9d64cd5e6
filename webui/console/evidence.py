"""What the console reads from the audit log: sessions, one session's records, and proof.

A replay is told from the signed records alone. Its "verified" mark is earned, not
assumed: :func:`verify_inclusion` checks the trust file against the root key, the latest
checkpoint's signature against a key the trust file lets sign that size, and the Merkle root
of the records 0 … size − 1 as they are on disk against the root the checkpoint signed —
so every record of the session below that size is included, unaltered, in a signed
checkpoint. Records after the latest checkpoint are "not yet signed" (the next checkpoint,
within ``checkpoint_seconds``, covers them).

The root key checked against is the appliance's own ``keys/root.pub``: the page proves the
records match what the log signed, not that the box is honest — an auditor verifies a
bundle (downloadable here) off the box with ``tollgate-verify`` and their pinned key.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from appliance.audit import merkle
from appliance.audit.note import NoteError, open_note, parse_checkpoint, parse_verifier_key
from appliance.audit.reader import AuditReader, ReaderError
from appliance.audit.trust import TrustError, parse_trust
from appliance.config import AuditConfig


def session_records(audit: AuditConfig, session: str) -> Iterator[dict[str, Any]]:
    """A session's records in log order (and the decisions on approvals it asked for)."""
    from appliance.audit.cli import session_records as records
    return records(audit, session)


def session_rows(audit: AuditConfig) -> list[Any]:
    from appliance.audit.cli import session_rows as rows
    return rows(audit)


@dataclass(frozen=True)
class Inclusion:
    """The outcome of :func:`verify_inclusion`."""

    verified: bool
    detail: str  # why, in a sentence a person can read
    size: int | None = None  # the checkpoint's tree size
    time: str | None = None  # when it was signed
    key: str | None = None  # the key that signed it


# Roots computed, by (directory, size): a page view doesn't hash the whole log again.
_ROOTS: dict[tuple[str, int], bytes] = {}
_ROOTS_LOCK = threading.Lock()


def _root_on_disk(reader: AuditReader, size: int) -> bytes:
    key = (str(reader.dir), size)
    with _ROOTS_LOCK:
        known = _ROOTS.get(key)
    if known is not None:
        return known
    tree = merkle.CompactRange(0)
    tree.append_leaves(entry.leaf for entry in reader.records(0, size))
    if len(tree) != size:
        raise ReaderError(f"the log holds {len(tree)} records, fewer than the checkpoint's {size}")
    root = tree.root()
    with _ROOTS_LOCK:
        if len(_ROOTS) > 64:
            _ROOTS.clear()
        _ROOTS[key] = root
    return root


def verify_inclusion(audit: AuditConfig, seqs: list[int]) -> Inclusion:
    """Whether the records ``seqs`` are all included in the latest signed checkpoint."""
    if not seqs:
        return Inclusion(False, "no records to verify")
    try:
        root_key = parse_verifier_key((audit.keys_dir / "root.pub").read_text().strip())
        trust = parse_trust((audit.dir / "trust.note").read_text(), root_key)
        reader = AuditReader(audit.dir)
        entry = reader.last_checkpoint()
        if entry is None:
            return Inclusion(False, "the log has no signed checkpoint yet")
        text, signers = open_note(entry["note"], trust.verifier_keys())
        checkpoint = parse_checkpoint(text)
        if checkpoint.origin != trust.origin:
            return Inclusion(False, f"the checkpoint names origin {checkpoint.origin!r}, not the log's "
                                    f"{trust.origin!r}")
        allowed = []
        for key in signers:
            try:
                trust.check(key.name, key.key_hash, checkpoint.size)
                allowed.append(key.label)
            except TrustError:
                continue
        if not allowed:
            return Inclusion(False, f"no key the trust file lets sign tree size {checkpoint.size} signed the "
                                    "latest checkpoint")
        if max(seqs) >= checkpoint.size:
            return Inclusion(False, f"records up to seq {max(seqs)} are not yet in a signed checkpoint (the latest "
                                    f"covers {checkpoint.size}); reload in a moment", checkpoint.size,
                             entry.get("time"), allowed[0])
        if _root_on_disk(reader, checkpoint.size) != checkpoint.root:
            return Inclusion(False, f"the records on disk do not match the root signed at size {checkpoint.size}: "
                                    "the log has been altered", checkpoint.size, entry.get("time"), allowed[0])
    except (OSError, ValueError, NoteError, TrustError, ReaderError, KeyError) as exc:
        return Inclusion(False, f"could not verify: {exc}")
    return Inclusion(True, f"all {len(seqs)} records are included in the checkpoint of size {checkpoint.size}, "
                           f"signed by {allowed[0]}", checkpoint.size, entry.get("time"), allowed[0])


__all__ = ["Inclusion", "session_records", "session_rows", "verify_inclusion"]
