from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Sequence

import pytest
from differential import DifferentialSuite, SearchBackend

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


class TestDifferential(DifferentialSuite):
    """The shared differential suite on this backend."""
