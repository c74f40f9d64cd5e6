"""Tests of the policy engine: classifier, patterns, rules, engine, holder and CLI."""
