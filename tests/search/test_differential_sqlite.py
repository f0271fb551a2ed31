from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Sequence

import pytest
from differential import SearchBackend, check_backend, queries, twins
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from search import sqlite as index
from search.rql import Filter, SearchQuery
from twin_service.types import JSONObject


class SqliteBackend:
    """The SQLite index on a real database, written the way the twin store writes it."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        with conn:
            for statement in index.SCHEMA:
                conn.execute(statement)

    async def load(self, docs: Sequence[JSONObject]) -> None:
        keep = {doc["twinId"] for doc in docs}
        with self.conn:
            for (twin_id,) in self.conn.execute("SELECT twin_id FROM search_twin").fetchall():
                if twin_id not in keep:
                    index.unindex_twin(self.conn, twin_id)
            for doc in docs:
                index.index_twin(self.conn, doc)

    async def search(self, query: SearchQuery) -> tuple[list[str], str | None]:
        return index.search_ids(self.conn, query)

    async def count(self, filter: Filter | None, namespaces: Sequence[str] | None) -> int:
        return index.count(self.conn, filter, namespaces)


@pytest.fixture(params=["sqlite"])
async def backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[SearchBackend]:
    conn = sqlite3.connect(tmp_path_factory.mktemp("index") / "index.db")
    try:
        yield SqliteBackend(conn)
    finally:
        conn.close()


RELAXED = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@RELAXED
@given(docs=twins(), query=queries())
async def test_pages_and_counts_match_the_evaluator(
    backend: SearchBackend, docs: list[JSONObject], query: SearchQuery
) -> None:
    await backend.load(docs)
    await check_backend(backend, docs, query)


@RELAXED
@given(before=twins(), after=twins(), query=queries())
async def test_reindexing_replaces_earlier_rows(
    backend: SearchBackend, before: list[JSONObject], after: list[JSONObject], query: SearchQuery
) -> None:
    await backend.load(before)
    await backend.load(after)
    await check_backend(backend, after, query)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(docs=twins(min_size=8, max_size=20), query=queries(), size=st.integers(1, 3))
async def test_small_pages_cover_everything_once(
    backend: SearchBackend, docs: list[JSONObject], query: SearchQuery, size: int
) -> None:
    await backend.load(docs)
    await check_backend(backend, docs, SearchQuery(query.filter, query.sort, size))
