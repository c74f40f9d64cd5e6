"""The foundation's acceptance, in the lab, through the redirect: unchanged clients just work.

Each comparison runs the same client twice from the agent namespace: through Tollgate (the
protected address, diverted by nftables) and directly (the unprotected address of the same
server over the same route), and expects the same behaviour — except that card numbers
arrive masked through Tollgate. These tests are about the protocol, not the policy: the
module runs under the lab's allow-all policy (masking stays on).
"""

from __future__ import annotations

import hashlib
import json

import pytest

from appliance.lab import Lab
from appliance.lab.pans import make_test_pans
from appliance.lab.policy import PERMISSIVE_POLICY, POLICIES
from appliance.lab.schema import CARDS, DEFAULT_SEED
from tests.e2e.conftest import live_sessions_during, psql, python, python_json, run, set_policy

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module", autouse=True)
def allow_all(lab: Lab):
    set_policy(lab, PERMISSIVE_POLICY)
    try:
        yield
    finally:
        set_policy(lab, POLICIES[lab.policy])


def pci_masked(pan: str) -> str:
    """PCI display format, computed here independently of the detector under test."""
    return pan[:6] + "*" * (len(pan) - 10) + pan[-4:]


def number_masked(pan: str) -> str:
    """The PCI display of a card number written as a bare number where the column's type
    is unknown (COPY text): zeros in between, so the field still loads into a number column,
    and the last of them a 1 where zeros would make a Luhn-valid number (a card number again)."""
    masked = pan[:6] + "0" * (len(pan) - 10) + pan[-4:]
    return masked[:-5] + "1" + masked[-4:] if luhn_valid(masked) else masked


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, d in enumerate(int(c) for c in reversed(digits)):
        total += d if i % 2 == 0 else (d * 2 - 9 if d > 4 else d * 2)
    return total % 10 == 0


def test_psql_with_unchanged_conninfo_reaches_the_real_database_through_tollgate(lab: Lab):
    out = psql(lab, "SELECT inet_server_addr(), inet_client_addr(), current_user, count(*) FROM cards")
    server, client, user, cards = out.strip().split("|")
    assert server == "198.18.2.10"
    # The database sees the appliance (the proxy's upstream), not the agent…
    assert client == "198.18.2.1"
    assert user == "app" and int(cards) > 0


def test_tollgate_sees_the_agents_source_address_and_destination(lab: Lab):
    # Listed (from the appliance side) while the agent's session is open: no timing involved.
    sessions, out = live_sessions_during(lab, "SELECT pg_backend_pid()")
    [mine] = [s for s in sessions if s["phase"] == "ready"]
    assert mine["backend_pid"] == int(out.strip())  # the pid the agent and pg_stat_activity know
    assert mine["client"].startswith("198.18.1.10:")
    assert mine["destination"] == "198.18.2.10:5432"
    assert (mine["target"], mine["user"], mine["database"]) == ("payments", "app", "payments")


def test_ipv6_is_intercepted_too(lab: Lab):
    out = run(lab, "agent", ["psql", "-X", "-A", "-t", lab.conninfo(ipv6=True), "-c",
                             "SELECT inet_server_addr(), inet_client_addr()"]).stdout.decode()
    assert out.strip() == "fd7a:6c67:2::10|fd7a:6c67:2::1"


@pytest.mark.parametrize("role", ["legacy_md5", "clear_tls"])
def test_upstream_md5_and_cleartext_over_tls_logins(lab: Lab, role: str):
    assert psql(lab, "SELECT current_user", role=role).strip() == role


CLIENT_PID_SCRIPT = """
    import json, sys, psycopg
    with psycopg.connect(sys.argv[1]) as conn:
        server_pid, client_addr = conn.execute("SELECT pg_backend_pid(), host(inet_client_addr())").fetchone()
        print(json.dumps({"client_sees": conn.info.backend_pid, "server_pid": server_pid,
                          "server_sees_client": client_addr}))
"""


def test_unprotected_address_is_not_intercepted(lab: Lab):
    # Either way the client is given the backend's real pid (Tollgate issues only the
    # cancel secret); what tells the paths apart is who the server sees connecting: the
    # agent directly, the appliance through Tollgate.
    through = python_json(lab, CLIENT_PID_SCRIPT, lab.conninfo())
    direct = python_json(lab, CLIENT_PID_SCRIPT, lab.conninfo(direct=True))
    assert through["client_sees"] == through["server_pid"]
    assert direct["client_sees"] == direct["server_pid"]
    assert direct["server_sees_client"] == "198.18.1.10"
    assert through["server_sees_client"] != "198.18.1.10"


def forward_drops(lab: Lab) -> int:
    """Packets the gateway's forward filter has dropped on their way to a protected IPv4 address."""
    listing = json.loads(run(lab, "gw", ["nft", "-j", "list", "chain", "inet", "tollgate", "forward"]).stdout)
    return sum(expr["counter"]["packets"] for item in listing["nftables"] if "rule" in item
               for expr in item["rule"]["expr"] if "counter" in expr
               if any(e.get("match", {}).get("right") == "@protected4" for e in item["rule"]["expr"]))


def guard_drops(lab: Lab, reason: str) -> int:
    """Packets the eBPF bypass guard (docs/ebpf.md) has dropped for ``reason``, at TC
    ingress of the gateway's agent link: before the forward filter sees them."""
    return int(lab.flows_status(status_only=True)["counters"]["dropped"].get(reason, 0))


def test_other_port_of_a_protected_address_is_filtered(lab: Lab):
    # Not diverted, and not routed either: agents reach a protected database only through
    # the proxy (a target's allow_ports would open 5433; the lab's opens nothing).
    listener = lab.popen("db", ["python3", "-c", (
        "import socket,sys\n"
        "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "s.bind(('198.18.2.10', 5433)); s.listen(1); print('ready', flush=True)\n"
        "c, peer = s.accept(); print(peer[0], flush=True)\n")], stdout=-1)
    try:
        assert listener.stdout.readline().strip() == b"ready"
        before = forward_drops(lab), guard_drops(lab, "other-port")
        got = python(lab, """
            import socket
            try:
                socket.create_connection(("198.18.2.10", 5433), timeout=3)
                print("connected")
            except TimeoutError:
                print("no answer")
        """).stdout.decode().strip()
        assert got == "no answer"
        # The SYNs were dropped: by the eBPF guard, which runs first, or by the forward
        # filter (each stops them alone: tests/flows, tests/intercept).
        after = forward_drops(lab), guard_drops(lab, "other-port")
        assert after[0] > before[0] or after[1] > before[1]
    finally:
        listener.kill()
        out, _ = listener.communicate()
    assert out == b""  # the listener never accepted anything


def test_connections_from_the_appliance_itself_are_never_looped(lab: Lab):
    got = python_json(lab, CLIENT_PID_SCRIPT, lab.conninfo(with_password=True), node="gw")
    assert got["client_sees"] == got["server_pid"]


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_through_tollgate(lab: Lab, mode: str):
    if mode == "simple":
        out = run(lab, "agent", ["pgbench", "-i", "-s", "1", "-q", lab.conninfo()]).stderr.decode()
        assert "done" in out
    proc = run(lab, "agent", ["pgbench", "-n", "-M", mode, "-c", "4", "-j", "2", "-t", "200", lab.conninfo()])
    out = proc.stdout.decode()
    assert "number of transactions actually processed: 800/800" in out
    assert "number of failed transactions: 0" in out


def test_plain_pg_dump_through_tollgate_is_identical_but_for_masked_card_numbers(lab: Lab):
    # A fixed \restrict key: pg_dump otherwise draws a random one per dump (CVE-2025-8714).
    through = run(lab, "agent", ["pg_dump", "--restrict-key=tollgate", "--no-password", lab.conninfo()]).stdout
    direct = run(lab, "agent", ["pg_dump", "--restrict-key=tollgate", lab.conninfo(direct=True)]).stdout
    assert b"CREATE TABLE public.cards" in direct
    expected = direct
    for pan in make_test_pans(DEFAULT_SEED, CARDS):
        assert pan.encode() in direct and pan.encode() not in through
        expected = expected.replace(pan.encode(), number_masked(pan).encode())  # pg_dump's data is COPY text
    assert hashlib.sha256(through).hexdigest() == hashlib.sha256(expected).hexdigest()


def test_pg_restore_through_tollgate(lab: Lab):
    psql(lab, "DROP TABLE IF EXISTS restore_probe; "
              "CREATE TABLE restore_probe AS SELECT g AS n FROM generate_series(1, 1000) g")
    try:
        run(lab, "agent", ["sh", "-c",
                           f"pg_dump -Fc -t restore_probe '{lab.conninfo(direct=True)}' > /tmp/tg-probe.{lab.name}"])
        psql(lab, "DROP TABLE restore_probe")
        run(lab, "agent", ["pg_restore", "--no-owner", "-d", lab.conninfo(), f"/tmp/tg-probe.{lab.name}"])
        assert psql(lab, "SELECT sum(n) FROM restore_probe").strip() == "500500"
    finally:
        run(lab, "agent", ["rm", "-f", f"/tmp/tg-probe.{lab.name}"])
        psql(lab, "DROP TABLE IF EXISTS restore_probe")


def test_cancel_stops_a_running_pg_sleep(lab: Lab):
    got = python_json(lab, """
        import json, sys, threading, time, psycopg
        conn = psycopg.connect(sys.argv[1], autocommit=True)
        watcher = psycopg.connect(sys.argv[2], autocommit=True)
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        outcome = {}
        def sleeper():
            try:
                conn.execute("SELECT pg_sleep(3600)")
                outcome["result"] = "completed"
            except psycopg.errors.QueryCanceled as exc:
                outcome["result"] = "canceled"
                outcome["sqlstate"] = exc.sqlstate
        t = threading.Thread(target=sleeper); t.start()
        # Cancel once the server really is sleeping (an event, not a guess).
        while watcher.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s "
                              "AND query LIKE 'SELECT pg_sleep%%' AND state = 'active'", (pid,)).fetchone()[0] == 0:
            time.sleep(0.01)
        conn.cancel()
        t.join(90)
        outcome.setdefault("result", "still sleeping")
        print(json.dumps(outcome))
    """, lab.conninfo(), lab.conninfo(direct=True), timeout=120)
    # An hour's sleep that ended in 57014 query_canceled: the cancel ended it, whatever the
    # clock says (no bound on how fast: a loaded machine is slow, not wrong).
    assert got == {"result": "canceled", "sqlstate": "57014"}, got


LISTEN_SCRIPT = """
    import json, sys, psycopg
    listener = psycopg.connect(sys.argv[1], autocommit=True)
    talker = psycopg.connect(sys.argv[1], autocommit=True)
    listener.execute("LISTEN tollgate_test")
    talker.execute("NOTIFY tollgate_test, 'hello 1'")
    talker.execute("SELECT pg_notify('tollgate_test', repeat('x', 7000))")
    got = []
    for note in listener.notifies(timeout=60, stop_after=2):  # returns at the second: 60 s is a safety net
        got.append([note.channel, note.payload, note.pid == talker.info.backend_pid])
    print(json.dumps(got))
"""


def test_listen_notify_behaves_as_direct(lab: Lab):
    through = python_json(lab, LISTEN_SCRIPT, lab.conninfo())
    direct = python_json(lab, LISTEN_SCRIPT, lab.conninfo(direct=True))
    assert direct[0][:2] == ["tollgate_test", "hello 1"] and len(direct) == 2
    # The notifying backend's pid is the server's, which the client is given either way.
    assert through == direct and all(n[2] for n in through)


COPY_SCRIPT = """
    import hashlib, json, sys, psycopg
    fmt = sys.argv[2]
    opts = {"text": "", "csv": "(FORMAT csv, HEADER true)", "binary": "(FORMAT binary)"}[fmt]
    with psycopg.connect(sys.argv[1], autocommit=True) as conn:
        out = bytearray()
        # No PAN column: COPY's fidelity, not masking (tests/e2e/test_masking.py), is the point.
        with conn.cursor().copy(f"COPY (SELECT id, pan_last4, expiry, brand FROM cards ORDER BY id) "
                                f"TO STDOUT {opts}") as copy:
            for chunk in copy:
                out += chunk
        conn.execute("CREATE TEMP TABLE copy_back (id int, last4 text, expiry text, brand text)")
        with conn.cursor().copy(f"COPY copy_back FROM STDIN {opts}") as copy:
            copy.write(bytes(out))
        back = conn.execute("SELECT md5(string_agg(id || last4 || expiry || brand, ',' ORDER BY id)) "
                            "FROM copy_back").fetchone()[0]
        print(json.dumps({"out": hashlib.sha256(out).hexdigest(), "size": len(out), "back": back}))
"""


@pytest.mark.parametrize("fmt", ["text", "csv", "binary"])
def test_copy_out_and_in_behave_as_direct(lab: Lab, fmt: str):
    through = python_json(lab, COPY_SCRIPT, lab.conninfo(), fmt)
    direct = python_json(lab, COPY_SCRIPT, lab.conninfo(direct=True), fmt)
    assert direct["size"] > 1000
    assert through == direct


def test_ten_megabyte_values_both_ways(lab: Lab):
    script = """
        import hashlib, json, sys, psycopg
        value = ("0123456789abcdef" * (10 * 1024 * 1024 // 16))
        with psycopg.connect(sys.argv[1], autocommit=True) as conn:
            conn.execute("CREATE TEMP TABLE big (v text)")
            conn.execute("INSERT INTO big VALUES (%s)", (value,))         # extended, as a parameter
            conn.execute("INSERT INTO big VALUES ('" + value + "')", prepare=False)  # as literal SQL
            rows = conn.execute("SELECT v FROM big").fetchall()
            binary = conn.cursor(binary=True).execute("SELECT v::bytea FROM big LIMIT 1").fetchone()[0]
            print(json.dumps([len(rows), all(r[0] == value for r in rows),
                              hashlib.md5(bytes(binary)).hexdigest() == hashlib.md5(value.encode()).hexdigest()]))
    """
    assert python_json(lab, script, lab.conninfo()) == [2, True, True]
    # psql's simple protocol too, result compared with direct.
    sql = "SELECT md5(repeat('x', 10485760)), length(repeat('y', 10485760))"
    assert psql(lab, sql) == psql(lab, sql, direct=True)


PIPELINE_SCRIPT = """
    import json, sys, psycopg
    results = []
    with psycopg.connect(sys.argv[1]) as conn:
        conn.execute("CREATE TEMP TABLE p (n int)")
        conn.commit()
        try:
            with conn.pipeline() as pipeline:
                conn.execute("INSERT INTO p VALUES (1)")
                c2 = conn.execute("SELECT 1/0")
                conn.execute("INSERT INTO p VALUES (2)")
                pipeline.sync()
        except psycopg.Error as exc:
            results.append(["error", exc.sqlstate])
        conn.rollback()
        with conn.pipeline():
            cur = conn.execute("SELECT count(*) FROM p")
            more = conn.execute("SELECT %s::int + 1", (41,))
        results.append(cur.fetchone()[0])
        results.append(more.fetchone()[0])
        results.append(conn.info.transaction_status.name)
    print(json.dumps(results))
"""


def test_pipeline_with_an_error_in_the_middle_behaves_as_direct(lab: Lab):
    through = python_json(lab, PIPELINE_SCRIPT, lab.conninfo())
    direct = python_json(lab, PIPELINE_SCRIPT, lab.conninfo(direct=True))
    assert direct[0] == ["error", "22012"]
    assert through == direct


CURSOR_SCRIPT = """
    import asyncio, json, sys, asyncpg, psycopg

    async def portal_batches(dsn):
        params = psycopg.conninfo.conninfo_to_dict(dsn)
        params["database"] = params.pop("dbname")
        conn = await asyncpg.connect(**params)
        try:
            batches = []
            async with conn.transaction():
                # asyncpg fetches a cursor with Execute(max_rows): PortalSuspended between batches.
                cur = await conn.cursor("SELECT id, pan FROM cards ORDER BY id")
                while rows := await cur.fetch(64):
                    batches.append([r["id"] for r in rows])
            return batches
        finally:
            await conn.close()

    dsn = sys.argv[1]
    batches = asyncio.run(portal_batches(dsn))
    declared = []
    with psycopg.connect(dsn) as conn:
        with conn.cursor(name="c") as cur:  # DECLARE / FETCH
            cur.itersize = 50
            cur.execute("SELECT id FROM cards ORDER BY id")
            declared = [r[0] for r in cur]
    print(json.dumps({"batch_sizes": [len(b) for b in batches], "ids": sum(batches, []), "declared": declared}))
"""


def test_cursor_fetched_in_batches_behaves_as_direct(lab: Lab):
    through = python_json(lab, CURSOR_SCRIPT, lab.conninfo())
    direct = python_json(lab, CURSOR_SCRIPT, lab.conninfo(direct=True))
    assert len(direct["batch_sizes"]) > 2 and direct["ids"] == direct["declared"]
    assert through == direct


def test_server_fatal_reaches_the_client(lab: Lab):
    got = python_json(lab, """
        import json, sys, psycopg
        conn = psycopg.connect(sys.argv[1], autocommit=True)
        killer = psycopg.connect(sys.argv[2], autocommit=True)
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        killer.execute("SELECT pg_terminate_backend(%s)", (pid,))
        try:
            conn.execute("SELECT 1")
            print(json.dumps(["no error"]))
        except psycopg.OperationalError as exc:
            print(json.dumps([exc.sqlstate, "terminating connection" in str(exc), conn.closed]))
    """, lab.conninfo(), lab.conninfo(direct=True))
    assert got[1:] == [True, True]


def test_a_bad_client_ends_only_its_own_connection(lab: Lab):
    got = python_json(lab, """
        import json, os, socket, ssl, struct, sys, psycopg
        keep = psycopg.connect(sys.argv[1], autocommit=True)
        pg = os.path.expanduser("~/.postgresql")
        raw = socket.create_connection(("198.18.2.10", 5432), timeout=60)
        raw.sendall(struct.pack("!II", 8, 80877103))           # SSLRequest, as libpq does
        assert raw.recv(1) == b"S"
        context = ssl.create_default_context(cafile=pg + "/root.crt")
        context.check_hostname = False
        context.load_cert_chain(pg + "/postgresql.crt", pg + "/postgresql.key")
        s = context.wrap_socket(raw)
        params = b"user\\0app\\0database\\0payments\\0\\0"
        s.sendall(struct.pack("!II", 8 + len(params), 196608) + params)
        buf = b""
        while not buf.endswith(b"Z\\0\\0\\0\\x05I"):
            chunk = s.recv(65536)
            assert chunk, buf
            buf += chunk
        s.sendall(b"Q\\0\\0\\0\\x02")   # a length below the minimum of 4
        reply = b""
        try:
            while chunk := s.recv(65536):
                reply += chunk
        except (ssl.SSLError, ConnectionError):
            pass                              # the proxy closed right after its FATAL
        text = reply.decode(errors="replace")
        print(json.dumps([reply[:1].decode(), "SFATAL" in text, "length 2" in text,
                          keep.execute("SELECT 42").fetchone()[0]]))
    """, lab.conninfo())
    assert got == ["E", True, True, 42]


def test_unknown_role_is_refused_with_a_clear_message(lab: Lab):
    proc = run(lab, "agent", ["psql", "-X", lab.conninfo("postgres"), "-c", "SELECT 1"], check=False)
    assert proc.returncode != 0
    assert b"Tollgate holds no credentials for role 'postgres'" in proc.stderr


def test_dialling_the_proxy_port_itself_is_refused_not_relayed(lab: Lab):
    proc = run(lab, "agent", ["psql", "-X", "host=198.18.1.1 port=15432 dbname=payments user=app",
                              "-c", "SELECT 1"], check=False)
    assert proc.returncode != 0
    assert b"Tollgate does not protect a database at 198.18.1.1:15432" in proc.stderr


def test_a_cancel_never_lands_on_the_next_statement(lab: Lab):
    # libpq's cancel returns once the appliance closes the cancel connection; that must
    # not happen before the database has acted, or the late cancel kills the next statement.
    hits = python_json(lab, """
        import json, sys, psycopg
        conn = psycopg.connect(sys.argv[1], autocommit=True)
        hits = 0
        for _ in range(30):
            conn.execute("SELECT 1")
            conn.cancel()
            try:
                conn.execute("SELECT pg_sleep(0.02)")
            except psycopg.errors.QueryCanceled:
                hits += 1
        print(json.dumps(hits))
    """, lab.conninfo())
    assert hits == 0
