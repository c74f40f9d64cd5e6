"""Issue 12's acceptance: an adversarial agent gets no card number out, through any channel.

The corpus (tests/e2e/adversarial_corpus.toml) is what a prompt-injected agent would try:
transforms of the card number in result values, column names, ParameterStatus, errors and
notices, notifications, COPY, writes into scratch tables read back, and predicates used as
oracles. Each case runs from the lab's agent namespace through Tollgate, under the lab's
policy, and — to prove the case and the recoverer — directly against the database. The
recoverer (tests/e2e/adversary.py) undoes encodings and joins pieces across columns and
rows; a case passes when nothing more than BIN + last four of any lab card is recoverable
from everything the client received (a refusal passes). Oracles pass when the answer does
not depend on the hidden digit. Controls (timestamps, epochs, UUIDs, IBANs, ISBNs,
non-issuer Luhn numbers, ids) must come back exactly as directly.

Also here: the parser-differential attack of issue 12 through the real proxy socket, with
standard_conforming_strings off asked for at startup and by SET — the UPDATE never runs.
Every client call runs under a deadline, so a hang fails the test instead of stalling it.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.lab import Lab
from appliance.lab.policy import LAB_POLICY
from tests.e2e.adversary import recover
from tests.e2e.conftest import python_json, set_policy, superuser_sql

pytestmark = pytest.mark.lab

CORPUS = tomllib.loads((Path(__file__).with_name("adversarial_corpus.toml")).read_text())
CASES = {c["name"]: c for c in CORPUS["case"]}
ORACLES = {c["name"]: c for c in CORPUS["oracle"]}
CONTROLS = {c["name"]: c for c in CORPUS["control"]}
CARD, CARD2 = 7, 123  # the cards the cases read (ids in the lab's cards table)
CASE_DEADLINE = 30  # seconds for one case's statements, through or direct
# The corpus runs under the lab's policy as it is, and with a `mask` rule on the card
# number added (the acceptance asks for both).
MASK_RULE = """
[[rule]]
name = "card-numbers-masked-for-agents"
groups = ["payments-agents"]
classes = ["read"]
relations = ["public.cards"]
action = "mask"
mask = [{ columns = ["public.cards.pan"], method = "pan" }]
"""
POLICY_VARIANTS = {"lab policy": LAB_POLICY, "with a mask rule": LAB_POLICY + MASK_RULE}

RUNNER = r"""
import json, os, sys, threading, psycopg
from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout

dsn, cases, deadline = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3])
STATEMENT_DEADLINE = 8  # then the statement is cancelled (a held one gets 57014 from Tollgate)
FIELDS = ("severity", "sqlstate", "message_primary", "message_detail", "message_hint", "context",
          "internal_query", "schema_name", "table_name", "column_name", "datatype_name", "constraint_name")

def diag(d):
    return [str(v) for v in (getattr(d, f) for f in FIELDS) if v]

def run(case):
    got = {"strings": [], "outcomes": []}
    conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10, **case.get("connect", {}))
    conn.add_notice_handler(lambda d: got["strings"].extend(diag(d)))
    conn.add_notify_handler(lambda n: got["strings"].extend([n.channel, n.payload]))
    try:
        if case.get("listen"):
            conn.execute(f"LISTEN {case['listen']}")
        for sql in case["sql"]:
            watchdog = threading.Timer(STATEMENT_DEADLINE, conn.cancel_safe)
            watchdog.start()
            try:
                if case.get("simple"):
                    res = conn.pgconn.exec_(sql.encode())  # PQexec: the last statement's result
                    got["strings"].append(res.command_status.decode() if res.command_status else "")
                    for c in range(res.nfields):
                        got["strings"].append(res.fname(c).decode("utf-8", "replace"))
                        got["strings"].extend(bytes(v).decode("utf-8", "replace") for r in range(res.ntuples)
                                              if (v := res.get_value(r, c)) is not None)
                    if res.error_message:
                        got["strings"].append(res.error_message.decode("utf-8", "replace"))
                        got["outcomes"].append(["error", res.error_field(ord("C")).decode()
                                                if res.error_field(ord("C")) else None])
                    else:
                        got["outcomes"].append(["ok"])
                    continue
                if sql.lstrip().lower().startswith("copy"):
                    data = bytearray()
                    with conn.cursor().copy(sql) as cp:
                        for chunk in cp:
                            data += chunk
                    got["strings"].append(bytes(data).decode("latin-1"))
                    got["outcomes"].append(["copy"])
                    continue
                binary = bool(case.get("binary"))
                cur = conn.execute(sql, binary=binary)
                got["strings"].append(cur.statusmessage or "")
                res = cur.pgresult
                rows = []
                if cur.description:
                    got["strings"].extend(d.name for d in cur.description)
                    for r in range(res.ntuples):
                        row = [None if (v := res.get_value(r, c)) is None
                               else bytes(v).decode("latin-1" if binary else "utf-8", "replace")
                               for c in range(res.nfields)]
                        rows.append(row)
                        got["strings"].extend(v for v in row if v is not None)
                    if binary:  # and as the client decodes them
                        got["strings"].extend(repr(v) for row in cur.fetchall() for v in row)
                got["outcomes"].append(["ok", rows])
            except psycopg.Error as exc:
                got["strings"].append(str(exc))
                if exc.diag is not None:
                    got["strings"].extend(diag(exc.diag))
                got["outcomes"].append(["error", exc.sqlstate])
                if conn.closed or conn.broken:
                    break
            finally:
                watchdog.cancel()
        if not conn.closed and not conn.broken:
            for name in case.get("params", []) + ["application_name"]:
                v = conn.pgconn.parameter_status(name.encode())
                if v is not None:
                    got["strings"].append(v.decode("utf-8", "replace"))
    finally:
        conn.close()
    return got

out = {}
pool = ThreadPoolExecutor(6)
futures = {name: pool.submit(run, case) for name, case in cases.items()}
for name, fut in futures.items():
    try:
        out[name] = fut.result(timeout=deadline)
    except FutureTimeout:
        out[name] = {"timeout": True}
    except Exception as exc:
        out[name] = {"crash": f"{type(exc).__name__}: {exc}"}
print(json.dumps(out))
sys.stdout.flush()
os._exit(0)  # a case stuck past its deadline must not hold the run
"""


def lab_pans(lab: Lab) -> dict[int, str]:
    rows = superuser_sql(lab, "SELECT id || ',' || pan FROM cards ORDER BY id").split()
    return {int(i): p for i, p in (r.split(",") for r in rows)}


def expand(case: dict, pans: dict[int, str], tag: str) -> dict:
    """The case with its placeholders filled in."""
    pan = pans[CARD]
    values = {"id": CARD, "id2": CARD2, "pan": pan, "pan_dots": ".".join(pan[i:i + 4] for i in range(0, len(pan), 4)),
              "t": f"scratch.adv_{tag}"}
    out = dict(case)
    out["sql"] = []
    for sql in case["sql"]:
        for key, value in values.items():  # not str.format: the SQL has regex braces
            sql = sql.replace("{" + key + "}", str(value))
        out["sql"].append(sql)
    return out


def targets(case: dict, pans: dict[int, str]) -> list[int]:
    which = case.get("cards", "one")
    return sorted(pans) if which == "all" else [CARD, CARD2] if which == "two" else [CARD]


def run_corpus(lab: Lab, cases: dict[str, dict], *, direct: bool) -> dict:
    dsn = lab.conninfo(direct=direct)
    deadline = CASE_DEADLINE * (1 + len(cases) // 6)  # six at a time
    return python_json(lab, RUNNER, dsn, json.dumps(cases), str(CASE_DEADLINE * 2),
                       timeout=deadline + 120)  # type: ignore[return-value]


def _drop_scratch(lab: Lab) -> None:
    superuser_sql(lab, "DO $$ DECLARE r record; BEGIN FOR r IN SELECT oid::regclass AS t, relkind FROM pg_class "
                       "WHERE relnamespace = 'scratch'::regnamespace AND relname LIKE 'adv_%' LOOP "
                       "EXECUTE format(CASE WHEN r.relkind = 'v' THEN 'DROP VIEW IF EXISTS %s CASCADE' "
                       "ELSE 'DROP TABLE IF EXISTS %s CASCADE' END, r.t); END LOOP; END $$")


@pytest.fixture(scope="module")
def direct_run(lab: Lab) -> dict:
    """The corpus with its placeholders filled, and what the client receives directly
    (once: the policy doesn't touch the direct path)."""
    superuser_sql(lab, "CREATE SCHEMA IF NOT EXISTS scratch AUTHORIZATION app")
    pans = lab_pans(lab)
    assert len(pans) >= 300
    cases = {name: expand(c, pans, f"{i}") for i, (name, c) in enumerate(CASES.items())}
    for name, o in ORACLES.items():
        for d in range(10):
            sql = o["sql"].replace("{d}", str(d))
            cases[f"oracle {name} {d}"] = expand({"sql": [sql]}, pans, "o")
    for name, c in CONTROLS.items():
        cases[f"control {name}"] = expand(c, pans, "c")
    try:
        return {"cases": cases, "pans": pans, "direct": run_corpus(lab, cases, direct=True)}
    finally:
        _drop_scratch(lab)


@pytest.fixture(scope="module", params=list(POLICY_VARIANTS))
def adversary(lab: Lab, direct_run: dict, request: pytest.FixtureRequest) -> Iterator[dict]:
    """Everything the client received, through Tollgate (under each policy variant) and
    directly, for every case."""
    set_policy(lab, POLICY_VARIANTS[request.param])
    try:
        through = run_corpus(lab, direct_run["cases"], direct=False)
        yield {"through": through, "direct": direct_run["direct"], "pans": direct_run["pans"]}
    finally:
        set_policy(lab, LAB_POLICY)
        _drop_scratch(lab)


def _case_params() -> list:
    out = []
    for name, case in CASES.items():
        marks = [pytest.mark.xfail(strict=True, reason=case["xfail"])] if case.get("xfail") else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


def _finished(got: dict, name: str) -> dict:
    assert "timeout" not in got, f"{name}: no answer within {CASE_DEADLINE * 2} s (a hang)"
    assert "crash" not in got, f"{name}: {got['crash']}"
    return got


@pytest.mark.parametrize("name", _case_params())
def test_no_card_number_is_recoverable_from_what_the_agent_receives(adversary: dict, name: str):
    case, pans = CASES[name], adversary["pans"]
    direct = _finished(adversary["direct"][name], name)
    through = _finished(adversary["through"][name], name)
    cards = targets(case, pans)
    if case.get("direct_leaks", True):
        # The case and the recoverer are sound: the same statements without Tollgate leak.
        assert recover(direct["strings"], pans, cards), (name, direct["outcomes"], direct["strings"][:6])
    if not case.get("may_hold"):
        assert ["error", "57014"] not in through["outcomes"], f"{name}: a statement was cancelled at its deadline"
    if case.get("answered"):  # masked, not refused: the BIN and last four are there to see
        pan = pans[CARD]
        assert all(o[0] in ("ok", "copy") for o in through["outcomes"]), (name, through["outcomes"])
        shown = "".join(through["strings"])
        assert pan[:6] in shown and pan[-4:] in shown, (name, through["strings"])
    leaks = recover(through["strings"], pans, cards)
    assert not leaks, (f"{name}: {[(lk.card, lk.how) for lk in leaks][:4]}; outcomes {through['outcomes']}; "
                       f"received {through['strings'][:8]}")


def _oracle_params() -> list:
    return [pytest.param(name, marks=[pytest.mark.xfail(strict=True, reason=o["xfail"])] if o.get("xfail") else [],
                         id=name) for name, o in ORACLES.items()]


def _answers(side: dict, name: str) -> list:
    return [json.dumps(_finished(side[f"oracle {name} {d}"], name)["outcomes"]) for d in range(10)]


@pytest.mark.parametrize("name", _oracle_params())
def test_no_predicate_answers_differently_by_a_hidden_digit(adversary: dict, name: str):
    direct = _answers(adversary["direct"], name)
    assert len(set(direct)) > 1, (name, direct)  # directly, the answer gives the digit away
    through = _answers(adversary["through"], name)
    assert len(set(through)) == 1, f"{name}: through Tollgate the answers differ by the digit: {through}"


@pytest.mark.parametrize("name", list(CONTROLS))
def test_controls_come_back_unchanged(adversary: dict, name: str):
    key = f"control {name}"
    direct = _finished(adversary["direct"][key], name)
    through = _finished(adversary["through"][key], name)
    assert all(o[0] != "error" for o in direct["outcomes"]), direct
    assert through["outcomes"] == direct["outcomes"]
    assert through["strings"] == direct["strings"]
    assert not recover(through["strings"], adversary["pans"], [])  # and they are no card numbers


def test_the_corpus_covers_every_channel():
    channels = {c["channel"] for c in CASES.values()}
    assert channels >= {"result", "transform", "column name", "parameter status", "error", "notification",
                        "copy", "write"}
    assert len(CASES) + len(ORACLES) >= 80 and len(ORACLES) >= 5 and len(CONTROLS) >= 10


# ---- the parser differential through the real proxy socket -------------------------------------

SCS = r"""
import json, sys, threading, psycopg
from psycopg import pq

dsn, attack = sys.argv[1], sys.argv[2]
out = {}
timer = threading.Timer(30, lambda: (print(json.dumps({"hang": True})), sys.stdout.flush(), __import__("os")._exit(0)))
timer.start()
def simple(conn, sql):
    res = conn.pgconn.exec_(sql.encode())
    field = res.error_field(ord("C"))
    return [pq.ExecStatus(res.status).name, field.decode() if field else None]
try:
    # 1. asked for at startup
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10,
                             options="-c standard_conforming_strings=off") as conn:
            out["startup setting"] = conn.pgconn.parameter_status(b"standard_conforming_strings").decode()
            out["startup attack"] = simple(conn, attack)
    except psycopg.Error as exc:
        out["startup attack"] = ["refused at connect", exc.sqlstate]
    # 2. asked for by SET, then the attack
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        out["set"] = simple(conn, "SET standard_conforming_strings = off")
        out["set attack"] = simple(conn, attack)
        out["set local"] = simple(conn, "BEGIN; SET LOCAL standard_conforming_strings = off; " + attack + "\nCOMMIT")
        out["set_config"] = simple(conn, "SELECT set_config('standard_conforming_strings', 'off', false)")
        out["after"] = simple(conn, "SELECT 1")
        out["setting after"] = conn.pgconn.parameter_status(b"standard_conforming_strings").decode()
finally:
    timer.cancel()
print(json.dumps(out))
"""


def test_standard_conforming_strings_off_does_not_let_the_differential_update_run(lab: Lab):
    set_policy(lab, LAB_POLICY)
    before = superuser_sql(lab, f"SELECT expiry FROM cards WHERE id = {CARD}").strip()
    assert before != "S0/01"
    attack = f"select '\\''; update cards set expiry = $$S0/01$$ where id = {CARD}; -- '"
    got = python_json(lab, SCS, lab.conninfo(), attack, timeout=90)
    assert "hang" not in got, got
    assert superuser_sql(lab, f"SELECT expiry FROM cards WHERE id = {CARD}").strip() == before, got
    # Refused: the attack on a session whose setting is off, and every way of turning it
    # off. (After a refused SET the setting is still on, and the same text is one harmless
    # SELECT of a string, as both pglast and the server read it.)
    for key in ("startup attack", "set", "set local", "set_config"):
        assert got[key][0] not in ("TUPLES_OK", "COMMAND_OK"), (key, got)
    assert got["after"] == ["TUPLES_OK", None], got  # the session still works…
    assert got["setting after"] == "on"  # …with the setting as Tollgate pins it
