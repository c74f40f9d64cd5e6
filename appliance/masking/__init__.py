"""PAN masking: card numbers found in anything bound for the agent are masked on the way.

The detector is ``appliance.pan``. ``values`` knows how each PostgreSQL type carries text
(and which types cannot hold a masked number); ``stream`` and ``copy`` walk large DataRows
and COPY OUT data incrementally; ``addon`` plugs all of it into the session's hooks.
"""

