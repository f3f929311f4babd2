"""Shared fixtures live in tests/fixtures/, one module per real thing they start."""

pytest_plugins = [
    "tests.fixtures.server",
    "tests.fixtures.public_app",
    "tests.fixtures.browser",
    "tests.fixtures.hub",
    "tests.fixtures.arlocal",
]
