"""Bounded resources, at the session layer (playbooks): the startup deadline's event and
the caps on what a client may make the proxy buffer.

The shell (tests/proxy/test_server_limits.py) owns the timer and the sockets; here the
deadline is an input, ``StartupTimedOut``, and what the session does about it, in each
phase before it is ready, is the trace.
"""

from __future__ import annotations

import struct

from appliance.pgwire import DEFAULT_MAX_MESSAGE_SIZE
from appliance.pgwire import messages as m
from appliance.proxy.budget import ALWAYS_GRANTED, BufferBudget
from appliance.proxy.session import CancelRegistry
from tests.proxy.playbook import (
    UPSTREAM_KEY,
    CancelDelivered,
    CancelUpstream,
    Capture,
    ClientClosed,
    ClientData,
    ClientGets,
    Close,
    Fatal,
    Like,
    OpenUpstream,
    ServerData,
    ServerGets,
    StartupTimedOut,
    UpstreamConnected,
    login,
    playbook,
    ready_playbook,
    roundtrip,
    startup,
)

u32 = struct.Struct("!I")
CAP = 1 << 20  # max_client_message in these sessions
ONE_ROW = (m.RowDescription((m.FieldDescription("?column?", 0, 0, 23, 4, -1, 0),)), m.DataRow((b"1",)),
           m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"I"))


def header(tag: bytes, length: int) -> bytes:
    return tag + u32.pack(length)


# ---- the startup deadline ------------------------------------------------------------------------

def test_deadline_closes_a_connection_that_never_spoke_without_a_word():
    pb = playbook(startup_timeout=0.5)
    assert (pb
            >> StartupTimedOut()
            << Close())


def test_deadline_mid_startup_packet_ends_with_a_fatal():
    pb = playbook(startup_timeout=0.5)
    assert (pb
            >> ClientData(startup().encode()[:11])
            >> StartupTimedOut()
            << ClientGets(Fatal("08P01", "did not complete its startup within 0.5 s"))
            << Close())


def test_deadline_after_a_declined_ssl_request_ends_with_a_fatal():
    pb = playbook(startup_timeout=3)
    assert (pb
            >> ClientData(m.SSLRequest())
            << ClientGets(m.SSLResponse(False))
            >> StartupTimedOut()
            << ClientGets(Fatal("08P01", "within 3 s"))
            << Close())


def test_a_repeated_encryption_request_is_refused_as_postgresql_does():
    """One GSSENCRequest and one SSLRequest are answered; a client that repeats them (one
    per read, to get an answer each until its deadline) is ended at the second."""
    for kind, declined in ((m.SSLRequest, m.SSLResponse(False)), (m.GSSENCRequest, m.GSSENCResponse(False))):
        assert (playbook()
                >> ClientData(kind())
                << ClientGets(declined)
                >> ClientData(kind())
                << ClientGets(Fatal("08P01", f"duplicate {kind.__name__}"))
                << Close())


def test_deadline_while_connecting_upstream_blames_the_database():
    pb = playbook(startup_timeout=0.5)
    assert (pb
            >> ClientData(startup())
            << OpenUpstream("payments", "198.18.2.10:5432")
            >> StartupTimedOut()
            << ClientGets(Fatal("08006", "could not log in to database 'payments' at 198.18.2.10:5432 "
                                         "within 0.5 s (still connecting)"))
            << Close())


def test_deadline_during_the_upstream_login_ends_it_and_nothing_more_is_relayed():
    pb = playbook(startup_timeout=0.5)
    assert (pb
            >> ClientData(startup())
            << OpenUpstream("payments", "198.18.2.10:5432")
            >> UpstreamConnected()
            << ServerGets(m.StartupMessage(196608, {"user": "app_rw", "database": "payments"}))
            >> StartupTimedOut()
            << ClientGets(Fatal("08006", "(still authenticating)"))
            << Close()
            >> ServerData(m.AuthenticationOk(), m.BackendKeyData(*UPSTREAM_KEY), m.ReadyForQuery(b"I")))


def test_deadline_is_cancelled_once_ready_and_later_has_no_effect():
    pb = playbook(startup_timeout=0.5)
    cancelled: list[bool] = []
    pb.session.cancel_deadline = lambda: cancelled.append(True)
    assert login(pb)
    assert cancelled == [True], "the shell's timer was not cancelled when the session became ready"
    assert (roundtrip(pb, [m.Query("SELECT 1")], ONE_ROW)
            >> StartupTimedOut()  # a timer that fired anyway, late: ignored
            )
    assert roundtrip(pb, [m.Query("SELECT 1")], ONE_ROW)


def test_deadline_is_cancelled_when_the_session_ends_before_ready():
    pb = playbook(startup_timeout=0.5)
    cancelled: list[bool] = []
    pb.session.cancel_deadline = lambda: cancelled.append(True)
    assert (pb
            >> ClientData(startup(user="postgres"))
            << ClientGets(Fatal("28000"))
            << Close())
    assert cancelled == [True]


def test_deadline_leaves_a_cancel_request_on_its_way_alone():
    """A cancel connection stays open until the database has acted (its delivery has
    timeouts of its own); the deadline neither closes it nor sends it anything."""
    cancels = CancelRegistry()
    issued = Capture(m.BackendKeyData)
    assert login(playbook(cancels=cancels), issued)
    canceller = playbook(cancels=cancels, startup_timeout=0.5)
    cancelled: list[bool] = []
    canceller.session.cancel_deadline = lambda: cancelled.append(True)
    assert (canceller
            >> ClientData(m.CancelRequest(issued.value.process_id, issued.value.secret_key))
            << CancelUpstream("198.18.2.10:5432", *UPSTREAM_KEY)
            >> StartupTimedOut()  # a timer that fired anyway: ignored
            >> CancelDelivered()
            << Close())
    assert cancelled == [True]


def test_cancels_pipelined_behind_a_cancel_open_one_upstream_connection_then_end_it():
    """A cancel connection carries one CancelRequest. More behind it (an agent hoping for one
    connection to the database per read, with the deadline no longer running) are a protocol
    violation: one cancel goes upstream, the next read ends the connection."""
    cancels = CancelRegistry()
    issued = Capture(m.BackendKeyData)
    assert login(playbook(cancels=cancels), issued)
    request = bytes(m.CancelRequest(issued.value.process_id, issued.value.secret_key).encode())
    assert (playbook(cancels=cancels)
            >> ClientData(request * 3)
            << CancelUpstream("198.18.2.10:5432", *UPSTREAM_KEY)
            >> ClientData(request * 1000)
            << ClientGets(Fatal("08P01", "16032 unexpected bytes after a CancelRequest"))
            << Close())


# ---- requests in flight: max_pending_requests ---------------------------------------------------

def test_requests_pipelined_without_sync_past_the_cap_end_the_session():
    """After an error the server skips to Sync without answering: a client that never
    sends one would make the proxy remember every request it pipelines."""
    pb = ready_playbook(max_pending_requests=64)
    group = m.Bind("", "", (), (), ()).encode() + m.Execute("", 0).encode()
    parse = m.Parse("", "SELECT 1", ()).encode()
    assert (pb
            >> ClientData(parse + group * 40)
            << ClientGets(Fatal("54000", "the client has 64 requests in flight that the server has not answered",
                                hint="Send Sync (or wait for results) more often; Tollgate's "
                                     "max_pending_requests sets the limit."))
            << Close())


def test_requests_answered_in_time_never_reach_the_cap():
    pb = ready_playbook(max_pending_requests=64)
    batch = m.Parse("", "SELECT 1", ()).encode() + m.Bind("", "", (), (), ()).encode() \
        + m.Execute("", 0).encode() + m.Sync().encode()
    for _ in range(40):  # 160 requests in all, four at a time
        assert (pb
                >> ClientData(batch)
                << ServerGets(m.Parse("", "SELECT 1", ()), m.Bind("", "", (), (), ()), m.Execute("", 0), m.Sync())
                >> ServerData(m.ParseComplete(), m.BindComplete(), *ONE_ROW[1:])
                << ClientGets(m.ParseComplete(), m.BindComplete(), *ONE_ROW[1:]))


# ---- one message: max_client_message -----------------------------------------------------------

def test_header_above_the_cap_is_refused_on_the_header_alone():
    pb = ready_playbook(max_client_message=CAP)
    assert (pb
            >> ClientData(header(b"Q", CAP + 5) + b"SELECT")
            << ClientGets(Fatal("54000", f"client message of {CAP + 5} bytes exceeds Tollgate's limit of {CAP}"))
            << Close())


def test_header_above_postgres_limit_is_still_a_protocol_violation():
    pb = ready_playbook(max_client_message=CAP)
    assert (pb
            >> ClientData(header(b"Q", DEFAULT_MAX_MESSAGE_SIZE + 1))
            << ClientGets(Fatal("08P01", "invalid frontend message"))
            << Close())


def test_copy_data_is_buffered_whole_only_up_to_the_cap():
    pb = ready_playbook(max_client_message=CAP)
    below = m.CopyData(b"x" * (CAP - 4)).encode()  # length field exactly CAP
    assert (pb
            >> ClientData(below[:CAP // 2])
            >> ClientData(below[CAP // 2:])
            << ServerGets(m.CopyData(b"x" * (CAP - 4)))
            >> ClientData(header(b"d", CAP + 1))
            << ClientGets(Fatal("54000", "exceeds Tollgate's limit"))
            << Close())


def test_bytes_queued_behind_a_message_being_judged_are_capped_too():
    """A pipelined flood behind the login is bounded by the same per-connection cap."""
    pb = playbook(max_client_message=CAP)
    queries = m.Query("SELECT 1").encode() * (CAP // 10)
    assert (pb
            >> ClientData(startup())
            << OpenUpstream("payments", "198.18.2.10:5432")
            >> ClientData(queries)
            << ClientGets(Fatal("54000", f"more than {CAP} bytes"))
            << Close())


# ---- all sessions: max_buffered_total -------------------------------------------------------------

def test_budget_refuses_a_header_once_spent_and_is_returned_by_completion_and_close():
    budget = BufferBudget(3 * CAP)
    big = ready_playbook(max_client_message=2 * CAP, budget=budget)
    other = ready_playbook(max_client_message=2 * CAP, budget=budget)
    small = ready_playbook(max_client_message=2 * CAP, budget=budget)
    announced = 2 * CAP
    assert big >> ClientData(header(b"Q", announced) + b"SELECT '")  # reserved from the header
    assert budget.used == announced + 1
    assert (other
            >> ClientData(header(b"Q", announced))
            << ClientGets(Fatal("53200", "out of memory"))
            << Close())
    assert budget.used == announced + 1, "a refused session kept part of the budget"
    # A small statement arriving in pieces still goes through while the budget is spent.
    query = m.Query("SELECT 1").encode()
    assert (small
            >> ClientData(query[:3])
            >> ClientData(query[3:])
            << ServerGets(m.Query("SELECT 1")))
    assert budget.used == announced + 1
    # Completing the big message returns its share.
    body = b"x" * (announced - 4 - len("SELECT '") - 2) + b"'\x00"
    assert (big
            >> ClientData(body)
            << ServerGets(Like(m.Query)))
    assert budget.used == 0
    # And a session closing mid-message returns its share.
    assert (small
            >> ClientData(header(b"Q", announced))
            >> ClientClosed()
            << Close())
    assert budget.used == 0


def test_small_pieces_are_granted_even_when_the_budget_is_spent():
    budget = BufferBudget(0)
    assert budget.take(ALWAYS_GRANTED, ALWAYS_GRANTED)
    assert not budget.take(1, ALWAYS_GRANTED + 1)
    budget.give(ALWAYS_GRANTED)
    assert budget.used == 0
