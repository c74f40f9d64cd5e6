"""Trace tests of the session layer: events in, effects out, no sockets.

Each test is a playbook (tests/proxy/playbook.py): one ordered script of what the agent
and the database send and everything the session does in return. Protocol state (pending
requests, prepared statements, portals) is checked by what it makes the session do next,
seen on the wire or by an addon, never by reading the session's attributes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac

import pytest

from appliance.config import Credential, Target
from appliance.pgwire import messages as m
from appliance.proxy.hooks import (
    Addon,
    FailClosed,
    Forward,
    Hold,
    Reject,
    Result,
    SessionInfo,
    Statement,
    StatementKind,
    StreamEdit,
)
from appliance.proxy.pipeline import BLOCKED_PORTAL, BLOCKED_SQL, BLOCKED_STATEMENT
from appliance.proxy.session import CancelRegistry, Phase
from appliance.proxy.upstream_auth import md5_password
from tests.proxy.playbook import (
    ANY,
    UPSTREAM_KEY,
    CancelDelivered,
    CancelTarget,
    CancelUpstream,
    Capture,
    ClientClosed,
    ClientData,
    ClientGets,
    ClientTlsFailed,
    ClientTlsReady,
    Close,
    Contains,
    Error,
    Fatal,
    Like,
    OpenUpstream,
    Partial,
    PauseClient,
    ResumeClient,
    ServerClosed,
    ServerData,
    ServerGets,
    StartClientTls,
    StartUpstreamTls,
    UpstreamConnected,
    UpstreamTlsReady,
    Wait,
    WaitCancelled,
    WaitDone,
    make_target,
    playbook,
    ready_playbook,
    roundtrip,
    startup,
)

BLOCKED = BLOCKED_SQL.decode()
READY = m.ReadyForQuery(b"I")


class Outcomes(Addon):
    """Sees what the session makes of each result: the statement it is attributed to, and
    how it ended. With a forward hook, requests the server skipped are reported too."""

    def __init__(self) -> None:
        self.results: list[tuple[str | None, str | None, bool, bool]] = []

    def forward(self, session: SessionInfo, request: Forward) -> None:
        return None

    def result_complete(self, session: SessionInfo, result: Result, tag: str | None, error: bool) -> None:
        text = result.statement.text if result.statement is not None else None
        self.results.append((text, tag, error, result.skipped))


def connect(pb, *, upstream_startup=None, **params: str):
    """Script the agent's startup and the upstream connection, up to the login request."""
    return (pb
            >> ClientData(startup(**params))
            << OpenUpstream("payments", "198.18.2.10:5432")
            >> UpstreamConnected()
            << ServerGets(upstream_startup or Like(m.StartupMessage)))


# ---- startup and upstream login ------------------------------------------------------------

def test_startup_logs_in_upstream_with_held_credentials_and_hides_the_backend_secret():
    pb = playbook()
    key = Capture(m.BackendKeyData)
    assert (connect(pb, application_name="agent-7", upstream_startup=m.StartupMessage(196608, {
                "user": "app_rw", "database": "payments", "application_name": "agent-7"}))
            >> ServerData(m.AuthenticationMD5Password(b"abcd"))
            # the agent is not part of the password exchange: it gets nothing here
            << ServerGets(m.PasswordMessage(md5_password("app_rw", "pencil", b"abcd") + b"\0"))
            >> ServerData(m.AuthenticationOk(), m.ParameterStatus("client_encoding", "UTF8"),
                          m.BackendKeyData(*UPSTREAM_KEY), READY)
            << ClientGets(m.AuthenticationOk(), m.ParameterStatus("client_encoding", "UTF8"), key, READY))
    # The backend's real pid (pg_backend_pid() agrees with the driver); a secret of Tollgate's.
    assert key.value.process_id == UPSTREAM_KEY[0]
    assert key.value.secret_key != UPSTREAM_KEY[1]
    assert len(key.value.secret_key) == 4
    assert pb.session.describe()["backend_pid"] == UPSTREAM_KEY[0]
    assert pb.session.phase is Phase.READY
    assert pb.session.info.parameters["client_encoding"] == "UTF8"


def test_database_defaults_to_the_agents_role_not_the_upstream_login():
    pb = playbook()
    assert (pb
            >> ClientData(m.StartupMessage(196608, {"user": "app"}))
            << OpenUpstream()
            >> UpstreamConnected()
            << ServerGets(m.StartupMessage(196608, {"user": "app_rw", "database": "app"})))


def test_scram_matches_rfc7677_vector():
    from appliance.proxy.upstream_auth import ScramSha256
    scram = ScramSha256("pencil", nonce="rOprNGfwEbeRWgbNEkqO", username="user")
    assert scram.client_first() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    final = scram.client_final(b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                               b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
    assert final == (b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                     b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    scram.verify_server_final(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")


def scram_server(password: str, salt: bytes, rounds: int, auth_message: bytes) -> tuple[bytes, bytes]:
    """What a SCRAM-SHA-256 server expects (RFC 5802 §3): the client's proof, and the
    signature that proves the server knows the password."""
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, rounds)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    signature = hmac.digest(hashlib.sha256(client_key).digest(), auth_message, "sha256")
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    server_signature = hmac.digest(hmac.digest(salted, b"Server Key", "sha256"), auth_message, "sha256")
    return base64.b64encode(proof), base64.b64encode(server_signature)


@pytest.mark.parametrize("server_knows_the_password", [True, False])
def test_scram_login_proves_the_password_and_checks_the_servers_proof(server_knows_the_password):
    pb = playbook()
    first, final = Capture(m.PasswordMessage), Capture(m.PasswordMessage)
    assert (connect(pb)
            >> ServerData(m.AuthenticationSASL(("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")))
            << ServerGets(first))
    initial = m.SASLInitialResponse.from_payload(first.value.payload)
    assert initial.mechanism == "SCRAM-SHA-256"  # never -PLUS (see ScramSha256)
    assert initial.data.startswith(b"n,,")  # no channel binding
    client_first_bare = initial.data[3:]
    nonce = dict(a.split(b"=", 1) for a in client_first_bare.split(b","))[b"r"]
    server_first = b"r=" + nonce + b"xyz,s=" + base64.b64encode(b"salt") + b",i=4096"
    assert pb >> ServerData(m.AuthenticationSASLContinue(server_first)) << ServerGets(final)

    without_proof = b"c=biws,r=" + nonce + b"xyz"
    proof, signature = scram_server("pencil", b"salt", 4096,
                                    client_first_bare + b"," + server_first + b"," + without_proof)
    assert final.value.payload == without_proof + b",p=" + proof
    if server_knows_the_password:
        assert (pb
                >> ServerData(m.AuthenticationSASLFinal(b"v=" + signature), m.AuthenticationOk(),
                              m.BackendKeyData(*UPSTREAM_KEY), READY)
                << ClientGets(m.AuthenticationOk(), Like(m.BackendKeyData), READY))
    else:
        assert (pb
                >> ServerData(m.AuthenticationSASLFinal(b"v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="))
                << ClientGets(Fatal(ANY, "signature does not match"))
                << Close())


def test_cleartext_password_refused_without_upstream_tls():
    pb = playbook()
    assert (connect(pb)
            >> ServerData(m.AuthenticationCleartextPassword())
            << ClientGets(Like(m.ErrorResponse, sqlstate="28000", message=Contains("cleartext")))
            << Close())  # and the server got nothing


def test_cleartext_password_sent_over_upstream_tls():
    pb = playbook(target=make_target(tls="require"))
    assert (pb
            >> ClientData(startup())
            << OpenUpstream()
            >> UpstreamConnected()
            << ServerGets(m.SSLRequest())
            >> ServerData(b"S")
            << StartUpstreamTls("payments")
            >> UpstreamTlsReady("TLSv1.3")
            << ServerGets(Like(m.StartupMessage))
            >> ServerData(m.AuthenticationCleartextPassword())
            << ServerGets(m.PasswordMessage(b"pencil\0")))


def test_required_upstream_tls_refused_by_server_fails_closed():
    pb = playbook(target=make_target(tls="require"))
    assert (pb
            >> ClientData(startup())
            << OpenUpstream()
            >> UpstreamConnected()
            << ServerGets(m.SSLRequest())
            >> ServerData(b"N")
            << ClientGets(Fatal(ANY, "refused TLS"))
            << Close())


def test_server_data_before_tls_handshake_is_refused():
    pb = playbook(target=make_target(tls="require"))
    assert (pb
            >> ClientData(startup())
            << OpenUpstream()
            >> UpstreamConnected()
            << ServerGets(m.SSLRequest())
            >> ServerData(b"Sgarbage")
            << ClientGets(Like(m.ErrorResponse, message=Contains("before the TLS handshake")))
            << Close())  # no TLS started


class Recorder(Addon):
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def session_start(self, session: SessionInfo) -> None:
        self.calls.append(("start", session.user))

    def session_end(self, session: SessionInfo, reason: str) -> None:
        self.calls.append(("end", reason))

    def session_refused(self, session: SessionInfo, reason: str) -> None:
        self.calls.append(("refused", reason))


def test_unknown_destination_is_refused_and_reported():
    recorder = Recorder()
    pb = playbook([recorder], no_target=True)
    assert (pb
            >> ClientData(startup())
            << ClientGets(Fatal("08004", "does not protect a database at 198.18.2.10:5432"))
            << Close())
    assert recorder.calls[0][0] == "refused"


def test_role_without_credentials_is_refused():
    pb = playbook()
    assert (pb
            >> ClientData(startup(user="postgres"))
            << ClientGets(Like(m.ErrorResponse, sqlstate="28000",
                               message=Contains("no credentials for role 'postgres'")))
            << Close())


def test_replication_connections_are_refused_by_default():
    pb = playbook()
    assert (pb
            >> ClientData(startup(replication="database"))
            << ClientGets(Like(m.ErrorResponse, message=Contains("replication")))
            << Close())


def test_ssl_and_gssenc_requests_are_declined_then_startup_proceeds():
    pb = playbook()
    assert (pb
            >> ClientData(m.GSSENCRequest())
            << ClientGets(m.GSSENCResponse(False))
            >> ClientData(m.SSLRequest())
            << ClientGets(m.SSLResponse(False))
            >> ClientData(startup())
            << OpenUpstream("payments", "198.18.2.10:5432"))


def test_bytes_after_ssl_request_are_refused_with_a_fatal():
    pb = playbook()
    assert (pb
            >> ClientData(m.SSLRequest(), startup())
            << ClientGets(Fatal("08P01", "unencrypted data after an encryption request"))
            << Close())


def test_session_hooks_see_start_and_end():
    recorder = Recorder()
    pb = ready_playbook([recorder])
    assert (pb
            >> ClientData(m.Terminate())
            << ServerGets(m.Terminate())
            >> ServerClosed()
            << Close())
    assert recorder.calls == [("start", "app"), ("end", "client terminated the session")]


# ---- cancel ---------------------------------------------------------------------------------

def test_cancel_request_reaches_the_right_backend_with_the_real_key():
    cancels = CancelRegistry()
    issued = Capture(m.BackendKeyData)
    first = playbook(cancels=cancels)
    assert (connect(first)
            >> ServerData(m.AuthenticationOk(), m.BackendKeyData(*UPSTREAM_KEY), READY)
            << ClientGets(m.AuthenticationOk(), issued, READY))

    canceller = playbook(cancels=cancels)
    assert (canceller
            >> ClientData(m.CancelRequest(issued.value.process_id, issued.value.secret_key))
            << CancelUpstream("198.18.2.10:5432", *UPSTREAM_KEY))
    # Open until the database has acted: a client takes our close to mean "done". Nothing
    # is ever sent back on a cancel connection.
    assert canceller >> CancelDelivered() << Close()


def test_cancel_with_the_upstream_key_itself_does_nothing():
    cancels = CancelRegistry()
    ready_playbook(cancels=cancels)
    canceller = playbook(cancels=cancels)
    assert canceller >> ClientData(m.CancelRequest(*UPSTREAM_KEY)) << Close()
    assert cancels.unmatched == 1


def test_cancel_needs_both_the_pid_and_the_secret():
    cancels = CancelRegistry()
    issued = Capture(m.BackendKeyData)
    ready_playbook(cancels=cancels, key=issued)
    pid, secret = issued.value.process_id, issued.value.secret_key
    wrong_secret = bytes(b ^ 0xFF for b in secret)
    for key in ((pid, wrong_secret), (pid + 1, secret)):
        canceller = playbook(cancels=cancels)
        # Dropped without a word (PostgreSQL says nothing either): no CancelUpstream.
        assert canceller >> ClientData(m.CancelRequest(*key)) << Close()
    assert cancels.unmatched == 2
    canceller = playbook(cancels=cancels)
    assert (canceller >> ClientData(m.CancelRequest(pid, secret))
            << CancelUpstream("198.18.2.10:5432", *UPSTREAM_KEY))
    assert canceller >> CancelDelivered() << Close()


def test_cancel_over_tls_reaches_the_backend():
    cancels = CancelRegistry()
    issued = Capture(m.BackendKeyData)
    ready_playbook(cancels=cancels, key=issued)
    canceller = playbook(cancels=cancels, authenticator=CertificateOnly())
    # Inside TLS (a cancel is not authenticated, in PostgreSQL either: the key is the proof).
    assert (tls_accepted(canceller)
            >> ClientTlsReady("TLSv1.3", None)
            >> ClientData(m.CancelRequest(issued.value.process_id, issued.value.secret_key))
            << CancelUpstream("198.18.2.10:5432", *UPSTREAM_KEY))
    assert canceller >> CancelDelivered() << Close()


def test_two_databases_backends_with_the_same_pid_get_distinct_keys():
    # Two sessions on different servers whose backends have the same pid: the secret tells
    # them apart, and a drawn secret that would repeat a live key (or be the database's own)
    # is drawn again.
    draws = iter([b"\x01\x02\x03\x04", b"\xaa\xaa\xaa\xaa", b"\xaa\xaa\xaa\xaa", b"\xbb\xbb\xbb\xbb"])
    cancels = CancelRegistry(draw_secret=lambda n: next(draws))
    first, second = Capture(m.BackendKeyData), Capture(m.BackendKeyData)
    one = ready_playbook(cancels=cancels, key=first)
    two = ready_playbook(cancels=cancels, key=second)
    assert first.value.process_id == second.value.process_id == UPSTREAM_KEY[0]
    assert first.value.secret_key == b"\xaa\xaa\xaa\xaa"  # the database's own secret was drawn first: refused
    assert second.value.secret_key == b"\xbb\xbb\xbb\xbb"  # the first session's was drawn next: refused
    assert cancels.lookup(*(first.value.process_id, first.value.secret_key)) is one.session
    assert cancels.lookup(*(second.value.process_id, second.value.secret_key)) is two.session


def test_closed_session_key_is_forgotten():
    cancels = CancelRegistry()
    issued = Capture(m.BackendKeyData)
    pb = ready_playbook(cancels=cancels, key=issued)
    assert len(cancels) == 1
    assert pb >> ClientClosed() << Close()
    assert len(cancels) == 0
    canceller = playbook(cancels=cancels)  # the old key now cancels nothing
    assert canceller >> ClientData(m.CancelRequest(issued.value.process_id, issued.value.secret_key)) << Close()


# ---- relay, pipelines, errors ---------------------------------------------------------------

def test_simple_query_is_forwarded_byte_for_byte():
    pb = ready_playbook()
    query = m.Query("SELECT 1; SELECT 2").encode()
    reply = b"".join(x.encode() for x in (
        m.RowDescription(()), m.DataRow((b"1",)), m.CommandComplete("SELECT 1"),
        m.RowDescription(()), m.DataRow((b"2",)), m.CommandComplete("SELECT 1"), READY))
    pb >> ClientData(query) << ServerGets(query)  # bytes: exactly these bytes
    # Split anywhere: the client still gets exactly the server's bytes.
    for cut in (1, 7, len(reply) - 3):
        pb >> ServerData(reply, cuts=[cut]) << ClientGets(reply) >> ClientData(query) << ServerGets(query)
    assert pb


def test_pipeline_error_skips_to_sync_and_state_follows_the_server():
    outcomes = Outcomes()
    pb = ready_playbook([outcomes])
    assert (roundtrip(pb, [
                m.Parse("s1", "SELECT 1", ()), m.Bind("", "s1", (), (), ()), m.Execute("", 0),
                m.Parse("s2", "SELECT broken", ()), m.Bind("", "s2", (), (), ()), m.Execute("", 0),
                m.Sync(),
                m.Parse("s3", "SELECT 3", ()), m.Sync()],
                [m.ParseComplete(), m.BindComplete(), m.DataRow((b"1",)), m.CommandComplete("SELECT 1")]))
    assert outcomes.results == [("SELECT 1", "SELECT 1", False, False)]
    # The Parse of s2 fails: the server skips its Bind and Execute, up to the Sync.
    error = m.ErrorResponse.build("ERROR", "42703", "column broken does not exist")
    assert pb >> ServerData(error) << ClientGets(error)
    assert outcomes.results[1:] == [("SELECT broken", None, True, True)]
    assert roundtrip(pb, [], [READY, m.ParseComplete(), READY])
    assert len(outcomes.results) == 2  # nothing else was attributed a result

    # Nothing is left pending: the next result is the next request's.
    assert roundtrip(pb, [m.Query("SELECT 4")], [m.CommandComplete("SELECT 1"), READY])
    assert outcomes.results[2:] == [("SELECT 4", "SELECT 1", False, False)]
    # s1 and s3 exist; s2, which the server skipped, is unknown: a Bind of it is refused
    # (sent as a Bind of a name that can't exist, which the server fails the same way).
    for name in ("s1", "s3"):
        assert roundtrip(pb, [m.Bind("", name, (), (), ()), m.Execute("", 0), m.Sync()],
                         [m.BindComplete(), m.CommandComplete("SELECT 1"), READY])
    missing = m.ErrorResponse.build("ERROR", "26000", 'prepared statement "\x01tollgate unknown statement" '
                                    'does not exist')
    assert (pb >> ClientData(m.Bind("", "s2", (), (), ()), m.Execute("", 0), m.Sync())
            << ServerGets(m.Bind("", BLOCKED_STATEMENT, (), (), ()), m.Execute("", 0), m.Sync())
            >> ServerData(missing, READY)
            << ClientGets(Like(m.ErrorResponse, sqlstate="26000", message='prepared statement "s2" does not exist'),
                          READY))
    assert outcomes.results[3:] == [("SELECT 1", "SELECT 1", False, False), ("SELECT 3", "SELECT 1", False, False),
                                    (None, None, True, True)]


class Blocker(Addon):
    def statement(self, session: SessionInfo, statement: Statement):
        if "DROP" in statement.text:
            return Reject("42501", "DROP is not allowed for agents", hint="ask a DBA")
        return None


def test_blocked_query_never_reaches_the_server_and_the_error_keeps_transaction_state():
    pb = ready_playbook([Blocker()])
    assert (roundtrip(pb, [m.Query("BEGIN")], [m.CommandComplete("BEGIN"), m.ReadyForQuery(b"T")])
            >> ClientData(m.Query("DROP TABLE cards"))
            << ServerGets(m.Query(BLOCKED))
            # The server fails our stand-in as it would any failing statement in a transaction.
            >> ServerData(m.ErrorResponse.build("ERROR", "42601", 'syntax error at or near "TOLLGATE"'),
                          m.ReadyForQuery(b"E"))
            << ClientGets(Like(m.ErrorResponse, sqlstate="42501", message="DROP is not allowed for agents",
                               hint="ask a DBA"),
                          m.ReadyForQuery(b"E")))


def test_blocked_parse_in_a_pipeline_fails_like_a_server_error():
    outcomes = Outcomes()
    pb = ready_playbook([Blocker(), outcomes])
    assert (pb
            >> ClientData(m.Parse("ok", "SELECT 1", ()), m.Parse("bad", "DROP TABLE cards", ()),
                          m.Bind("", "bad", (), (), ()), m.Execute("", 0), m.Sync())
            # The Bind of the refused statement goes on (the server fails it, or skips it as
            # here); its Execute is refused too.
            << ServerGets(m.Parse("ok", "SELECT 1", ()), m.Parse("bad", BLOCKED, ()),
                          m.Bind("", "bad", (), (), ()), m.Execute(BLOCKED_PORTAL, 0), m.Sync())
            >> ServerData(m.ParseComplete(), m.ErrorResponse.build("ERROR", "42601", "syntax error"), READY)
            << ClientGets(m.ParseComplete(), Error("42501"), READY))
    # "ok" exists; "bad" was never created: a Bind of it is refused as not existing.
    assert roundtrip(pb, [m.Bind("", "ok", (), (), ()), m.Execute("", 0), m.Sync()],
                     [m.BindComplete(), m.CommandComplete("SELECT 1"), READY])
    missing = m.ErrorResponse.build("ERROR", "26000", "prepared statement does not exist")
    assert (pb >> ClientData(m.Bind("", "bad", (), (), ()), m.Execute("", 0), m.Sync())
            << ServerGets(m.Bind("", BLOCKED_STATEMENT, (), (), ()), m.Execute("", 0), m.Sync())
            >> ServerData(missing, READY)
            << ClientGets(Like(m.ErrorResponse, sqlstate="26000", message='prepared statement "bad" does not exist'),
                          READY))
    assert outcomes.results[-2:] == [("SELECT 1", "SELECT 1", False, False), (None, None, True, True)]


class Holder(Addon):
    def __init__(self) -> None:
        self.held: list[Statement] = []

    def statement(self, session: SessionInfo, statement: Statement):
        if statement.text.startswith("UPDATE"):
            self.held.append(statement)
            return Hold(asyncio.sleep(0), "needs approval")
        return None


UPDATE = m.Query("UPDATE cards SET brand = 'x'")


def test_hold_pauses_only_this_session_then_runs_in_order_on_approval():
    holder = Holder()
    pb = ready_playbook([holder])
    assert (pb
            >> ClientData(m.Query("SELECT 1"), UPDATE, m.Query("SELECT 2"))
            << PauseClient()
            << Wait("approval")
            << ServerGets(m.Query("SELECT 1"))
            >> ClientData(m.Query("SELECT 3"))  # arrives while held: queued, not sent
            >> WaitDone("approval")
            << ServerGets(UPDATE, m.Query("SELECT 2"), m.Query("SELECT 3"))
            << ResumeClient())
    assert len(holder.held) == 1  # decided once, not re-asked on resume


def test_denied_hold_is_rejected_like_a_block():
    pb = ready_playbook([Holder()])
    assert (pb
            >> ClientData(UPDATE)
            << PauseClient()
            << Wait("approval")
            >> WaitDone("approval", Reject("42501", "denied by alice: not during freeze"))
            << ServerGets(m.Query(BLOCKED))
            << ResumeClient()
            >> ServerData(m.ErrorResponse.build("ERROR", "42601", "syntax"), READY)
            << ClientGets(Like(m.ErrorResponse, message="denied by alice: not during freeze"), READY))


def test_cancel_while_held_withdraws_the_request_with_57014():
    pb = ready_playbook([Holder()])
    cancel = CancelTarget()
    assert (pb
            >> ClientData(UPDATE)
            << PauseClient()
            << Wait("approval")
            >> cancel
            << WaitCancelled("approval")  # and no cancel goes upstream
            << ServerGets(m.Query(BLOCKED))
            << ResumeClient()
            >> ServerData(m.ErrorResponse.build("ERROR", "42601", "syntax"), READY)
            << ClientGets(Error("57014"), READY))
    assert cancel.result is None  # handled here: nothing to send upstream


def test_failing_hold_fails_closed():
    pb = ready_playbook([Holder()])
    assert (pb
            >> ClientData(UPDATE)
            << PauseClient()
            << Wait("approval")
            >> WaitDone("approval", error=RuntimeError("approval store unavailable"))
            << ServerGets(m.Query(BLOCKED))
            << ResumeClient()
            >> ServerData(m.ErrorResponse.build("ERROR", "42601", "syntax"), READY)
            << ClientGets(Error("XX000"), READY))


class RowWatcher(Addon):
    def __init__(self) -> None:
        self.rows: list[tuple[Result, bytes]] = []
        self.completed: list[tuple[str | None, bool]] = []

    def data_row(self, session: SessionInfo, result: Result, message: memoryview):
        self.rows.append((result, bytes(message)))
        return bytes(message).replace(b"4111", b"****")

    def result_complete(self, session, result, tag, error):
        self.completed.append((tag, error))


def test_data_row_hook_gets_cached_description_and_bind_formats_and_may_rewrite():
    watcher = RowWatcher()
    pb = ready_playbook([watcher])
    field = m.FieldDescription("pan", 1, 1, 25, -1, -1, 0)
    assert (roundtrip(pb, [m.Parse("q", "SELECT pan FROM cards", ()), m.Describe(b"S", "q"), m.Sync()],
                      [m.ParseComplete(), m.ParameterDescription(()), m.RowDescription((field,)), READY])
            # Execute without Describe: the proxy still knows the columns and the asked-for formats.
            >> ClientData(m.Bind("", "q", (), (), (1,)), m.Execute("", 0), m.Sync())
            << ServerGets(m.Bind("", "q", (), (), (1,)), m.Execute("", 0), m.Sync())
            >> ServerData(m.BindComplete(), m.DataRow((b"4111111111111111",)), m.CommandComplete("SELECT 1"), READY)
            << ClientGets(m.BindComplete(), m.DataRow((b"****111111111111",)), m.CommandComplete("SELECT 1"), READY))
    [(result, _)] = watcher.rows
    assert result.row_description.fields[0].name == "pan"
    assert result.result_formats == (1,)
    assert result.statement.text == "SELECT pan FROM cards"
    assert watcher.completed == [("SELECT 1", False)]


class Streamer(Addon):
    def __init__(self) -> None:
        self.seen = 0

    def stream_chunk(self, session, result, tag, chunk, offset, total):
        assert offset == self.seen
        self.seen += len(chunk)
        return StreamEdit(bytes(chunk).replace(b"7", b"*"))


def test_large_values_stream_through_without_being_held_whole():
    streamer = Streamer()
    pb = ready_playbook([streamer], stream_threshold=4096)
    value = b"7" * 200_000
    row = m.DataRow((value,)).encode()
    reply = row + m.CommandComplete("SELECT 1").encode() + READY.encode()
    pb = roundtrip(pb, [m.Query("SELECT big")])
    for start in range(0, len(reply), 1000):
        end = min(start + 1000, len(reply))
        pb >> ServerData(reply[start:end])
        if end < len(row):
            # Passed on as it arrives: the agent is never a read behind (it holds part of a
            # message it cannot read yet).
            pb << ClientGets(Partial(low=end - 999, high=end))
    assert pb << ClientGets(m.DataRow((b"*" * 200_000,)), m.CommandComplete("SELECT 1"), READY)
    assert streamer.seen == 4 + 2 + 4 + 200_000 - 4 - 2 + 2  # body: count, length, value


def test_copy_in_and_out_pass_through_the_copy_hooks():
    seen: list[tuple[bool, bytes]] = []
    copy_results: list[tuple] = []

    class CopyWatch(Addon):
        def copy_data(self, session, result, from_client, message):
            assert (result is None) == from_client
            if result is not None:
                copy_results.append((result.copy_format, result.copy_column_formats))
            seen.append((from_client, bytes(message[5:])))
            return None

    pb = ready_playbook([CopyWatch()])
    assert (roundtrip(pb, [m.Query("COPY t FROM STDIN")], [m.CopyInResponse(0, (0,))])
            >> ClientData(m.CopyData(b"1\n"), m.CopyData(b"2\n"), m.CopyDone())
            << ServerGets(m.CopyData(b"1\n"), m.CopyData(b"2\n"), m.CopyDone())
            >> ServerData(m.CommandComplete("COPY 2"), READY)
            << ClientGets(m.CommandComplete("COPY 2"), READY))
    assert roundtrip(pb, [m.Query("COPY t TO STDOUT")],
                     [m.CopyOutResponse(0, (0,)), m.CopyData(b"1\n"), m.CopyDone(), m.CommandComplete("COPY 1"), READY])
    assert seen == [(True, b"1\n"), (True, b"2\n"), (False, b"1\n")]
    assert copy_results[-1] == (0, (0,))


def test_notice_and_notification_hooks_may_rewrite():
    class Scrub(Addon):
        def notice(self, session, is_error, message):
            return bytes(message).replace(b"secret", b"******")

        def notification(self, session, message):
            return bytes(message).replace(b"secret", b"******")

    pb = ready_playbook([Scrub()])
    assert (pb
            >> ServerData(m.NoticeResponse((("S", "NOTICE"), ("C", "00000"), ("M", "a secret"))),
                          m.NotificationResponse(7, "chan", "the secret"))
            << ClientGets(Like(m.NoticeResponse, message="a ******"),
                          Like(m.NotificationResponse, payload="the ******")))


# ---- bad input --------------------------------------------------------------------------------

def test_malformed_client_message_ends_the_session_with_a_fatal_that_says_why():
    pb = ready_playbook()
    assert (pb
            >> ClientData(b"Q\x00\x00\x00\x02")
            << ClientGets(Fatal("08P01", "length 2"))
            << Close())


def test_unknown_client_message_type_is_refused():
    pb = ready_playbook()
    assert (pb
            >> ClientData(b"\x7f\x00\x00\x00\x04")
            << ClientGets(Fatal("08P01", message=Contains("frontend message type", "0x7f")))
            << Close())


def test_malformed_server_message_ends_the_session():
    pb = ready_playbook()
    assert (pb
            >> ServerData(b"Z\x00\x00\x00\x05Q")
            << ClientGets(Fatal(ANY, "database server"))
            << Close())


def test_server_fatal_reaches_the_client_then_the_session_closes():
    pb = ready_playbook()
    fatal = m.ErrorResponse.build("FATAL", "57P01", "terminating connection due to administrator command").encode()
    assert (pb
            >> ServerData(fatal)
            << ClientGets(fatal)  # these very bytes, and nothing of ours after them
            >> ServerClosed()
            << Close())
    assert pb.session.close_reason.startswith("the database ended the session")


def test_oversized_startup_packet_is_refused():
    pb = playbook()
    assert (pb
            >> ClientData(b"\x00\x01\x00\x00" + b"\x00" * 16)
            << ClientGets(Like(m.ErrorResponse, sqlstate="08P01", message=Contains("startup packet", "65536")))
            << Close())


@pytest.mark.parametrize("kind", [StatementKind.QUERY, StatementKind.PARSE])
def test_statement_hook_that_raises_fails_closed(kind):
    class Broken(Addon):
        def statement(self, session, statement):
            raise RuntimeError("policy store gone")

    pb = ready_playbook([Broken()])
    if kind is StatementKind.QUERY:
        assert pb >> ClientData(m.Query("SELECT 1")) << ServerGets(m.Query(BLOCKED))
    else:
        assert pb >> ClientData(m.Parse("", "SELECT 1", ())) << ServerGets(m.Parse("", BLOCKED, ()))


class Formats(Addon):
    """Sees each row with the statement and result formats the session attributes it to."""

    def __init__(self) -> None:
        self.rows: list[tuple[str | None, tuple[int, ...]]] = []

    def data_row(self, session, result, message):
        self.rows.append((result.statement.text if result.statement else None, result.result_formats))


def test_portal_bound_after_a_sync_survives_that_syncs_ready_for_query():
    rows, outcomes = Formats(), Outcomes()
    pb = ready_playbook([rows, outcomes])
    assert (roundtrip(pb, [m.Parse("q", "SELECT 1", ()), m.Bind("", "q", (), (), ()), m.Execute("", 0), m.Sync(),
                           m.Bind("p2", "q", (), (), (1,)), m.Execute("p2", 1), m.Sync()],
                      [m.ParseComplete(), m.BindComplete(), m.DataRow((b"1",)), m.CommandComplete("SELECT 1"), READY])
            # p2 outlived the first ReadyForQuery: its row is still attributed to it
            >> ServerData(m.BindComplete(), m.DataRow((b"1",)), m.PortalSuspended(), READY)
            << ClientGets(m.BindComplete(), m.DataRow((b"1",)), m.PortalSuspended(), READY))
    assert rows.rows == [("SELECT 1", ()), ("SELECT 1", (1,))]
    # … but not the transaction's end it was bound before: p2 is gone, and nothing is
    # pending (this Execute's outcome is its own).
    missing = m.ErrorResponse.build("ERROR", "34000", 'portal "p2" does not exist')
    assert roundtrip(pb, [m.Execute("p2", 1), m.Sync()], [missing, READY])
    assert outcomes.results[-1] == (None, None, True, False)


def test_close_statement_then_reparse_in_one_pipeline_keeps_the_new_statement():
    outcomes = Outcomes()
    pb = ready_playbook([outcomes])
    assert roundtrip(pb, [m.Parse("s", "SELECT 1", ()), m.Sync()], [m.ParseComplete(), READY])
    assert roundtrip(pb, [m.Close(b"S", "s"), m.Parse("s", "SELECT 2", ()), m.Sync()],
                     [m.CloseComplete(), m.ParseComplete(), READY])
    assert roundtrip(pb, [m.Bind("", "s", (), (), ()), m.Execute("", 0), m.Sync()],
                     [m.BindComplete(), m.CommandComplete("SELECT 1"), READY])
    assert outcomes.results[-1] == ("SELECT 2", "SELECT 1", False, False)


# ---- the agent side: TLS and identity -----------------------------------------------------------

class CertificateOnly:
    """An authenticator like the identity layer's: TLS offered, a certificate required."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def server_context(self, target):
        return "server-context-for-" + target.name

    def tls_failed(self, info, reason):
        self.failures.append(reason)

    def authenticate(self, info, peer_certificate):
        from appliance.proxy.agent_auth import AuthFailure
        if peer_certificate is None:
            raise AuthFailure("a client certificate is required", hint="run tollgate enroll")
        return peer_certificate.decode()


def tls_accepted(pb):
    return (pb
            >> ClientData(m.SSLRequest())
            << ClientGets(m.SSLResponse(True))
            << StartClientTls("server-context-for-payments"))


def test_ssl_request_is_answered_with_tls_when_the_authenticator_offers_it():
    pb = playbook(authenticator=CertificateOnly())
    assert (tls_accepted(pb)
            >> ClientTlsReady("TLSv1.3", b"alice")
            >> ClientData(startup())
            << OpenUpstream("payments", "198.18.2.10:5432"))
    assert pb.session.info.identity == "alice" and pb.session.info.client_tls == "TLSv1.3"


def test_missing_certificate_is_refused_with_28000_and_how_to_enroll():
    pb = playbook(authenticator=CertificateOnly())
    assert (tls_accepted(pb)
            >> ClientTlsReady("TLSv1.3", None)
            >> ClientData(startup())
            << ClientGets(Fatal("28000", message="a client certificate is required", hint="run tollgate enroll"))
            << Close())  # no upstream connection opened


class GroupsFromCertificate(CertificateOnly):
    """The certificate's bytes name the identity's groups, comma-separated."""

    def authenticate(self, info, peer_certificate):
        from appliance.model.identity import Identity
        return Identity("someone", "agent", tuple(peer_certificate.decode().split(",")))


def role_bound_target() -> Target:
    return make_target(credentials={"app": Credential("app_rw", "pencil", frozenset({"payments-dbas"})),
                                    "agent": Credential("agent", "pencil", frozenset({"payments-agents"}))})


def test_a_role_bound_to_groups_refuses_an_identity_outside_them_before_any_upstream_connection():
    pb = playbook(authenticator=GroupsFromCertificate(), target=role_bound_target())
    assert (tls_accepted(pb)
            >> ClientTlsReady("TLSv1.3", b"payments-agents")
            >> ClientData(startup(user="app"))
            << ClientGets(Fatal("28000", message="role 'app' on database 'payments' is not for your identity's groups",
                                hint="Roles your identity may use through Tollgate here: agent."))
            << Close())


def test_a_role_bound_to_groups_lets_an_identity_in_one_of_them_log_in():
    pb = playbook(authenticator=GroupsFromCertificate(), target=role_bound_target())
    assert (tls_accepted(pb)
            >> ClientTlsReady("TLSv1.3", b"other,payments-agents")
            >> ClientData(startup(user="agent"))
            << OpenUpstream("payments", "198.18.2.10:5432"))


def test_failed_client_handshake_is_remembered_and_closes():
    auth = CertificateOnly()
    pb = playbook(authenticator=auth)
    assert (tls_accepted(pb)
            >> ClientTlsFailed("certificate verify failed: unable to get local issuer certificate")
            << Close())
    assert auth.failures == ["certificate verify failed: unable to get local issuer certificate"]


def test_database_hanging_up_on_a_ready_session_is_reported():
    pb = ready_playbook()
    assert (pb
            >> ServerClosed()
            << ClientGets(Fatal("08006", "closed the connection"))
            << Close())


def test_a_sync_claiming_a_megabyte_is_refused_from_its_header():
    pb = ready_playbook()
    assert (pb
            >> ClientData(b"S\x00\x10\x00\x00")  # the header alone: refused without waiting for the rest
            << ClientGets(Like(m.ErrorResponse, message=Contains("'S'", "length 1048576")))
            << Close())


def test_a_large_message_in_many_reads_is_framed_once():
    pb = ready_playbook()
    query = m.Query("SELECT '" + "x" * 300_000 + "'").encode()
    pieces = [query[i:i + 4096] for i in range(0, len(query), 4096)]
    writes = pb.writes("server")
    for piece in pieces[:-1]:
        pb >> ClientData(piece)  # nothing happens until the message is whole
    assert pb >> ClientData(pieces[-1]) << ServerGets(query)
    assert pb.writes("server") == writes + 1  # … and then it goes in one piece


def test_bind_with_65535_parameters_is_valid():
    pb = ready_playbook()
    assert roundtrip(pb, [m.Parse("s", "INSERT", ()), m.Bind("", "s", (), (None,) * 65535, ()), m.Sync()])


class KeepBack(Addon):
    """Masks runs of '7' of any length, even split across windows, by keeping back a
    trailing run until the next window shows where it ends."""

    def __init__(self) -> None:
        self.offsets: list[int] = []

    def stream_chunk(self, session, result, tag, window, offset, total):
        self.offsets.append(offset)
        data = bytes(window).replace(b"77", b"**")
        final = offset + len(window) == total
        keep = 0 if final else len(data) - len(data.rstrip(b"7"))
        return StreamEdit(data, keep)


def test_stream_hook_may_keep_bytes_back_for_the_next_window():
    addon = KeepBack()
    pb = ready_playbook([addon], stream_threshold=4096)
    value = (b"x7" + b"7" * 999) * 20  # runs of 1000 sevens: '77' pairs split across reads
    assert (roundtrip(pb, [m.Query("SELECT big")])
            >> ServerData(m.DataRow((value,)), m.CommandComplete("SELECT 1"), READY, chunk=333)
            << ClientGets(m.DataRow((value.replace(b"77", b"**"),)), m.CommandComplete("SELECT 1"), READY))
    assert addon.offsets == sorted(addon.offsets) and addon.offsets[0] == 0


def test_a_hook_that_keeps_bytes_back_at_the_end_of_a_message_fails_closed():
    class Greedy(Addon):
        def stream_chunk(self, session, result, tag, window, offset, total):
            return StreamEdit(None, 1)

    pb = ready_playbook([Greedy()], stream_threshold=4096)
    row = m.DataRow((b"a" * 10_000,)).encode()
    assert (roundtrip(pb, [m.Query("SELECT big")])
            >> ServerData(row[:5000])
            << ClientGets(Partial())
            >> ServerData(row[5000:])
            << Close())  # cut: a FATAL inside the row would garble it


class Deferring(Addon):
    """Defers UPDATEs to run time, and holds each Execute of them with its parameters."""

    def __init__(self) -> None:
        self.binds: list[bytes | None] = []
        self.block_everything = False

    def statement(self, session, statement):
        if self.block_everything:
            return Reject("42501", "policy changed: no longer allowed")
        if statement.text.startswith("UPDATE"):
            statement.deferred = "hold"
        return None

    def execute(self, session, statement, bind):
        self.binds.append(bind)

        async def decision():
            return None
        return Hold(decision())


def test_a_deferred_statement_is_prepared_at_once_and_held_at_each_execute_with_its_parameters():
    addon = Deferring()
    pb = ready_playbook([addon])
    bind = m.Bind("", "upd", (), (b"visa",), ())
    assert (roundtrip(pb, [m.Parse("upd", "UPDATE cards SET brand = $1", ()), m.Sync()], [m.ParseComplete(), READY])
            >> ClientData(bind, m.Execute("", 0), m.Sync())
            << PauseClient()
            << Wait("execute")
            << ServerGets(bind))  # the Execute is held
    assert len(addon.binds) == 1 and b"visa" in addon.binds[0]
    assert (pb
            >> WaitDone("execute")
            << ServerGets(m.Execute("", 0), m.Sync())
            << ResumeClient())
    assert len(addon.binds) == 1  # decided once, not re-asked on resume


def test_a_held_execute_that_is_denied_fails_like_a_server_error_at_execute():
    pb = ready_playbook([Deferring()])
    parse, bind = m.Parse("", "UPDATE cards SET brand = $1", ()), m.Bind("", "", (), (b"visa",), ())
    assert (pb
            >> ClientData(parse, bind, m.Execute("", 0), m.Sync())
            << PauseClient()
            << Wait("approval")
            << ServerGets(parse, bind)
            >> WaitDone("approval", Reject("42501", "approval apr-1 was denied"))
            << ServerGets(m.Execute(BLOCKED_PORTAL, 0), m.Sync())
            << ResumeClient()
            >> ServerData(m.ParseComplete(), m.BindComplete(),
                          m.ErrorResponse.build("ERROR", "34000", "portal does not exist"), READY)
            << ClientGets(m.ParseComplete(), m.BindComplete(),
                          Like(m.ErrorResponse, sqlstate="42501", message="approval apr-1 was denied"), READY))


def test_a_statement_prepared_before_a_policy_change_is_decided_again_at_execute():
    addon = Deferring()
    pb = ready_playbook([addon])
    assert roundtrip(pb, [m.Parse("s", "SELECT 1", ()), m.Sync()], [m.ParseComplete(), READY])
    addon.block_everything = True
    pb.hooks.epoch += 1  # what a policy reload does
    for _ in range(2):  # and it stays decided
        assert (pb
                >> ClientData(m.Bind("", "s", (), (), ()), m.Execute("", 0), m.Sync())
                << ServerGets(m.Bind("", "s", (), (), ()), m.Execute(BLOCKED_PORTAL, 0), m.Sync())
                >> ServerData(m.BindComplete(), m.ErrorResponse.build("ERROR", "34000", "no portal"), READY)
                << ClientGets(m.BindComplete(), Like(m.ErrorResponse, message="policy changed: no longer allowed"),
                              READY))


def test_a_client_may_not_bind_the_reserved_blocked_portal_name():
    pb = ready_playbook([])
    assert (pb
            >> ClientData(m.Bind(BLOCKED_PORTAL, "", (), (), ()), m.Sync())
            << ClientGets(Fatal())
            << Close())  # and nothing reached the server


def test_data_a_hook_cannot_make_safe_ends_the_session_with_a_fatal():
    class Unsafe(Addon):
        def data_row(self, session, result, message):
            raise FailClosed("42501", "column pan (int8) holds a card number", hint="cast it to text")

    pb = ready_playbook([Unsafe()])
    assert (roundtrip(pb, [m.Query("SELECT pan FROM cards")])
            >> ServerData(m.RowDescription(()), m.DataRow((b"1",)))
            << ClientGets(Fatal(ANY, "card number"))
            << Close())


def test_function_call_results_pass_the_function_result_hook():
    class Scrub(Addon):
        def function_result(self, session, message):
            return bytes(message).replace(b"secret", b"******")

    pb = ready_playbook([Scrub()])
    assert (roundtrip(pb, [m.FunctionCall(1234, (), (), 0)])
            >> ServerData(m.FunctionCallResponse(b"secret"), READY)
            << ClientGets(m.FunctionCallResponse(b"******"), READY))


def test_a_statement_resumed_after_its_hold_keeps_what_the_hooks_decided():
    class DecidingHolder(Addon):
        def __init__(self) -> None:
            self.results: list[Result] = []

        def statement(self, session, statement):
            statement.decision = "mask the cvv"

            async def approve():
                return None
            return Hold(approve())

        def row_description(self, session, result):
            self.results.append(result)

    addon = DecidingHolder()
    pb = ready_playbook([addon])
    reply = [m.RowDescription(()), m.CommandComplete("SELECT 0"), READY]
    assert (pb
            >> ClientData(m.Query("SELECT cvv FROM cards"))
            << PauseClient()
            << Wait("approval")
            >> WaitDone("approval")
            << ServerGets(m.Query("SELECT cvv FROM cards"))
            << ResumeClient()
            >> ServerData(*reply)
            << ClientGets(*reply))
    assert addon.results[0].statement.decision == "mask the cvv"
