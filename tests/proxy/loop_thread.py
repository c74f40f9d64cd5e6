"""An event loop on a thread of its own, for tests that drive a real ProxyServer and the
fake PostgreSQL with blocking sockets from the test's thread."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable, Callable
from typing import Any

SAFETY_NET = 60.0  # the longest a wait may take before the test fails; never a measure


class LoopThread:
    """Runs coroutines and calls on the loop thread, where proxy state is only ever touched."""

    def __init__(self) -> None:
        if os.environ.get("TOLLGATE_TEST_LOOP", "uvloop") == "uvloop":
            import uvloop
            self.loop = uvloop.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        self.loop_errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda loop, context: self.loop_errors.append(context))
        self.thread = threading.Thread(target=self.loop.run_forever, name="proxy-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[Any], timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the loop thread."""
        async def wrapper() -> Any:
            return fn()
        return self.run(wrapper())

    def wait_for(self, predicate: Callable[[], bool], what: str, timeout: float = SAFETY_NET) -> None:
        """Check a predicate on the loop thread until it holds, failing after ``timeout``."""
        async def poll() -> bool:
            deadline = self.loop.time() + timeout
            while not predicate():
                if self.loop.time() > deadline:
                    return False
                await asyncio.sleep(0.002)
            return True
        assert self.run(poll(), timeout + 10), f"{what} never happened"

    def stop(self, closing: Callable[[], Awaitable[None]]) -> None:
        """Run ``closing`` on the loop, then stop the loop and its thread."""
        try:
            self.run(closing())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
