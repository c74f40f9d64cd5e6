"""Card numbers for the tests: one per issuer row and length, from the detector's own table."""

from __future__ import annotations

from appliance.pan.detector import ISSUERS, MAESTRO_OTHER_6, Issuer, luhn_complete


def pans_for(issuer: Issuer, length: int, variant: int = 0) -> str:
    """A Luhn-valid number of ``length`` digits in ``issuer``'s range (low, middle or high end)."""
    low, high = int(issuer.low), int(issuer.high)
    prefix = str((low, (low + high) // 2, high)[variant % 3])
    body = (prefix + "0123456789" * 2)[: length - 1]
    return luhn_complete(body)


def every_brand_and_length() -> list[tuple[str, str]]:
    """(brand, PAN) for every issuer row and every length it issues, at both range ends."""
    out = []
    for issuer in (*ISSUERS, MAESTRO_OTHER_6):
        for length in issuer.lengths:
            for variant in (0, 2):
                pan = pans_for(issuer, length, variant)
                if issuer is MAESTRO_OTHER_6:
                    pan = luhn_complete(("63" + "0123456789" * 2)[: length - 1])
                out.append((issuer.brand, pan))
    return out
