"""Shared fixtures: real servers (tests/servers) and the real twin service process."""

from __future__ import annotations

pytest_plugins = [
    "tests.servers.fixtures",
    "tests.servers.search_fixtures",
    "tests.service_fixtures",
    "tests.store_fixtures",
    "tests.terminate",
]
