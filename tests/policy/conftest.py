"""Fixtures for the policy tests: the masking tests' throwaway PostgreSQL 15, for the
differential test of the classifier against the server (test_differential.py)."""

from tests.masking.conftest import postgres  # noqa: F401 -- re-exported as a fixture
