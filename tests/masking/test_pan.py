"""The PAN detector: every issuer and length is found, the look-alikes are left alone."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.lab.pans import is_luhn_valid, make_test_pans
from appliance.pan.detector import (
    ISSUERS,
    MIN_DIGITS,
    PREFIX_LENGTHS,
    brand,
    find_pans,
    int_is_pan,
    int_mask,
    is_pan_digits,
    issuer_lengths,
    luhn_complete,
    luhn_ok,
    mask_pans,
    number_mask,
)
from appliance.pan.scanner import scrub
from tests.masking.corpus import every_brand_and_length

CORPUS = sorted(set(every_brand_and_length()))
VISA = "4111111111111111"
AMEX = "378282246310005"


def masked(text: str, fmt: str = "pci") -> str:
    return mask_pans(text.encode(), fmt)[0].decode()


def grouped(pan: str, sep: str, sizes: tuple[int, ...] = ()) -> str:
    if not sizes:
        sizes = (4,) * (len(pan) // 4) + ((len(pan) % 4,) if len(pan) % 4 else ())
    out, pos = [], 0
    for n in sizes:
        out.append(pan[pos:pos + n])
        pos += n
    assert pos == len(pan)
    return sep.join(out)


# ---- the card numbers ------------------------------------------------------------------------

def test_the_issuer_table_covers_every_brand_of_the_brief():
    brands = {i.brand for i in ISSUERS}
    assert brands >= {"Visa", "Mastercard", "American Express", "Discover", "Diners Club", "JCB", "UnionPay",
                      "Maestro", "Mir", "RuPay", "Verve"}


@pytest.mark.parametrize("issuer_brand,pan", CORPUS)
def test_every_brand_and_length_is_found_contiguous(issuer_brand, pan):
    assert is_pan_digits(pan)
    assert brand(pan) is not None
    for text in (pan, f"card {pan} on file", f"({pan})", f'"{pan}"', f"x{pan}y", f"{pan}\n", f"\t{pan}\0"):
        spans = find_pans(text.encode())
        assert len(spans) == 1
        s, e = spans[0]
        assert text[s:e] == pan


@pytest.mark.parametrize("issuer_brand,pan", CORPUS)
@pytest.mark.parametrize("sep", [" ", "-"])
def test_every_brand_and_length_is_found_grouped(issuer_brand, pan, sep):
    text = f"paid with {grouped(pan, sep)}."
    shown = masked(text)
    digits = re.sub(r"\D", "", shown.replace("*", "x"))
    assert shown != text and len(shown) == len(text)
    assert shown.count("*") == len(pan) - 10
    assert sep in shown and digits.startswith(pan[:6]) and digits.endswith(pan[-4:])


def test_amex_and_diners_groupings():
    assert masked("3782 822463 10005") == "3782 82**** *0005"
    assert masked("3782-822463-10005", "last4") == "****-******-*0005"
    assert masked("3056 930902 5904") == "3056 93**** 5904"


@pytest.mark.parametrize("fmt,expected", [
    ("pci", "411111******1111"), ("last4", "************1111"),
])
def test_formats_keep_length_and_show_at_most_bin_and_last_four(fmt, expected):
    assert masked(VISA, fmt) == expected
    thirteen = luhn_complete("401288888881")
    assert masked(thirteen) == thirteen[:6] + "***" + thirteen[-4:]
    nineteen = luhn_complete("401234567890123456")
    assert masked(nineteen, fmt).count("*") == (9 if fmt == "pci" else 15)


def test_a_pan_followed_by_more_groups_is_found_group_aligned():
    text = "4111 1111 1111 1111 2024"
    assert masked(text) == "4111 11** **** 1111 2024"
    assert masked("2024 " + "4111 1111 1111 1111") == "2024 4111 11** **** 1111"
    assert masked("4111111111111111 12/27") == "411111******1111 12/27"
    # Where the run goes on with enough digits to make a look-alike from a cut group, only
    # whole groups are shown on that side (see the next test).
    assert masked("1234 5678 4111 1111 1111 1111") == "1234 5678 4111 **** **** 1111"
    assert masked("1234 4111111111111111 5678 9012 3") == "1234 411111********** 5678 9012 3"
    assert masked("exp 12 4111-1111-1111-1111 cvv") == "exp 12 4111-11**-****-1111 cvv"


def test_masking_never_leaves_a_look_alike_made_of_a_cut_group():
    # "5678 90183401 2345" is a PAN; showing "90" of its second group would leave
    # "3050 1234 5678 90", a Luhn-valid 14-digit Diners number that was never in the data.
    data = b"3050 1234 5678 90183401 2345 6789 014"
    out, count = mask_pans(data)
    assert count == 1 and out == b"3050 1234 5678 ******** 2345 6789 014"
    assert find_pans(out) == []


def test_two_pans_in_one_text():
    text = f"{VISA}, {AMEX}; {grouped(VISA, '-')}"
    out, count = mask_pans(text.encode())
    assert count == 3
    assert out.decode() == "411111******1111, 378282*****0005; 4111-11**-****-1111"


def test_separators_must_be_single_and_consistent():
    for text in ("4111 1111-1111 1111", "4111  1111 1111 1111", "4111--1111--1111--1111", "4111_1111_1111_1111",
                 "4111.1111.1111.1111", "4111/1111/1111/1111"):
        assert find_pans(text.encode()) == [], text


def test_boundaries_need_a_non_digit_on_both_sides():
    assert find_pans(b"0" + VISA.encode()) == []
    assert find_pans(VISA.encode() + b"0") == []
    assert find_pans(b"abc" + VISA.encode() + b"xyz") == [(3, 19)]
    assert find_pans(b"-" + VISA.encode()) == [(1, 17)]  # a sign is not a digit


def test_luhn_invalid_and_unknown_prefixes_are_not_pans():
    assert not is_pan_digits("4111111111111112")
    for prefix in ("1", "7", "9", "0", "80", "83", "33", "29"):
        number = luhn_complete((prefix + "123456789012345")[:15])
        assert not is_pan_digits(number), number
        assert find_pans(number.encode()) == []


def test_lengths_are_per_issuer():
    assert not is_pan_digits(luhn_complete("41111111111111"))  # Visa has no 15-digit numbers
    assert not is_pan_digits(luhn_complete("340123456789012"))  # Amex is 15 only
    assert not is_pan_digits(luhn_complete("51012345678901"))  # Mastercard is 16 only
    assert is_pan_digits(luhn_complete("650012345678901"))  # Discover/RuPay 65: 16
    assert not is_pan_digits(luhn_complete("601101234567"))  # Discover 6011: not Maestro's 13
    assert is_pan_digits(luhn_complete("639012345678"))  # other 6…: Maestro, 13 digits


def test_the_prefix_table_answers_what_the_issuer_table_does_for_every_six_digit_prefix():
    # is_pan_digits reads the lengths from PREFIX_LENGTHS in one index; the issuer table
    # (issuer_lengths, widths 1 to 6, Maestro's "other 6…") is the definition it must match.
    wrong = [p for p in range(10 ** 6)
             if issuer_lengths(b"%06d" % p + b"0" * 13) >> MIN_DIGITS != PREFIX_LENGTHS[p]]
    assert wrong == []


def test_luhn_matches_the_digit_by_digit_definition_at_every_length():
    rng = random.Random(15)
    for length in range(1, 26):
        for _ in range(400):
            digits = "".join(rng.choice("0123456789") for _ in range(length))
            total = sum((d * 2 - 9 if d > 4 else d * 2) if i % 2 else d
                        for i, d in enumerate(int(c) for c in reversed(digits)))
            assert luhn_ok(digits.encode()) == (total % 10 == 0), digits


def test_str_bytes_bytearray_memoryview_all_work():
    data = f"x {VISA} y"
    for form in (data.encode(), bytearray(data.encode()), memoryview(data.encode())):
        assert find_pans(form) == [(2, 18)]
    assert is_pan_digits(VISA) and is_pan_digits(VISA.encode()) and is_pan_digits(memoryview(VISA.encode()))
    assert not is_pan_digits("٤١١١١١١١١١١١١١١١")  # Arabic-Indic digits: ASCII only


def test_lab_generated_pans_are_all_found():
    for pan in make_test_pans(seed=7, count=200):
        assert find_pans(pan.encode()) == [(0, len(pan))], pan


# ---- the control corpus: digits that are not card numbers ---------------------------------

def imei(prefix: str) -> str:
    return luhn_complete((prefix + "9900176148" + "1234")[:14])


CONTROL = [
    "0.4111111111111111",  # fraction of a decimal
    "4111111111111111.25",  # integer part of a decimal
    "-4111111111111111.0",
    "price=0.378282246310005;",
    "4.111111111111111e+15",  # float8 text output of a 16-digit number
    "4111111111111111e3",
    "4111111111111111E-2",
    "4.111111111111111E15",
    "1e4111111111111111", "2E+4111111111111111",
    "1700000000000",  # epoch milliseconds
    "1712345678901 1712345678902",
    "1712345678901234",  # epoch microseconds: no issuer starts with 1
    imei("35"), imei("86"), imei("01"), imei("49"),  # IMEIs: Luhn-valid, 15 digits
    "41111111-1111-1111-1111-111111111111",  # all-digit UUID hiding a Visa in its first groups
    "550e8400-e29b-41d4-a716-446655440000",
    "urn:uuid:41111111-1111-1111-1111-111111111111.",
    "41111111111111111111",  # 20 digits
    "4111111111111111111111111111111111",
    "4111111111111112",  # Luhn fails
    "2023-01-15 12:34:56.789",
    "+44 20 7946 0958",
    # E.164 phone numbers: Luhn-valid with a Visa prefix and length, but a card number has no "+"
    "+4915112345678", "tel. +49 151 12345678", "+49-151-12345678", "(+4915112345678)",
    "192.168.100.200",
]


@pytest.mark.parametrize("text", CONTROL)
def test_control_corpus_passes_untouched(text):
    assert find_pans(text.encode()) == [], text
    assert mask_pans(text.encode()) == (text.encode(), 0)
    assert scrub(text) == text


def test_imeis_are_luhn_valid_so_the_table_is_what_rules_them_out():
    for prefix in ("35", "86", "01", "49"):
        number = imei(prefix)
        assert len(number) == 15 and luhn_ok(number.encode()) and not is_pan_digits(number)


# ---- scrub (logs, approvals) --------------------------------------------------------------

def test_scrub_masks_text_and_keeps_everything_else():
    sql = f"INSERT INTO cards VALUES ('{VISA}', 'Zoë', 0.5, '{grouped(AMEX, ' ', (4, 6, 5))}')"
    assert scrub(sql) == "INSERT INTO cards VALUES ('411111******1111', 'Zoë', 0.5, '3782 82**** *0005')"
    assert scrub(sql, "last4").count("1111") == 1
    assert scrub("") == "" and scrub("nothing here") == "nothing here"
    assert scrub("bad \udcff byte " + VISA) == "bad \udcff byte 411111******1111"


def test_scrub_catches_card_numbers_in_bytea_hex_as_binary_parameters_are_shown():
    shown = "\\x" + b"4111-1111-1111-1111".hex()
    out = scrub(shown)
    assert bytes.fromhex(out[2:]) == b"4111-11**-****-1111"
    with pytest.raises(ValueError, match="PAN mask format must be one of"):
        scrub(VISA, "bin")


# ---- properties --------------------------------------------------------------------------------

@given(st.text(alphabet="0123456789", min_size=2, max_size=25))
def test_fast_luhn_matches_the_reference(digits):
    assert luhn_ok(digits.encode()) == is_luhn_valid(digits)


_ALPHABET = st.sampled_from([*b"0123456789 -.eE+abcdfx\n\t\"\\{},:", 0, 0xFF, 0xC3])


@settings(max_examples=400)
@given(st.lists(st.one_of(_ALPHABET.map(lambda b: bytes([b])),
                          st.sampled_from([p.encode() for _, p in CORPUS[:40]]),
                          st.sampled_from([grouped(p, s).encode() for _, p in CORPUS[:20] for s in " -"])),
                max_size=30).map(b"".join))
def test_detector_never_raises_keeps_length_and_leaves_no_pan(data):
    out, count = mask_pans(data, "pci")
    assert len(out) == len(data)
    assert count == len(find_pans(data))
    # Only digits change, into stars.
    assert all(a == b or (chr(a).isdigit() and b == 0x2A) for a, b in zip(data, out, strict=True))
    assert find_pans(out) == []
    out4, _ = mask_pans(data, "last4")
    assert find_pans(out4) == [] and len(out4) == len(data)


@settings(max_examples=200)
@given(st.binary(max_size=300))
def test_detector_on_random_bytes(data):
    out, _ = mask_pans(data)
    assert len(out) == len(data) and find_pans(out) == []


def test_a_masked_pan_shows_no_more_than_bin_and_last_four():
    rng = random.Random(3)
    for _, pan in CORPUS:
        for fmt, shown in (("pci", 10), ("last4", 4)):
            text = rng.choice(["{}", "x {} y", "{}\n"]).format(pan)
            out = masked(text, fmt)
            assert sum(c.isdigit() for c in out) == sum(c.isdigit() for c in text) - (len(pan) - shown)


# ---- number masks -------------------------------------------------------------------------


@settings(max_examples=500)
@given(st.sampled_from(every_brand_and_length()), st.randoms(use_true_random=False), st.sampled_from(["pci", "last4"]))
def test_a_number_mask_shows_no_more_and_is_no_card_number(sample, rnd, fmt):
    """number_mask of any card number: same length, BIN (pci) and last four kept, never a
    card number itself, and a function of the shown digits only (two numbers that show the
    same digits get the same mask)."""
    _brand, pan = sample
    # Another number with the same BIN, length and last four (a card number one time in ten).
    other = pan[:6] + "".join(rnd.choice("0123456789") for _ in range(len(pan) - 10)) + pan[-4:]
    masked = number_mask(pan.encode(), fmt).decode()
    assert len(masked) == len(pan) and masked[-4:] == pan[-4:] and masked.isdigit()
    assert not is_pan_digits(masked)
    if fmt == "pci":
        assert masked[:6] == pan[:6] and set(masked[6:-4]) <= {"0", "1"}
    else:
        assert masked[0] == "9" and set(masked[1:-4]) == {"0"}
    if is_pan_digits(other):
        assert number_mask(other.encode(), fmt).decode() == masked
    assert int_mask(-int(pan), fmt) == -int(masked)


def test_an_id_on_an_issuer_prefix_is_masked_and_one_off_it_is_not():
    assert int_is_pan(4000000000000002) and int_mask(4000000000000002) == 4000000000010002
    assert not int_is_pan(9000000000000002) and not int_is_pan(1234567812345670)


def test_a_plus_sign_rules_out_only_what_e164_allows():
    """A "+" before at most 15 digits is a phone number; before 16 or more, or glued to a
    word or a number (``1+4…``, ``x+4…``), the digits are still searched."""
    assert mask_pans(b"+4111111111111111") == (b"+411111******1111", 1)  # 16 digits: no phone number
    assert mask_pans(b"1+4915112345678")[1] == 1
    assert mask_pans(b"x+4915112345678")[1] == 1
    assert mask_pans(b"+ 4915112345678")[1] == 1  # a sign set apart is no prefix
