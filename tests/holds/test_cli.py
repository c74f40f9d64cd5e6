"""``tollgate approvals`` end to end: the real CLI against a real ``tollgate enroll-server``
(gunicorn, TLS, the approvals blueprint), tokens from a real dev issuer, requests opened as the
proxy opens them in the same approvals database.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from appliance.holds.cli import duration
from appliance.holds.service import ApprovalService
from appliance.holds.store import ApprovalStore
from appliance.lab.oidc_issuer import DevIssuer
from appliance.model.identity import Identity
from tests.holds import (
    APPROVER_CLIENTS,
    CARD_UPDATE,
    PAYMENT_DELETE,
    approvals_issuer,
    client_token,
    open_request,
)
from tests.identity.enroll_server import EnrollServer, tollgate
from tests.identity.tls_helpers import TlsFiles
from tests.webui import Appliance


# The shared enrollment fixtures (tests/conftest.py: tls, appliance, server), with an issuer
# that also knows the approvers.
@pytest.fixture(scope="module")
def issuer(tls: TlsFiles) -> Iterator[DevIssuer]:
    issuer = approvals_issuer(tls)
    yield issuer
    issuer.stop()


@pytest.fixture(scope="module")
def token_files(tmp_path_factory: pytest.TempPathFactory, issuer: DevIssuer, tls: TlsFiles) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("tokens")
    files = {}
    for name in APPROVER_CLIENTS:
        files[name] = directory / name
        files[name].write_text(client_token(issuer, tls, name) + "\n")
    return files


@pytest.fixture(scope="module")
def proxy(appliance: Appliance) -> Iterator[ApprovalService]:
    """The proxy's side: it opens the requests the CLI decides."""
    service = ApprovalService(ApprovalStore(appliance.state_dir / "approvals.db"))
    yield service
    service.close()


def approvals(server: EnrollServer, appliance: Appliance, token: Path | None, *args: str,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:  # noqa: F821
    verb, rest = args[0], args[1:]
    connection = ["--url", server.url, "--ca-file", str(appliance.state_dir / "ca" / "ca.crt")]
    if token is not None:
        connection += ["--token-file", str(token)]
    environment = {k: v for k, v in os.environ.items() if k != "TOLLGATE_TOKEN"}
    return tollgate("approvals", verb, *connection, *rest, env={**environment, **(env or {})})


def test_list_shows_what_an_approver_needs(server: EnrollServer, appliance: Appliance, proxy: ApprovalService,
                                           token_files: dict[str, Path]) -> None:
    opened = open_request(proxy)
    done = approvals(server, appliance, token_files["dba-1"], "list")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["ID", "AGE", "STATUS", "REQUESTER", "TARGET/DB", "RULE", "VOTES", "EXPIRES"]
    row = next(i for i, line in enumerate(lines) if line.startswith(opened.id))
    assert re.match(rf"{opened.id}  \d+s +pending  agent agent-ci +payments/payments  card-changes-need-a-dba  0/1 "
                    r"+in (9m\d\ds|10m00s)$", lines[row]), lines[row]
    assert lines[row + 1] == f"    {CARD_UPDATE}"


def test_show_in_full(server: EnrollServer, appliance: Appliance, proxy: ApprovalService,
                      token_files: dict[str, Path]) -> None:
    opened = open_request(proxy, PAYMENT_DELETE, params=None)
    proxy.decide(opened.id, Identity("sec-1", "agent", ("security",)), True, "security reviewed\nticket SEC-9")
    done = approvals(server, appliance, token_files["dba-1"], "show", opened.id.lower())
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert re.match(rf"{opened.id}  PENDING — expires in 4m\d\ds \(\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC\)\n", out)
    assert "  requester  agent agent-ci  [payments-agents]\n" in out
    assert "             from 10.0.0.2:50123, as role app, session 17\n" in out
    assert "  target     payments, database payments\n" in out
    assert ("  rule       two-person-rule (line 12): this statement needs approval under policy rule "
            "'two-person-rule' (<policy>:12)\n") in out
    assert "  approvers  payments-dbas, security: 1 of 2 approval(s)\n" in out
    assert "  classes    write\n  relations  public.payments\n" in out
    assert f"  statement\n    {PAYMENT_DELETE}\n" in out
    assert "  params" not in out  # a simple Query has none
    assert re.search(r"  votes\n    approve sec-1 at [\d-]+ [\d:]+ UTC\n            security reviewed\n"
                     r"            ticket SEC-9\n", out), out


def test_show_lists_parameters(server: EnrollServer, appliance: Appliance, proxy: ApprovalService,
                               token_files: dict[str, Path]) -> None:
    opened = open_request(proxy)
    out = approvals(server, appliance, token_files["dba-1"], "show", opened.id).stdout
    assert "  params\n    $1 = blocked\n    $2 = 42\n" in out
    assert "  votes      none yet" in out


def test_approve_with_a_grant(server: EnrollServer, appliance: Appliance, proxy: ApprovalService,
                              token_files: dict[str, Path]) -> None:
    opened = open_request(proxy)
    done = approvals(server, appliance, token_files["dba-1"], "approve", opened.id, "--reason", "CHG-42 nightly fix",
                     "--for-minutes", "30")
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(rf"{opened.id} is approved; agent-ci may run exactly this statement \(same constants and "
                        r"parameters\) on payments until [\d-]+ [\d:]+ UTC\n", done.stdout)
    stored = proxy.get(opened.id)
    assert stored.status == "approved" and stored.votes[0].reason == "CHG-42 nightly fix"
    assert stored.grant.expires_at - stored.decided_at == timedelta(minutes=30)
    assert stored.grant.scope == "exact"


def test_approve_with_a_shape_grant_shows_what_may_vary(server: EnrollServer, appliance: Appliance,
                                                        proxy: ApprovalService, token_files: dict[str, Path]) -> None:
    opened = open_request(proxy, fingerprint="exact:1", shape="shape:1", free=("'blocked'", "42"))
    shown = approvals(server, appliance, token_files["dba-1"], "show", opened.id)
    assert "  may vary   only with a shape grant (--any-constants): 'blocked', 42\n" in shown.stdout
    alone = approvals(server, appliance, token_files["dba-1"], "approve", opened.id, "--reason", "r",
                      "--any-constants")
    assert alone.returncode != 0 and "give --for-minutes too" in alone.stderr
    done = approvals(server, appliance, token_files["dba-1"], "approve", opened.id, "--reason", "any card today",
                     "--for-minutes", "30", "--any-constants")
    assert done.returncode == 0, done.stderr
    assert "agent-ci may run this statement shape (any constants) on payments until" in done.stdout
    assert proxy.get(opened.id).grant.fingerprint == "shape:1"


def test_vote_that_does_not_settle_says_so(server: EnrollServer, appliance: Appliance, proxy: ApprovalService,
                                           token_files: dict[str, Path]) -> None:
    opened = open_request(proxy, PAYMENT_DELETE)
    done = approvals(server, appliance, token_files["dba-1"], "approve", opened.id, "--reason", "ok by me")
    assert done.stdout == (f"your vote to approve {opened.id} is recorded: 1 of 2 approval(s), still pending\n")


def test_deny_with_the_token_in_the_environment(server: EnrollServer, appliance: Appliance, proxy: ApprovalService,
                                                token_files: dict[str, Path]) -> None:
    opened = open_request(proxy)
    done = approvals(server, appliance, None, "deny", opened.id, "--reason", "not during the freeze",
                     env={"TOLLGATE_TOKEN": token_files["dba-2"].read_text().strip()})
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{opened.id} is denied\n"
    assert proxy.get(opened.id).denial.reason == "not during the freeze"


def test_json_output(server: EnrollServer, appliance: Appliance, proxy: ApprovalService,
                     token_files: dict[str, Path]) -> None:
    opened = open_request(proxy)
    listed = json.loads(approvals(server, appliance, token_files["dba-1"], "list", "--status", "all", "--json").stdout)
    assert opened.id in [r["id"] for r in listed]
    shown = json.loads(approvals(server, appliance, token_files["dba-1"], "show", opened.id, "--json").stdout)
    assert shown["sql"] == CARD_UPDATE and shown["status"] == "pending"


def test_config_supplies_url_and_ca(server: EnrollServer, appliance: Appliance, proxy: ApprovalService,
                                    token_files: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "approver.toml"
    config.write_text(f'[approvals]\napi_url = "{server.url}"\napi_ca_file = "{appliance.state_dir}/ca/ca.crt"\n')
    opened = open_request(proxy)
    done = tollgate("approvals", "show", opened.id, "-c", str(config), "--token-file", str(token_files["dba-1"]))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{opened.id}  PENDING")


def test_list_and_show_reflect_who_may_see(server: EnrollServer, appliance: Appliance, proxy: ApprovalService,
                                           token_files: dict[str, Path]) -> None:
    opened = open_request(proxy)  # agent-ci asks, payments-dbas decide
    outsider = approvals(server, appliance, token_files["ops-bot"], "list", "--status", "all")
    assert outsider.returncode == 0, outsider.stderr
    assert opened.id not in outsider.stdout and CARD_UPDATE not in outsider.stdout
    shown = approvals(server, appliance, token_files["ops-bot"], "show", opened.id)
    assert shown.returncode == 1 and shown.stdout == ""
    assert one_line(shown) == f"tollgate approvals: there is no approval request {opened.id} [unknown_request]"
    for name in ("agent-ci", "dba-1"):  # the requester, and an approver
        listed = approvals(server, appliance, token_files[name], "list")
        assert listed.returncode == 0 and opened.id in listed.stdout, (name, listed.stderr)
        assert approvals(server, appliance, token_files[name], "show", opened.id).returncode == 0


def test_an_empty_list_says_whose(server: EnrollServer, appliance: Appliance, token_files: dict[str, Path]) -> None:
    done = approvals(server, appliance, token_files["sec-1"], "list", "--status", "withdrawn")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "no approval requests withdrawn that you may decide or asked for\n"


# --- errors: one line, exit 1; usage, exit 2 ---------------------------------------------------

def one_line(done: subprocess.CompletedProcess[str]) -> str:  # noqa: F821
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_refusals_are_one_line_and_exit_1(server: EnrollServer, appliance: Appliance, proxy: ApprovalService,
                                          token_files: dict[str, Path]) -> None:
    opened = open_request(proxy)
    done = approvals(server, appliance, token_files["ops-bot"], "approve", opened.id, "--reason", "looks fine")
    assert done.returncode == 1 and done.stdout == ""
    assert one_line(done) == f"tollgate approvals: there is no approval request {opened.id} [unknown_request]"
    done = approvals(server, appliance, token_files["agent-ci"], "approve", opened.id, "--reason", "mine")
    assert done.returncode == 1 and one_line(done).endswith("cannot approve their own request [self_approval]")
    done = approvals(server, appliance, token_files["dba-1"], "show", "apr-000000")
    assert done.returncode == 1
    assert one_line(done) == "tollgate approvals: there is no approval request apr-000000 [unknown_request]"
    done = approvals(server, appliance, token_files["dba-1"], "approve", opened.id, "--reason", "ok",
                     "--for-minutes", "100000")
    assert done.returncode == 1 and one_line(done).endswith("[grant_too_long]")
    assert proxy.get(opened.id).pending


def test_a_refused_token_is_one_line(server: EnrollServer, appliance: Appliance, issuer: DevIssuer,
                                     tmp_path: Path) -> None:
    expired = tmp_path / "expired"
    expired.write_text(issuer.mint(issuer.base_claims("dba-1", client_id="dba-1", ttl=-3600)))
    done = approvals(server, appliance, expired, "list")
    assert done.returncode == 1
    assert one_line(done).startswith("tollgate approvals: token expired at ")
    assert one_line(done).endswith("[invalid_token]")


def test_untrusted_server_certificate(server: EnrollServer, token_files: dict[str, Path]) -> None:
    done = tollgate("approvals", "list", "--url", server.url, "--token-file", str(token_files["dba-1"]))
    assert done.returncode == 1
    assert "cannot verify the TLS certificate of" in one_line(done)
    assert "pass the appliance CA with --ca-file" in one_line(done)


def test_unreachable_server(appliance: Appliance, token_files: dict[str, Path]) -> None:
    done = tollgate("approvals", "list", "--url", "https://127.0.0.1:9", "--token-file", str(token_files["dba-1"]))
    assert done.returncode == 1
    assert one_line(done).startswith("tollgate approvals: cannot reach the approvals API at https://127.0.0.1:9/")


def test_a_lab_address_is_refused_from_the_hosts_own_namespace(token_files: dict[str, Path]) -> None:
    # The test runs in the root namespace, where the lab's range is not routed: the request
    # must not go out by the host's default route, and the message says where to run it.
    done = tollgate("approvals", "list", "--url", "https://198.18.1.1:8443", "--token-file",
                    str(token_files["dba-1"]))
    assert done.returncode == 2  # refused before anything is sent, as a URL that isn't https:// is
    assert "is a lab address (198.18.0.0/15), reachable only inside the lab's network namespaces" in one_line(done)
    assert "tollgate lab exec gw --" in one_line(done)


@pytest.mark.parametrize("args, message", [
    (["list", "--url", "https://127.0.0.1:9"], "no token: give --token-file FILE or set TOLLGATE_TOKEN"),
    (["list", "--token-file", "/dev/null"], "no approvals API URL: give --url"),
    (["list", "--url", "http://127.0.0.1:9", "--token-file", "/etc/hostname"], "must be https://HOST[:PORT]"),
    (["list", "--url", "https://127.0.0.1:9", "--token-file", "/nonexistent"], "cannot read the token file"),
    (["approve", "apr-000000", "--url", "https://127.0.0.1:9"], "the following arguments are required: --reason"),
    (["list", "--status", "open"], "invalid choice: 'open'"),
    (["approve", "apr-000000", "--reason", "x", "--for-minutes", "soon"], "invalid int value: 'soon'"),
])
def test_usage_errors_exit_2(args: list[str], message: str) -> None:
    environment = {k: v for k, v in os.environ.items() if k != "TOLLGATE_TOKEN"}
    done = tollgate("approvals", *args, env=environment)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert message in done.stderr


def test_unreadable_config_is_a_usage_error(tmp_path: Path) -> None:
    done = tollgate("approvals", "list", "-c", str(tmp_path / "missing.toml"), "--token-file", "/etc/hostname")
    assert done.returncode == 2 and "cannot read" in done.stderr


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (42, "42s"), (425, "7m05s"), (3600 * 3 + 720, "3h12m"),
                                           (86400 * 2 + 3600 * 4 + 5, "2d4h"), (-30, "30s")])
def test_duration(seconds: float, text: str) -> None:
    assert duration(seconds) == text
