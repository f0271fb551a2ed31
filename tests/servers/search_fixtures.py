"""Pytest fixture for the real search engine. Load with
``pytest_plugins = ["tests.servers.search_fixtures"]``.

The node is shared by the whole session: tests must use their own index names
(e.g. ``unique_name``) and delete nothing they did not create.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.servers.require import require_server
from tests.servers.search_engine import SearchEngine, unavailable_reason

__all__ = ["search_engine"]


@pytest.fixture(scope="session")
def search_engine() -> Iterator[SearchEngine]:
    """One Elasticsearch node for the whole session. Do not stop or restart it."""
    reason = unavailable_reason()
    if reason is not None:
        require_server("elasticsearch", reason)
    node = SearchEngine()
    try:
        yield node.start()
    finally:
        node.stop()
