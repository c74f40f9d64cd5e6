"""``tollgate audit export``: a bundle an auditor can verify away from the appliance.

1. A fresh checkpoint fixes what the bundle covers (its *log size*): asked of the running
   proxy over its control socket (``audit.checkpoint``), or — when the proxy isn't
   running — made by opening the log here (taking its lock, as the writer).
2. Every position 0 … log size − 1 is fed to :class:`~appliance.audit.bundle_writer.BundleWriter`
   in order: the records the filters select with their lines, the others by leaf hash only
   (the writer turns runs of those into proofs). Filters: a time range on the records'
   ``time`` (both ends inclusive) and a session — its records, and the decisions on
   approvals its statements asked for (which may be recorded after the session ended).
3. The bundle holds the checkpoints from the first one covering the first selected record
   up to the fresh one, each with the witnesses' cosignatures the writer stored for it
   (an export waits a few seconds for those of the fresh one, and warns without them).
4. The export is itself recorded (an ``admin`` record, ``audit.export``), through the proxy
   (``audit.append``) or directly; a failed export is recorded as a failure.

A *damaged* log — a segment cut or replaced under the writer, which then refuses every
record and checkpoint — can't give a fresh checkpoint (nor, stopped, be opened as the
writer). Export then ends the bundle at the last checkpoint the records on disk still
match (:func:`last_sound_checkpoint`): ranges before the damage export and verify as
ever, and the summary's warnings name the damage (the writer's ``audit.failure`` record
when it could write one) and what the bundle leaves out. The export can't be recorded
in a log that refuses records; a warning says so.
"""

from __future__ import annotations

import copy
import logging
import os
import pwd
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.audit import merkle
from appliance.audit.bundle_writer import BundleWriter
from appliance.audit.keys import KeyRing
from appliance.audit.reader import AuditReader, ReaderError, field_pattern, parse, record_time
from appliance.audit.store import AuditLog
from appliance.audit.store_checkpoints import checkpoint_root
from appliance.audit.store_errors import AuditError
from appliance.audit.store_pruned import load_pruned
from appliance.audit.witnessing import load_cosignatures, text_sha256, with_cosignatures
from appliance.config import AuditConfig, Config, ConfigError

log = logging.getLogger("tollgate.audit")

Progress = Callable[[int, int], None]
PROGRESS_EVERY = 20_000
EXPORT_WITNESS_WAIT = 10.0  # seconds an export waits for the witnesses to cosign its fresh checkpoint
WITNESS_POLL = 0.05
_DECISION = b'"type":"approval.decision"'
_APPROVAL = b'"approval":"'


class ExportError(Exception):
    """The export could not be made (the message says why)."""


@dataclass
class ExportSummary:
    path: Path
    log_size: int
    records: int
    left_out: int
    checkpoints: int
    bytes: int
    sha256: str
    seconds: float
    via: str  # "proxy" or "direct"
    admin_seq: int | None = None
    warnings: list[str] = field(default_factory=list)
    damaged: str | None = None  # the log is damaged: the bundle ends before it (see last_sound_checkpoint)


def record_stamp(when: datetime) -> str:
    """A datetime in the records' form, ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (naive = UTC)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def cli_identity() -> tuple[str, str]:
    """(user, origin) for records of a local command: the login name (the sudo caller's
    when run through sudo) and ``cli:UID``."""
    uid = os.getuid()
    user = os.environ.get("SUDO_USER") if uid == 0 else None
    if not user:
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = f"uid:{uid}"
    return user, f"cli:{uid}"


# --- who writes: the running proxy, or this process ----------------------------------------

class LogAccess:
    """Checkpoints and admin records, through the proxy if it runs, else by opening the log."""

    def __init__(self, config: Config, *, version: str = "cli", read_only_if_unusable: bool = False):
        """``read_only_if_unusable``: if the log can't be opened as the writer (it is
        damaged), read it without writing (``via`` "read-only": no checkpoint, no record)."""
        self.config = config
        audit = config.audit
        if audit is None:
            raise ConfigError(f"{config.path}: has no [audit] section")
        self.audit: AuditConfig = audit
        self.log: AuditLog | None = None
        self.via = "proxy"
        self.unusable: str | None = None  # why the log can't be written (read-only access)
        if not self._proxy_answers():
            self.via = "direct"
            try:
                self.log = AuditLog.open(audit, version=version)
            except AuditError as exc:
                hint = ""
                if "in use by pid" in str(exc):
                    hint = (" — the proxy holds it, but its control socket can't be reached"
                            + ("" if config.proxy.control_socket else " (set proxy.control_socket)"))
                elif read_only_if_unusable:
                    self.via, self.unusable = "read-only", str(exc)
                    return
                raise ExportError(f"{exc}{hint}") from None

    def _proxy_answers(self) -> bool:
        if self.config.proxy.control_socket is None:
            return False
        from appliance.proxy.control import control_request
        try:
            reply = control_request(self.config, {"op": "ping"})
        except ConfigError:
            return False  # not running (or not reachable): we are the writer
        return bool(reply.get("ok"))

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        from appliance.proxy.control import control_request
        reply = control_request(self.config, request)
        if not reply.get("ok"):
            raise ExportError(f"the proxy refused {request['op']}: {reply.get('error', 'no reason given')}")
        return reply

    def checkpoint(self) -> dict[str, Any]:
        if self.unusable is not None:
            raise ExportError(f"the audit log can't be opened to sign a checkpoint: {self.unusable}")
        if self.log is not None:
            try:
                return self.log.checkpoint_now()
            except AuditError as exc:
                raise ExportError(f"the audit log refused to sign a checkpoint: {exc}") from None
        return self._ask({"op": "audit.checkpoint"})["checkpoint"]

    def append_admin(self, record: dict[str, Any]) -> int:
        record = {"type": "admin", **record}
        if self.unusable is not None:
            raise ExportError(f"the audit log can't be written: {self.unusable}")
        if self.log is not None:
            return self.log.append_durable(record)
        return int(self._ask({"op": "audit.append", "record": record})["seq"])

    def rotate(self, root_key_path: Path | None, user: str, origin: str) -> str:
        if self.log is not None:
            from appliance.audit.keys import load_root_key
            root = load_root_key(self.audit, root_key_path)
            return self.log.rotate_key(root, user=user, origin=origin).key_id
        request: dict[str, Any] = {"op": "audit.rotate", "user": user, "origin": origin}
        if root_key_path is not None:
            request["root_key"] = str(root_key_path.resolve())
        reply = self._ask(request)
        rotated = reply.get("rotated")
        return rotated.get("key") if isinstance(rotated, dict) else str(rotated)

    def status(self) -> dict[str, Any] | None:
        if self.log is not None:
            return self.log.status()
        try:
            return self._ask({"op": "audit"}).get("audit")
        except ExportError:
            return None

    def close(self, reason: str) -> None:
        if self.log is not None:
            self.log.close(reason)
            self.log = None


def append_admin_direct(config: Config, record: dict[str, Any]) -> int:
    """An admin record appended by this process (no proxy answers): durable and signed
    before it returns, as through the proxy; :func:`appliance.proxy.control.record_admin`
    calls it (installed by the entry point)."""
    access = LogAccess(config, version="admin")
    try:
        seq = access.append_admin(record)
        access.checkpoint()
        return seq
    finally:
        access.close("admin record appended")


# --- selection ----------------------------------------------------------------------------

class Selection:
    """Which records a bundle holds: time range (inclusive) and/or session."""

    def __init__(self, frm: datetime | None, to: datetime | None, session: str | None):
        self.frm = record_stamp(frm) if frm is not None else None
        self.to = record_stamp(to) if to is not None else None
        if self.frm and self.to and self.to < self.frm:
            raise ExportError(f"--to {self.to} is before --from {self.frm}")
        self.session = session
        self._pattern = field_pattern("session", session) if session is not None else None
        self._approvals: set[str] = set()

    def fresh(self) -> Selection:
        """The same filters, with nothing seen yet (for a second pass)."""
        new = copy.copy(self)
        new._approvals = set()
        return new

    @property
    def everything(self) -> bool:
        return self.frm is None and self.to is None and self.session is None

    def __call__(self, line: bytes) -> bool:
        if self.frm is not None or self.to is not None:
            t = record_time(line)
            if t is None or (self.frm is not None and t < self.frm) or (self.to is not None and t > self.to):
                return False
        pattern = self._pattern
        if pattern is None:
            return True
        if pattern in line:
            if _APPROVAL in line:  # a statement run under an approval, or the request itself
                approval = parse(line).get("approval")
                if isinstance(approval, str):
                    self._approvals.add(approval)
            return True
        if self._approvals and _DECISION in line:
            return parse(line).get("approval") in self._approvals
        return False


# --- the export ----------------------------------------------------------------------------

def export(config: Config, out: Path, frm: datetime | None = None, to: datetime | None = None,
           session: str | None = None, progress: Progress | None = None, *,
           access: LogAccess | None = None, who: tuple[str, str] | None = None) -> ExportSummary:
    """Write the bundle ``out``; see the module docstring. Records the export in the log, as
    made by ``who`` — (user, origin), e.g. a console user and their address — or by the
    local command's user."""
    audit = config.audit
    if audit is None:
        raise ConfigError(f"{config.path}: has no [audit] section")
    started = time.monotonic()
    select = Selection(frm, to, session)  # before anything is written: bad ranges fail early
    own = access is None
    access = access or LogAccess(config, read_only_if_unusable=True)
    user, origin = who or cli_identity()
    details: dict[str, Any] = {"from": select.frm, "to": select.to, "session": session, "out": str(out)}
    details = {k: v for k, v in details.items() if v is not None}
    try:
        try:
            summary = _write(audit, out, select, access, progress)
        except BaseException as exc:
            reason = str(exc) or type(exc).__name__
            try:
                access.append_admin({"action": "audit.export", "user": user, "outcome": "failure",
                                     "origin": origin, "object": "audit-log", **details, "error": reason[:500]})
            except Exception as also:  # noqa: BLE001 - the export's own error is the one to report
                log.error("audit: could not record the failed export either: %s", also)
            raise
        summary.via = access.via
        summary.seconds = time.monotonic() - started
        admin = {"action": "audit.export", "user": user, "outcome": "success", "origin": origin,
                 "object": "audit-log", **details, "records": summary.records, "log_size": summary.log_size,
                 "sha256": summary.sha256}
        if summary.damaged is None:
            summary.admin_seq = access.append_admin(admin)
            return summary
        try:  # a damaged log refuses records: the bundle stands, unrecorded, and says so
            summary.admin_seq = access.append_admin(admin)
        except (ExportError, AuditError) as exc:
            summary.warnings.append(f"the export could not be recorded in the audit log: {exc}")
        return summary
    finally:
        if own:
            access.close("audit export done")


def _write(audit: AuditConfig, out: Path, select: Selection, access: LogAccess,
           progress: Progress | None) -> ExportSummary:
    reader = AuditReader(audit.dir)
    damaged: str | None = None
    try:
        fresh = access.checkpoint()
    except ExportError as exc:
        sound = last_sound_checkpoint(reader, _witnessed(audit) if audit.witnesses else None)
        if sound.checkpoint is None:
            raise ExportError(f"{exc}; and no checkpoint of the log matches the records on disk") from None
        fresh = sound.checkpoint
        damaged = (f"{sound.damage or exc}; the bundle ends at the last checkpoint the records on disk still "
                   f"match (size {fresh['size']}): records from seq {fresh['size']} on are not in it")
        log.error("audit: export of a damaged log: %s", damaged)
    log_size = int(fresh["size"])
    keyring = KeyRing.load(audit)

    first = None
    if log_size:
        probe = select.fresh()
        for entry in reader.records(0, log_size):
            if probe(entry.line):
                first = entry.seq
                break
    checkpoints = _checkpoints(reader, fresh, first)
    witness_warning = None
    if audit.witnesses:
        checkpoints, witness_warning = _add_cosignatures(audit, checkpoints, fresh, damaged is None)

    pruned = load_pruned(audit.dir)
    frm = select.frm
    if pruned is not None and pruned.end and frm is None and log_size > pruned.end:
        # Retention took the oldest records off the box (they are in the sealed bundles):
        # the bundle says it starts with the first record still online, not that it is whole.
        entry = reader.find(pruned.end)
        frm = record_time(entry.line) if entry is not None else None
    writer = BundleWriter(
        out, origin=audit.origin, signing_key=keyring.signing_key, trust_note=keyring.trust_note,
        root_verifier_key=keyring.root_verifier_text, verifier_keys=list(keyring.verifier_keys().values()),
        checkpoints=checkpoints, frm=frm, to=select.to, session=select.session,
        # The bundle is as of its fresh checkpoint: a checkpoint made while this export
        # scans must not look like a log tail the bundle is missing.
        created=fresh["time"])
    with writer:
        leaf = merkle.leaf_hash
        add = writer.add
        everything = select.everything
        seq = -1
        if pruned is not None and pruned.end:
            writer.add_pruned(pruned)  # retention took these records off the box: their hashes prove them
            seq = pruned.end - 1
        for seq, line, segment in reader.records(0, log_size):
            add(seq, leaf(line), line if everything or select(line) else None, segment)
            if progress is not None and seq % PROGRESS_EVERY == 0:
                progress(seq, log_size)
        if seq != log_size - 1:
            raise ExportError(f"{audit.dir}: the log holds {seq + 1} records, but its checkpoint covers {log_size}")
        if progress is not None:
            progress(log_size, log_size)
        if writer.warnings:  # the log doesn't match its own checkpoints: no bundle
            raise ExportError(f"{audit.dir}: the log does not verify: " + "; ".join(writer.warnings[:5]))
        result = writer.close()
    warnings = list(result.warnings)
    if witness_warning is not None:
        warnings.append(witness_warning)
    if damaged is not None:
        warnings.insert(0, f"the audit log is damaged: {damaged}")
    return ExportSummary(result.path, result.log_size, result.records, result.left_out, result.checkpoints,
                         result.bytes, result.sha256, 0.0, access.via, warnings=warnings, damaged=damaged)


@dataclass
class Sound:
    checkpoint: dict[str, Any] | None  # the last checkpoint the records on disk match
    damage: str | None  # what is wrong after it, as far as the log says


def last_sound_checkpoint(reader: AuditReader, witnessed: Callable[[dict[str, Any]], bool] | None = None) -> Sound:
    """The last checkpoint whose root the records on disk still give, reading the log from
    the start until it stops matching or can't be read on; and the damage past it — the
    writer's ``audit.failure`` record with ``damage`` if it wrote one, else what was found.
    With ``witnessed``, only a checkpoint it accepts (the witnesses cosigned it) is chosen."""
    checkpoints = reader.checkpoints()
    by_size: dict[int, dict[str, Any]] = {}
    for cp in checkpoints:
        if witnessed is None or witnessed(cp) or cp["size"] not in by_size:
            by_size[cp["size"]] = cp  # the last of each size (same root unless forked), witnessed if one is
    sizes = sorted(s for s in by_size if s > 0)
    tree = merkle.CompactRange()
    good: dict[str, Any] | None = None
    found: str | None = None
    count = 0
    i = 0

    def at_size() -> bool:
        nonlocal i, good, found
        while i < len(sizes) and sizes[i] == count:
            cp = by_size[count]
            i += 1
            if checkpoint_root(cp) != tree.root():
                found = f"the records before seq {count} don't match the checkpoint of size {count}"
                return False
            if witnessed is None or witnessed(cp):
                good = cp
        return True

    try:
        for entry in reader.records():
            if not at_size():
                break
            tree.append_leaf(entry.leaf)
            count += 1
        else:
            at_size()
    except ReaderError as exc:
        found = str(exc)
    if found is None and i < len(sizes):
        found = f"the log holds {count} records on disk, but a checkpoint covers {sizes[-1]}"
    return Sound(good, _damage_record(reader) or found)


def _damage_record(reader: AuditReader) -> str | None:
    """The writer's own account of a segment that changed under it (its last such record)."""
    for _start, path in reversed(reader.segments()):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        for line in reversed(data.split(b"\n")):
            if b'"damage":' in line and b'"type":"audit.failure"' in line:
                try:
                    record = parse(line)
                except ValueError:
                    continue
                return f"{record.get('error')} (recorded as seq {record.get('seq')}, {record.get('time')})"
    return None


def _witnessed(audit: AuditConfig) -> Callable[[dict[str, Any]], bool]:
    """Does a checkpoints.jsonl entry carry the quorum of stored cosignatures?"""
    stored = load_cosignatures(audit.dir)

    def witnessed(cp: dict[str, Any]) -> bool:
        lines = stored.get(text_sha256(cp["note"]), [])
        return len({line.split(" ", 2)[1] for line in lines}) >= audit.witness_quorum
    return witnessed


def _add_cosignatures(audit: AuditConfig, checkpoints: list[dict[str, Any]], fresh: dict[str, Any],
                      wait: bool) -> tuple[list[dict[str, Any]], str | None]:
    """The checkpoints with the witnesses' cosignatures in their notes; a warning if the
    last one has fewer than the quorum (after waiting up to EXPORT_WITNESS_WAIT seconds for
    the writer to get them: it submits each checkpoint as soon as it is signed)."""
    deadline = time.monotonic() + (EXPORT_WITNESS_WAIT if wait else 0.0)
    digest = text_sha256(fresh["note"])
    while True:
        stored = load_cosignatures(audit.dir)
        have = len({line.split(" ", 2)[1] for line in stored.get(digest, [])})
        if have >= audit.witness_quorum or time.monotonic() >= deadline:
            break
        time.sleep(WITNESS_POLL)  # the writer's thread appends to cosignatures.jsonl; no event crosses processes
    out = [{**c, "note": with_cosignatures(c["note"], stored)} for c in checkpoints]
    if have >= audit.witness_quorum:
        return out, None
    return out, (f"the bundle's last checkpoint (size {fresh['size']}) has {have} of the {audit.witness_quorum} "
                 f"witness cosignatures required (see `tollgate audit status`): a verifier given the witness keys "
                 f"will not rely on it")


def _checkpoints(reader: AuditReader, fresh: dict[str, Any], first: int | None) -> list[dict[str, Any]]:
    """From the first checkpoint covering record ``first`` up to ``fresh`` (the bundle's last)."""
    everything = reader.checkpoints()
    try:
        end = next(i for i in range(len(everything) - 1, -1, -1) if everything[i]["note"] == fresh["note"])
    except StopIteration:
        raise ExportError("the fresh checkpoint is not in checkpoints.jsonl (was the log replaced?)") from None
    chosen = everything[:end + 1]
    chosen = [chosen[-1]] if first is None else [c for c in chosen if c["size"] >= first + 1]
    chosen.sort(key=lambda c: c["size"])  # stable: file order within a size
    return [{"note": c["note"], "size": c["size"], "time": c["time"]} for c in chosen]
