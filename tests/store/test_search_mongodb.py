"""The differential search suite on the MongoDB index, against a real MongoDB-wire server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from search import mongodb as index
from search.rql import Filter, SearchQuery
from tests.search.differential import DifferentialSuite, SearchBackend
from tests.servers.ferretdb import FerretDB
from twin_service.types import JSONObject


class MongoBackend:
    """Documents shaped like the store's twins: id, namespace, liveness and index fields."""

    def __init__(self, client: AsyncMongoClient[dict[str, Any]], database: str) -> None:
        self.collection = client[database]["twins"]

    async def load(self, docs: Sequence[JSONObject]) -> None:
        await self.collection.delete_many({})
        if docs:
            await self.collection.insert_many(
                [
                    {
                        "_id": doc["twinId"],
                        "ns": doc["namespace"],
                        "rev": 1,
                        "doc": json.dumps(doc),
                        **index.index_fields(doc),
                    }
                    for doc in docs
                ]
            )

    async def search(self, query: SearchQuery) -> tuple[list[str], str | None]:
        rows, cursor = await index.search_page(
            self.collection, query, lambda raw: json.loads(raw["doc"])
        )
        return [row["_id"] for row in rows], cursor

    async def count(self, filter: Filter | None, namespaces: Sequence[str] | None) -> int:
        return await index.count(
            self.collection, filter, None if namespaces is None else list(namespaces)
        )


@pytest.fixture
async def backend(ferretdb_server: FerretDB, unique_name: str) -> AsyncIterator[SearchBackend]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(ferretdb_server.url)
    try:
        yield MongoBackend(client, unique_name)
        await client.drop_database(unique_name)
    finally:
        await client.close()


class TestDifferential(DifferentialSuite):
    """The shared differential suite on this backend."""
