"""The test Elasticsearch node starts, answers the real Python client, and stops.

Covers the query features the search index relies on, so a distribution that lacks one fails
here rather than deep inside the index contract tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tests.servers.require import require_server
from tests.servers.search_engine import SearchEngine
from tests.servers.search_fixtures import require_search_engine, search_engine_node

pytestmark = pytest.mark.server("elasticsearch")

INDEX = "twin-things"

MAPPING: dict[str, Any] = {
    "dynamic": "strict",
    "properties": {
        "thingId": {"type": "keyword"},
        "revision": {"type": "long"},
        "modified": {"type": "date"},
        "fields": {
            "type": "nested",
            "properties": {
                "path": {"type": "keyword"},
                "num": {"type": "double"},
                "str": {"type": "keyword"},
            },
        },
    },
}


def thing(n: int) -> dict[str, Any]:
    return {
        "thingId": f"org.example:sensor-{n:02d}",
        "revision": n,
        "modified": f"2024-05-{n + 1:02d}T12:00:00Z",
        "fields": [
            {"path": "/attributes/temperature", "num": 18.0 + n},
            {"path": "/attributes/location", "str": "hall" if n % 2 else "lab"},
        ],
    }


def field(path: str, *conditions: dict[str, Any]) -> dict[str, Any]:
    """A nested query: one `fields` entry at `path` matching every condition."""
    return {
        "nested": {
            "path": "fields",
            "query": {"bool": {"filter": [{"term": {"fields.path": path}}, *conditions]}},
        }
    }


@pytest.fixture(scope="module")
def engine() -> Iterator[SearchEngine]:
    yield from search_engine_node()


@pytest.fixture
async def es(engine: SearchEngine) -> AsyncIterator[Any]:
    try:
        from elasticsearch import AsyncElasticsearch
    except ImportError:
        require_server("elasticsearch", "client missing: pip install -e '.[elasticsearch]'")
    client = AsyncElasticsearch(engine.url, request_timeout=30)
    try:
        await client.indices.delete(index="twin-*", allow_no_indices=True)
        await client.indices.create(index=INDEX, mappings=MAPPING)
        operations: list[dict[str, Any]] = []
        for n in range(10):
            doc = thing(n)
            operations += [{"index": {"_index": INDEX, "_id": doc["thingId"]}}, doc]
        result = await client.bulk(operations=operations)
        assert not result["errors"], result
        await client.indices.refresh(index=INDEX)
        yield client
    finally:
        await client.close()


def test_engine_identity(engine: SearchEngine) -> None:
    assert engine.kind == "elasticsearch"
    assert engine.running()
    assert engine.url.startswith("http://127.0.0.1:")
    assert engine.version.split(".")[0] in {"8", "9"}


async def test_health_through_client(es: Any, engine: SearchEngine) -> None:
    health = await es.cluster.health(wait_for_status="yellow")
    assert health["status"] in {"yellow", "green"}
    # The client checks X-Elastic-Product on every answer; reaching here means it was there.
    assert health.meta.headers.get("x-elastic-product") == "Elasticsearch"


async def test_nested_bool_range_prefix(es: Any) -> None:
    query = {
        "bool": {
            "filter": [
                field("/attributes/temperature", {"range": {"fields.num": {"gte": 21, "lt": 25}}}),
                field("/attributes/location", {"prefix": {"fields.str": "ha"}}),
            ],
            "must_not": [{"term": {"thingId": "org.example:sensor-05"}}],
        }
    }
    result = await es.search(index=INDEX, query=query, sort=[{"thingId": "asc"}])
    ids = [hit["_id"] for hit in result["hits"]["hits"]]
    assert ids == ["org.example:sensor-03"]


async def test_terms_wildcard_exists(es: Any) -> None:
    query = {
        "bool": {
            "filter": [
                {"terms": {"thingId": ["org.example:sensor-01", "org.example:sensor-02"]}},
                field("/attributes/location", {"wildcard": {"fields.str": "l*b"}}),
                {"exists": {"field": "modified"}},
            ]
        }
    }
    result = await es.search(index=INDEX, query=query)
    assert [hit["_id"] for hit in result["hits"]["hits"]] == ["org.example:sensor-02"]


async def test_count(es: Any) -> None:
    result = await es.count(index=INDEX, query={"range": {"modified": {"lt": "2024-05-04"}}})
    assert result["count"] == 3


async def test_sort_search_after(es: Any) -> None:
    sort = [{"revision": "desc"}, {"thingId": "asc"}]
    seen: list[str] = []
    after: list[Any] | None = None
    while True:
        page = await es.search(index=INDEX, sort=sort, size=4, search_after=after)
        hits = page["hits"]["hits"]
        if not hits:
            break
        seen += [hit["_id"] for hit in hits]
        after = hits[-1]["sort"]
    assert seen == [f"org.example:sensor-{n:02d}" for n in reversed(range(10))]


async def test_nested_sort(es: Any) -> None:
    sort = [
        {
            "fields.num": {
                "order": "desc",
                "nested": {
                    "path": "fields",
                    "filter": {"term": {"fields.path": "/attributes/temperature"}},
                },
            }
        },
        {"thingId": "asc"},
    ]
    first = await es.search(index=INDEX, sort=sort, size=2)
    hits = first["hits"]["hits"]
    assert [hit["_id"] for hit in hits] == ["org.example:sensor-09", "org.example:sensor-08"]
    rest = await es.search(index=INDEX, sort=sort, size=20, search_after=hits[-1]["sort"])
    assert len(rest["hits"]["hits"]) == 8


def test_stop_is_idempotent_and_frees_everything() -> None:
    require_search_engine()
    node = SearchEngine(heap_mb=256)
    with node:
        workdir = node.workdir
        assert workdir is not None and workdir.exists()
    assert not node.running()
    assert not workdir.exists()
    assert node.stop() is None
