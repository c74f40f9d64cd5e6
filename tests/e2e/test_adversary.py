"""The recoverer of tests/e2e/test_adversarial.py on its own (no lab): it finds each
encoding the corpus uses, and does not call a masked card number, or a control, a leak."""

from __future__ import annotations

import base64
import hashlib

import pytest

from appliance.lab.pans import make_test_pans
from tests.e2e.adversary import recover

PANS = {i: str(p) for i, p in enumerate(make_test_pans(20240601, 300), 1)}
CARD = next(i for i, p in PANS.items() if len(p) == 16)
PAN = PANS[CARD]


def spaced(p: str, sep: str) -> str:
    return sep.join(p[i:i + 4] for i in range(0, len(p), 4))


LEAKS = {
    "clear": [PAN],
    "reversed": [PAN[::-1]],
    "pieces in two columns": [PAN[:8], PAN[8:]],
    "pieces in rows": [PAN[i:i + 4] for i in range(0, 16, 4)],
    "dots": [spaced(PAN, ".")],
    "a star between groups": [spaced(PAN, "*")],
    "base64": [base64.b64encode(PAN.encode()).decode()],
    "hex": [PAN.encode().hex()],
    "to_hex": [format(int(PAN), "x")],
    "bits": [format(int(PAN), "064b")],
    "ascii codes": ["{" + ",".join(str(ord(c)) for c in PAN) + "}"],
    "letters": [PAN.translate(str.maketrans("0123456789", "abcdefghij"))],
    "fullwidth": ["".join(chr(0xFF10 + int(c)) for c in PAN)],
    "json escapes": ["".join(f"\\u003{c}" for c in PAN)],
    "plus one": [str(int(PAN) + 1)],
    "times two": [str(int(PAN) * 2)],
    "divided by ten": [str(int(PAN) // 10)],
    "md5": [hashlib.md5(PAN.encode()).hexdigest()],
    "sha256 in base64": [base64.b64encode(hashlib.sha256(PAN.encode()).digest()).decode()],
    "the hidden digits alone, with neighbours": [PAN[5:12]],
}


@pytest.mark.parametrize("name", list(LEAKS))
def test_each_encoding_is_recovered(name: str):
    assert recover(LEAKS[name], PANS, [CARD]), name


NOT_LEAKS = {
    "star mask": [PAN[:6] + "*" * 6 + PAN[-4:]],
    "number mask": [PAN[:6] + "000000" + PAN[-4:], PAN[:6] + "000001" + PAN[-4:]],
    "grouped star mask": [PAN[:4] + " " + PAN[4:6] + "** **** " + PAN[-4:]],
    "BIN and last four in two columns": [PAN[:6], PAN[-4:]],
    "controls": ["1700000000000", "2024-01-15 10:00:00+00", "41111111-1111-1111-1111-111111111111",
                 "GB82WEST12345698765432", "9780306406157", "SELECT 1"],
}


@pytest.mark.parametrize("name", list(NOT_LEAKS))
def test_masked_forms_and_controls_are_not_leaks(name: str):
    assert not recover(NOT_LEAKS[name], PANS, [CARD]), name


def test_every_card_masked_in_one_aggregate_is_not_a_leak():
    masked = "|".join(p[:6] + "*" * (len(p) - 10) + p[-4:] for p in PANS.values())
    assert not recover([masked], PANS, list(PANS))
    clear = "|".join(PANS.values())
    assert {lk.card for lk in recover([clear], PANS, list(PANS))} == set(PANS)
