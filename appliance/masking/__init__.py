"""PAN masking: card numbers found in anything bound for the agent are masked on the way.

``pan`` detects card numbers in bytes and text; ``scanner`` applies it to values that
arrive whole or in windows; ``values`` knows how each PostgreSQL type carries text (and
which types cannot hold a masked number); ``stream`` and ``copy`` walk large DataRows and
COPY OUT data incrementally; ``addon`` plugs all of it into the session's hooks.
"""

from appliance.masking.pan import find_pans, is_pan_digits, mask_pans
from appliance.masking.scanner import scrub

__all__ = ["find_pans", "is_pan_digits", "mask_pans", "scrub"]
