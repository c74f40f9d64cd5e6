"""``tollgate-verify``: check an audit export bundle against a pinned root key.

What it checks is listed in docs/audit-format.md ("What tollgate-verify checks"). It needs
only Python, ``cryptography`` and the modules beside it (``make verifier`` packs them into
one zipapp), streams the records (a bundle may hold millions) and names every failure by
file, line, seq, checkpoint size or manifest entry.

This module is the front door: :func:`verify_bundle` runs the steps in order and
:func:`main` is the command. The steps live in modules of their own:

* :mod:`~appliance.audit.verify_signed` — the trust file, manifest, keys, checkpoints,
  proofs and off-box copies, and after the walk the files against the manifest;
* :mod:`~appliance.audit.verify_walk` — the walk over every position, record by record or
  a block at a time (:mod:`~appliance.audit.verify_members` streams the members,
  :mod:`~appliance.audit.verify_workers` checks blocks in worker processes);
* :mod:`~appliance.audit.verify_records` and :mod:`~appliance.audit.verify_pan` — what
  every record must pass: canonical JSON, the 10.2.2 fields, no clear card number;
* :mod:`~appliance.audit.verify_report` — the report.

Usage::

    tollgate-verify BUNDLE --root-key KEY|@FILE [--offbox DIR_OR_FILE]... [--as-of TIME] [--json FILE]
                    [--witness KEY|@FILE]... [--witness-quorum N] [--witness-url URL]...
                    [--witness-checkpoint FILE]... [--witness-ca FILE]
                    [--quiet] [--progress] [--workers N]

With ``--witness`` keys the checkpoint the records are held to must carry cosignatures by
``--witness-quorum`` of them (default: all); records beyond the last such checkpoint are
failures. ``--witness-checkpoint FILE`` is a witness's latest cosigned checkpoint of the
log, fetched by the auditor when asking for the export (``GET URL/checkpoint?origin=``):
the bundle must reach its size with the same root, which catches a tail cut or a
back-dated bundle without ``--offbox`` or ``--as-of``. ``--witness-url`` asks a witness
now: its root must match where the bundle reaches its size (a later size is only noted).

Exit status: 0 when everything holds, 1 when anything fails, 2 on a usage error (no root
key pinned, unreadable arguments).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from appliance.audit.bundle_layout import ROOT_PUB
from appliance.audit.bundle_reader import BundleError, open_bundle
from appliance.audit.cosignature import WitnessKey, parse_witness_key
from appliance.audit.note import NoteError, VerifierKey, parse_time, parse_verifier_key
from appliance.audit.verify_members import BLOCK_BYTES
from appliance.audit.verify_records import check_block
from appliance.audit.verify_report import Report
from appliance.audit.verify_signed import SignedParts
from appliance.audit.verify_walk import RecordWalk
from appliance.audit.verify_workers import BlockCheck
from appliance.audit.witness_protocol import fetch_latest


def verify_bundle(path: str | Path, root_key: str, offbox: Sequence[str | Path] = (),
                  progress: Callable[[int, int], None] | None = None, as_of: str | None = None,
                  workers: int | None = None, *, block_bytes: int = BLOCK_BYTES,
                  block_check: BlockCheck = check_block, witnesses: Sequence[str] = (),
                  witness_quorum: int | None = None, witness_urls: Sequence[str] = (),
                  witness_checkpoints: Sequence[str | Path] = (), witness_ca: str | Path | None = None) -> Report:
    """Verify the bundle at ``path`` (.tar.gz or directory) against the pinned root verifier key.

    NoteError if ``root_key`` is not a verifier key; everything about the bundle itself is
    reported in the returned Report (``ok``, counts, ``failures``). ``workers``: processes
    checking records (default: one per CPU for bundles with enough records, 1 = none).
    ``block_bytes`` and ``block_check`` tune the fast path (see
    :class:`~appliance.audit.verify_walk.RecordWalk`); the report does not depend on them.
    ``witnesses`` (witness verifier keys), ``witness_quorum`` (default: all of them),
    ``witness_urls`` and ``witness_checkpoints``: see the module docstring. NoteError or
    ValueError for a bad key or quorum.
    """
    root = parse_verifier_key(root_key)
    if as_of is not None:
        parse_time(as_of)
    keys = [parse_witness_key(k) for k in witnesses]
    quorum = len(keys) if witness_quorum is None else witness_quorum
    if keys and not 1 <= quorum <= len(keys):
        raise ValueError(f"the witness quorum must be between 1 and {len(keys)}")
    witnessing = Witnessing(keys, quorum if keys else 0, list(witness_urls),
                            [Path(p) for p in witness_checkpoints], witness_ca)
    return _verify(Path(path), root, [Path(p) for p in offbox], progress, as_of, workers, block_bytes, block_check,
                   witnessing)


class Witnessing:
    """What the auditor gave about witnesses: keys, quorum, where to get their views."""

    def __init__(self, keys: list[WitnessKey], quorum: int, urls: list[str], files: list[Path],
                 ca_file: str | Path | None) -> None:
        self.keys, self.quorum, self.urls, self.files, self.ca_file = keys, quorum, urls, files, ca_file

    def views(self, report: Report, origin: str | None) -> list[tuple[str, str, bool]]:
        """(where, cosigned checkpoint, live) of each witness view given."""
        out = []
        for f in self.files:
            try:
                out.append((f"witness checkpoint {f}", f.read_text("utf-8"), False))
            except (OSError, UnicodeDecodeError) as exc:
                report.fail("witness", str(f), f"unreadable: {exc}")
        for url in self.urls:
            if origin is None:
                report.fail("witness", url, "not asked: the log's origin is unknown (no valid trust file)")
                continue
            try:
                view = fetch_latest(url, origin, ca_file=self.ca_file)
            except (OSError, UnicodeDecodeError) as exc:
                report.fail("witness", url, f"cannot ask the witness for its latest checkpoint: {exc}")
                continue
            if view is None:
                report.fail("witness", url, f"the witness has cosigned no checkpoint of {origin!r}")
                continue
            out.append((f"witness {url}", view, True))
        return out


def _verify(path: Path, root: VerifierKey, offbox: list[Path], progress: Callable[[int, int], None] | None,
            as_of: str | None, workers: int | None, block_bytes: int, block_check: BlockCheck,
            witnessing: Witnessing | None = None) -> Report:
    started = time.monotonic()
    report = Report(str(path))
    try:
        bundle = open_bundle(path)
    except BundleError as exc:
        report.fail("bundle", str(path), str(exc))
        return report
    with bundle:
        for problem in bundle.problems:
            report.fail("bundle", "archive", problem)
        hashed: dict[str, tuple[str, int]] = {}  # member -> (sha256, size), as each is read
        witnessing = witnessing or Witnessing([], 0, [], [], None)
        report.witness_quorum = witnessing.quorum
        signed = SignedParts(bundle, report, root, hashed, witnessing.keys, witnessing.quorum)
        try:
            signed.read_trust()
            signed.read_manifest()
            signed.read_keys()
            signed.read_checkpoints()
            signed.read_proofs()
            signed.read_offbox(offbox, as_of)
            if (witnessing.urls or witnessing.files) and not signed.requirements:
                report.fail("witness", "arguments", "a witness view was given, but no witness key to check it with "
                                                    "(--witness, or witnesses in the trust file)")
            if signed.requirements:
                signed.read_witness_views(witnessing.views(report, signed.origin))
                signed.check_witness_freshness(as_of)
                if not witnessing.files:
                    report.notes.append("no saved witness view (--witness-checkpoint): a bundle cut back to a "
                                        "size the witnesses once cosigned can't be told from an older export")
            RecordWalk(bundle, report, signed, hashed, progress, workers, block_bytes, block_check).run()
            signed.check_files()
            signed.check_filter()
        except (BundleError, OSError, EOFError) as exc:  # a damaged archive mid-read
            report.fail("bundle", str(path), f"verification stopped: {exc}")
    report.seconds = time.monotonic() - started
    return report


def _bundle_root_pub(path: str) -> str | None:
    try:
        with open_bundle(path) as b:
            if ROOT_PUB in b:
                return b.read(ROOT_PUB).decode("utf-8", "replace").strip()
    except (BundleError, OSError):
        return None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tollgate-verify",
        description="Verify a Tollgate audit export bundle: signatures, Merkle proofs, records, off-box checkpoints.",
    )
    parser.add_argument("bundle", help="the bundle: a .tar.gz, or a directory it was unpacked into "
                                       "(with --chain: a directory of sealed bundles)")
    parser.add_argument("--chain", action="store_true",
                        help="BUNDLE is retention's archive: verify every *.tar.gz in it and that each continues "
                             "the one before (one tree, no gap)")
    parser.add_argument("--root-key", metavar="KEY|@FILE",
                        help="the root verifier key you received out of band, or @FILE (or a FILE path) holding it")
    parser.add_argument("--offbox", action="append", default=[], metavar="DIR_OR_FILE",
                        help="off-box checkpoint copies: a directory of *.note files, or a syslog file "
                             "with 'tollgate-checkpoint <base64>' lines (repeatable)")
    parser.add_argument("--as-of", metavar="TIME",
                        help="when the export was requested (YYYY-MM-DDTHH:MM:SSZ): off-box checkpoints "
                             "beyond the bundle made before it show a cut tail")
    parser.add_argument("--witness", action="append", default=[], metavar="KEY|@FILE",
                        help="a witness's verifier key (name+hash+key, cosignature/v1), received out of band "
                             "(repeatable): the checkpoint relied on must carry a quorum of their cosignatures")
    parser.add_argument("--witness-quorum", type=int, metavar="N",
                        help="cosignatures required (default: one per --witness)")
    parser.add_argument("--witness-checkpoint", action="append", default=[], metavar="FILE",
                        help="a witness's latest cosigned checkpoint of the log, fetched when the export was "
                             "asked for (GET URL/checkpoint?origin=ORIGIN): the bundle must reach it (repeatable)")
    parser.add_argument("--witness-url", action="append", default=[], metavar="URL",
                        help="ask this witness now for its latest cosigned checkpoint: the bundle must agree "
                             "with it where it reaches its size (repeatable)")
    parser.add_argument("--witness-ca", metavar="FILE", help="CA certificate for https witness URLs")
    parser.add_argument("--json", metavar="FILE", help="also write a JSON report to FILE ('-' for stdout)")
    parser.add_argument("--report", metavar="FILE.html",
                        help="also write a PCI DSS evidence report (HTML, printable) made from the bundle")
    parser.add_argument("--quiet", action="store_true", help="print only failures")
    parser.add_argument("--progress", action="store_true", help="report progress on stderr")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="processes checking records (default: one per CPU when the bundle is large; 1: none)")
    args = parser.parse_args(argv)

    if not args.root_key:
        print("tollgate-verify: no root key pinned. Pass --root-key KEY (or --root-key @FILE) with the root\n"
              "verifier key you received out of band when the appliance was set up — not one taken\n"
              "from the bundle, which anyone who altered the bundle could have replaced.", file=sys.stderr)
        shown = _bundle_root_pub(args.bundle)
        if shown:
            print(f"For reference, the bundle's keys/root.pub says: {shown}\n"
                  "(compare it with your own copy before using it)", file=sys.stderr)
        return 2
    key_text = args.root_key
    key_file = key_text[1:] if key_text.startswith("@") else None
    if key_file is None and "+" not in key_text and Path(key_text).is_file():
        key_file = key_text  # a path given without the @ (a verifier key always holds '+')
    if key_file is not None:
        try:
            key_text = Path(key_file).read_text("utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            print(f"tollgate-verify: cannot read the root key file: {exc}", file=sys.stderr)
            return 2
    try:
        parse_verifier_key(key_text)
    except NoteError as exc:
        print(f"tollgate-verify: --root-key is not a verifier key (name+hash+key): {exc}", file=sys.stderr)
        return 2
    if args.as_of is not None:
        try:
            parse_time(args.as_of)
        except ValueError as exc:
            print(f"tollgate-verify: --as-of: {exc}", file=sys.stderr)
            return 2
    for src in args.offbox:
        if not Path(src).exists():
            print(f"tollgate-verify: --offbox {src}: no such file or directory", file=sys.stderr)
            return 2
    if not Path(args.bundle).exists():
        print(f"tollgate-verify: {args.bundle}: no such file or directory", file=sys.stderr)
        return 2
    if args.workers is not None and args.workers < 1:
        print("tollgate-verify: --workers must be at least 1", file=sys.stderr)
        return 2

    progress = None
    if args.progress:
        def progress(done: int, total: int) -> None:
            print(f"tollgate-verify: {done}/{total} positions", file=sys.stderr, flush=True)

    witness_keys = []
    for item in args.witness:
        try:
            text = Path(item[1:]).read_text("utf-8").strip() if item.startswith("@") else item
            parse_witness_key(text)
        except (OSError, UnicodeDecodeError, NoteError) as exc:
            print(f"tollgate-verify: --witness {item}: {exc}", file=sys.stderr)
            return 2
        witness_keys.append(text)
    if args.chain:
        return _verify_chain(args, key_text, witness_keys)
    try:
        report = verify_bundle(args.bundle, key_text, args.offbox, progress=progress, as_of=args.as_of,
                               workers=args.workers, witnesses=witness_keys, witness_quorum=args.witness_quorum,
                               witness_urls=args.witness_url, witness_checkpoints=args.witness_checkpoint,
                               witness_ca=args.witness_ca)
    except ValueError as exc:
        print(f"tollgate-verify: {exc}", file=sys.stderr)
        return 2
    if args.json:
        if args.json == "-":
            sys.stdout.write(report.to_json())
        else:
            Path(args.json).write_text(report.to_json(), "utf-8")
    if args.report:
        from appliance.audit.verify_evidence import write_report
        write_report(args.report, report, args.bundle)
    if not args.quiet:
        sys.stdout.write(report.summary())
    elif not report.ok:
        for f in report.failures:
            print(f"FAILED {f.kind}: {f}")
        for kind, n in report.suppressed.items():
            print(f"FAILED {kind}: … and {n} more not listed")
    return 0 if report.ok else 1


def _verify_chain(args: argparse.Namespace, key_text: str, witness_keys: list[str]) -> int:
    from appliance.audit.verify_chain import chain_json, check_chain
    directory = Path(args.bundle)
    paths = sorted(directory.glob("*.tar.gz")) if directory.is_dir() else []
    verified: dict[str, bool] = {}
    reports = {}
    for path in paths:
        try:
            report = verify_bundle(path, key_text, args.offbox, workers=args.workers, witnesses=witness_keys,
                                   witness_quorum=args.witness_quorum)
        except ValueError as exc:
            print(f"tollgate-verify: {exc}", file=sys.stderr)
            return 2
        verified[path.name] = report.ok
        reports[path.name] = report
        if not args.quiet or not report.ok:
            sys.stdout.write(report.summary())
    chain = check_chain(paths, verified)
    if args.json:
        text = json.dumps({**chain_json(chain), "reports": {n: r.as_dict() for n, r in reports.items()}}, indent=2)
        if args.json == "-":
            sys.stdout.write(text + "\n")
        else:
            Path(args.json).write_text(text + "\n", "utf-8")
    sys.stdout.write(chain.summary())
    return 0 if chain.ok else 1


if __name__ == "__main__":
    sys.exit(main())
