"""Trace tests of the session layer: events in, effects out, no sockets."""

from __future__ import annotations

import asyncio

import pytest

from appliance.pgwire import messages as m
from appliance.proxy.hooks import (
    Addon, FailClosed, Hold, Reject, Result, SessionInfo, Statement, StatementKind, StreamEdit,
)
from appliance.proxy.session import BLOCKED_PORTAL, BLOCKED_SQL, CancelRegistry, Phase
from appliance.proxy.upstream_auth import md5_password
from tests.proxy.trace import (
    UPSTREAM_KEY, backend, frontend, make_target, new_session, ready_session, startup,
)


# ---- startup and upstream login ------------------------------------------------------------

def test_startup_logs_in_upstream_with_held_credentials_and_hides_the_backend_key():
    session, io = new_session()
    session.client_data(startup(application_name="agent-7"))
    assert io.events == [("open_upstream", "payments", "198.18.2.10:5432")]
    session.upstream_connected()
    [sent] = io.server_got()
    assert sent.parameters["user"] == "app_rw"
    assert sent.parameters["database"] == "payments"
    assert sent.parameters["application_name"] == "agent-7"

    session.server_data(m.AuthenticationMD5Password(b"abcd").encode())
    [password] = io.server_got()
    assert password.payload == md5_password("app_rw", "pencil", b"abcd") + b"\0"
    assert io.client_got() == []  # the agent is not part of the password exchange

    session.server_data(backend(m.AuthenticationOk(), m.ParameterStatus("client_encoding", "UTF8"),
                                m.BackendKeyData(*UPSTREAM_KEY), m.ReadyForQuery(b"I")))
    got = io.client_got()
    assert [type(x) for x in got] == [m.AuthenticationOk, m.ParameterStatus, m.BackendKeyData, m.ReadyForQuery]
    key = got[2]
    assert (key.process_id, key.secret_key) != UPSTREAM_KEY
    assert len(key.secret_key) == 4
    assert session.phase is Phase.READY
    assert session.info.parameters["client_encoding"] == "UTF8"


def test_database_defaults_to_the_agents_role_not_the_upstream_login():
    session, io = new_session()
    session.client_data(m.StartupMessage(196608, {"user": "app"}).encode())
    session.upstream_connected()
    [sent] = io.server_got()
    assert sent.parameters["database"] == "app"


def test_scram_matches_rfc7677_vector():
    from appliance.proxy.upstream_auth import ScramSha256
    scram = ScramSha256("pencil", nonce="rOprNGfwEbeRWgbNEkqO", username="user")
    assert scram.client_first() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    final = scram.client_final(b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                               b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
    assert final == (b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                     b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    scram.verify_server_final(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")


def test_scram_server_with_a_wrong_signature_is_refused():
    session, io = new_session()
    session.client_data(startup())
    session.upstream_connected()
    session.server_data(m.AuthenticationSASL(("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")).encode())
    io.server_got()
    nonce = session._scram._nonce
    session.server_data(m.AuthenticationSASLContinue(f"r={nonce}xyz,s=c2FsdA==,i=4096".encode()).encode())
    io.server_got()
    session.server_data(m.AuthenticationSASLFinal(b"v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=").encode())
    [error] = io.client_got()
    assert error.severity == "FATAL" and "signature does not match" in error.message
    assert io.closed


def test_cleartext_password_refused_without_upstream_tls():
    session, io = new_session()
    session.client_data(startup())
    session.upstream_connected()
    io.server_got()
    session.server_data(m.AuthenticationCleartextPassword().encode())
    assert io.server_got() == []
    [error] = io.client_got()
    assert error.sqlstate == "28000" and "cleartext" in error.message
    assert io.closed


def test_cleartext_password_sent_over_upstream_tls():
    session, io = new_session(target=make_target(tls="require"))
    session.client_data(startup())
    session.upstream_connected()
    assert [type(x) for x in io.server_got()] == [m.SSLRequest]
    session.server_data(b"S")
    assert io.events[-1] == ("start_tls", "payments")
    session.upstream_tls_ready("TLSv1.3")
    assert [type(x) for x in io.server_got()] == [m.StartupMessage]
    session.server_data(m.AuthenticationCleartextPassword().encode())
    [password] = io.server_got()
    assert password.payload == b"pencil\0"


def test_required_upstream_tls_refused_by_server_fails_closed():
    session, io = new_session(target=make_target(tls="require"))
    session.client_data(startup())
    session.upstream_connected()
    io.server_got()
    session.server_data(b"N")
    [error] = io.client_got()
    assert error.severity == "FATAL" and "refused TLS" in error.message
    assert io.server_got() == []


def test_server_data_before_tls_handshake_is_refused():
    session, io = new_session(target=make_target(tls="require"))
    session.client_data(startup())
    session.upstream_connected()
    session.server_data(b"Sgarbage")
    [error] = io.client_got()
    assert "before the TLS handshake" in error.message
    assert ("start_tls", "payments") not in io.events


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
    session, io = new_session([recorder], no_target=True)
    session.client_data(startup())
    [error] = io.client_got()
    assert error.severity == "FATAL" and error.sqlstate == "08004"
    assert "does not protect a database at 198.18.2.10:5432" in error.message
    assert io.events == [] and io.closed
    assert recorder.calls[0][0] == "refused"


def test_role_without_credentials_is_refused():
    session, io = new_session()
    session.client_data(startup(user="postgres"))
    [error] = io.client_got()
    assert error.sqlstate == "28000" and "no credentials for role 'postgres'" in error.message
    assert io.events == []


def test_replication_connections_are_refused_by_default():
    session, io = new_session()
    session.client_data(startup(replication="database"))
    [error] = io.client_got()
    assert "replication" in error.message and io.closed


def test_ssl_and_gssenc_requests_are_declined_then_startup_proceeds():
    session, io = new_session()
    session.client_data(m.GSSENCRequest().encode())
    assert io.client_got() == [b"N"]
    session.client_data(m.SSLRequest().encode())
    assert io.client_got() == [b"N"]
    session.client_data(startup())
    assert io.events == [("open_upstream", "payments", "198.18.2.10:5432")]


def test_bytes_after_ssl_request_are_refused_with_a_fatal():
    session, io = new_session()
    session.client_data(m.SSLRequest().encode() + startup())
    [error] = io.client_got()
    assert error.sqlstate == "08P01" and "unencrypted data after an encryption request" in error.message
    assert io.closed and io.events == []


def test_session_hooks_see_start_and_end():
    recorder = Recorder()
    session, io = ready_session([recorder])
    session.client_data(frontend(m.Terminate()))
    session.server_closed()
    assert recorder.calls == [("start", "app"), ("end", "client terminated the session")]


# ---- cancel ---------------------------------------------------------------------------------

def test_cancel_request_reaches_the_right_backend_with_the_real_key():
    cancels = CancelRegistry()
    first, first_io = new_session(cancels=cancels)
    first.client_data(startup())
    first.upstream_connected()
    first.server_data(backend(m.AuthenticationOk(), m.BackendKeyData(*UPSTREAM_KEY), m.ReadyForQuery(b"I")))
    issued = first_io.client_got()[1]

    canceller, canceller_io = new_session(cancels=cancels)
    canceller.client_data(m.CancelRequest(issued.process_id, issued.secret_key).encode())
    assert canceller_io.events == [("cancel_upstream", "198.18.2.10:5432", *UPSTREAM_KEY)]
    # Open until the database has acted: a client takes our close to mean "done".
    assert not canceller_io.closed and canceller_io.to_client == b""
    canceller.cancel_delivered()
    assert canceller_io.closed and canceller_io.to_client == b""


def test_cancel_with_the_upstream_key_itself_does_nothing():
    cancels = CancelRegistry()
    first, first_io = ready_session(cancels=cancels)
    canceller, canceller_io = new_session(cancels=cancels)
    canceller.client_data(m.CancelRequest(*UPSTREAM_KEY).encode())
    assert canceller_io.closed and canceller_io.events == []


def test_closed_session_key_is_forgotten():
    cancels = CancelRegistry()
    session, io = ready_session(cancels=cancels)
    assert len(cancels) == 1
    session.client_closed()
    assert len(cancels) == 0


# ---- relay, pipelines, errors ---------------------------------------------------------------

def test_simple_query_is_forwarded_byte_for_byte():
    session, io = ready_session()
    query = frontend(m.Query("SELECT 1; SELECT 2"))
    session.client_data(query)
    assert bytes(io.to_server) == query
    reply = backend(m.RowDescription(()), m.DataRow((b"1",)), m.CommandComplete("SELECT 1"),
                    m.RowDescription(()), m.DataRow((b"2",)), m.CommandComplete("SELECT 1"),
                    m.ReadyForQuery(b"I"))
    # Split anywhere: the client still gets exactly the server's bytes.
    for cut in (1, 7, len(reply) - 3):
        io.to_client.clear()
        session.server_data(reply[:cut])
        session.server_data(reply[cut:])
        assert bytes(io.to_client) == reply
        session.client_data(query)


def test_pipeline_error_skips_to_sync_and_state_follows_the_server():
    session, io = ready_session()
    session.client_data(frontend(
        m.Parse("s1", "SELECT 1", ()), m.Bind("", "s1", (), (), ()), m.Execute("", 0),
        m.Parse("s2", "SELECT broken", ()), m.Bind("", "s2", (), (), ()), m.Execute("", 0),
        m.Sync(),
        m.Parse("s3", "SELECT 3", ()), m.Sync()))
    session.server_data(backend(m.ParseComplete(), m.BindComplete(), m.DataRow((b"1",)),
                                m.CommandComplete("SELECT 1")))
    assert [p.kind.name for p in session._pending] == ["PARSE", "BIND", "EXECUTE", "SYNC", "PARSE", "SYNC"]
    session.server_data(backend(m.ErrorResponse.build("ERROR", "42703", "column broken does not exist")))
    assert [p.kind.name for p in session._pending] == ["SYNC", "PARSE", "SYNC"]
    session.server_data(backend(m.ReadyForQuery(b"I"), m.ParseComplete(), m.ReadyForQuery(b"I")))
    assert not session._pending
    assert set(session._statements) == {"s1", "s3"}


class Blocker(Addon):
    def statement(self, session: SessionInfo, statement: Statement):
        if "DROP" in statement.text:
            return Reject("42501", "DROP is not allowed for agents", hint="ask a DBA")
        return None


def test_blocked_query_never_reaches_the_server_and_the_error_keeps_transaction_state():
    session, io = ready_session([Blocker()])
    session.client_data(frontend(m.Query("BEGIN")))
    session.server_data(backend(m.CommandComplete("BEGIN"), m.ReadyForQuery(b"T")))
    io.server_got(), io.client_got()
    session.client_data(frontend(m.Query("DROP TABLE cards")))
    [sent] = io.server_got()
    assert sent.query.encode() == BLOCKED_SQL
    # The server fails our stand-in as it would any failing statement in a transaction.
    session.server_data(backend(m.ErrorResponse.build("ERROR", "42601", 'syntax error at or near "TOLLGATE"'),
                                m.ReadyForQuery(b"E")))
    error, ready = io.client_got()
    assert (error.sqlstate, error.message, error.get("H")) == ("42501", "DROP is not allowed for agents", "ask a DBA")
    assert ready.status == b"E"


def test_blocked_parse_in_a_pipeline_fails_like_a_server_error():
    session, io = ready_session([Blocker()])
    session.client_data(frontend(
        m.Parse("ok", "SELECT 1", ()), m.Parse("bad", "DROP TABLE cards", ()),
        m.Bind("", "bad", (), (), ()), m.Execute("", 0), m.Sync()))
    sent = io.server_got()
    assert [type(x) for x in sent] == [m.Parse, m.Parse, m.Bind, m.Execute, m.Sync]
    assert sent[1].name == "bad" and sent[1].query.encode() == BLOCKED_SQL
    session.server_data(backend(m.ParseComplete(), m.ErrorResponse.build("ERROR", "42601", "syntax error"),
                                m.ReadyForQuery(b"I")))
    got = io.client_got()
    assert [type(x) for x in got] == [m.ParseComplete, m.ErrorResponse, m.ReadyForQuery]
    assert got[1].sqlstate == "42501"
    assert set(session._statements) == {"ok"}


class Holder(Addon):
    def __init__(self) -> None:
        self.held: list[Statement] = []

    def statement(self, session: SessionInfo, statement: Statement):
        if statement.text.startswith("UPDATE"):
            self.held.append(statement)
            return Hold(asyncio.sleep(0), "needs approval")
        return None


def test_hold_pauses_only_this_session_then_runs_in_order_on_approval():
    holder = Holder()
    session, io = ready_session([holder])
    session.client_data(frontend(m.Query("SELECT 1"), m.Query("UPDATE cards SET brand = 'x'"), m.Query("SELECT 2")))
    assert [x.query for x in io.server_got()] == ["SELECT 1"]
    assert io.client_paused and len(io.waits) == 1
    session.client_data(frontend(m.Query("SELECT 3")))  # arrives while held: queued, not sent
    assert io.server_got() == []
    awaitable, done = io.waits[0]
    awaitable.close()
    done(None, None)
    assert [x.query for x in io.server_got()] == ["UPDATE cards SET brand = 'x'", "SELECT 2", "SELECT 3"]
    assert not io.client_paused
    assert len(holder.held) == 1  # decided once, not re-asked on resume


def test_denied_hold_is_rejected_like_a_block():
    session, io = ready_session([Holder()])
    session.client_data(frontend(m.Query("UPDATE cards SET brand = 'x'")))
    awaitable, done = io.waits[0]
    awaitable.close()
    done(Reject("42501", "denied by alice: not during freeze"), None)
    [sent] = io.server_got()
    assert sent.query.encode() == BLOCKED_SQL
    session.server_data(backend(m.ErrorResponse.build("ERROR", "42601", "syntax"), m.ReadyForQuery(b"I")))
    error, _ = io.client_got()
    assert error.message == "denied by alice: not during freeze"


def test_cancel_while_held_withdraws_the_request_with_57014():
    session, io = ready_session([Holder()])
    session.client_data(frontend(m.Query("UPDATE cards SET brand = 'x'")))
    awaitable, _ = io.waits[0]
    awaitable.close()
    assert session.cancel_target() is None  # handled here: nothing to send upstream
    assert ("hold_cancelled",) in io.events
    assert not any(e[0] == "cancel_upstream" for e in io.events)
    [sent] = io.server_got()
    assert sent.query.encode() == BLOCKED_SQL
    session.server_data(backend(m.ErrorResponse.build("ERROR", "42601", "syntax"), m.ReadyForQuery(b"I")))
    error, _ = io.client_got()
    assert error.sqlstate == "57014"


def test_failing_hold_fails_closed():
    session, io = ready_session([Holder()])
    session.client_data(frontend(m.Query("UPDATE cards SET brand = 'x'")))
    awaitable, done = io.waits[0]
    awaitable.close()
    done(None, RuntimeError("approval store unavailable"))
    [sent] = io.server_got()
    assert sent.query.encode() == BLOCKED_SQL


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
    session, io = ready_session([watcher])
    field = m.FieldDescription("pan", 1, 1, 25, -1, -1, 0)
    session.client_data(frontend(m.Parse("q", "SELECT pan FROM cards", ()), m.Describe(b"S", "q"), m.Sync()))
    session.server_data(backend(m.ParseComplete(), m.ParameterDescription(()), m.RowDescription((field,)),
                                m.ReadyForQuery(b"I")))
    io.client_got()
    # Execute without Describe: the proxy still knows the columns and the asked-for formats.
    session.client_data(frontend(m.Bind("", "q", (), (), (1,)), m.Execute("", 0), m.Sync()))
    session.server_data(backend(m.BindComplete(), m.DataRow((b"4111111111111111",)),
                                m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"I")))
    [(result, _)] = watcher.rows
    assert result.row_description.fields[0].name == "pan"
    assert result.result_formats == (1,)
    assert result.statement.text == "SELECT pan FROM cards"
    got = io.client_got()
    assert got[1].values == (b"****111111111111",)
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
    session, io = ready_session([streamer], stream_threshold=4096)
    value = b"7" * 200_000
    reply = backend(m.DataRow((value,)), m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"I"))
    session.client_data(frontend(m.Query("SELECT big")))
    for i in range(0, len(reply), 1000):
        session.server_data(reply[i:i + 1000])
        assert len(session._sbuf) < 1000  # never accumulates the value
    got = io.client_got()
    assert got[0].values == (b"*" * 200_000,)
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

    session, io = ready_session([CopyWatch()])
    session.client_data(frontend(m.Query("COPY t FROM STDIN")))
    session.server_data(backend(m.CopyInResponse(0, (0,))))
    session.client_data(frontend(m.CopyData(b"1\n"), m.CopyData(b"2\n"), m.CopyDone()))
    session.server_data(backend(m.CommandComplete("COPY 2"), m.ReadyForQuery(b"I")))
    session.client_data(frontend(m.Query("COPY t TO STDOUT")))
    session.server_data(backend(m.CopyOutResponse(0, (0,)), m.CopyData(b"1\n"), m.CopyDone(),
                                m.CommandComplete("COPY 1"), m.ReadyForQuery(b"I")))
    assert seen == [(True, b"1\n"), (True, b"2\n"), (False, b"1\n")]
    assert copy_results[-1] == (0, (0,))
    assert [type(x) for x in io.server_got()][-1] == m.Query


def test_notice_and_notification_hooks_may_rewrite():
    class Scrub(Addon):
        def notice(self, session, is_error, message):
            return bytes(message).replace(b"secret", b"******")

        def notification(self, session, message):
            return bytes(message).replace(b"secret", b"******")

    session, io = ready_session([Scrub()])
    session.server_data(backend(m.NoticeResponse((("S", "NOTICE"), ("C", "00000"), ("M", "a secret"))),
                                m.NotificationResponse(7, "chan", "the secret")))
    notice, note = io.client_got()
    assert notice.message == "a ******" and note.payload == "the ******"


# ---- bad input --------------------------------------------------------------------------------

def test_malformed_client_message_ends_the_session_with_a_fatal_that_says_why():
    session, io = ready_session()
    session.client_data(b"Q\x00\x00\x00\x02")
    [error] = io.client_got()
    assert error.severity == "FATAL" and error.sqlstate == "08P01"
    assert "length 2" in error.message
    assert io.closed


def test_unknown_client_message_type_is_refused():
    session, io = ready_session()
    session.client_data(b"\x7f\x00\x00\x00\x04")
    [error] = io.client_got()
    assert "unexpected frontend message type" in error.message and io.closed


def test_malformed_server_message_ends_the_session():
    session, io = ready_session()
    session.server_data(b"Z\x00\x00\x00\x05Q")
    [error] = io.client_got()
    assert error.severity == "FATAL" and "database server" in error.message


def test_server_fatal_reaches_the_client_then_the_session_closes():
    session, io = ready_session()
    fatal = backend(m.ErrorResponse.build("FATAL", "57P01", "terminating connection due to administrator command"))
    session.server_data(fatal)
    assert bytes(io.to_client) == fatal
    session.server_closed()
    assert io.closed and session.close_reason.startswith("the database ended the session")


def test_oversized_startup_packet_is_refused():
    session, io = new_session()
    session.client_data(b"\x00\x01\x00\x00" + b"\x00" * 16)
    [error] = io.client_got()
    assert error.sqlstate == "08P01" and "startup packet length" in error.message


@pytest.mark.parametrize("kind", [StatementKind.QUERY, StatementKind.PARSE])
def test_statement_hook_that_raises_fails_closed(kind):
    class Broken(Addon):
        def statement(self, session, statement):
            raise RuntimeError("policy store gone")

    session, io = ready_session([Broken()])
    message = m.Query("SELECT 1") if kind is StatementKind.QUERY else m.Parse("", "SELECT 1", ())
    session.client_data(frontend(message))
    [sent] = io.server_got()
    assert sent.query.encode() == BLOCKED_SQL


def test_portal_bound_after_a_sync_survives_that_syncs_ready_for_query():
    session, io = ready_session([RowWatcher()])
    session.client_data(frontend(
        m.Parse("q", "SELECT 1", ()), m.Bind("", "q", (), (), ()), m.Execute("", 0), m.Sync(),
        m.Bind("p2", "q", (), (), (1,)), m.Execute("p2", 1), m.Sync()))
    session.server_data(backend(m.ParseComplete(), m.BindComplete(), m.DataRow((b"1",)),
                                m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"I")))
    assert "p2" in session._portals
    session.server_data(backend(m.BindComplete(), m.DataRow((b"1",)), m.PortalSuspended(),
                                m.ReadyForQuery(b"I")))
    assert session._portals == {}
    assert not session._pending


def test_close_statement_then_reparse_in_one_pipeline_keeps_the_new_statement():
    session, io = ready_session()
    session.client_data(frontend(m.Parse("s", "SELECT 1", ()), m.Sync()))
    session.server_data(backend(m.ParseComplete(), m.ReadyForQuery(b"I")))
    session.client_data(frontend(m.Close(b"S", "s"), m.Parse("s", "SELECT 2", ()), m.Sync()))
    session.server_data(backend(m.CloseComplete(), m.ParseComplete(), m.ReadyForQuery(b"I")))
    assert session._statements["s"].text == "SELECT 2"


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


def test_ssl_request_is_answered_with_tls_when_the_authenticator_offers_it():
    auth = CertificateOnly()
    session, io = new_session(authenticator=auth)
    session.client_data(m.SSLRequest().encode())
    assert io.client_got() == [b"S"]
    assert io.events == [("start_client_tls", "server-context-for-payments")]
    session.client_tls_ready("TLSv1.3", b"alice")
    session.client_data(startup())
    assert io.events[-1] == ("open_upstream", "payments", "198.18.2.10:5432")
    assert session.info.identity == "alice" and session.info.client_tls == "TLSv1.3"


def test_missing_certificate_is_refused_with_28000_and_how_to_enroll():
    session, io = new_session(authenticator=CertificateOnly())
    session.client_data(m.SSLRequest().encode())
    io.client_got()
    session.client_tls_ready("TLSv1.3", None)
    session.client_data(startup())
    [error] = io.client_got()
    assert (error.severity, error.sqlstate, error.message, error.get("H")) == \
        ("FATAL", "28000", "a client certificate is required", "run tollgate enroll")
    assert not any(e[0] == "open_upstream" for e in io.events)


def test_failed_client_handshake_is_remembered_and_closes():
    auth = CertificateOnly()
    session, io = new_session(authenticator=auth)
    session.client_data(m.SSLRequest().encode())
    session.client_tls_failed("certificate verify failed: unable to get local issuer certificate")
    assert io.closed and auth.failures == ["certificate verify failed: unable to get local issuer certificate"]


def test_database_hanging_up_on_a_ready_session_is_reported():
    session, io = ready_session()
    session.server_closed()
    [error] = io.client_got()
    assert (error.severity, error.sqlstate) == ("FATAL", "08006") and "closed the connection" in error.message


def test_a_sync_claiming_a_megabyte_is_refused_from_its_header():
    session, io = ready_session()
    session.client_data(b"S\x00\x10\x00\x00")
    [error] = io.client_got()
    assert "message type 'S' has length 1048576, outside 4..4" in error.message


def test_a_large_message_in_many_reads_is_framed_once():
    session, io = ready_session()
    query = frontend(m.Query("SELECT '" + "x" * 300_000 + "'"))
    calls = []
    original = session._relay_client
    session._relay_client = lambda data, pos: calls.append(len(data)) or original(data, pos)
    for i in range(0, len(query), 4096):
        session.client_data(query[i:i + 4096])
    assert bytes(io.to_server) == query
    assert len(calls) == 2  # the first piece (head seen), then the completed message


def test_bind_with_65535_parameters_is_valid():
    session, io = ready_session()
    session.client_data(frontend(m.Parse("s", "INSERT", ()), m.Bind("", "s", (), (None,) * 65535, ()), m.Sync()))
    assert [type(x) for x in io.server_got()] == [m.Parse, m.Bind, m.Sync]


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
    session, io = ready_session([addon], stream_threshold=4096)
    value = (b"x7" + b"7" * 999) * 20  # runs of 1000 sevens: '77' pairs split across reads
    reply = backend(m.DataRow((value,)), m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"I"))
    session.client_data(frontend(m.Query("SELECT big")))
    for i in range(0, len(reply), 333):
        session.server_data(reply[i:i + 333])
    got = io.client_got()
    assert got[0].values == (value.replace(b"77", b"**"),)
    assert addon.offsets == sorted(addon.offsets) and addon.offsets[0] == 0


def test_a_hook_that_keeps_bytes_back_at_the_end_of_a_message_fails_closed():
    class Greedy(Addon):
        def stream_chunk(self, session, result, tag, window, offset, total):
            return StreamEdit(None, 1)

    session, io = ready_session([Greedy()], stream_threshold=4096)
    session.client_data(frontend(m.Query("SELECT big")))
    row = backend(m.DataRow((b"a" * 10_000,)))
    session.server_data(row[:5000])
    session.server_data(row[5000:])
    assert io.closed and b"SFATAL" not in io.to_client  # cut: a FATAL inside the row would garble it


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
    session, io = ready_session([addon])
    session.client_data(frontend(m.Parse("upd", "UPDATE cards SET brand = $1", ()), m.Sync()))
    session.server_data(backend(m.ParseComplete(), m.ReadyForQuery(b"I")))
    session.client_data(frontend(m.Bind("", "upd", (), (b"visa",), ()), m.Execute("", 0), m.Sync()))
    assert [type(x) for x in io.server_got()] == [m.Parse, m.Sync, m.Bind]  # Execute held
    assert io.client_paused and len(addon.binds) == 1 and b"visa" in addon.binds[0]
    awaitable, done = io.waits[0]
    awaitable.close()
    done(None, None)
    assert [type(x) for x in io.server_got()] == [m.Execute, m.Sync]
    assert len(addon.binds) == 1  # decided once, not re-asked on resume


def test_a_held_execute_that_is_denied_fails_like_a_server_error_at_execute():
    addon = Deferring()
    session, io = ready_session([addon])
    session.client_data(frontend(m.Parse("", "UPDATE cards SET brand = $1", ()),
                                 m.Bind("", "", (), (b"visa",), ()), m.Execute("", 0), m.Sync()))
    awaitable, done = io.waits[0]
    awaitable.close()
    done(Reject("42501", "approval apr-1 was denied"), None)
    *_, execute, sync = io.server_got()
    assert execute.portal == BLOCKED_PORTAL and type(sync) is m.Sync
    session.server_data(backend(m.ParseComplete(), m.BindComplete(),
                                m.ErrorResponse.build("ERROR", "34000", "portal does not exist"),
                                m.ReadyForQuery(b"I")))
    *_, error, ready = io.client_got()
    assert error.message == "approval apr-1 was denied" and error.sqlstate == "42501"


def test_a_statement_prepared_before_a_policy_change_is_decided_again_at_execute():
    addon = Deferring()
    hooks_session, io = ready_session([addon])
    hooks_session.client_data(frontend(m.Parse("s", "SELECT 1", ()), m.Sync()))
    hooks_session.server_data(backend(m.ParseComplete(), m.ReadyForQuery(b"I")))
    addon.block_everything = True
    hooks_session.hooks.epoch += 1  # what a policy reload does
    for _ in range(2):  # and it stays decided
        hooks_session.client_data(frontend(m.Bind("", "s", (), (), ()), m.Execute("", 0), m.Sync()))
        *_, execute, _sync = io.server_got()
        assert execute.portal == BLOCKED_PORTAL
        hooks_session.server_data(backend(m.BindComplete(), m.ErrorResponse.build("ERROR", "34000", "no portal"),
                                          m.ReadyForQuery(b"I")))
        error, _ = io.client_got()[-2:]
        assert error.message == "policy changed: no longer allowed"


def test_a_client_may_not_bind_the_reserved_blocked_portal_name():
    session, io = ready_session([])
    session.client_data(frontend(m.Bind(BLOCKED_PORTAL, "", (), (), ()), m.Sync()))
    assert io.closed


def test_data_a_hook_cannot_make_safe_ends_the_session_with_a_fatal():
    class Unsafe(Addon):
        def data_row(self, session, result, message):
            raise FailClosed("42501", "column pan (int8) holds a card number", hint="cast it to text")

    session, io = ready_session([Unsafe()])
    session.client_data(frontend(m.Query("SELECT pan FROM cards")))
    session.server_data(backend(m.RowDescription(()), m.DataRow((b"1",))))
    [fatal] = io.client_got()
    assert fatal.severity == "FATAL" and "card number" in fatal.message and io.closed


def test_function_call_results_pass_the_function_result_hook():
    class Scrub(Addon):
        def function_result(self, session, message):
            return bytes(message).replace(b"secret", b"******")

    session, io = ready_session([Scrub()])
    session.client_data(frontend(m.FunctionCall(1234, (), (), 0)))
    session.server_data(backend(m.FunctionCallResponse(b"secret"), m.ReadyForQuery(b"I")))
    assert io.client_got()[0].value == b"******"


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
    session, io = ready_session([addon])
    session.client_data(frontend(m.Query("SELECT cvv FROM cards")))
    awaitable, done = io.waits[0]
    awaitable.close()
    done(None, None)
    session.server_data(backend(m.RowDescription(()), m.CommandComplete("SELECT 0"), m.ReadyForQuery(b"I")))
    assert addon.results[0].statement.decision == "mask the cvv"
