"""Fixtures for the proxy tests: every playbook a test builds must have been asserted, and
awaitables of waits a playbook left open are closed."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.proxy import playbook as pb_module


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed


_CALL_FAILED = pytest.StashKey[bool]()


@pytest.fixture(autouse=True)
def playbooks_are_asserted(request: pytest.FixtureRequest) -> Iterator[None]:
    """A playbook with steps no ``assert`` ran checks nothing: that is a broken test."""
    pb_module._LIVE.clear()
    yield
    live = list(pb_module._LIVE)
    pb_module._LIVE.clear()
    for pb in live:
        pb.dispose()
    unfinished = [pb for pb in live if pb.unfinished]
    if unfinished and not request.node.stash.get(_CALL_FAILED, False):
        pytest.fail(f"{len(unfinished)} playbook(s) with steps never run: `assert` the playbook after adding steps")
