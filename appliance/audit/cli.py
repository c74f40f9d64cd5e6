"""``tollgate audit …`` (init, status, export, verify, review, rotate-key, trust-witnesses, sessions) and
``tollgate replay``.

Commands that must write to the log (an export is itself recorded, a key rotation is a
key event) or need a fresh checkpoint go through the running proxy's control socket; when
the proxy isn't running they open the log themselves (taking its lock, as its writer).
Read-only commands (status, sessions, replay) read the files and never take the lock.

Times given on the command line are ISO 8601: a date (``2024-05-01``) or a date and time
(``2024-05-01T12:00``, ``…Z``, ``…+02:00``; without an offset, UTC), or for ``--since``
also a span back from now (``90m``, ``12h``, ``7d``). A date alone as ``--to`` means the
end of that day. Times shown are UTC.

Exit status: 0 done; 1 the operation failed (one line saying why); 2 usage or config.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from appliance.config import AuditConfig, Config, ConfigError, load_config

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PROG = "tollgate audit"
_SPAN = re.compile(r"^(\d+)\s*([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class UsageError(Exception):
    """Something the caller must fix in how the command was run."""


def register(sub: argparse._SubParsersAction) -> None:
    audit = sub.add_parser("audit", help="the audit log: init, status, export, verify, rotate-key, sessions",
                           description="The tamper-evident audit log (docs/audit-format.md).")
    verbs = audit.add_subparsers(dest="audit_command", metavar="ACTION", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", required=True, type=Path, help="Tollgate configuration (TOML)")

    init = verbs.add_parser("init", parents=[common], help="create the audit directory, root and signing keys")
    init.add_argument("--force", action="store_true",
                      help="move an existing audit directory aside (kept, renamed) and start a new log")
    init.set_defaults(handler=_run(cmd_init))

    status = verbs.add_parser("status", parents=[common], help="size, last checkpoint, keys, failures")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=_run(cmd_status))

    export = verbs.add_parser("export", parents=[common], help="write a bundle an auditor can verify offline",
                              description="Records in the range (both ends inclusive; all when not given), "
                                          "with checkpoints, keys, the trust file and proofs for what is left out.")
    export.add_argument("--from", dest="frm", metavar="TIME", help="first record time (ISO 8601)")
    export.add_argument("--to", metavar="TIME", help="last record time (ISO 8601; a date = its whole day)")
    export.add_argument("--session", metavar="ID", help="only this session's records (and its approvals)")
    export.add_argument("-o", "--output", required=True, type=Path, metavar="BUNDLE",
                        help="the bundle to write (.tar.gz)")
    bar = export.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None,
                     help="show a progress bar even when stderr is not a terminal")
    bar.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    export.set_defaults(handler=_run(cmd_export))

    verify = verbs.add_parser("verify", help="verify a bundle (as tollgate-verify does)")
    verify.add_argument("bundle", type=Path)
    verify.add_argument("-c", "--config", type=Path, help="Tollgate configuration: its keys/root.pub is the "
                                                          "default root key")
    verify.add_argument("--root-key", metavar="FILE|KEY", help="the pinned root verifier key (file or key text)")
    verify.add_argument("--offbox", action="append", default=[], metavar="DIR|FILE",
                        help="checkpoints kept off the box, to show a cut tail (repeatable)")
    verify.add_argument("--witness", action="append", default=[], metavar="KEY|@FILE",
                        help="a witness's key: the bundle's head must carry its cosignature (repeatable; "
                             "default with -c: the config's witnesses)")
    verify.add_argument("--witness-quorum", type=int, metavar="N", help="cosignatures required (default: all)")
    verify.add_argument("--witness-checkpoint", action="append", default=[], metavar="FILE",
                        help="a witness's view saved when the export was asked for: the bundle must reach it")
    verify.add_argument("--witness-url", action="append", default=[], metavar="URL",
                        help="ask this witness now for its latest checkpoint")
    verify.add_argument("--json", metavar="FILE", help="also write a JSON report")
    verify.set_defaults(handler=_run(cmd_verify))

    rotate = verbs.add_parser("rotate-key", parents=[common], help="new signing key; the trust file re-signed",
                              description="Needs the root private key: [audit] root_key, keys/root.key, or "
                                          "--root-key FILE.")
    rotate.add_argument("--root-key", type=Path, metavar="FILE", help="the root private key (PEM)")
    rotate.set_defaults(handler=_run(cmd_rotate))

    trust_w = verbs.add_parser("trust-witnesses", parents=[common],
                               help="the trust file re-signed to require the config's witnesses",
                               description="Writes [[audit.witnesses]] and witness_quorum into the trust file "
                                           "(none: removes the requirement), so a verifier pinning only the root key "
                                           "requires their cosignatures. Needs the root private key.")
    trust_w.add_argument("--root-key", type=Path, metavar="FILE", help="the root private key (PEM)")
    trust_w.set_defaults(handler=_run(cmd_trust_witnesses))

    review = verbs.add_parser("review", parents=[common], help="verify the log, then report anomalies since the "
                                                               "last review (PCI DSS 10.4.1.1); for a timer",
                              description="Exit status: 0 nothing found; 3 findings (alerted); 1 the review failed.")
    review.add_argument("--alert-webhook", metavar="URL", help="POST the findings (JSON) here when there are any")
    review.add_argument("--alert-syslog", metavar="ADDRESS",
                        help="and/or send one line (authpriv.warning): unix:/dev/log or udp:HOST:PORT")
    review.add_argument("--heartbeat-gap", type=float, metavar="SECONDS",
                        help="a longer time between checkpoints while running is a finding "
                             "(default: 3 × audit.heartbeat_seconds)")
    review.add_argument("--json", action="store_true", help="the review as JSON")
    review.set_defaults(handler=_run(cmd_review))

    retain = verbs.add_parser("retain", parents=[common],
                              help="seal closed months into the archive, prune the online log, expire old "
                                   "bundles (PCI DSS 10.5.1); for a timer")
    retain.set_defaults(handler=_run(cmd_retain))

    forward = verbs.add_parser("forward", parents=[common],
                               help="stream every record to the SIEM ([siem]), at least once; runs until stopped")
    forward.add_argument("--once", action="store_true", help="send what is waiting, then exit")
    forward.set_defaults(handler=_run(cmd_forward))

    sessions = verbs.add_parser("sessions", parents=[common], help="sessions recorded in the log")
    _session_arguments(sessions)
    sessions.set_defaults(handler=_run(cmd_sessions))
    _top_level_sessions(sub, common)

    replay = sub.add_parser("replay", parents=[common], help="replay a recorded session in the terminal",
                            description="A session from its audit records, in order: identity and TLS, each "
                                        "statement with its decision and result, approvals, the end.")
    replay.add_argument("session", help="the session id (see `tollgate audit sessions`)")
    replay.add_argument("--results", action=argparse.BooleanOptionalAction, default=True,
                        help="show the sampled result rows (default: yes)")
    replay.set_defaults(handler=_run(cmd_replay))


def _session_arguments(parser: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
    parser.add_argument("--since", metavar="TIME", help="sessions started at or after (ISO 8601, or 12h, 7d)")
    parser.add_argument("--user", help="only this identity")
    parser.add_argument("--limit", type=int, default=50, help="the most recent N (default: %(default)s; 0: all)")
    if json_flag:
        parser.add_argument("--json", action="store_true", help="machine-readable output")


def _top_level_sessions(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """``tollgate sessions``: the sessions recorded in the audit log, or with ``--live``
    (or when the config has no [audit]) the running proxy's sessions now."""
    top = sub.add_parser("sessions", parents=[common], help="sessions: recorded in the audit log, or --live",
                         description="Sessions recorded in the audit log (with [audit] configured), or with "
                                     "--live the running proxy's sessions now (its control socket).")
    _session_arguments(top)
    top.add_argument("--live", action="store_true", help="the running proxy's sessions now, not the recorded ones")
    recorded = _run(cmd_sessions)

    def handler(args: argparse.Namespace) -> int:
        if args.live or load_config(args.config).audit is None:
            from appliance.proxy.cli import cmd_live_sessions
            return cmd_live_sessions(args)
        return int(recorded(args) or 0)

    top.set_defaults(handler=handler)


# --- plumbing ----------------------------------------------------------------------------------

def _run(fn: Any) -> Any:
    def handler(args: argparse.Namespace) -> int:
        from appliance.audit.export import ExportError
        from appliance.audit.keys import AuditKeyError
        from appliance.audit.reader import ReaderError
        from appliance.audit.store_errors import AuditError
        try:
            return fn(args)
        except UsageError as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except (AuditError, AuditKeyError, ExportError, ReaderError) as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            return EXIT_FAILED
    handler.__name__ = fn.__name__
    return handler


def _config(args: argparse.Namespace) -> tuple[Config, AuditConfig]:
    config = load_config(args.config)  # ConfigError: main() reports it, exit 2
    if config.audit is None:
        raise ConfigError(f"{config.path}: has no [audit] section")
    return config, config.audit


def parse_when(text: str, *, end: bool = False, now: datetime | None = None) -> datetime:
    """An ISO 8601 date or date-time (naive = UTC), or a span back from now (``12h``).

    A date alone is the start of that day, or with ``end`` its last microsecond."""
    text = text.strip()
    m = _SPAN.match(text)
    if m:
        return (now or datetime.now(UTC)) - timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            when = datetime(day.year, day.month, day.day, tzinfo=UTC)
            return when + timedelta(days=1, microseconds=-1) if end else when
        when = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise UsageError(f"{text!r} is not an ISO 8601 date or time (e.g. 2024-05-01, 2024-05-01T12:00:00Z)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC)


class ProgressBar:
    """``[#####-----]  45%  123,456/274,000 records  52,113/s  ETA 0:03`` on one line."""

    def __init__(self, stream: TextIO, what: str = "records", width: int = 30):
        self.stream, self.what, self.width = stream, what, width
        self.started = time.monotonic()
        self._drawn = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._drawn < 0.1:
            return
        self._drawn = now
        elapsed = max(now - self.started, 1e-6)
        rate = done / elapsed
        share = done / total if total else 1.0
        filled = int(self.width * share)
        eta = (total - done) / rate if rate > 0 else 0.0
        minutes, seconds = divmod(int(eta + 0.5), 60)
        line = (f"\r[{'#' * filled}{'-' * (self.width - filled)}] {share:4.0%}  {done:,}/{total:,} {self.what}"
                f"  {rate:,.0f}/s  ETA {minutes}:{seconds:02d}")
        self.stream.write(line)
        self.stream.flush()

    def finish(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()


# --- init, status, rotate ----------------------------------------------------------------------

def cmd_init(args: argparse.Namespace) -> int:
    from appliance.audit.keys import init_audit_dir
    _, audit = _config(args)
    ring = init_audit_dir(audit, force=args.force)
    root_key = audit.root_key or audit.keys_dir / "root.key"
    print(f"audit log created in {audit.dir} (origin {audit.origin})")
    print(f"signing key {ring.signing_key.key_id}, trusted from tree size 0")
    print()
    print("The root verifier key — give it to your auditors out of band; they pin it:")
    print(f"  {ring.root_verifier_text}")
    print(f"  (also in {audit.keys_dir / 'root.pub'})")
    print()
    print(f"The root private key is {root_key}: move it off this box and keep it offline;")
    print("it is needed only to rotate the signing key (`tollgate audit rotate-key --root-key FILE`).")
    return EXIT_OK


def cmd_rotate(args: argparse.Namespace) -> int:
    from appliance.audit.export import LogAccess, cli_identity
    config, audit = _config(args)
    if args.root_key is not None and not args.root_key.exists():
        raise UsageError(f"{args.root_key}: no such file")
    user, origin = cli_identity()
    access = LogAccess(config)
    try:
        key = access.rotate(args.root_key, user, origin)
    finally:
        access.close("key rotated")
    print(f"signing key rotated: now {key} (via {access.via}); {audit.dir / 'trust.note'} re-signed by the root key")
    return EXIT_OK


def cmd_trust_witnesses(args: argparse.Namespace) -> int:
    from appliance.audit.export import LogAccess, cli_identity
    from appliance.audit.keys import KeyRing, load_root_key, trust_witnesses
    config, audit = _config(args)
    if args.root_key is not None and not args.root_key.exists():
        raise UsageError(f"{args.root_key}: no such file")
    root = load_root_key(audit, args.root_key)
    trust_witnesses(KeyRing.load(audit), root)
    user, origin = cli_identity()
    access = LogAccess(config)
    try:
        access.append_admin({"action": "audit.trust-witnesses", "user": user, "origin": origin,
                             "object": "audit-log", "outcome": "success",
                             "witnesses": [w.name for w in audit.witnesses], "quorum": audit.witness_quorum})
    finally:
        access.close("trust file re-signed")
    names = ", ".join(w.name for w in audit.witnesses) or "none"
    print(f"{audit.dir / 'trust.note'} re-signed by the root key: witnesses {names}, quorum {audit.witness_quorum}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    config, audit = _config(args)
    status = _live_status(config)
    if status is None:
        status = _offline_status(audit)
    if args.json:
        print(json.dumps(status, indent=2))
        return EXIT_OK
    print(f"audit log   {status['dir']}  (origin {status['origin']})")
    if status.get("pid"):
        print(f"writer      pid {status['pid']}, run {status.get('run', '?')}, durability {status.get('durability')}")
    else:
        print("writer      none (the proxy is not running)")
    size = f"{status['size']:,} records"
    if "durable_size" in status:
        size += f" ({status['durable_size']:,} durable)"
    print(f"size        {size}; {status.get('segments', '?')} segment(s), current {status['segment']}")
    cp = status.get("checkpoint")
    if cp:
        age = _age(cp["time"])
        print(f"checkpoint  size {cp['size']:,} at {cp['time']}{f' ({age} ago)' if age else ''}")
    else:
        print("checkpoint  none yet")
    print(f"signing key {status['key']}")
    for entry in status.get("trust", []):
        print(f"  trusted   {entry}")
    failure = status.get("failure")
    if failure:
        print(f"FAILING     since {failure['since']}: {failure['error']} "
              f"({failure.get('refused', 0)} statements refused)")
    for sink in status.get("offbox", []):
        state = f"error: {sink['error']}" if sink.get("error") else "ok"
        print(f"off-box     {sink['sink']}: {sink.get('delivered', 0)} sent, "
              f"{sink.get('pending', 0)} waiting ({state})")
    for w in status.get("witnesses", []):
        cosigned = f"cosigned size {w['cosigned_size']:,}" if w.get("cosigned_size") is not None else "nothing cosigned"
        state = (f"FAILING since {w['failing_since']}: {w['error']}" if w.get("error")
                 else f"ok, {cosigned} at {w.get('cosigned_time')}")
        waiting = f", size {w['pending']:,} waiting" if w.get("pending") is not None else ""
        print(f"witness     {w['witness']} ({w['url']}): {state}{waiting}")
    if status.get("root_key_on_box"):
        print(f"warning     the root private key is on this box ({status['root_key_on_box']}): move it offline")
    return EXIT_OK


def _age(stamp: str) -> str:
    try:
        when = datetime.fromisoformat(stamp)
    except ValueError:
        return ""
    seconds = max(0, int((datetime.now(UTC) - when).total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def _live_status(config: Config) -> dict[str, Any] | None:
    if config.proxy.control_socket is None:
        return None
    from appliance.proxy.control import control_request
    try:
        reply = control_request(config, {"op": "audit"})
    except (ConfigError, ValueError):
        return None
    if not reply.get("ok") or not isinstance(reply.get("audit"), dict):
        return None
    status = dict(reply["audit"])
    status.update(_file_facts(config.audit))  # type: ignore[arg-type]
    return status


def _file_facts(audit: AuditConfig) -> dict[str, Any]:
    from appliance.audit.keys import KeyRing
    from appliance.audit.reader import AuditReader
    facts: dict[str, Any] = {"segments": len(AuditReader(audit.dir).segments())}
    try:
        ring = KeyRing.load(audit)
        facts["trust"] = [f"{e.key.key_id} for tree sizes {e.range_text}" for e in ring.trust.entries]
    except Exception as exc:  # noqa: BLE001 - status shows what it can
        facts["trust"] = [f"unreadable: {exc}"]
    on_box = [str(p) for p in (audit.root_key, audit.keys_dir / "root.key") if p is not None and p.exists()]
    facts["root_key_on_box"] = on_box[0] if on_box else None
    return facts


def _offline_status(audit: AuditConfig) -> dict[str, Any]:
    from appliance.audit.keys import KeyRing
    from appliance.audit.reader import AuditReader
    from appliance.audit.store_segments import lock_holder, segment_name
    reader = AuditReader(audit.dir)
    ring = KeyRing.load(audit)
    segments = reader.segments()
    status: dict[str, Any] = {
        "dir": str(audit.dir), "origin": audit.origin, "pid": lock_holder(audit.dir), "size": reader.size(),
        "segment": segments[-1][1].name if segments else segment_name(0), "key": ring.signing_key.key_id,
        "checkpoint": None, "failure": None, "offbox": [],
    }
    last = reader.last_checkpoint()
    if last is not None:
        status["checkpoint"] = {"size": last["size"], "time": last["time"]}
    status.update(_file_facts(audit))
    return status


# --- export and verify ----------------------------------------------------------------------------

def cmd_export(args: argparse.Namespace) -> int:
    from appliance.audit.export import export
    config, _ = _config(args)
    frm = parse_when(args.frm) if args.frm else None
    to = parse_when(args.to, end=True) if args.to else None
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    bar = ProgressBar(sys.stderr) if show else None
    try:
        summary = export(config, args.output, frm, to, args.session, bar)
    finally:
        if bar is not None:
            bar.finish()
    rate = summary.log_size / summary.seconds if summary.seconds else 0
    print(f"wrote {summary.path}: {summary.records:,} records of {summary.log_size:,} "
          f"({summary.left_out:,} left out, proven by hashes), {summary.checkpoints} checkpoints, "
          f"{summary.bytes:,} bytes, {summary.seconds:.1f} s ({rate:,.0f} records/s)")
    print(f"sha256 {summary.sha256}")
    if summary.admin_seq is not None:
        print(f"recorded in the audit log as seq {summary.admin_seq} (via {summary.via})")
    for warning in summary.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    # A bundle of a damaged log is written (what precedes the damage verifies) but the
    # export did not cover the log: say so in the exit status too.
    return EXIT_FAILED if summary.damaged is not None else EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from appliance.audit import verifier
    root = args.root_key
    config = None
    if args.config is not None:
        config, audit = _config(args)
    if root is None:
        if config is None:
            raise UsageError("give --root-key FILE (the root verifier key you pinned) or -c CONFIG")
        root = str(audit.keys_dir / "root.pub")
        print(f"note: using this appliance's own {root} as the root key; an auditor should pin their own copy "
              "(--root-key) — a key read from the box being audited proves less.", file=sys.stderr)
    if not root.startswith("@") and Path(root).exists():
        root = "@" + root
    argv = [str(args.bundle), "--root-key", root]
    for offbox in args.offbox:
        argv += ["--offbox", offbox]
    witnesses = args.witness or ([w.key for w in audit.witnesses] if config is not None else [])
    for key in witnesses:
        argv += ["--witness", key]
    if args.witness_quorum is not None:
        argv += ["--witness-quorum", str(args.witness_quorum)]
    elif not args.witness and config is not None and audit.witnesses:
        argv += ["--witness-quorum", str(audit.witness_quorum)]
    for view in args.witness_checkpoint:
        argv += ["--witness-checkpoint", view]
    for url in args.witness_url:
        argv += ["--witness-url", url]
    if args.json:
        argv += ["--json", args.json]
    code = int(verifier.main(argv) or 0)
    if config is not None:
        _record_verify(config, args.bundle, code)
    return code


EXIT_FINDINGS = 3


def cmd_review(args: argparse.Namespace) -> int:
    from appliance.audit.review import ReviewAlertError, review
    config, _ = _config(args)
    try:
        result = review(config, heartbeat_gap=args.heartbeat_gap, alert_webhook=args.alert_webhook,
                        alert_syslog=args.alert_syslog)
    except ReviewAlertError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(f"reviewed records {result.from_seq}..{result.to_seq - 1}: "
              f"{'verified' if result.verified else 'NOT verified'} ({result.verification})")
        for finding in result.findings:
            print(f"  {finding.kind}: seq {finding.seq if finding.seq is not None else '-'} "
                  f"{finding.time or ''} {finding.summary}")
        total = sum(result.counts.values())
        if total > len(result.findings):
            print(f"  … and {total - len(result.findings)} more")
        print(f"{total} finding(s); recorded as review record {result.record_seq}")
    return EXIT_OK if result.clean else EXIT_FINDINGS


def cmd_retain(args: argparse.Namespace) -> int:
    from appliance.audit.retention import RetentionError, retain
    config, audit = _config(args)
    try:
        result = retain(config)
    except RetentionError as exc:
        print(f"{PROG}: retention stopped: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"sealed: {', '.join(result.sealed) or 'nothing new'} (archive {audit.archive})")
    if result.pruned_through is not None:
        print(f"online log: records 0-{result.pruned_through - 1} are in the archive only "
              f"({result.removed_segments} segment(s) removed)")
    if result.expired:
        print(f"expired (older than {audit.retain_months} months): {', '.join(result.expired)}")
    return EXIT_OK


def cmd_forward(args: argparse.Namespace) -> int:
    import signal
    import threading

    from appliance.audit.siem import Forwarder
    config, _ = _config(args)
    forwarder = Forwarder(config)
    if args.once:
        while forwarder.step(retry=True):
            pass
        waiting = {name: pos for name, pos in forwarder.positions.items() if name in forwarder.failing}
        if waiting:
            print(f"{PROG}: not delivered (still failing): {', '.join(waiting)}", file=sys.stderr)
            return EXIT_FAILED
        return EXIT_OK
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    forwarder.run(stop)
    return EXIT_OK


def _record_verify(config: Config, bundle: Path, code: int) -> None:
    """Best effort: the verification is an administrative action on the log's data."""
    from appliance.audit.export import ExportError, LogAccess, cli_identity
    from appliance.audit.store_errors import AuditError
    user, origin = cli_identity()
    record = {"action": "audit.verify", "user": user, "outcome": "success" if code == 0 else "failure",
              "origin": origin, "object": "audit-log", "bundle": str(bundle.resolve()), "exit": code}
    try:
        access = LogAccess(config)
        try:
            access.append_admin(record)
        finally:
            access.close("audit verify done")
    except (AuditError, ExportError, ConfigError, OSError) as exc:
        print(f"{PROG}: note: the verification could not be recorded in the audit log: {exc}", file=sys.stderr)


# --- sessions and replay ---------------------------------------------------------------------------

_SESSION_KEY = b'"session":"'


def _session_of(line: bytes) -> str | None:
    i = line.find(_SESSION_KEY)
    if i < 0:
        return None
    start = i + len(_SESSION_KEY)
    end = line.find(b'"', start)
    value = line[start:end]
    if b"\\" in value:  # escaped: parse properly
        from appliance.audit.reader import parse
        sid = parse(line).get("session")
        return sid if isinstance(sid, str) else None
    return value.decode("utf-8", "replace")


def session_rows(audit: AuditConfig, since: datetime | None = None, user: str | None = None) -> list[Any]:
    """Sessions in the log (parsing only the records that describe them)."""
    from appliance.audit.export import record_stamp
    from appliance.audit.reader import AuditReader, parse, record_time
    from appliance.audit.replay import SessionRow
    rows: dict[str, SessionRow] = {}
    skip: set[str] = set()  # sessions started before ``since``
    floor = record_stamp(since) if since is not None else None
    statement, result, blocked = b'"type":"statement"', b'"type":"result"', b'"decision":"block"'
    failure, unmasked = b'"outcome":"failure"', b'"masked":0'
    for entry in AuditReader(audit.dir).records():
        line = entry.line
        sid = _session_of(line)
        if sid is None or sid in skip:
            continue
        row = rows.get(sid)
        if row is None:
            if floor is not None:
                t = record_time(line)
                if t is not None and t < floor:
                    skip.add(sid)
                    continue
            row = rows[sid] = SessionRow(sid)
        if statement in line:  # the commonest records, counted from their bytes
            row.statements += 1
            if blocked in line or failure in line:
                row.blocked += 1
            if row.start is None:
                row.start = record_time(line)
                row.identify(parse(line))
            continue
        if result in line and unmasked in line:
            if row.start is None:
                row.start = record_time(line)
            continue
        row.take(parse(line))
    out = list(rows.values())
    if user is not None:
        out = [r for r in out if r.user == user]
    return out


def cmd_sessions(args: argparse.Namespace) -> int:
    from appliance.audit.replay import sessions_table
    _, audit = _config(args)
    since = parse_when(args.since) if args.since else None
    if args.limit < 0:
        raise UsageError("--limit must be 0 (all) or more")
    rows = session_rows(audit, since, args.user)
    if args.limit:
        rows = rows[-args.limit:]
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=2))
        return EXIT_OK
    if not rows:
        print("no sessions recorded" + (" in that range" if since or args.user else ""))
        return EXIT_OK
    print(sessions_table(rows))
    return EXIT_OK


def session_records(audit: AuditConfig, session: str) -> Iterator[dict[str, Any]]:
    """A session's records in log order, with the decisions on approvals it asked for."""
    from appliance.audit.export import Selection
    from appliance.audit.reader import AuditReader, parse
    select = Selection(None, None, session)
    for entry in AuditReader(audit.dir).records():
        if select(entry.line):
            yield parse(entry.line)


def cmd_replay(args: argparse.Namespace) -> int:
    from appliance.audit.replay import replay_lines
    _, audit = _config(args)
    records = list(session_records(audit, args.session))
    if not records:
        raise UsageError(f"no records of session {args.session!r} in {audit.dir} (see `tollgate audit sessions`)")
    out = sys.stdout
    for line in replay_lines(records, results=args.results):
        out.write(line + "\n")
    return EXIT_OK
