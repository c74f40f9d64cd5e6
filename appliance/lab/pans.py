"""Deterministic, Luhn-valid test card numbers for the lab database and the tests.

The lab's ``cards`` table must hold PANs of every brand and length the masking detector is
meant to catch, and the same seed must always give the same numbers so that a failing test
can be replayed. Nothing here is a real card: the digits after the issuer prefix are drawn
from a seeded generator and only the check digit is computed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BrandRule:
    """One issuer prefix range (inclusive, equal-width numbers) and the lengths it issues."""

    brand: str
    low: int
    high: int
    lengths: tuple[int, ...]

    @property
    def prefix_width(self) -> int:
        return len(str(self.low))

    def matches(self, pan: str) -> bool:
        head = pan[: self.prefix_width]
        return len(pan) in self.lengths and head.isdigit() and self.low <= int(head) <= self.high


# The issuer table the lab generates from (and the detector's brief lists): Visa 4,
# Mastercard 51-55 and 2221-2720, Amex 34/37, Discover 6011/644-649/65, Diners 36/38/300-305,
# JCB 3528-3589, UnionPay 62.
BRAND_RULES: tuple[BrandRule, ...] = (
    BrandRule("visa", 4, 4, (13, 16, 19)),
    BrandRule("mastercard", 51, 55, (16,)),
    BrandRule("mastercard", 2221, 2720, (16,)),
    BrandRule("amex", 34, 34, (15,)),
    BrandRule("amex", 37, 37, (15,)),
    BrandRule("discover", 6011, 6011, (16, 19)),
    BrandRule("discover", 644, 649, (16, 19)),
    BrandRule("discover", 65, 65, (16, 19)),
    BrandRule("diners", 36, 36, (14, 16, 19)),
    BrandRule("diners", 38, 38, (14, 16)),
    BrandRule("diners", 300, 305, (14, 16)),
    BrandRule("jcb", 3528, 3589, (16, 19)),
    BrandRule("unionpay", 62, 62, (16, 19)),
)

BRANDS: tuple[str, ...] = tuple(dict.fromkeys(rule.brand for rule in BRAND_RULES))


class TestPan(str):
    """A generated PAN: a plain ``str`` (so it can go anywhere a PAN string goes) that also
    knows its ``brand`` and ``last4``."""

    __slots__ = ("brand",)
    __test__ = False  # not a pytest test class, despite the name

    brand: str

    def __new__(cls, pan: str, brand: str) -> TestPan:
        obj = super().__new__(cls, pan)
        obj.brand = brand
        return obj

    @property
    def last4(self) -> str:
        return self[-4:]


def luhn_check_digit(partial: str) -> str:
    """The digit that makes ``partial + digit`` pass the Luhn check."""
    if not partial.isdigit():
        raise ValueError(f"{partial!r} is not a string of digits")
    total = 0
    # Walking from the right, the digit next to the (missing) check digit is doubled first.
    for i, ch in enumerate(reversed(partial)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str((10 - total % 10) % 10)


def is_luhn_valid(number: str) -> bool:
    """True if ``number`` (digits only, at least two) passes the Luhn check."""
    if len(number) < 2 or not number.isdigit():
        return False
    return luhn_check_digit(number[:-1]) == number[-1]


def brand_of(pan: str) -> str | None:
    """The brand whose prefix and length ``pan`` matches (longest prefix wins), or None."""
    best: BrandRule | None = None
    for rule in BRAND_RULES:
        if rule.matches(pan) and (best is None or rule.prefix_width > best.prefix_width):
            best = rule
    return best.brand if best else None


def _rule_length_pairs() -> list[tuple[BrandRule, int]]:
    return [(rule, length) for rule in BRAND_RULES for length in rule.lengths]


def make_test_pans(seed: int, count: int) -> list[TestPan]:
    """``count`` distinct Luhn-valid PANs, the same for the same seed.

    Cycles through every (prefix range, length) pair so that any ``count`` of at least
    ``len(_rule_length_pairs())`` (28) covers every brand and every length listed.
    """
    if count < 0:
        raise ValueError("count must be >= 0")
    rng = random.Random(seed)
    pairs = _rule_length_pairs()
    pans: list[TestPan] = []
    seen: set[str] = set()
    i = 0
    while len(pans) < count:
        rule, length = pairs[i % len(pairs)]
        i += 1
        prefix = str(rng.randint(rule.low, rule.high))
        body = prefix + "".join(rng.choice("0123456789") for _ in range(length - len(prefix) - 1))
        pan = body + luhn_check_digit(body)
        if pan in seen:
            continue
        seen.add(pan)
        pans.append(TestPan(pan, rule.brand))
    return pans
