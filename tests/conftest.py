"""Shared fixtures live in tests/fixtures/, one module per real thing they start."""

pytest_plugins = [
    "tests.fixtures.server",
    "tests.fixtures.public_app",
    "tests.fixtures.browser",
    "tests.fixtures.hub",
    "tests.fixtures.arlocal",
]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The built image's size, from tests/test_image.py, in the summary of every run that built it."""
    from tests.test_image import IMAGE_SIZE

    if IMAGE_SIZE in config.stash:
        terminalreporter.write_line(config.stash[IMAGE_SIZE])
