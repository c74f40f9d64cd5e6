"""The certificate registry (and its SQLite helper): recording, revoking, the revision counter,
what another process sees, concurrent threads, and the ``certs list|revoke`` commands."""

from __future__ import annotations

import argparse
import json
import sqlite3
import stat
import threading
from datetime import UTC, datetime, timedelta

import pytest

from appliance.identity import CertificateAuthority, Identity, cli
from appliance.identity.registry import (
    CertificateRegistry,
    RegistryError,
    SubjectRevoked,
    TokenAlreadyUsed,
    format_serial,
    serial_candidates,
)
from appliance.state.db import Database, StateError
from tests.identity import ALICE, BOT, ec_key, make_csr

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return CertificateAuthority.create(tmp_path_factory.mktemp("ca"), now=T0 - timedelta(days=1))


@pytest.fixture(scope="module")
def csr():
    return make_csr(ec_key())  # one key is enough: the registry cares about serials


@pytest.fixture
def registry(state_where):  # once on SQLite, once on PostgreSQL (tests/conftest.py)
    reg = CertificateRegistry(state_where("certificates"))
    yield reg
    reg.close()


def issue(ca, csr, registry, identity=ALICE, now=T0, lifetime=timedelta(hours=8)):
    cert = ca.issue_client(csr, identity, lifetime, now=now)
    return cert, registry.record_issued(cert, identity, now=now)


# --- recording and listing --------------------------------------------------------------------


def test_record_and_list(ca, csr, registry):
    cert, record = issue(ca, csr, registry)
    assert record.serial == cert.serial_number
    assert record.identity == ALICE
    assert record.not_after == T0 + timedelta(hours=8)
    assert record.issued_at == T0
    assert not record.revoked and record.status(T0) == "valid"
    assert registry.list(now=T0) == [record]
    assert registry.get(cert.serial_number) == record
    assert registry.get(cert.serial_number + 1) is None


def test_list_hides_expired_certificates_unless_asked(ca, csr, registry):
    _, old = issue(ca, csr, registry, now=T0 - timedelta(days=1))
    _, new = issue(ca, csr, registry, now=T0)
    assert registry.list(now=T0) == [new]
    assert registry.list(include_expired=True, now=T0) == [old, new]
    assert old.status(T0) == "expired"


def test_record_refuses_a_mismatched_identity_and_a_duplicate(ca, csr, registry):
    cert = ca.issue_client(csr, ALICE, now=T0)
    with pytest.raises(RegistryError, match="carries tollgate:identity:person:alice, not tollgate:identity:agent"):
        registry.record_issued(cert, BOT)
    registry.record_issued(cert, ALICE)
    with pytest.raises(RegistryError, match="already recorded"):
        registry.record_issued(cert, ALICE)


# --- revoking -------------------------------------------------------------------------------


def test_revoke_by_serial(ca, csr, registry):
    cert, _ = issue(ca, csr, registry)
    other, _ = issue(ca, csr, registry)
    assert registry.revision() == 0
    assert not registry.is_revoked(cert.serial_number)
    record = registry.revoke(cert.serial_number, "laptop lost", "ops", now=T0 + timedelta(hours=1))
    assert record.revoked and record.status() == "revoked"
    assert ((record.revoked_at, record.revoked_reason, record.revoked_by)
            == (T0 + timedelta(hours=1), "laptop lost", "ops"))
    assert registry.revision() == 1
    assert registry.is_revoked(cert.serial_number)
    assert not registry.is_revoked(other.serial_number)
    # Revoking again is a no-op: nothing for the proxy to re-read.
    again = registry.revoke(cert.serial_number, "other reason", "someone")
    assert again == record and registry.revision() == 1


def test_revoke_requires_a_known_serial_a_reason_and_a_revoker(ca, csr, registry):
    cert, _ = issue(ca, csr, registry)
    with pytest.raises(RegistryError, match="no certificate with serial 0000000000000000000000000000002A"):
        registry.revoke(42, "x", "ops")
    with pytest.raises(RegistryError, match="needs a reason"):
        registry.revoke(cert.serial_number, "  ", "ops")
    with pytest.raises(RegistryError, match="needs who revokes it"):
        registry.revoke(cert.serial_number, "lost", "")
    assert registry.revision() == 0 and not registry.is_revoked(cert.serial_number)


def test_revoke_subject_revokes_all_of_them_in_one_revision(ca, csr, registry):
    a1, _ = issue(ca, csr, registry)
    a2, _ = issue(ca, csr, registry)
    b, _ = issue(ca, csr, registry, identity=BOT)
    registry.revoke(a1.serial_number, "first", "ops")
    revoked = registry.revoke_subject("alice", "left the company", "hr")
    assert [r.serial for r in revoked] == [a2.serial_number]  # a1 was already revoked
    assert registry.revision() == 2
    assert registry.is_revoked(a1.serial_number) and registry.is_revoked(a2.serial_number)
    assert not registry.is_revoked(b.serial_number)
    assert registry.revoke_subject("alice", "again", "hr") == []
    assert registry.revision() == 2


def test_revoked_serials_returns_only_the_changes(ca, csr, registry):
    c1, _ = issue(ca, csr, registry)
    c2, _ = issue(ca, csr, registry, identity=BOT)
    registry.revoke(c1.serial_number, "r", "ops")
    assert registry.revoked_serials(0) == (1, frozenset({c1.serial_number}))
    registry.revoke_subject(BOT.subject, "r", "ops")
    assert registry.revoked_serials(1) == (2, frozenset({c2.serial_number}))
    assert registry.revoked_serials(2) == (2, frozenset())


def test_a_revocation_by_another_process_counts_at_once(ca, csr, tmp_path):
    proxy = CertificateRegistry(tmp_path / "r.db")
    cli_side = CertificateRegistry(tmp_path / "r.db")  # a second connection, as the CLI would have
    try:
        cert, _ = issue(ca, csr, proxy)
        assert not proxy.is_revoked(cert.serial_number)  # cached at revision 0
        cli_side.revoke(cert.serial_number, "compromised", "ops")
        assert proxy.is_revoked(cert.serial_number)
        assert proxy.revision() == 1
    finally:
        proxy.close()
        cli_side.close()


def test_is_revoked_starts_over_when_the_database_is_replaced(ca, csr, tmp_path):
    registry = CertificateRegistry(tmp_path / "r.db")
    cert, _ = issue(ca, csr, registry)
    registry.revoke(cert.serial_number, "r", "ops")
    other, _ = issue(ca, csr, registry)
    registry.revoke(other.serial_number, "r", "ops")
    assert registry.is_revoked(cert.serial_number)  # cache now at revision 2
    with registry.db.transaction() as conn:  # as if restored from an older backup
        conn.execute("UPDATE certificates SET revoked_at = NULL, revoked_revision = NULL")
        conn.execute("UPDATE revision SET value = 0")
    registry.revoke(other.serial_number, "r", "ops")  # revision 1 again, and only `other`
    assert not registry.is_revoked(cert.serial_number)
    assert registry.is_revoked(other.serial_number)
    registry.close()


def test_two_threads_record_and_revoke_concurrently(ca, csr, registry):
    per_thread = 15
    errors: list[BaseException] = []
    serials: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(3)
    done = threading.Event()

    def writer(identity: Identity) -> None:
        try:
            start.wait()
            for _ in range(per_thread):
                cert, _ = issue(ca, csr, registry, identity=identity)
                registry.revoke(cert.serial_number, "rotation", identity.subject)
                with lock:
                    serials.append(cert.serial_number)
        except BaseException as exc:  # noqa: BLE001 — reported by the assertion below
            errors.append(exc)

    def reader() -> None:
        try:
            start.wait()
            while not done.is_set():
                with lock:
                    seen = list(serials)
                # Anything a writer finished revoking must read as revoked from this thread too.
                assert all(registry.is_revoked(s) for s in seen)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in (ALICE, BOT)]
    watcher = threading.Thread(target=reader)
    for t in (*threads, watcher):
        t.start()
    for t in threads:
        t.join(60)
    done.set()
    watcher.join(60)
    assert errors == []
    assert registry.revision() == 2 * per_thread
    assert len(registry.list(now=T0)) == 2 * per_thread
    assert all(r.revoked for r in registry.list(now=T0))
    assert registry.revoked_serials(0) == (2 * per_thread, frozenset(serials))


# --- serials --------------------------------------------------------------------------------


def test_serial_forms():
    assert format_serial(0xAB) == "000000000000000000000000000000AB"
    assert serial_candidates("ab:cd:01") == [0xABCD01]
    assert serial_candidates("0xABCD") == [0xABCD]
    assert serial_candidates("ABCDEF") == [0xABCDEF]
    assert serial_candidates("1234") == [0x1234, 1234]
    for bad in ("", "xyz", "ab:cde", "12-34", "0x"):
        with pytest.raises(RegistryError, match="is not a serial number"):
            serial_candidates(bad)


def test_resolve_serial_accepts_every_form(ca, csr, registry):
    cert, _ = issue(ca, csr, registry)
    s = cert.serial_number
    colons = ":".join(f"{s:032x}"[i:i + 2] for i in range(0, 32, 2))
    for text in (format_serial(s), f"{s:x}", colons, str(s), f"0x{s:x}"):
        assert registry.resolve_serial(text) == s, text
    with pytest.raises(RegistryError, match="no certificate with serial 99"):
        registry.resolve_serial("99")


# --- the SQLite helper ----------------------------------------------------------------------


def test_database_migrates_once_in_wal_mode_with_private_files(tmp_path):
    migrations = [("CREATE TABLE a (x INTEGER)",), ("INSERT INTO a VALUES (1)",)]
    db = Database(tmp_path / "s.db", migrations)
    assert db.schema_version == 2
    assert db.connection().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert stat.S_IMODE((tmp_path / "s.db").stat().st_mode) == 0o600
    db.close()
    db = Database(tmp_path / "s.db", [*migrations, ("INSERT INTO a VALUES (2)",)])
    assert [r[0] for r in db.connection().execute("SELECT x FROM a ORDER BY x")] == [1, 2]  # 1 and 2 not re-run
    db.close()
    with pytest.raises(StateError, match="schema version 3 is newer than this Tollgate understands \\(2\\)"):
        Database(tmp_path / "s.db", migrations)
    with pytest.raises(StateError, match="does not exist"):
        Database(tmp_path / "missing.db", migrations, create=False)


def test_database_gives_each_thread_its_own_connection_and_rolls_back_failures(tmp_path):
    db = Database(tmp_path / "s.db", [("CREATE TABLE a (x INTEGER)",)])
    other: list[sqlite3.Connection] = []
    t = threading.Thread(target=lambda: other.append(db.connection()))
    t.start()
    t.join()
    assert other[0] is not db.connection() and db.connection() is db.connection()

    def insert_then_fail() -> None:
        with db.transaction() as conn:
            conn.execute("INSERT INTO a VALUES (1)")
            raise ZeroDivisionError("a failure inside the transaction")

    with pytest.raises(ZeroDivisionError, match="a failure inside the transaction"):
        insert_then_fail()
    assert db.connection().execute("SELECT count(*) FROM a").fetchone()[0] == 0
    db.close()


# --- the CLI: certs list / revoke -----------------------------------------------------------


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


@pytest.fixture
def state(tmp_path, capsys):
    assert run_cli("ca", "init", "--state-dir", str(tmp_path)) == 0
    capsys.readouterr()
    ca = CertificateAuthority.load(tmp_path / "ca" / "ca.crt", tmp_path / "ca" / "ca.key")
    registry = CertificateRegistry(tmp_path / "certificates.db")
    certs = [ca.issue_client(make_csr(ec_key()), ident) for ident in (ALICE, ALICE, BOT)]
    for cert, ident in zip(certs, (ALICE, ALICE, BOT), strict=True):
        registry.record_issued(cert, ident)
    yield tmp_path, registry, certs
    registry.close()


def test_cli_list_and_revoke_by_serial(state, capsys):
    path, registry, (a1, a2, b) = state
    assert run_cli("certs", "list", "--state-dir", str(path), "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert sorted(r["serial"] for r in listed) == sorted(format_serial(c.serial_number) for c in (a1, a2, b))
    assert {r["status"] for r in listed} == {"valid"}

    colons = ":".join(f"{a1.serial_number:032x}"[i:i + 2] for i in range(0, 32, 2))
    assert run_cli("certs", "revoke", colons, "--reason", "lost", "--by", "ops", "--state-dir", str(path)) == 0
    assert f"revoked {format_serial(a1.serial_number)} (person alice@example.com)" in capsys.readouterr().out
    assert registry.is_revoked(a1.serial_number)
    assert run_cli("certs", "revoke", str(a1.serial_number), "--reason", "x", "--state-dir", str(path)) == 0
    assert "was already revoked" in capsys.readouterr().out and registry.revision() == 1

    assert run_cli("certs", "list", "--state-dir", str(path)) == 0
    table = capsys.readouterr().out
    assert f"{format_serial(a1.serial_number)}  revoked" in table
    assert f"{format_serial(b.serial_number)}  valid" in table and "[agents]" in table


def test_cli_revoke_by_subject_and_errors(state, capsys):
    path, registry, (a1, a2, b) = state
    assert run_cli("certs", "revoke", "--subject", "alice", "--reason", "left", "--state-dir", str(path)) == 0
    assert capsys.readouterr().out.count("revoked ") == 2
    assert registry.is_revoked(a1.serial_number) and registry.is_revoked(a2.serial_number)
    assert not registry.is_revoked(b.serial_number)

    assert run_cli("certs", "revoke", "--subject", "nobody", "--reason", "x", "--state-dir", str(path)) == 1
    assert "no certificates were issued to subject 'nobody'" in capsys.readouterr().err
    assert run_cli("certs", "revoke", "--reason", "x", "--state-dir", str(path)) == 1
    assert "give either a SERIAL or --subject" in capsys.readouterr().err
    assert run_cli("certs", "revoke", "zz", "--reason", "x", "--state-dir", str(path)) == 1
    assert "'zz' is not a serial number" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: --reason is required
        run_cli("certs", "revoke", "--subject", "alice", "--state-dir", str(path))
    assert run_cli("certs", "list", "--state-dir", str(path / "nowhere")) == 1
    assert "no certificate registry at" in capsys.readouterr().err


# --- revoked identities and used tokens ---------------------------------------------------------

def enroll(ca, csr, registry, identity=ALICE, jti="jti-1", issuer="https://idp.example", now=T0,
           token_expires=T0 + timedelta(minutes=5)):
    cert = ca.issue_client(csr, identity, timedelta(hours=8), now=now)
    return cert, registry.record_enrollment(cert, identity, issuer=issuer, jti=jti, token_expires=token_expires,
                                            now=now)


def test_revoking_a_subject_blocks_its_enrollment_until_reinstated(ca, csr, registry):
    first, _ = enroll(ca, csr, registry, jti="a")
    registry.revoke_subject("alice", "secret leaked", "ops", now=T0 + timedelta(minutes=1))
    block = registry.revoked_subject("alice")
    assert (block.subject, block.action, block.reason, block.by) == ("alice", "revoke", "secret leaked", "ops")
    assert block.at == T0 + timedelta(minutes=1)
    assert registry.revoked_subject(BOT.subject) is None

    with pytest.raises(SubjectRevoked) as refused:
        enroll(ca, csr, registry, jti="b", now=T0 + timedelta(minutes=2))
    assert str(refused.value) == ("identity 'alice' was revoked at 2030-01-01 12:01:00 UTC by ops: secret leaked; it "
                                  "cannot enroll until an operator reinstates it (tollgate certs reinstate --subject "
                                  "alice)")
    # Refused means not recorded, and the token not spent: it may enroll once reinstated.
    assert [r.serial for r in registry.list(include_expired=True)] == [first.serial_number]
    assert registry.token_used("https://idp.example", "b", now=T0 + timedelta(minutes=2)) is None
    enroll(ca, csr, registry, identity=BOT, jti="c", now=T0 + timedelta(minutes=2))  # others are unaffected

    lifted = registry.reinstate_subject("alice", "new secret issued", "sec", now=T0 + timedelta(minutes=3))
    assert lifted == block
    assert registry.revoked_subject("alice") is None
    _, again = enroll(ca, csr, registry, jti="b", now=T0 + timedelta(minutes=4))
    assert again.status(T0 + timedelta(minutes=4)) == "valid"
    assert registry.is_revoked(first.serial_number) and not registry.is_revoked(again.serial)  # old stays revoked
    assert [(e.action, e.reason, e.by) for e in registry.subject_history("alice")] == [
        ("revoke", "secret leaked", "ops"), ("reinstate", "new secret issued", "sec")]
    assert registry.reinstate_subject("alice", "twice", "sec") is None  # not revoked: nothing recorded
    assert len(registry.subject_history("alice")) == 2


def test_revoking_a_subject_whose_certificates_are_all_revoked_still_blocks_it(ca, csr, registry):
    cert, _ = issue(ca, csr, registry)
    registry.revoke(cert.serial_number, "lost", "ops")  # by serial: the identity may enroll again
    assert registry.revoked_subject("alice") is None
    assert registry.revoke_subject("alice", "left", "hr") == []
    assert registry.revoked_subject("alice").reason == "left"
    with pytest.raises(SubjectRevoked):  # nothing is recorded for a revoked identity, enrolled or not
        issue(ca, csr, registry)
    assert len(registry.list(include_expired=True)) == 1
    registry.revoke_subject("alice", "again", "hr")  # the first revocation stays the one on record
    assert [e.reason for e in registry.subject_history("alice")] == ["left"]
    assert [b.subject for b in registry.revoked_subjects()] == ["alice"]


def test_reinstatement_needs_a_reason_and_who(registry):
    registry.revoke_subject("alice", "r", "ops")
    with pytest.raises(RegistryError, match="a reinstatement needs a reason"):
        registry.reinstate_subject("alice", " ", "ops")
    with pytest.raises(RegistryError, match="a reinstatement needs who reinstates it"):
        registry.reinstate_subject("alice", "ok", "")
    assert registry.revoked_subject("alice") is not None


def test_a_token_enrolls_one_certificate_across_processes(ca, csr, registry, state_where):
    other = CertificateRegistry(state_where("certificates"))  # another worker's own connection
    try:
        enroll(ca, csr, registry, jti="once")
        with pytest.raises(TokenAlreadyUsed) as refused:
            enroll(ca, csr, other, jti="once", now=T0 + timedelta(seconds=30))
        assert "this token (jti 'once') was already used to enroll a certificate, at 2030-01-01 12:00:00 UTC" in str(
            refused.value)
        # Another issuer's token may carry the same jti.
        enroll(ca, csr, other, jti="once", issuer="https://other.example")
        with pytest.raises(RegistryError, match="needs a jti"):
            enroll(ca, csr, other, jti=" ")
    finally:
        other.close()
    assert len(registry.list(include_expired=True)) == 2


def test_used_tokens_are_forgotten_once_expired(ca, csr, registry):
    enroll(ca, csr, registry, jti="old", token_expires=T0 + timedelta(minutes=5))
    assert registry.token_used("https://idp.example", "old", now=T0 + timedelta(minutes=4)) == T0
    assert registry.token_used("https://idp.example", "old", now=T0 + timedelta(minutes=5)) is None
    enroll(ca, csr, registry, jti="new", now=T0 + timedelta(minutes=6))  # purges what expired
    rows = registry.db.connection().execute("SELECT jti FROM used_tokens").fetchall()
    assert [r["jti"] for r in rows] == ["new"]


def test_enrollment_racing_a_revocation_is_never_left_valid(ca, csr, registry):
    # The enrollment service looked (not revoked) and signed; the operator revokes before it records.
    cert = ca.issue_client(csr, ALICE, timedelta(hours=8), now=T0)
    issue(ca, csr, registry)
    registry.revoke_subject("alice", "incident", "ops")
    with pytest.raises(SubjectRevoked):
        registry.record_enrollment(cert, ALICE, issuer="https://idp.example", jti="x",
                                   token_expires=T0 + timedelta(minutes=5), now=T0)
    assert registry.get(cert.serial_number) is None


def test_cli_revoke_subject_then_reinstate(state, capsys):
    path, registry, (a1, _, _) = state
    assert run_cli("certs", "revoke", "--subject", "alice", "--reason", "left", "--by", "hr",
                   "--state-dir", str(path)) == 0
    out = capsys.readouterr().out
    assert "'alice' cannot enroll again until reinstated (tollgate certs reinstate --subject alice" in out
    assert registry.revoked_subject("alice").by == "hr"
    assert run_cli("certs", "revoke", "--subject", "alice", "--reason", "x", "--state-dir", str(path)) == 0
    assert "'alice' was already blocked from enrolling since " in capsys.readouterr().out

    assert run_cli("certs", "list", "--state-dir", str(path)) == 0
    table = capsys.readouterr().out
    assert "revoked identities (cannot enroll until `tollgate certs reinstate --subject …`):" in table
    assert "  alice: revoked at " in table and " by hr: left" in table

    with pytest.raises(SystemExit):  # argparse: --reason is required
        run_cli("certs", "reinstate", "--subject", "alice", "--state-dir", str(path))
    assert run_cli("certs", "reinstate", "--subject", "alice", "--reason", "came back", "--by", "hr",
                   "--state-dir", str(path)) == 0
    assert "reinstated 'alice': it may enroll again (revoked at " in capsys.readouterr().out
    assert registry.revoked_subject("alice") is None
    assert [(e.action, e.reason) for e in registry.subject_history("alice")] == [("revoke", "left"),
                                                                                 ("reinstate", "came back")]
    assert registry.is_revoked(a1.serial_number)  # reinstating does not un-revoke certificates
    assert run_cli("certs", "reinstate", "--subject", "alice", "--reason", "x", "--state-dir", str(path)) == 0
    assert "'alice' is not revoked: nothing to reinstate" in capsys.readouterr().out
    assert run_cli("certs", "revoke", "--subject", "nobody", "--reason", "x", "--state-dir", str(path)) == 1
    assert registry.revoked_subject("nobody") is None  # a typo blocks nobody
