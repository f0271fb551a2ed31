"""Pytest fixture for the real search engine. Load with
``pytest_plugins = ["tests.servers.search_fixtures"]``.

The node is shared by the whole session: tests must use their own index names
(e.g. ``unique_name``) and delete nothing they did not create.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.servers.process import started_then_stopped
from tests.servers.require import require_server
from tests.servers.search_engine import SearchEngine, unavailable_reason

__all__ = ["search_engine"]


def require_search_engine() -> None:
    """Skip the test (fail it in CI) when no Elasticsearch node can run here."""
    reason = unavailable_reason()
    if reason is not None:
        require_server("elasticsearch", reason)


def search_engine_node() -> Iterator[SearchEngine]:
    """The body of a fixture (``yield from``): a node of its own, started and stopped after."""
    require_search_engine()
    yield from started_then_stopped(SearchEngine())


@pytest.fixture(scope="session")
def search_engine() -> Iterator[SearchEngine]:
    """One Elasticsearch node for the whole session. Do not stop or restart it."""
    yield from search_engine_node()
