"""Unit tests for the lab's test-PAN generator: Luhn, brands, lengths, determinism."""

from __future__ import annotations

import pytest

from appliance.lab.pans import (
    BRAND_RULES,
    BRANDS,
    TestPan,
    brand_of,
    is_luhn_valid,
    luhn_check_digit,
    make_test_pans,
)


@pytest.mark.parametrize("number", [
    "4111111111111111", "5555555555554444", "378282246310005", "6011111111111117",
    "3530111333300000", "30569309025904", "6200000000000005", "79927398713",
])
def test_known_valid_numbers(number: str) -> None:
    assert is_luhn_valid(number)
    assert luhn_check_digit(number[:-1]) == number[-1]


@pytest.mark.parametrize("number", ["4111111111111112", "79927398710", "", "7", "4111-1111", "abc"])
def test_invalid_numbers(number: str) -> None:
    assert not is_luhn_valid(number)


def test_check_digit_rejects_non_digits() -> None:
    with pytest.raises(ValueError, match="'12a4' is not a string of digits"):
        luhn_check_digit("12a4")


def test_every_generated_pan_is_luhn_valid_and_of_its_brand() -> None:
    pans = make_test_pans(7, 500)
    assert len(pans) == len(set(pans)) == 500
    for pan in pans:
        assert pan.isdigit() and is_luhn_valid(pan), pan
        assert brand_of(pan) == pan.brand, (pan, pan.brand)
        assert pan.last4 == pan[-4:]


def test_every_brand_and_length_is_covered() -> None:
    pans = make_test_pans(1, 300)
    assert {p.brand for p in pans} == set(BRANDS)
    covered = {(p.brand, len(p)) for p in pans}
    for rule in BRAND_RULES:
        for length in rule.lengths:
            assert (rule.brand, length) in covered
    # the ranges the detector must know, spot-checked
    heads = {p[:4] for p in pans} | {p[:3] for p in pans} | {p[:2] for p in pans}
    assert any(h.startswith(("22", "27")) for h in heads), "Mastercard 2-series missing"
    assert any(p.brand == "visa" and len(p) == 13 for p in pans)
    assert any(p.brand == "visa" and len(p) == 19 for p in pans)
    assert {len(p) for p in pans if p.brand == "amex"} == {15}


@pytest.mark.parametrize("pan, brand", [
    ("4111111111111111", "visa"), ("5105105105105100", "mastercard"), ("2223000048400011", "mastercard"),
    ("371449635398431", "amex"), ("6011000990139424", "discover"), ("6445644564456445", "discover"),
    ("36227206271667", "diners"), ("30569309025904", "diners"), ("3566002020360505", "jcb"),
    ("6212345678901232", "unionpay"), ("1234567812345670", None), ("411111111111111", None),
])
def test_brand_of(pan: str, brand: str | None) -> None:
    assert brand_of(pan) == brand


def test_generation_is_deterministic_per_seed() -> None:
    assert make_test_pans(42, 50) == make_test_pans(42, 50)
    assert make_test_pans(42, 50) != make_test_pans(43, 50)
    assert make_test_pans(42, 10) == make_test_pans(42, 50)[:10]


def test_test_pan_is_a_plain_string() -> None:
    pan = make_test_pans(3, 1)[0]
    assert isinstance(pan, str) and isinstance(pan, TestPan)
    assert str(pan) == pan and f"{pan}" == str(pan)
