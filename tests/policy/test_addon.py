"""The enforcement addon driven through a real Session (no sockets): policy → verdicts.

Uses a real policy file and PolicyHolder; holds go to a small recorder that stands in for
the approvals broker only where the test is about what the addon asks for (the broker
itself is tested with a real store in tests/holds).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from appliance.model.decision import Action
from appliance.model.identity import Identity
from appliance.pgwire import messages as m
from appliance.pgwire.encodings import client_encoding
from appliance.policy.addon import EnforcementAddon
from appliance.policy.holder import PolicyHolder
from appliance.policy.shape import grant_keys
from appliance.proxy.pipeline import BLOCKED_PORTAL, BLOCKED_SQL
from tests.proxy.trace import backend, frontend, ready_session

POLICY = """
default = "deny"

[[rule]]
name = "no-ddl"
classes = ["ddl", "truncate"]
action = "block"
message = "no DDL here"

[[rule]]
name = "writes-need-approval"
classes = ["write"]
action = "hold"
approvers = ["dba"]

[[rule]]
name = "reads"
groups = ["agents"]
classes = ["read", "prepared", "transaction"]
action = "allow"
"""


class Approvals:
    """Records what the addon asks approvals for; each hold's outcome is set by the test."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.granted: set[tuple[str, str, str]] = set()

    def grant_allows(self, subject: str, target: str, fp: str) -> bool:
        return (subject, target, fp) in self.granted

    def hold(self, request: dict[str, Any], decision: Any) -> Any:
        self.requests.append({**request, "decision": decision})

        async def undecided() -> None:
            return None
        return SimpleNamespace(id=f"apr-test{len(self.requests)}", timeout_seconds=300), undecided()


@pytest.fixture
def setup(tmp_path: Path):
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    holder = PolicyHolder(path)
    approvals = Approvals()
    addon = EnforcementAddon(holder, approvals, scrub=lambda text: text.replace("4111111111111111", "411111******1111"))
    session, io = ready_session([addon])
    session.info.identity = Identity("agent-1", "agent", ("agents",))
    return holder, approvals, session, io, path


def close_waits(io) -> None:
    for awaitable, _ in io.waits:
        if asyncio.iscoroutine(awaitable):
            awaitable.close()


def test_a_blocked_statement_never_reaches_the_server_and_names_the_rule(setup):
    _, _, session, io, _ = setup
    session.client_data(frontend(m.Query("TRUNCATE cards")))
    [sent] = io.server_got()
    assert sent.query.encode() == BLOCKED_SQL
    session.server_data(backend(m.ErrorResponse.build("ERROR", "42601", "syntax"), m.ReadyForQuery(b"I")))
    error, _ = io.client_got()
    assert (error.sqlstate, error.message) == ("42501", "no DDL here")
    assert "no-ddl" in error.get("D")


def test_unmatched_is_denied_and_allowed_reads_carry_their_decision(setup):
    _, _, session, io, _ = setup
    session.client_data(frontend(m.Query("CREATE ROLE x")))  # no allow rule: default deny
    assert io.server_got()[0].query.encode() == BLOCKED_SQL
    session.server_data(backend(m.ErrorResponse.build("ERROR", "42601", "x"), m.ReadyForQuery(b"I")))
    io.client_got()
    session.client_data(frontend(m.Query("SELECT 1")))
    assert io.server_got()[0].query == "SELECT 1"


def test_a_simple_query_write_is_held_with_who_and_what(setup):
    _, approvals, session, io, _ = setup
    session.client_data(frontend(m.Query("UPDATE cards SET pan = '4111111111111111'")))
    assert io.server_got() == [] and io.client_paused
    [request] = approvals.requests
    assert request["requester_subject"] == "agent-1" and request["requester_groups"] == ["agents"]
    assert request["sql"] == "UPDATE cards SET pan = '411111******1111'"  # scrubbed before it is stored
    assert request["decision"].action is Action.HOLD and request["decision"].rule == "writes-need-approval"
    close_waits(io)


def test_a_parsed_write_is_prepared_at_once_and_held_at_execute_with_its_parameters(setup):
    _, approvals, session, io, _ = setup
    session.client_data(frontend(m.Parse("", "UPDATE cards SET brand = $1 WHERE id = $2", (25, 23)),
                                 m.Bind("", "", (1,), (b"visa", (7).to_bytes(4, "big")), ()),
                                 m.Execute("", 0), m.Sync()))
    assert [type(x) for x in io.server_got()] == [m.Parse, m.Bind]
    [request] = approvals.requests
    assert request["params"] == ["visa", "7"]  # binary int4 shown as its value
    close_waits(io)


def test_sql_prepare_defers_the_hold_to_execute(setup):
    _, approvals, session, io, _ = setup
    session.client_data(frontend(m.Query("PREPARE upd AS UPDATE cards SET brand = $1")))
    assert io.server_got()[0].query.startswith("PREPARE")  # preparing runs nothing
    session.server_data(backend(m.CommandComplete("PREPARE"), m.ReadyForQuery(b"I")))
    assert approvals.requests == []
    session.client_data(frontend(m.Query("EXECUTE upd('amex')")))
    assert io.server_got() == []
    [request] = approvals.requests
    assert request["decision"].rule == "writes-need-approval"
    close_waits(io)


def test_an_exact_grant_lets_only_the_approved_statement_through(setup):
    _, approvals, session, io, _ = setup
    approvals.granted.add(("agent-1", "payments", grant_keys("UPDATE cards SET brand = 'x' WHERE id = 1").exact))
    session.client_data(frontend(m.Query("update cards  set brand = 'x' /* again */ where id = 1")))
    assert io.server_got()[0].query == "update cards  set brand = 'x' /* again */ where id = 1"
    session.server_data(backend(m.CommandComplete("UPDATE 1"), m.ReadyForQuery(b"I")))
    io.client_got()
    assert approvals.requests == []
    session.client_data(frontend(m.Query("UPDATE cards SET brand = 'x' WHERE id = 2")))  # another constant
    assert io.server_got() == []
    [request] = approvals.requests
    assert request["free"] == ["'x'", "2"] and request["shape"] == grant_keys("UPDATE cards SET brand = 'y' "
                                                                               "WHERE id = 1").shape
    close_waits(io)


def test_a_shape_grant_lets_other_constants_through(setup):
    _, approvals, session, io, _ = setup
    approvals.granted.add(("agent-1", "payments", grant_keys("UPDATE cards SET brand = 'x' WHERE id = 1").shape))
    session.client_data(frontend(m.Query("UPDATE cards SET brand = 'y' WHERE id = 2")))
    assert io.server_got()[0].query == "UPDATE cards SET brand = 'y' WHERE id = 2"
    assert approvals.requests == []


def test_a_reload_reaches_statements_prepared_before_it(setup):
    holder, _, session, io, path = setup
    session.client_data(frontend(m.Parse("s", "SELECT brand FROM cards", ()), m.Sync()))
    session.server_data(backend(m.ParseComplete(), m.ReadyForQuery(b"I")))
    io.server_got()
    path.write_text(POLICY.replace('classes = ["read", "prepared", "transaction"]', 'classes = ["transaction"]'))
    assert holder.reload()
    session.hooks.epoch += 1  # what tollgate run's reload callback does
    session.client_data(frontend(m.Bind("", "s", (), (), ()), m.Execute("", 0), m.Sync()))
    *_, execute, _ = io.server_got()
    assert execute.portal == BLOCKED_PORTAL


def test_without_approvals_configured_a_hold_is_refused_clearly(tmp_path: Path):
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    session, io = ready_session([EnforcementAddon(PolicyHolder(path), None)])
    session.client_data(frontend(m.Query("UPDATE cards SET brand = 'x'")))
    assert io.server_got()[0].query.encode() == BLOCKED_SQL
    session.server_data(backend(m.ErrorResponse.build("ERROR", "42601", "x"), m.ReadyForQuery(b"I")))
    error, _ = io.client_got()
    assert "approvals are not configured" in error.message


def test_in_an_sjis_session_approvers_read_the_statement_the_server_runs(setup):
    # The SJIS trail byte 0x5C is part of ソ, not a backslash; the request shows the text
    # converted from the session's encoding, not its bytes read as UTF-8.
    _, approvals, session, io, _ = setup
    session.info.client_encoding = client_encoding("SJIS")
    session.info.parameters["client_encoding"] = "SJIS"
    text = "UPDATE cards SET brand = E'ソ' WHERE pan = '4111111111111111'"
    session.client_data(frontend(m.Query(text.encode("cp932").decode("utf-8", "surrogateescape"))))
    assert io.server_got() == [] and io.client_paused
    [request] = approvals.requests
    assert request["sql"] == "UPDATE cards SET brand = E'ソ' WHERE pan = '411111******1111'"
    close_waits(io)
