"""Issue 12's side channels, through whole sessions (playbooks): ParameterStatus (in the
session and during login), RowDescription field names (results, Describe answers, cached
descriptions), every ErrorResponse/NoticeResponse field, notifications — and the wider
shapes the side-channel search masks, with the controls it must leave alone."""

from __future__ import annotations

import re

import pytest

from appliance.masking.addon import MaskingAddon
from appliance.pan.detector import find_pans
from appliance.pan.sidechannel import mask_side, scrub_side
from appliance.pgwire import messages as m
from appliance.proxy.hooks import Addon, Result, SessionInfo
from tests.proxy.playbook import (
    Capture,
    ClientData,
    ClientGets,
    Close,
    Fatal,
    OpenUpstream,
    ServerData,
    ServerGets,
    UpstreamConnected,
    playbook,
    ready_playbook,
)
from tests.proxy.trace import UPSTREAM_KEY, startup

PAN = "4767493653687"  # the issue's column name: a 13-digit Visa
MASKED = "476749***3687"
VISA = "4111111111111111"
VISA_MASKED = "411111******1111"
FULLWIDTH = "".join(chr(0xFF10 + int(c)) for c in VISA)


def field(name: str) -> m.FieldDescription:
    return m.FieldDescription(name, 0, 0, 23, 4, -1, 0)


def no_pan(message: m.Message) -> bool:
    data = message.encode()
    return find_pans(data) == [] and mask_side(data)[1] == 0


class Sees(Addon):
    """Records the description every later addon (audit, policy) is shown."""

    name = "sees"
    after = ("masking",)

    def __init__(self) -> None:
        self.names: list[list[str]] = []

    def row_description(self, session: SessionInfo, result: Result) -> None:
        assert result.row_description is not None
        self.names.append([f.name for f in result.row_description.fields])


# ---- ParameterStatus --------------------------------------------------------------------------

def test_set_config_value_is_masked_in_parameter_status_and_the_sessions_parameters():
    pb = ready_playbook([MaskingAddon()])
    sql = "select set_config('application_name', pan, false) from cards where id=1"
    assert (pb
            >> ClientData(m.Query(sql))
            << ServerGets(m.Query(sql))
            >> ServerData(m.ParameterStatus("application_name", VISA), m.CommandComplete("SELECT 1"),
                          m.ReadyForQuery(b"I"))
            << ClientGets(m.ParameterStatus("application_name", VISA_MASKED), m.CommandComplete("SELECT 1"),
                          m.ReadyForQuery(b"I")))
    assert pb.session.info.parameters["application_name"] == VISA_MASKED


@pytest.mark.parametrize("value, shown", [
    ("4111.1111.1111.1111", "4111.11**.****.1111"),
    (FULLWIDTH, FULLWIDTH[:6] + "******" + FULLWIDTH[-4:]),
    ("0000" + VISA, "0000" + VISA_MASKED),
])
def test_parameter_status_wider_shapes_and_the_name_are_masked(value, shown):
    pb = ready_playbook([MaskingAddon()])
    assert (pb
            >> ServerData(m.ParameterStatus(f"x.{VISA}", value))
            << ClientGets(m.ParameterStatus(f"x.{VISA_MASKED}", shown)))


def test_parameter_status_during_login_goes_through_the_same_hook():
    pb = playbook([MaskingAddon()])
    assert (pb
            >> ClientData(startup(application_name=VISA))
            << OpenUpstream("payments", "198.18.2.10:5432")
            >> UpstreamConnected()
            << ServerGets(m.StartupMessage(196608, {"user": "app_rw", "database": "payments",
                                                    "application_name": VISA}))
            >> ServerData(m.AuthenticationMD5Password(b"salt"))
            << ServerGets(Capture(m.PasswordMessage))
            >> ServerData(m.AuthenticationOk(), m.ParameterStatus("application_name", VISA),
                          m.NoticeResponse((("S", "NOTICE"), ("C", "00000"), ("M", "hello"), ("H", VISA))),
                          m.BackendKeyData(*UPSTREAM_KEY), m.ReadyForQuery(b"I"))
            << ClientGets(m.AuthenticationOk(), m.ParameterStatus("application_name", VISA_MASKED),
                          m.NoticeResponse((("S", "NOTICE"), ("C", "00000"), ("M", "hello"), ("H", VISA_MASKED))),
                          Capture(m.BackendKeyData), m.ReadyForQuery(b"I")))
    assert pb.session.info.parameters["application_name"] == VISA_MASKED


class Breaks(Addon):
    name = "breaks"

    def parameter_status(self, session: SessionInfo, message: memoryview) -> bytes | None:
        if b"application_name" in bytes(message):
            raise RuntimeError("boom")
        return None


def test_a_failing_parameter_status_hook_fails_closed():
    pb = ready_playbook([Breaks()])
    assert (pb
            >> ServerData(m.ParameterStatus("application_name", VISA))
            << ClientGets(Fatal("XX000"))
            << Close())


def test_an_ordinary_parameter_status_goes_through_as_it_came():
    pb = ready_playbook([MaskingAddon()])
    status = m.ParameterStatus("TimeZone", "Etc/UTC")
    assert pb >> ServerData(status) << ClientGets(status)
    assert pb.session.info.parameters["TimeZone"] == "Etc/UTC"


# ---- RowDescription field names ---------------------------------------------------------------

def test_a_card_number_as_column_name_is_masked_for_the_agent_and_every_later_addon():
    sees = Sees()
    pb = ready_playbook([MaskingAddon(), sees])
    sql = f'select 1 as "{PAN}", 2 as "{FULLWIDTH}", 3 as "id"'
    described = m.RowDescription((field(PAN), field(FULLWIDTH), field("id")))
    shown = m.RowDescription((field(MASKED), field(FULLWIDTH[:6] + "******" + FULLWIDTH[-4:]), field("id")))
    assert (pb
            >> ClientData(m.Query(sql))
            << ServerGets(m.Query(sql))
            >> ServerData(described, m.DataRow((b"1", b"2", b"3")), m.CommandComplete("SELECT 1"),
                          m.ReadyForQuery(b"I"))
            << ClientGets(shown, m.DataRow((b"1", b"2", b"3")), m.CommandComplete("SELECT 1"),
                          m.ReadyForQuery(b"I")))
    assert sees.names == [[MASKED, FULLWIDTH[:6] + "******" + FULLWIDTH[-4:], "id"]]
    # The same description again (cached by its bytes): masked again, not served raw.
    assert (pb
            >> ClientData(m.Query(sql))
            << ServerGets(m.Query(sql))
            >> ServerData(described, m.CommandComplete("SELECT 0"), m.ReadyForQuery(b"I"))
            << ClientGets(shown, m.CommandComplete("SELECT 0"), m.ReadyForQuery(b"I")))


def test_descriptions_answering_describe_statement_and_portal_are_masked():
    pb = ready_playbook([MaskingAddon()])
    sql = f'select 1 as "{PAN}"'
    request = (m.Parse("s", sql, ()), m.Describe(b"S", "s"), m.Bind("p", "s", (), (), ()), m.Describe(b"P", "p"),
               m.Sync())
    assert (pb
            >> ClientData(*request)
            << ServerGets(*request)
            >> ServerData(m.ParseComplete(), m.ParameterDescription(()), m.RowDescription((field(PAN),)),
                          m.BindComplete(), m.RowDescription((field(PAN),)), m.ReadyForQuery(b"I"))
            << ClientGets(m.ParseComplete(), m.ParameterDescription(()), m.RowDescription((field(MASKED),)),
                          m.BindComplete(), m.RowDescription((field(MASKED),)), m.ReadyForQuery(b"I")))
    requests = pb.session.requests
    # Kept for the statement's later Executes (the portal's is gone with the Sync).
    assert requests.statements["s"].row_description.fields[0].name == MASKED


def test_column_names_without_a_card_number_keep_their_bytes():
    pb = ready_playbook([MaskingAddon()])
    # Type OIDs and modifiers whose bytes are digits are not part of any name.
    rd = m.RowDescription((m.FieldDescription("created_at 2026-12-07 19:31:58", 0x31313131, 0x3131, 0x31313131,
                                              0x3131, 0x31313131, 0),
                           field("1733600000000"), field("550e8400-e29b-41d4-a716-446655440000")))
    assert pb >> ClientData(m.Query("select")) << ServerGets(m.Query("select")) >> ServerData(rd) << ClientGets(rd)


# ---- errors, notices, notifications ---------------------------------------------------------

ALL_FIELDS = "SVCMDHPpqWstcdnFLR"


def test_every_error_and_notice_field_is_masked():
    pb = ready_playbook([MaskingAddon()])
    forms = [VISA, "4111.1111.1111.1111", FULLWIDTH, "\\u0034\\u0031" + "\\u0031" * 14]
    fields = tuple((code, f"{code} {forms[i % len(forms)]}") for i, code in enumerate(ALL_FIELDS))
    notice = m.NoticeResponse(fields)
    error = m.ErrorResponse(fields)
    got_notice, got_error = Capture(m.NoticeResponse), Capture(m.ErrorResponse)
    assert (pb
            >> ClientData(m.Query("do $$ begin raise notice '%', 1; end $$"))
            << ServerGets(m.Query("do $$ begin raise notice '%', 1; end $$"))
            >> ServerData(notice, error, m.ReadyForQuery(b"I"))
            << ClientGets(got_notice, got_error, m.ReadyForQuery(b"I")))
    for got in (got_notice.value, got_error.value):
        assert [code for code, _ in got.fields] == list(ALL_FIELDS)
        assert no_pan(got), got.fields
        assert all("******" in value or "\\u0031\\u0031\\u0031\\u0031" not in value for _, value in got.fields)


def test_notification_channel_and_payload_in_wider_shapes_are_masked():
    pb = ready_playbook([MaskingAddon()])
    got = Capture(m.NotificationResponse)
    assert (pb
            >> ServerData(m.NotificationResponse(0x34313131, "4111_1111_1111_1111", f"{{\"p\": \"{FULLWIDTH}\"}}"))
            << ClientGets(got))
    assert got.value.channel == "4111_11**_****_1111" and got.value.process_id == 0x34313131
    assert no_pan(got.value)


# ---- the detector's wider shapes, and its controls ------------------------------------------

@pytest.mark.parametrize("text", [
    VISA, "4111.1111.1111.1111", "4111_1111_1111_1111", "4111/1111/1111/1111", "4111\t1111\t1111\t1111",
    "4111  1111  1111  1111", "4,111,111,111,111,111", "0000" + VISA, VISA + VISA, "9999" + VISA,
    FULLWIDTH, "".join(f"\\u{ord(c):04x}" for c in VISA), "pan=" + "".join(f"\\u{ord(c):04x}" for c in PAN),
    "".join(chr(0x0660 + int(c)) for c in VISA),  # Arabic-Indic digits
])
def test_wider_shapes_are_masked_to_bin_and_last_four(text):
    out = scrub_side(text)
    assert out != text and "***" in out
    recovered = decoded(out)
    assert VISA not in recovered and PAN not in recovered and VISA[6:12] not in recovered, (out, recovered)
    assert scrub_side(out) == out  # nothing left to find


def decoded(text: str) -> str:
    """The digits an agent reads back: escapes decoded, Unicode digits as ASCII, separators gone."""
    text = re.sub(r"\\u003([0-9])", r"\1", text)
    return "".join(str(int(c)) if c.isdigit() else c for c in text if c.isdigit() or c == "*")


@pytest.mark.parametrize("text", [
    "2026-12-07 19:31:58.123456+00", "2026-12-07T19:31:58Z", "1733600000000", "1733600000000123",
    "1733600000000123456", "550e8400-e29b-41d4-a716-446655440000", "12345678-1234-1234-1234-123456789012",
    "DE89370400440532013000", "DE89 3704 0044 0532 0130 00", "GB82WEST12345698765432", "978-3-16-148410-0",
    "9780306406157", "1234567890123", "12345678901234567890123", "192.168.100.200", "1,2,3,4,5,6,7,8,9,10,11,12,13",
    "1,234,567,890,123", "order 1234567 line 89", "3.14159265358979323846", "79927398713",  # non-issuer Luhn
    "12345678903", "4.111111111111111e+15", "4111111111111111.25", "0.4111111111111111", "4111111111111111e3",
    "amount 5555555555554444.00 EUR",
])
def test_controls_are_left_alone(text):
    assert scrub_side(text) == text
    assert mask_side(text.encode()) == (None, 0)


def test_non_issuer_luhn_numbers_are_left_alone():
    # Luhn-valid, 16 digits, no issuer starts with 0 or 9 (here): not a card number.
    for number in ("0000000000000000", "9000000000000003"):
        assert scrub_side(number.replace("", " ").strip().replace(" ", ".")) == number.replace("", " ").strip().replace(
            " ", ".")
