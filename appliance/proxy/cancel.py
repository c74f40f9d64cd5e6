"""Cancel keys: the ones Tollgate hands agents, mapped onto their sessions.

The agent is given the backend's real process id — so ``pg_backend_pid()``, a
notification's sender pid, ``pg_stat_activity`` and ``pg_terminate_backend`` agree with
what its driver reports — and a secret Tollgate draws itself; the database's secret never
leaves Tollgate. A CancelRequest is looked up by the pair: only a key issued to a live
session cancels, and only that session's query, through Tollgate, which sends the real key
to that session's database. Two databases may have a backend with the same pid, and a pid
is reused once its backend ends; the secret tells them apart: no two live keys are equal
(a drawn secret that would make one is drawn again), and a session's key is forgotten when
it ends. A key that matches nothing is ignored without an answer, as PostgreSQL does, and
counted.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.config import Endpoint
    from appliance.proxy.session import Session

    # Where a CancelRequest goes: the session's database, the backend's pid and real secret.
    CancelTarget = tuple[Endpoint, int, bytes]


class CancelRegistry:
    """Maps the cancel keys issued to clients onto their sessions."""

    def __init__(self, draw_secret: Callable[[int], bytes] = secrets.token_bytes) -> None:
        self._sessions: dict[tuple[int, bytes], Session] = {}
        self._draw_secret = draw_secret
        self.unmatched = 0  # CancelRequests whose key was no live session's
        # With several workers: asks the others about a key no session here holds (a
        # cancel connection lands on any worker); calls back with where to send the
        # CancelRequest, or None if no session anywhere needs one sent.
        self.elsewhere: Callable[[int, bytes, Callable[[CancelTarget | None], None]], None] | None = None
        self.passed_on = 0  # keys passed to the other workers
        self.from_elsewhere = 0  # keys another worker received for a session here

    def issue(self, session: Session, process_id: int, upstream_secret: bytes) -> tuple[int, bytes]:
        """The key the agent is given for the backend ``process_id``: its real pid and a
        fresh secret as long as the database's (4 bytes in protocol 3.0), never equal to
        the database's secret nor making a key another live session holds."""
        while True:
            secret = self._draw_secret(len(upstream_secret))
            key = (process_id, secret)
            if secret != upstream_secret and key not in self._sessions:
                self._sessions[key] = session
                return key

    def lookup(self, process_id: int, secret_key: bytes) -> Session | None:
        session = self._sessions.get((process_id, secret_key))
        if session is None and self.elsewhere is None:
            self.unmatched += 1
        return session

    def find(self, process_id: int, secret_key: bytes) -> Session | None:
        """The session holding this key here, if any (a cancel another worker received)."""
        return self._sessions.get((process_id, secret_key))

    def forget(self, key: tuple[int, bytes] | None) -> None:
        if key is not None:
            self._sessions.pop(key, None)

    def __len__(self) -> int:
        return len(self._sessions)
