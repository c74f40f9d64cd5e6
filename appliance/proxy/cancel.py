"""Cancel keys: the ones Tollgate hands agents, mapped onto their sessions.

Agents never see the database's BackendKeyData: a key from Tollgate can only cancel the
query of the session it was issued to, through Tollgate, which sends the real key.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.proxy.session import Session


class CancelRegistry:
    """Maps the cancel keys issued to clients onto their sessions."""

    def __init__(self) -> None:
        self._sessions: dict[tuple[int, bytes], Session] = {}

    def issue(self, session: Session, key_length: int) -> tuple[int, bytes]:
        while True:
            key = (secrets.randbits(31) or 1, secrets.token_bytes(key_length))
            if key not in self._sessions:
                self._sessions[key] = session
                return key

    def lookup(self, process_id: int, secret_key: bytes) -> Session | None:
        return self._sessions.get((process_id, secret_key))

    def forget(self, key: tuple[int, bytes] | None) -> None:
        if key is not None:
            self._sessions.pop(key, None)

    def __len__(self) -> int:
        return len(self._sessions)
