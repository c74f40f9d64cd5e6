"""Masking in the client encodings Tollgate reads (issue 14).

Card numbers are searched for in the bytes sent to the agent, not in decoded text. That is
exact where no character's later bytes are ASCII digits or separators: the digit runs of
the bytes are then those of the text, and a masked digit is an ASCII byte replaced by
another. These tests check that property over every character of each encoding (and that
a card number next to any character with an ASCII later byte is still found), show why
GB18030 and JOHAB — where it doesn't hold — are refused as session encodings, and that a
``last4`` column mask keeps whole characters of the session's encoding.
"""

from __future__ import annotations

import pytest

from appliance.masking import values as v
from appliance.model.decision import MaskMethod
from appliance.pan.detector import PCI
from appliance.pan.scanner import mask_text
from appliance.pgwire.encodings import VERIFIED, client_encoding
from appliance.policy.pins import session_problem

PAN = b"4111111111111111"
MULTIBYTE = ["EUC_JP", "EUC_JIS_2004", "EUC_CN", "EUC_KR", "SJIS", "BIG5", "GBK", "UHC"]


def _characters_with_ascii_inside(name: str) -> dict[bytes, set[int]]:
    """Every valid two-byte character of ``name`` (three-byte behind 0x8F for EUC) whose
    later bytes hold an ASCII byte → those bytes."""
    encoding = client_encoding(name)
    assert encoding is not None
    found: dict[bytes, set[int]] = {}
    candidates = [bytes([a, b]) for a in range(0x80, 0x100) for b in range(0x100)]
    if name.startswith("EUC_J"):
        candidates += [bytes([0x8F, b, c]) for b in range(0x80, 0x100) for c in range(0x100)]
    for data in candidates:
        try:
            text = encoding.decode(data)
        except UnicodeDecodeError:
            continue
        if len(text) == 1 and any(byte < 0x80 for byte in data[1:]):
            found[data] = {byte for byte in data[1:] if byte < 0x80}
    return found


@pytest.mark.parametrize("name", MULTIBYTE)
def test_no_later_byte_of_a_character_is_a_digit_or_a_separator(name: str) -> None:
    inside = set().union(*_characters_with_ascii_inside(name).values())
    assert not inside & set(b"0123456789 -.+,"), sorted(chr(b) for b in inside & set(b"0123456789 -.+,"))


@pytest.mark.parametrize("name", MULTIBYTE)
def test_a_card_number_next_to_any_such_character_is_masked(name: str) -> None:
    for character in _characters_with_ascii_inside(name):
        for value in (character + PAN, PAN + character, character + b"-" + PAN, character + b" " + PAN + character):
            masked, count = mask_text(value, PCI)
            assert count == 1 and masked is not None and PAN not in masked, (name, value)
            encoding = client_encoding(name)
            assert encoding is not None
            assert encoding.decode(masked).count("411111******1111") == 1  # still text in the encoding


@pytest.mark.parametrize("name, character", [("GB18030", b"\x81\x30\x81\x39"), ("JOHAB", b"\xd9\x37")])
def test_where_a_later_byte_can_be_a_digit_a_card_number_hides_and_the_session_is_refused(
        name: str, character: bytes) -> None:
    encoding = client_encoding(name)
    assert encoding is not None
    value = character + PAN
    assert encoding.decode(value).endswith(PAN.decode())  # the text holds a card number …
    assert mask_text(value, PCI) == (None, 0)  # … which the bytes' 17-digit run hides
    assert encoding.digits_inside_characters
    problem = session_problem({"client_encoding": name}, encoding)
    assert problem is not None and "card numbers" in problem


def test_only_those_two_encodings_have_digits_inside_characters() -> None:
    assert {name for name in VERIFIED if client_encoding(name).digits_inside_characters} == {"GB18030", "JOHAB"}  # type: ignore[union-attr]


@pytest.mark.parametrize("name, text", [
    ("SJIS", "カード番号ソ表"), ("EUC_JP", "カード番号ソ表"), ("BIG5", "信用卡號碼十"), ("UHC", "카드 번호입니다"),
    ("LATIN9", "carte € café"), ("GBK", "信用卡号码是"),
])
def test_last4_keeps_whole_characters_of_the_session_encoding(name: str, text: str) -> None:
    encoding = client_encoding(name)
    assert encoding is not None
    value = encoding.encode(text)
    masked = v.column_mask(value, v.TEXT, MaskMethod.LAST4, encoding.codec)
    assert masked is not None
    shown = encoding.decode(masked)
    assert shown.endswith(text[-4:]) and set(shown[:-4]) == {"*"}


def test_last4_of_bytes_that_arent_text_in_the_encoding_shows_nothing() -> None:
    assert v.column_mask(b"abc\x83", v.TEXT, MaskMethod.LAST4, "cp932") == b"****"
