"""The proxy's side of the audit log without the proxy: its writer on a loop, and the audit
control operations on its control socket, for tests of the commands that ask it."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from appliance.audit.store import AuditLog
from appliance.config import Config


@contextlib.contextmanager
def running_proxy(config: Config) -> Iterator[AuditLog]:
    """The proxy's side of the log: its writer on a loop, the audit control ops on its socket."""
    from appliance.audit.control import register_control_ops
    from appliance.proxy.control import ControlOps, start_control_server

    assert config.audit is not None and config.proxy.control_socket is not None
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, Any] = {}

    def serve() -> None:
        asyncio.set_event_loop(loop)
        log = AuditLog.open(config.audit, version="proxy")  # type: ignore[arg-type]
        log.start(loop)
        ops = ControlOps()
        ops.register("ping", lambda request: {})
        register_control_ops(ops, log)
        holder["log"] = log
        holder["control"] = loop.run_until_complete(start_control_server(ops, config.proxy.control_socket))
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    log: AuditLog = holder["log"]
    try:
        yield log
    finally:
        async def shutdown() -> None:
            holder["control"].close()
            await holder["control"].wait_closed()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            await asyncio.wait_for(asyncio.gather(*others, return_exceptions=True), 10)

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(15)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        log.close()
        loop.close()
