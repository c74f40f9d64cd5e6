"""Opening an audit log after a stop or a crash: where it ends, and what had to be cut.

A process killed at any point leaves at worst a partial last line: it was never
acknowledged (its statement never ran), so it is cut, and the ``log.start`` record says
how many bytes were. The segments are rehashed from the last checkpoint's compact range
(``state.json``, when a recent checkpoint vouches for it) or from the start, and must agree
with the last checkpoint: a log shorter than its checkpoints, or with other records under
them, is refused rather than continued.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.audit import canonical, merkle
from appliance.audit.store_checkpoints import checkpoint_root, load_state
from appliance.audit.store_errors import AuditError
from appliance.audit.store_pruned import load_pruned
from appliance.audit.store_segments import last_line_of_log, list_segments, rehash, truncate

log = logging.getLogger("tollgate.audit")


@dataclass(frozen=True)
class Recovered:
    """Where the log ends, as found on disk."""

    size: int  # records in the segments
    seg_start: int  # the segment the next record goes to
    tree: merkle.CompactRange  # of all of them
    truncated: int  # bytes of a partial last line cut off
    unsigned: int  # records after the last checkpoint
    previous_run: str | None  # the ``run`` of the last record, whoever wrote it


def recover(directory: Path, last_checkpoint: dict[str, Any] | None, recent_roots: dict[int, bytes]) -> Recovered:
    """Find the end of the log in ``directory`` and cut a partial last line.

    ``last_checkpoint`` is the last entry of checkpoints.jsonl (None for a new log) and
    ``recent_roots`` the roots of the last few, by size. AuditError when the segments
    don't add up or don't match the last checkpoint.
    """
    truncated = 0
    last_size = last_checkpoint["size"] if last_checkpoint else 0
    segments = list_segments(directory)
    state = load_state(directory, recent_roots, segments)
    if state is not None:
        size, seg_start, offset, tree = state
    else:
        size, seg_start, offset, tree = 0, (segments[0][0] if segments else 0), 0, merkle.CompactRange()
        try:
            pruned = load_pruned(directory)
        except ValueError as exc:
            raise AuditError(str(exc)) from None
        if pruned is not None and segments and segments[0][0] == pruned.end:
            # Retention took the first segments off: rehash on from the prefix's compact range.
            size, tree = pruned.end, merkle.CompactRange(0, pruned.end, pruned.hashes)
        elif segments and segments[0][0] != 0:
            raise AuditError(f"{segments[0][1]}: the first segment must start at seq 0 (segments are missing)")
    last_root = checkpoint_root(last_checkpoint) if last_checkpoint else None
    later = [s for s in segments if s[0] >= seg_start]
    last_line = b""
    for i, (start, path) in enumerate(later):
        final = i == len(later) - 1
        if start != size and not (i == 0 and start == seg_start):
            raise AuditError(f"{path}: starts at seq {start}, but the segments before it end at {size - 1}")
        size, cut, tail = rehash(path, offset if i == 0 else 0, tree, size, last_size, last_root)
        if tail:
            last_line = tail
        if cut:
            if not final:
                raise AuditError(f"{path}: ends in a partial line although later segments exist (corrupt)")
            truncate(path, os.path.getsize(path) - cut)
            truncated += cut
        seg_start = start
    if last_checkpoint is not None and size < last_size:
        raise AuditError(f"{directory}: the segments hold {size} records but the last checkpoint covers "
                         f"{last_size}: records were lost or removed (restore them, or start a new log "
                         "with `tollgate audit init --force`)")
    if last_line == b"" and size:
        last_line = last_line_of_log(list_segments(directory))
    previous_run = None
    if last_line:
        try:
            record = canonical.loads(last_line)
            if record.get("seq") != size - 1:
                raise AuditError(f"{directory}: the last record says seq {record.get('seq')}, but it is record "
                                 f"{size - 1} of the log")
            previous_run = record.get("run")
        except canonical.CanonicalError as exc:
            raise AuditError(f"{directory}: the last record is not valid JSON ({exc})") from None
    if not later and not segments:
        seg_start = 0
    if truncated:
        log.warning("audit: cut %d bytes of a partial record at the end of the log (never acknowledged)", truncated)
    unsigned = size - last_size if last_checkpoint else size
    return Recovered(size, seg_start, tree, truncated, unsigned, previous_run)
