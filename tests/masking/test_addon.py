"""The masking addon in a real Session: every path to the agent, through the hook contract."""

from __future__ import annotations

import struct

import pytest

from appliance.config import Credential, Endpoint, Target
from appliance.masking import addon as masking_addon
from appliance.masking.addon import MaskingAddon, touches
from appliance.masking.catalog import PgColumnCatalog
from appliance.model.decision import ColumnMask, Decision, MaskMethod, StatementClass
from appliance.pan.detector import find_pans
from appliance.pgwire import messages as m
from appliance.proxy.hooks import Addon, Result, SessionInfo, Statement
from tests.masking.policy import DictCatalog, decision
from tests.masking.wire import array_bin, binary_copy, numeric_bin
from tests.proxy.trace import backend, frontend, make_target, ready_session

PAN = b"4111111111111111"
MASKED = b"411111******1111"
NUM = b"4111110000001111"  # masked as a number: BIN, zeros, last four
AMEX = b"378282246310005"
CARDS_OID = 16500


@pytest.fixture(autouse=True, params=["compiled", "python"])
def row_path(request, monkeypatch):
    """Every test here runs with the compiled row scanner and with the Python path alone."""
    if request.param == "python":
        monkeypatch.setattr(masking_addon, "fastrows", None)
    elif masking_addon.fastrows is None:
        pytest.fail("the compiled row scanner is not built (python setup.py build_ext --inplace)")


def field(name: str, type_oid: int = 25, fmt: int = 0, table: int = 0, attnum: int = 0) -> m.FieldDescription:
    return m.FieldDescription(name, table, attnum, type_oid, -1, -1, fmt)


class Decides(Addon):
    """Puts a policy decision on every statement, as the enforcement addon does."""

    name = "decides"

    def __init__(self, decision: Decision):
        self.decision = decision

    def statement(self, session: SessionInfo, statement: Statement):
        statement.decision = self.decision


def masking_session(*addons: Addon, **kw):
    masking = kw.pop("masking", None) or MaskingAddon()
    session, io = ready_session([*addons, masking], **kw)
    return session, io, masking


def query(session, io, sql: str, *messages) -> list:
    session.client_data(frontend(m.Query(sql)))
    io.server_got()
    session.server_data(backend(*messages))
    return io.client_got()


# ---- DataRow ---------------------------------------------------------------------------------

def test_simple_query_rows_are_masked_and_counted():
    session, io, _ = masking_session()
    rd = m.RowDescription((field("id", 23), field("pan"), field("note", 1043)))
    got = query(session, io, "SELECT id, pan, note FROM cards", rd,
                m.DataRow((b"1", PAN, b"fine")), m.DataRow((b"2", b"none", None)),
                m.DataRow((b"3", b"x", b"card " + AMEX)),
                m.CommandComplete("SELECT 3"), m.ReadyForQuery(b"I"))
    rows = [g.values for g in got if isinstance(g, m.DataRow)]
    assert rows == [(b"1", MASKED, b"fine"), (b"2", b"none", None), (b"3", b"x", b"card 378282*****0005")]
    assert session.info.masked_values == 2


def test_a_row_without_a_card_number_goes_through_byte_for_byte():
    session, io, _ = masking_session()
    reply = backend(m.RowDescription((field("a"), field("b"))), m.DataRow((b"1234567890123", b"x")),
                    m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"I"))
    session.client_data(frontend(m.Query("SELECT 1")))
    session.server_data(reply)
    assert bytes(io.to_client) == reply


def test_result_masked_counts_per_result():
    counted: list[int] = []

    class Counter(Addon):
        def result_complete(self, session, result, tag, error):
            counted.append(result.masked)

    session, io, _ = masking_session(Counter())
    query(session, io, "SELECT pan", m.RowDescription((field("pan"),)), m.DataRow((PAN + b" " + AMEX,)),
          m.DataRow((PAN,)), m.CommandComplete("SELECT 2"), m.ReadyForQuery(b"I"))
    assert counted == [3]


def test_extended_protocol_uses_the_statements_description_and_binds_formats():
    session, io, _ = masking_session()
    fields = (field("pan"), field("n", 20), field("amount", 1700), field("tags", 1009))
    session.client_data(frontend(m.Parse("s", "SELECT pan, n, amount, tags FROM cards", ()), m.Describe(b"S", "s"),
                                 m.Sync()))
    session.server_data(backend(m.ParseComplete(), m.ParameterDescription(()), m.RowDescription(fields),
                                m.ReadyForQuery(b"I")))
    io.client_got()
    # Execute without Describe: formats come from Bind (all binary).
    session.client_data(frontend(m.Bind("", "s", (), (), (1,)), m.Execute("", 0), m.Sync()))
    row = m.DataRow((PAN, struct.pack("!q", 42), numeric_bin("12.50"), array_bin(25, [b"a", PAN])))
    session.server_data(backend(m.BindComplete(), row, m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"I")))
    got = io.client_got()
    assert got[1].values == (MASKED, struct.pack("!q", 42), numeric_bin("12.50"), array_bin(25, [b"a", MASKED]))


@pytest.mark.parametrize("value,type_oid", [
    (struct.pack("!q", int(PAN)), 20), (numeric_bin(PAN.decode()), 1700),
    (array_bin(20, [struct.pack("!q", int(PAN))]), 1016),
])
def test_binary_numbers_holding_a_card_number_are_masked_as_numbers_and_the_session_lives(value, type_oid):
    session, io, _ = masking_session()
    session.client_data(frontend(m.Parse("", "SELECT n FROM t", ()), m.Bind("", "", (), (), (1,)),
                                 m.Describe(b"P", ""), m.Execute("", 0), m.Sync()))
    session.server_data(backend(m.ParseComplete(), m.BindComplete(), m.RowDescription((field("n", type_oid, 1),)),
                                m.DataRow((value,)), m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"I")))
    got = io.client_got()
    assert not [g for g in got if isinstance(g, m.ErrorResponse)] and not io.closed
    [row] = [g for g in got if isinstance(g, m.DataRow)]
    masked = value.replace(struct.pack("!q", int(PAN)), struct.pack("!q", int(NUM)))
    if type_oid == 1700:
        masked = numeric_bin(NUM.decode())
    assert row.values == (masked,) and masked != value
    assert session.info.masked_values == 1


def test_int8_text_holding_a_card_number_is_masked_as_a_number_and_cast_to_text_with_stars():
    session, io, _ = masking_session()
    got = query(session, io, "SELECT pan_number", m.RowDescription((field("pan_number", 20),)), m.DataRow((PAN,)))
    assert got[1].values == (NUM,)
    session, io, _ = masking_session()
    got = query(session, io, "SELECT pan_number::text", m.RowDescription((field("pan_number", 25),)), m.DataRow((PAN,)))
    assert got[1].values == (MASKED,)


def test_rows_of_a_never_described_statement_are_searched_by_format():
    session, io, _ = masking_session()
    session.client_data(frontend(m.Parse("s", "SELECT a, b FROM t", ()), m.Sync()))
    session.server_data(backend(m.ParseComplete(), m.ReadyForQuery(b"I")))
    io.client_got()
    session.client_data(frontend(m.Bind("", "s", (), (), (0, 1)), m.Execute("", 0), m.Sync()))
    session.server_data(backend(m.BindComplete(), m.DataRow((PAN, b"x")), m.CommandComplete("SELECT 1"),
                                m.ReadyForQuery(b"I")))
    assert io.client_got()[1].values == (NUM, b"x")  # text of unknown type: a bare number stays one
    session.client_data(frontend(m.Bind("", "s", (), (), (0, 1)), m.Execute("", 0), m.Sync()))
    session.server_data(backend(m.BindComplete(), m.DataRow((b"a", struct.pack("!q", int(PAN))))))
    assert io.client_got()[-1].values == (b"a", struct.pack("!q", int(NUM)))  # 8 bytes: read as an int8


# ---- policy column masks -----------------------------------------------------------------------

def test_catalog_named_columns_get_their_policy_mask():
    catalog = DictCatalog({(CARDS_OID, 2): "public.cards.pan", (CARDS_OID, 3): "public.cards.cvv",
                           (CARDS_OID, 4): "public.cards.holder", (CARDS_OID, 5): "public.cards.secret"})
    dec = decision(ColumnMask("public.cards.pan", MaskMethod.LAST4), ColumnMask("public.cards.cvv", MaskMethod.NULL),
                   ColumnMask("public.cards.holder", MaskMethod.FULL),
                   ColumnMask("public.cards.secret", MaskMethod.PAN),
                   columns=("cards.pan", "cards.cvv", "cards.holder", "cards.secret"))
    session, io, _ = masking_session(Decides(dec), masking=MaskingAddon(catalog=catalog))
    rd = m.RowDescription((field("id", 23, table=CARDS_OID, attnum=1), field("card", table=CARDS_OID, attnum=2),
                           field("cvv", table=CARDS_OID, attnum=3), field("holder", table=CARDS_OID, attnum=4),
                           field("secret", table=CARDS_OID, attnum=5)))
    got = query(session, io, "SELECT id, pan AS card, cvv, holder, secret FROM cards", rd,
                m.DataRow((b"1", PAN, b"123", "Zoë Z".encode(), b"k-12345678901234")),
                m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"I"))
    assert got[1].values == (b"1", b"************1111", None, b"******", b"k-123456****1234")
    assert catalog.calls[0] == ("payments", "payments", CARDS_OID, 1)
    assert session.info.masked_values == 4


def test_computed_columns_of_a_statement_touching_a_masked_column_are_masked_too():
    dec = decision(ColumnMask("public.cards.pan", MaskMethod.FULL), columns=("cards.pan",))
    session, io, _ = masking_session(Decides(dec), masking=MaskingAddon(catalog=DictCatalog({})))
    rd = m.RowDescription((field("upper"), field("n", 20)))
    got = query(session, io, "SELECT upper(pan), length(pan)::int8 FROM cards", rd,
                m.DataRow((b"4111 1111", b"16")), m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"I"))
    assert got[1].values == (b"*********", None)  # an int8 can't show stars: NULL


def test_a_column_mask_without_a_catalog_or_with_one_not_loaded_fails_closed():
    dec = decision(ColumnMask("public.cards.pan", MaskMethod.FULL))
    rd = m.RowDescription((field("pan", table=CARDS_OID, attnum=2),))
    unloaded = PgColumnCatalog([make_target()])
    unloaded.set_columns(["public.cards.pan"])  # and never looked up: it raises
    for masking in (MaskingAddon(), MaskingAddon(catalog=unloaded)):
        session, io, _ = masking_session(Decides(dec), masking=masking)
        got = query(session, io, "SELECT pan FROM cards", rd, m.DataRow((PAN,)))
        assert got[-1].severity == "FATAL" and io.closed
        assert all(PAN not in bytes(g.encode()) for g in got)


def test_the_real_catalog_against_a_real_server(postgres):
    """appliance.masking.catalog.PgColumnCatalog reads pg_attribute; its answers drive the plan."""
    import asyncio

    from psycopg import pq

    conn = postgres.connect()
    conn.execute("DROP TABLE IF EXISTS public.cards_cat")
    conn.execute("CREATE TABLE public.cards_cat (id int, pan text, note text)")
    conn.execute("INSERT INTO public.cards_cat VALUES (1, '4111111111111111', 'card 5500000000000004')")
    res = conn.pgconn.exec_params(b"SELECT id, pan AS card, note FROM public.cards_cat", [], result_format=0)
    assert res.status == pq.ExecStatus.TUPLES_OK
    fields = tuple(field(res.fname(i).decode(), res.ftype(i), 0, res.ftable(i), res.ftablecol(i)) for i in range(3))
    row = tuple(res.get_value(0, i) for i in range(3))
    conn.close()
    target = Target("payments", (Endpoint.parse(f"127.0.0.1:{postgres.port}"),), {"app": Credential("postgres", "")},
                    tls="disable")
    catalog = PgColumnCatalog([target])
    catalog.set_columns(["public.cards_cat.pan"])

    async def load() -> None:
        waiting = catalog.ready(target.name, "postgres")
        assert waiting is not None
        await asyncio.wait_for(waiting, 60)  # a safety net against a hang, not a bound
    asyncio.run(load())
    dec = decision(ColumnMask("public.cards_cat.pan", MaskMethod.LAST4), columns=("pan",), relations=("cards_cat",))
    session, io, _ = masking_session(Decides(dec), masking=MaskingAddon(catalog=catalog), target=target)
    session.info.database = "postgres"
    got = query(session, io, "SELECT id, pan AS card, note FROM public.cards_cat", m.RowDescription(fields),
                m.DataRow(row), m.CommandComplete("SELECT 1"), m.ReadyForQuery(b"I"))
    assert got[1].values == (b"1", b"************1111", b"card 550000******0004")


def test_touches_matches_the_ways_a_statement_names_a_column():
    assert touches("cards.pan", "public.cards.pan") and touches("public.cards.pan", "public.cards.pan")
    assert touches("?.pan", "public.cards.pan") and touches("pan", "public.cards.pan")
    assert touches("cards.*", "public.cards.pan") and touches("CARDS.PAN", "public.cards.pan")
    assert not touches("other.cards.pan", "public.cards.pan") and not touches("cards.cvv", "public.cards.pan")
    assert not touches("orders.pan", "public.cards.pan")


# ---- streamed DataRows ---------------------------------------------------------------------------

def stream_reply(rd: m.RowDescription, *rows: m.DataRow) -> bytes:
    return backend(rd, *rows, m.CommandComplete(f"SELECT {len(rows)}"), m.ReadyForQuery(b"I"))


def run_split(reply: bytes, step: int, threshold: int = 4096, *addons: Addon):
    session, io, _masking = masking_session(*addons, stream_threshold=threshold)
    session.client_data(frontend(m.Query("SELECT big")))
    io.server_got()
    for i in range(0, len(reply), step):
        session.server_data(reply[i:i + step])
    return session, io


def test_large_rows_are_masked_in_windows_like_whole_rows():
    big = b"x" * 3000 + PAN + b" " + b"y" * 2000 + b"4111 1111 1111 1111" + b"z" * 3000
    rd = m.RowDescription((field("id", 23), field("doc"), field("n", 20, 1), field("j", 3802, 1)))
    row = m.DataRow((b"7", big, struct.pack("!q", 5), b'\x01{"p": ' + PAN + b', "t": "' + b"w" * 5000 + b'"}'))
    reply = stream_reply(rd, row)
    session, io, _ = masking_session()
    session.client_data(frontend(m.Query("SELECT big")))
    session.server_data(reply)
    whole = io.client_got()
    for step in (1, 7, 100, 333, 4096, 5000):
        _s, io2 = run_split(reply, step)
        assert io2.client_got() == whole, step
    assert whole[1].values[1].count(MASKED) == 1 and b"4111 11** **** 1111" in whole[1].values[1]
    assert b'"p": ' + NUM + b"," in whole[1].values[3]


def test_a_large_row_with_a_card_number_in_a_bigint_is_masked_in_windows():
    rd = m.RowDescription((field("doc"), field("n", 20, 1)))
    reply = stream_reply(rd, m.DataRow((b"a" * 10_000, struct.pack("!q", int(PAN)))))
    _session, io = run_split(reply, 1000)
    assert not io.closed and struct.pack("!q", int(PAN)) not in io.to_client
    [row] = [g for g in io.client_got() if isinstance(g, m.DataRow)]
    assert row.values == (b"a" * 10_000, struct.pack("!q", int(NUM)))


def test_a_large_row_with_a_numeric_whose_mask_changes_length_is_cut_not_garbled():
    # Last four 0000 and hidden digits that are not: the masked numeric drops a group the
    # original had, and the row's length went out in its first window.
    from appliance.pan.detector import is_pan_digits

    pan = next(f"411111{n:02d}12340000" for n in range(100) if is_pan_digits(f"411111{n:02d}12340000"))
    rd = m.RowDescription((field("doc"), field("n", 1700, 1)))
    reply = stream_reply(rd, m.DataRow((b"a" * 10_000, numeric_bin(pan))))
    _session, io = run_split(reply, 1000)
    assert io.closed and numeric_bin(pan) not in io.to_client


def test_a_null_column_mask_in_a_large_row_cuts_the_connection():
    catalog = DictCatalog({(CARDS_OID, 1): "public.cards.pan"})
    dec = decision(ColumnMask("public.cards.pan", MaskMethod.NULL))
    session, io, _ = masking_session(Decides(dec), masking=MaskingAddon(catalog=catalog), stream_threshold=4096)
    session.client_data(frontend(m.Query("SELECT pan, doc FROM cards")))
    reply = stream_reply(m.RowDescription((field("pan", table=CARDS_OID, attnum=1), field("doc"))),
                         m.DataRow((PAN, b"d" * 9000)))
    for i in range(0, len(reply), 1500):
        session.server_data(reply[i:i + 1500])
    assert io.closed and PAN not in io.to_client


def test_a_full_column_mask_in_a_large_row_is_applied_in_windows():
    catalog = DictCatalog({(CARDS_OID, 1): "public.cards.pan"})
    dec = decision(ColumnMask("public.cards.pan", MaskMethod.FULL))
    session, io, _ = masking_session(Decides(dec), masking=MaskingAddon(catalog=catalog), stream_threshold=4096)
    session.client_data(frontend(m.Query("SELECT pan FROM cards")))
    reply = stream_reply(m.RowDescription((field("pan", table=CARDS_OID, attnum=1),
                                           field("doc", table=CARDS_OID, attnum=2))),
                         m.DataRow((PAN + b"-" * 9000, b"tail " + AMEX)))
    for i in range(0, len(reply), 1500):
        session.server_data(reply[i:i + 1500])
    got = io.client_got()
    assert got[1].values == (b"*" * 9016, b"tail 378282*****0005")


# ---- COPY, function results, notices, notifications -------------------------------------------

def test_copy_out_text_and_binary_through_the_session():
    session, io, _ = masking_session()
    got = query(session, io, "COPY cards TO STDOUT", m.CopyOutResponse(0, (0, 0)),
                m.CopyData(b"1\t" + PAN + b"\n"), m.CopyData(b"2\t" + AMEX + b"\n"), m.CopyDone(),
                m.CommandComplete("COPY 2"), m.ReadyForQuery(b"I"))
    # COPY says nothing of types: a bare number is masked as a number, so it loads back
    assert [g.data for g in got if isinstance(g, m.CopyData)] == [b"1\t" + NUM + b"\n", b"2\t378282000000005\n"]
    data = binary_copy([[b"a", PAN]])
    got = query(session, io, "COPY cards TO STDOUT (FORMAT binary)", m.CopyOutResponse(1, (1, 1)),
                m.CopyData(data[:25]), m.CopyData(data[25:]), m.CopyDone(), m.CommandComplete("COPY 1"),
                m.ReadyForQuery(b"I"))
    assert b"".join(g.data for g in got if isinstance(g, m.CopyData)) == binary_copy([[b"a", NUM]])
    assert session.info.masked_values == 3


def test_copy_in_data_from_the_client_is_not_touched():
    session, io, _ = masking_session()
    session.client_data(frontend(m.Query("COPY cards FROM STDIN")))
    session.server_data(backend(m.CopyInResponse(0, (0,))))
    session.client_data(frontend(m.CopyData(b"1\t" + PAN + b"\n"), m.CopyDone()))
    assert next(g for g in io.server_got() if isinstance(g, m.CopyData)).data == b"1\t" + PAN + b"\n"


def test_copy_of_a_table_with_a_masked_column_fails_closed():
    dec = decision(ColumnMask("public.cards.cvv", MaskMethod.NULL), columns=(), relations=("cards",),
                   classes=(StatementClass.COPY_OUT,))
    session, io, _ = masking_session(Decides(dec), masking=MaskingAddon(catalog=DictCatalog({})))
    got = query(session, io, "COPY cards TO STDOUT", m.CopyOutResponse(0, (0,)), m.CopyData(b"1\t123\n"))
    assert got[-1].severity == "FATAL" and "COPY" in got[-1].message


def test_large_copydata_is_masked_in_windows():
    rows = b"".join(b"%d\tcard %s x\n" % (i, PAN) for i in range(600))
    reply = backend(m.CopyOutResponse(0, (0, 0)), m.CopyData(rows), m.CopyDone(), m.CommandComplete("COPY 600"),
                    m.ReadyForQuery(b"I"))
    session, io = run_split(reply, 777)
    [data] = [g.data for g in io.client_got() if isinstance(g, m.CopyData)]
    assert data == rows.replace(PAN, MASKED) and session.info.masked_values == 600


def test_function_call_results_are_masked():
    session, io, _ = masking_session()
    session.client_data(frontend(m.FunctionCall(1234, (), (), 0)))
    session.server_data(backend(m.FunctionCallResponse(b"lo data " + PAN), m.ReadyForQuery(b"I")))
    assert io.client_got()[0].value == b"lo data " + MASKED


def test_unique_violation_detail_and_notices_are_masked():
    session, io, _ = masking_session()
    error = m.ErrorResponse.build("ERROR", "23505", 'duplicate key value violates unique constraint "cards_pan_key"',
                                  detail=f"Key (pan)=({PAN.decode()}) already exists.")
    got = query(session, io, "INSERT INTO cards VALUES ('4111111111111111')", error, m.ReadyForQuery(b"I"))
    assert got[0].get("D") == "Key (pan)=(411111******1111) already exists." and got[0].sqlstate == "23505"
    session.server_data(backend(m.NoticeResponse((("S", "NOTICE"), ("V", "NOTICE"), ("C", "00000"),
                                                  ("M", f"card {AMEX.decode()}")))))
    assert io.client_got()[0].message == "card 378282*****0005"


def test_notifications_channel_and_payload_are_masked():
    session, io, _ = masking_session()
    # A process ID whose bytes are digits must not glue onto the channel's digits.
    session.server_data(backend(m.NotificationResponse(0x31313131, PAN.decode(), f"paid {PAN.decode()}")))
    [note] = io.client_got()
    assert note.channel == MASKED.decode() and note.payload == "paid 411111******1111"
    assert note.process_id == 0x31313131


def test_everything_sent_to_the_client_is_free_of_card_numbers():
    session, io, _ = masking_session()
    query(session, io, "SELECT *", m.RowDescription((field("a"), field("b", 17), field("c", 3802))),
          m.DataRow((PAN, b"\\x" + PAN.hex().encode(), b'{"a": [' + PAN + b"]}")),
          m.NoticeResponse((("S", "NOTICE"), ("M", PAN.decode()))), m.CommandComplete("SELECT 1"),
          m.ReadyForQuery(b"I"))
    sent = bytes(io.to_client)
    assert find_pans(sent) == [] and PAN.hex().encode() not in sent


def test_session_end_forgets_the_state():
    session, io, _ = masking_session()
    query(session, io, "SELECT 1", m.RowDescription((field("a"),)), m.DataRow((PAN,)))
    assert "masking" in session.info.addon_state
    session.client_closed()
    assert "masking" not in session.info.addon_state


def test_row_description_hook_caches_one_plan_per_description():
    addon = MaskingAddon()
    info = SessionInfo(client=None, destination=None)  # type: ignore[arg-type]
    rd = m.RowDescription((field("a"),))
    statement = Statement.__new__(Statement)
    first, second = Result(None, rd), Result(None, rd)
    addon.row_description(info, first)
    plan = info.addon_state["masking"].plan
    addon.row_description(info, second)
    assert info.addon_state["masking"].plan is plan and statement is not None


@pytest.mark.parametrize("fmt", ["pci", "last4"])
def test_rows_of_text_columns_take_the_short_path_and_mask_as_the_general_one(fmt):
    from appliance.masking.addon import _state
    from appliance.pan.detector import luhn_complete
    from tests.masking.corpus import every_brand_and_length

    addon = MaskingAddon(fmt)
    info = SessionInfo(client=Endpoint.parse("127.0.0.1:1"), destination=Endpoint.parse("127.0.0.1:2"))
    result = Result(statement=None, row_description=m.RowDescription(
        (field("id", 23), field("pan"), field("note", 1043), field("b", 17, 1))))
    addon.row_description(info, result)
    plan = _state(info).plan
    assert plan.texts_only
    pans = [pan.encode() for _brand, pan in every_brand_and_length()]
    values = [*pans, *(p[:-1] + b"0" if p[-1:] != b"0" else p[:-1] + b"1" for p in pans),  # Luhn off
              luhn_complete("41111111111111").encode(), b"0" + PAN[1:], b"x" + PAN, PAN + b" ", b"1" * 19,
              b"card " + PAN + b" and " + AMEX, b"4111-1111-1111-1111", b"1234567890123", None, b""]
    counted = 0
    for value in values:
        for other in (b"short", b"note " + AMEX, None):
            message = memoryview(m.DataRow((b"12", value, other, value)).encode())
            general, count = addon._mask_row(result, plan, message, True)
            assert addon.data_row(info, result, message) == general, (value, other)
            counted += count
    assert info.masked_values == counted > 0
