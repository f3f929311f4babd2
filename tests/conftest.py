"""Shared fixtures live in tests/fixtures/, one module per real thing they start."""

pytest_plugins = ["tests.fixtures.server", "tests.fixtures.browser", "tests.fixtures.hub", "tests.fixtures.arlocal"]
