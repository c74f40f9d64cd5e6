"""The prefix of the log retention took off the box: ``pruned.json`` in the audit directory.

Once a closed period's sealed bundle has verified and the period is older than
``online_months``, its segments may leave the online log (:mod:`appliance.audit.retention`).
What stays is the compact range of the leaves removed — the hashes of the aligned subtrees
covering ``[0, size)`` — which is all the Merkle tree needs of them: the writer recovers
from it, an export proves the left-out prefix with it (a bundle reads exactly as one made
before the pruning), and the records themselves are in the sealed bundles of the archive.

``{"size": N, "hashes": [base64, …], "through": "YYYY-MM"}``; written atomically before
any segment is removed, so a crash between leaves a marker the remaining segments agree
with (the reader starts at the first segment there is, at or before ``size``).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from appliance.audit import merkle

PRUNED_FILE = "pruned.json"


def load_pruned(directory: Path) -> merkle.CompactRange | None:
    """The pruned prefix's compact range, or None when nothing was pruned."""
    try:
        data = json.loads((directory / PRUNED_FILE).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{directory / PRUNED_FILE}: unreadable: {exc}") from None
    try:
        return merkle.CompactRange(0, int(data["size"]), [base64.b64decode(h) for h in data["hashes"]])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{directory / PRUNED_FILE}: not a pruned prefix: {exc}") from None


def pruned_data(tree: merkle.CompactRange, through: str) -> bytes:
    return json.dumps({"size": tree.end, "hashes": [base64.b64encode(h).decode() for h in tree.hashes],
                       "through": through}).encode() + b"\n"
