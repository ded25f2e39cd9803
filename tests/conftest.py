"""Shared pytest configuration for the whole test tree."""

pytest_plugins = ["datus.testing.pytest_plugin"]
