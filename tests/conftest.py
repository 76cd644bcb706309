"""Shared fixtures come from tests/plugins/: each real part (PACS, simulator, ...) has its own module."""

pytest_plugins = ["tests.plugins.pacs", "tests.plugins.simulator"]
