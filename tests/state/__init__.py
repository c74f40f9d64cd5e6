"""Tests of ``appliance.state``."""
