"""``tollgate witness init|add-log|serve|show``: run a witness for audit logs.

``init DIR --name NAME [--log ORIGIN=KEY]…`` creates the witness's directory and key and
prints its verifier key (give it to the appliance's ``[[audit.witnesses]]`` and to
auditors). ``add-log DIR ORIGIN KEY`` follows a log, or adds a log's new signing key
after a rotation (the witness checks the log's signature with these keys). ``serve DIR
--listen HOST:PORT [--tls-cert F --tls-key F]`` runs the service; ``show DIR`` prints the
key, the logs followed and the latest checkpoint of each.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from appliance.audit.note import NoteError
from appliance.witness.state import WitnessState, WitnessStateError, init_witness, load_cosigner


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("witness", help="a witness that cosigns audit-log checkpoints (C2SP tlog-witness)")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    init = verbs.add_parser("init", help="create a witness directory and key")
    init.add_argument("dir", type=Path)
    init.add_argument("--name", required=True, help="the witness's key name (no spaces, no '+')")
    init.add_argument("--log", action="append", default=[], metavar="ORIGIN=KEY",
                      help="a log to follow: its origin and a verifier key of its signing key (repeatable)")
    init.set_defaults(handler=_init)
    add = verbs.add_parser("add-log", help="follow a log, or add a rotated signing key of one")
    add.add_argument("dir", type=Path)
    add.add_argument("origin")
    add.add_argument("key", help="the log's signing key, as a verifier key (name+hash+key)")
    add.set_defaults(handler=_add_log)
    serve = verbs.add_parser("serve", help="run the witness's HTTP(S) service")
    serve.add_argument("dir", type=Path)
    serve.add_argument("--listen", default="127.0.0.1:7380", metavar="HOST:PORT")
    serve.add_argument("--tls-cert", type=Path)
    serve.add_argument("--tls-key", type=Path)
    serve.set_defaults(handler=_serve)
    show = verbs.add_parser("show", help="the witness's key, logs and latest checkpoints (JSON)")
    show.add_argument("dir", type=Path)
    show.set_defaults(handler=_show)


def _fail(message: str) -> int:
    print(f"tollgate witness: {message}", file=sys.stderr)
    return 1


def _init(args: argparse.Namespace) -> int:
    logs = []
    for item in args.log:
        origin, sep, key = item.partition("=")
        if not sep:
            return _fail(f"--log {item!r}: want ORIGIN=KEY")
        logs.append((origin, key))
    try:
        cosigner = init_witness(args.dir, args.name)
        state = WitnessState(args.dir)
        try:
            for origin, key in logs:
                state.add_log(origin, key)
        finally:
            state.close()
    except (WitnessStateError, NoteError) as exc:
        return _fail(str(exc))
    print(cosigner.key)
    return 0


def _add_log(args: argparse.Namespace) -> int:
    try:
        state = WitnessState(args.dir)
        try:
            state.add_log(args.origin, args.key)
        finally:
            state.close()
    except (WitnessStateError, NoteError) as exc:
        return _fail(str(exc))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from appliance.witness.server import serve
    host, sep, port = args.listen.rpartition(":")
    if not sep or not port.isdigit():
        return _fail(f"--listen {args.listen!r}: want HOST:PORT")
    if (args.tls_cert is None) != (args.tls_key is None):
        return _fail("--tls-cert and --tls-key go together")
    try:
        cosigner = load_cosigner(args.dir)
        state = WitnessState(args.dir)
    except WitnessStateError as exc:
        return _fail(str(exc))
    logging.getLogger("tollgate.witness").setLevel(logging.INFO)
    serve(state, cosigner, host, int(port), (args.tls_cert, args.tls_key) if args.tls_cert else None)
    return 0


def _show(args: argparse.Namespace) -> int:
    try:
        cosigner = load_cosigner(args.dir)
        state = WitnessState(args.dir)
    except WitnessStateError as exc:
        return _fail(str(exc))
    try:
        logs = state.logs()
        out = {"key": str(cosigner.key), "logs": {}}
        for origin, keys in logs.items():
            latest = state.latest(origin)
            out["logs"][origin] = {"keys": keys, "size": latest.size if latest else None,
                                   "note": latest.note if latest else None}
    finally:
        state.close()
    print(json.dumps(out, indent=2))
    return 0
