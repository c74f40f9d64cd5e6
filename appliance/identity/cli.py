"""``tollgate ca init``, ``tollgate certs list|revoke|reinstate|issue-server``, ``tollgate enroll`` and
``tollgate enroll-server`` (registered by webui.cli).

Layout under the state directory: ``ca/ca.crt`` (0644), ``ca/ca.key`` (0600) and
``certificates.db`` (the registry, 0600).

Revocations, reinstatements and server certificates are recorded in the audit log (``admin``
records ``certificate.revoke``, ``identity.revoke``, ``identity.reinstate``,
``certificate.issue-server``) through the running proxy, when the configuration (``-c``,
default ``/etc/tollgate/tollgate.toml`` when it exists) has ``[audit]``. A revocation or
reinstatement takes effect even when it can't be recorded — holding a revocation back
until the log is reachable would leave a certificate working that its owner wanted dead —
and the command then exits 1 saying so. A server certificate is issued only once recorded.
"""

from __future__ import annotations

import argparse
import functools
import getpass
import json
import os
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path

from appliance.config import Config, ConfigError, load_config
from appliance.identity import enroll_client
from appliance.identity.ca import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    DEFAULT_CA_NAME,
    DEFAULT_SERVER_LIFETIME_DAYS,
    CertificateAuthority,
    write_file_atomically,
)
from appliance.identity.certs import certificate_pem, fingerprint, not_valid_after, private_key_pem
from appliance.identity.registry import (
    REGISTRY_FILE,
    CertificateRegistry,
    CertRecord,
    RegistryError,
    SubjectEvent,
    format_serial,
)
from appliance.model.identity import IdentityError
from appliance.proxy.control import AdminUnrecorded, record_admin
from appliance.state.db import StateError

DEFAULT_STATE_DIR = Path("/var/lib/tollgate")
DEFAULT_CONFIG = Path("/etc/tollgate/tollgate.toml")
CA_DIR = "ca"


def register(sub: argparse._SubParsersAction) -> None:
    ca = sub.add_parser("ca", help="the appliance certificate authority")
    ca_sub = ca.add_subparsers(dest="ca_command", metavar="ACTION", required=True)
    init = ca_sub.add_parser("init", help="create the appliance CA and the certificate registry")
    init.add_argument("--state-dir", type=Path, required=True, help="where the CA and registry live")
    init.add_argument("--name", default=DEFAULT_CA_NAME, help="the CA's common name (default: %(default)s)")
    init.add_argument("--lifetime-days", type=int, default=3650, help="CA validity (default: %(default)s)")
    init.set_defaults(handler=cmd_ca_init)

    certs = sub.add_parser("certs", help="issued client certificates: list, revoke; server certificates")
    certs_sub = certs.add_subparsers(dest="certs_command", metavar="ACTION", required=True)
    state_dir = argparse.ArgumentParser(add_help=False)
    state_dir.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                           help="where the CA and registry live (default: %(default)s)")
    state_dir.add_argument("--state-url", default=None,
                           help="the registry in this shared PostgreSQL database instead ([identity] state_url)")
    recorded = argparse.ArgumentParser(add_help=False)
    recorded.add_argument("-c", "--config", type=Path, default=None,
                          help="Tollgate configuration whose audit log records the action "
                               f"(default: {DEFAULT_CONFIG} when it exists)")

    ls = certs_sub.add_parser("list", parents=[state_dir], help="issued client certificates")
    ls.add_argument("--all", action="store_true", help="include expired certificates")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(handler=cmd_certs_list)

    revoke = certs_sub.add_parser("revoke", parents=[state_dir, recorded],
                                  help="revoke one certificate by serial, or an identity: all its certificates, "
                                       "and no enrollment until reinstated")
    revoke.add_argument("serial", nargs="?", help="serial number: hex (colons optional) or decimal")
    revoke.add_argument("--subject", help="revoke this identity subject: every unrevoked certificate of it, and it "
                                          "cannot enroll again until `tollgate certs reinstate`")
    revoke.add_argument("--reason", required=True, help="why (recorded with the revocation)")
    revoke.add_argument("--by", default=None, help="who revokes (default: the invoking user)")
    revoke.set_defaults(handler=cmd_certs_revoke)

    reinstate = certs_sub.add_parser("reinstate", parents=[state_dir, recorded],
                                     help="let a revoked identity enroll again (its revoked certificates stay revoked)")
    reinstate.add_argument("--subject", required=True, help="the identity subject revoked with revoke --subject")
    reinstate.add_argument("--reason", required=True, help="why (recorded with the reinstatement)")
    reinstate.add_argument("--by", default=None, help="who reinstates (default: the invoking user)")
    reinstate.set_defaults(handler=cmd_certs_reinstate)

    server = certs_sub.add_parser("issue-server", parents=[state_dir, recorded],
                                  help="issue a server certificate for a protected target's addresses")
    server.add_argument("--address", dest="addresses", nargs="+", action="extend", default=[], metavar="IP",
                        help="IP address(es) the certificate is for")
    server.add_argument("--dns", dest="dns_names", nargs="+", action="extend", default=[], metavar="NAME",
                        help="DNS name(s) the certificate is for")
    server.add_argument("--out-cert", type=Path, required=True)
    server.add_argument("--out-key", type=Path, required=True, help="written 0600")
    server.add_argument("--lifetime-days", type=int, default=DEFAULT_SERVER_LIFETIME_DAYS,
                        help="validity (default: %(default)s)")
    server.add_argument("--force", action="store_true", help="replace existing output files")
    server.set_defaults(handler=cmd_certs_issue_server)

    enroll_client.add_parser(sub)


def _reported(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Our errors become one ``tollgate: …`` line and exit status 1, never a traceback."""
    @functools.wraps(fn)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (IdentityError, RegistryError, StateError) as exc:
            print(f"tollgate: {exc}", file=sys.stderr)
        except sqlite3.Error as exc:
            print(f"tollgate: certificate registry: {exc}", file=sys.stderr)
        except (ConfigError, AdminUnrecorded) as exc:
            print(f"tollgate: {exc}", file=sys.stderr)
        return 1
    return wrapper


def _audit_config(args: argparse.Namespace) -> Config | None:
    """The configuration whose audit log records this command's action, if any."""
    path = args.config if args.config is not None else (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    if path is None:
        print("tollgate: note: not recorded in an audit log (no -c/--config, and no "
              f"{DEFAULT_CONFIG})", file=sys.stderr)
        return None
    return load_config(path)


def _record(config: Config | None, record: dict[str, str], done: str) -> int:
    """Record an action already taken; exit status 1 when it couldn't be."""
    if config is None:
        return 0
    try:
        record_admin(config, record)
    except AdminUnrecorded as exc:
        print(f"tollgate: {done}, but it is NOT recorded in the audit log: {exc}", file=sys.stderr)
        return 1
    return 0


def _open_registry(state_dir: Path, state_url: str | None = None) -> CertificateRegistry:
    if state_url:
        return CertificateRegistry(state_url, create=False)
    path = state_dir / REGISTRY_FILE
    if not path.exists():
        raise RegistryError(f"no certificate registry at {path} (run: tollgate ca init --state-dir {state_dir})")
    return CertificateRegistry(path, create=False)


def _stamp(record_time: object) -> str:
    return record_time.strftime("%Y-%m-%d %H:%M") if record_time else "-"  # type: ignore[attr-defined]


@_reported
def cmd_ca_init(args: argparse.Namespace) -> int:
    ca = CertificateAuthority.create(args.state_dir / CA_DIR, name=args.name, lifetime_days=args.lifetime_days)
    CertificateRegistry(args.state_dir / REGISTRY_FILE).close()
    cert_path = args.state_dir / CA_DIR / CA_CERT_FILE
    print(f"created CA {args.name!r} (valid until {not_valid_after(ca.certificate):%Y-%m-%d})")
    print(f"  certificate: {cert_path}")
    print(f"  key:         {args.state_dir / CA_DIR / CA_KEY_FILE} (0600)")
    print(f"  registry:    {args.state_dir / REGISTRY_FILE}")
    print(f"  sha256:      {fingerprint(ca.certificate)}")
    print(f"clients using sslmode=verify-ca or verify-full must trust {cert_path} (sslrootcert)")
    return 0


@_reported
def cmd_certs_list(args: argparse.Namespace) -> int:
    registry = _open_registry(args.state_dir, getattr(args, "state_url", None))
    try:
        records = registry.list(include_expired=args.all)
        blocked = registry.revoked_subjects()
    finally:
        registry.close()
    if args.json:
        print(json.dumps([r.to_json() for r in records], indent=2))
        return 0
    if not records:
        print("no certificates" + ("" if args.all else " (not counting expired ones; --all shows them)"))
    else:
        print(f"{'SERIAL':<32}  {'STATUS':<7}  {'NOT AFTER (UTC)':<16}  {'KIND':<6}  SUBJECT  [GROUPS]")
        for r in records:
            groups = f"  [{', '.join(r.identity.groups)}]" if r.identity.groups else ""
            print(f"{r.serial_hex:<32}  {r.status():<7}  {_stamp(r.not_after):<16}  {r.identity.kind:<6}  "
                  f"{r.identity.display}{groups}")
    if blocked:
        print("revoked identities (cannot enroll until `tollgate certs reinstate --subject …`):")
        for event in blocked:
            print(f"  {_describe_block(event)}")
    return 0


def _describe_block(event: SubjectEvent) -> str:
    return f"{event.subject}: revoked at {_stamp(event.at)} UTC by {event.by}: {event.reason}"


def _describe(record: CertRecord) -> str:
    return f"{record.serial_hex} ({record.identity})"


@_reported
def cmd_certs_revoke(args: argparse.Namespace) -> int:
    if (args.serial is None) == (args.subject is None):
        raise RegistryError("give either a SERIAL or --subject SUBJECT")
    by = args.by or os.environ.get("SUDO_USER") or getpass.getuser()
    config = _audit_config(args)
    registry = _open_registry(args.state_dir, getattr(args, "state_url", None))
    base = {"user": by, "origin": "local", "outcome": "success", "reason": args.reason}
    try:
        if args.serial is not None:
            serial = registry.resolve_serial(args.serial)
            before = registry.get(serial)
            if before is not None and before.revoked:
                print(f"{_describe(before)} was already revoked at {_stamp(before.revoked_at)} UTC "
                      f"by {before.revoked_by}: {before.revoked_reason}")
                return 0
            record = registry.revoke(serial, args.reason, by)
            print(f"revoked {_describe(record)}")
            return _record(config, {**base, "action": "certificate.revoke", "object": record.serial_hex,
                                    "subject": record.subject}, f"revoked {record.serial_hex}")
        known = [r for r in registry.list(include_expired=True) if r.subject == args.subject]
        if not known:
            # A typo must not quietly block a subject that doesn't exist.
            raise RegistryError(f"no certificates were issued to subject {args.subject!r}")
        before = registry.revoked_subject(args.subject)
        revoked = registry.revoke_subject(args.subject, args.reason, by)
        if not revoked:
            print(f"all {len(known)} certificate(s) of {args.subject!r} were already revoked")
        for record in revoked:
            print(f"revoked {_describe(record)}")
        if before is not None:
            print(f"{args.subject!r} was already blocked from enrolling since {_stamp(before.at)} UTC "
                  f"by {before.by}: {before.reason}")
        else:
            print(f"{args.subject!r} cannot enroll again until reinstated "
                  f"(tollgate certs reinstate --subject {args.subject} --reason …)")
        return _record(config, {**base, "action": "identity.revoke", "object": args.subject,
                                "serials": ",".join(r.serial_hex for r in revoked)}, f"revoked {args.subject!r}")
    finally:
        registry.close()


@_reported
def cmd_certs_reinstate(args: argparse.Namespace) -> int:
    by = args.by or os.environ.get("SUDO_USER") or getpass.getuser()
    config = _audit_config(args)
    registry = _open_registry(args.state_dir, getattr(args, "state_url", None))
    try:
        lifted = registry.reinstate_subject(args.subject, args.reason, by)
    finally:
        registry.close()
    if lifted is None:
        print(f"{args.subject!r} is not revoked: nothing to reinstate")
        return 0
    print(f"reinstated {args.subject!r}: it may enroll again (revoked at {_stamp(lifted.at)} UTC by {lifted.by}: "
          f"{lifted.reason}); its revoked certificates stay revoked")
    return _record(config, {"action": "identity.reinstate", "user": by, "origin": "local", "outcome": "success",
                            "object": args.subject, "reason": args.reason}, f"reinstated {args.subject!r}")


@_reported
def cmd_certs_issue_server(args: argparse.Namespace) -> int:
    if not args.addresses and not args.dns_names:
        raise IdentityError("give at least one --address IP (or --dns NAME)")
    if not args.force:
        for path in (args.out_cert, args.out_key):
            if path.exists():
                raise IdentityError(f"{path} already exists (--force replaces it)")
    ca_dir = args.state_dir / CA_DIR
    ca = CertificateAuthority.load(ca_dir / CA_CERT_FILE, ca_dir / CA_KEY_FILE)
    config = _audit_config(args)
    cert, key = ca.issue_server(args.addresses, args.dns_names, lifetime_days=args.lifetime_days)
    if config is not None:
        # Recorded before it is written: an unrecorded server certificate never reaches the disk.
        record_admin(config, {"action": "certificate.issue-server", "object": format_serial(cert.serial_number),
                              "user": os.environ.get("SUDO_USER") or getpass.getuser(), "origin": "local",
                              "outcome": "success", "names": ", ".join([*args.dns_names, *args.addresses]),
                              "not_after": f"{not_valid_after(cert):%Y-%m-%dT%H:%M:%SZ}"})
    # Key first, so a certificate on disk always has its key beside it.
    write_file_atomically(args.out_key, private_key_pem(key), mode=0o600, overwrite=args.force)
    write_file_atomically(args.out_cert, certificate_pem(cert), mode=0o644, overwrite=args.force)
    names = ", ".join([*args.dns_names, *args.addresses])
    print(f"issued server certificate {cert.serial_number:032X} for {names}, "
          f"valid until {not_valid_after(cert):%Y-%m-%d}")
    print(f"  certificate: {args.out_cert}")
    print(f"  key:         {args.out_key} (0600)")
    return 0
