"""Shared pytest setup: the MicroPython harness and fixtures used across the tree."""

pytest_plugins = ["tests.mpharness", "tests.fixtures.broker", "tests.hil.plugin"]
