"""The checks every audit record passes: canonical JSON, the PCI DSS 10.2.2 fields, no clear PAN.

:func:`record_problems` checks one line and says what is wrong with it. :func:`check_block`
checks a block of lines at once, in C as far as it goes, and says only whether all of them
hold (with their leaf hashes and seqs): the fast path, run in worker processes. A block it
refuses is gone over line by line, which is what names the failures.
"""

from __future__ import annotations

import hashlib
import operator
import re
from collections.abc import Sequence
from typing import Any

from appliance.audit import canonical
from appliance.audit.verify_pan import find_clear_pans, flagged_lines, line_may_hold_pan, redact_digits

# PCI DSS 10.2.2: what every record must say.
FIELDS = ("user", "type", "time", "outcome", "origin", "object")
OUTCOMES = frozenset(("success", "failure"))
RECORD_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z", re.ASCII)
_record_time = RECORD_TIME.fullmatch
_sha256 = hashlib.sha256


_FIELD_VALUES = operator.itemgetter("seq", *FIELDS)


def fields_ok(obj: Any) -> bool:
    """Is ``obj`` a record with an integer seq and every 10.2.2 field well formed?"""
    try:
        seq, user, kind, when, outcome, origin, what = _FIELD_VALUES(obj)
    except (KeyError, TypeError):
        return False
    return (type(seq) is int and seq >= 0 and type(user) is str and type(kind) is str and type(when) is str
            and type(origin) is str and type(what) is str and user != "" and kind != "" and origin != ""
            and what != "" and (outcome == "success" or outcome == "failure") and _record_time(when) is not None)


def field_problems(obj: dict[str, Any]) -> list[str]:
    """What is wrong with the 10.2.2 fields of ``obj`` (messages quote no digit runs)."""
    problems = []
    missing = [f for f in FIELDS if type(obj.get(f)) is not str or not obj.get(f)]
    if missing:
        problems.append(f"PCI DSS 10.2.2 field(s) missing or empty: {', '.join(missing)}")
    outcome = obj.get("outcome")
    if "outcome" not in missing and outcome not in OUTCOMES:
        problems.append(redact_digits(f"outcome {str(outcome)[:40]!r} is not success or failure"))
    when = obj.get("time")
    if "time" not in missing and RECORD_TIME.fullmatch(when) is None:
        problems.append(redact_digits(f"time {when[:40]!r} is not YYYY-MM-DDTHH:MM:SS.ffffffZ"))
    return problems


def record_problems(line: bytes) -> tuple[dict[str, Any] | None, list[tuple[str, bool, str]]]:
    """Parse and check one record line: canonical JSON, 10.2.2 fields, no clear PAN.

    The record (None unless it is a JSON object) and what is wrong with it, each as
    (kind, whether the report names the record's seq, message).
    """
    problems: list[tuple[str, bool, str]] = []
    try:
        obj = canonical.loads_canonical(line)
        canonical_form = True
    except canonical.CanonicalError as exc:
        problems.append(("record", False, redact_digits(f"not canonical JSON: {exc}")))
        try:
            obj = canonical.loads(line)
        except canonical.CanonicalError:
            return None, problems
        canonical_form = False
    if type(obj) is not dict:
        problems.append(("record", False, "not a JSON object"))
        return None, problems
    if not fields_ok(obj):
        seq = obj.get("seq")
        if type(seq) is not int or seq < 0:
            problems.append(("fields", False, "no integer seq"))
        problems.extend(("fields", True, message) for message in field_problems(obj))
    if not canonical_form or line_may_hold_pan(line):
        for path, masked in find_clear_pans(obj):
            problems.append(("pan", True, f"clear PAN at {path} ({masked})"))
    return obj, problems


# What check_block says of a block: its leaf hashes and seqs when every line holds, else None.
BlockVerdict = tuple[bytes, Sequence[int]] | None


def check_block(data: bytes) -> BlockVerdict:
    """A block of whole record lines: if no line has a problem (``record_problems``), their
    leaf hashes (concatenated) and seqs (a range when consecutive); else None, and the walk
    takes the block line by line, naming what is wrong. Runs in worker processes.
    """
    objs = canonical.loads_canonical_lines(data)
    if objs is None or not all(map(fields_ok, objs)):
        return None
    for index, line in flagged_lines(data):
        if line_may_hold_pan(line) and find_clear_pans(objs[index]):
            return None
    lines = data.split(b"\n")
    lines.pop()
    hashes = b"".join([_sha256(b"\x00" + line).digest() for line in lines])
    seqs = [obj["seq"] for obj in objs]
    span = range(seqs[0], seqs[0] + len(seqs)) if seqs else range(0)
    return hashes, (span if seqs == list(span) else seqs)


def quick_seq(line: bytes) -> int | None:
    """The seq of a record line that may be damaged otherwise; None if it has none."""
    try:
        obj = canonical.loads(line)
    except canonical.CanonicalError:
        return None
    seq = obj.get("seq") if isinstance(obj, dict) else None
    return seq if type(seq) is int else None
