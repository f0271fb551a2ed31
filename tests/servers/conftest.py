"""Load the server fixtures for these tests even when tests/conftest.py does not.

`import_plugin` is a no-op when `pytest_plugins = ["tests.servers.fixtures"]` in the root
conftest has already registered them, so the session servers are never started twice.
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.import_plugin("tests.servers.fixtures")
