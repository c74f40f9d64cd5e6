"""Fixtures more than one audit test module uses."""

from __future__ import annotations

import pytest

from tests.audit.synthetic_log import Log, make_log


@pytest.fixture(scope="session")
def log() -> Log:
    """The synthetic signed log of tests/audit/synthetic_log.py, made once: read it, never change it."""
    return make_log()
