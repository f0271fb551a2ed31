"""The indexer and the consistency options in process: a real SQLite store with its outbox,
the real index on the test node, writes through the real twin service."""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from search.elasticsearch import MAPPING, MAPPING_VERSION, Change, Outcome
from search.rql import SearchQuery, parse_filter
from tests.index.helpers import es_settings, index_name
from tests.servers.search_engine import SearchEngine
from twin_service.errors import Unavailable
from twin_service.index.elasticsearch import ElasticsearchIndex, make_client, rebuild
from twin_service.service import TwinService
from twin_service.settings import Settings
from twin_service.store.base import TwinStore
from twin_service.store.sqlite import SqliteStore
from twin_service.twin.jsonvalue import Limits
from twin_service.twin.operations import replace_twin

pytestmark = pytest.mark.server("elasticsearch")


@dataclass
class Stack:
    settings: Settings
    store: SqliteStore
    service: TwinService
    index: ElasticsearchIndex

    async def put(self, twin_id: str, body: dict[str, Any]) -> int:
        edit = replace_twin(body, twin_id)
        outcome = await self.service.mutate(twin_id, lambda _: edit, origin="test", may_create=True)
        return outcome.stored.seq

    async def delete(self, twin_id: str) -> int:
        outcome = await self.service.mutate(twin_id, lambda _: None, origin="test")
        return outcome.stored.seq

    async def ids(self, rql: str | None = None, wait_for_seq: int | None = None) -> list[str]:
        query = SearchQuery(parse_filter(rql) if rql else None, size=200)
        if wait_for_seq is not None:
            await self.index.wait_for_seq(wait_for_seq)
        twins, _ = await self.index.search(query)
        return [t.twin_id for t in twins]


async def make_stack(
    engine: SearchEngine, tmp_path: Path, *, run_indexer: bool = True, **es: Any
) -> AsyncIterator[Stack]:
    settings = es_settings(engine, tmp_path, index_name("proc"), **es)
    store = SqliteStore(tmp_path / "twins.sqlite3", settings.sqlite, settings.stream, outbox=True)
    await store.open()
    index = ElasticsearchIndex(settings, store, run_indexer=run_indexer)
    await index.start()
    try:
        yield Stack(settings, store, TwinService(store, Limits(), "default"), index)
    finally:
        await index.client.indices.delete(index=f"{index.alias}-*")
        # An index the engine auto-created under the alias's name, if a test left one.
        await index.client.indices.delete(index=index.alias, ignore_unavailable=True)
        await index.stop()
        await store.close()


@pytest.fixture
async def stack(search_engine: SearchEngine, tmp_path: Path) -> AsyncIterator[Stack]:
    # Searches see new writes only through an explicit refresh: waiting must do it.
    async for s in make_stack(search_engine, tmp_path, refresh_interval="60s"):
        yield s


@pytest.fixture
async def stalled(search_engine: SearchEngine, tmp_path: Path) -> AsyncIterator[Stack]:
    """No indexer running: the outbox only grows."""
    async for s in make_stack(search_engine, tmp_path, run_indexer=False, wait_timeout_seconds=0.3):
        yield s


async def test_start_is_idempotent_and_uses_an_alias(stack: Stack) -> None:
    await stack.index.ensure_index()
    await stack.index.ensure_index()
    aliases = await stack.index.client.indices.get_alias(name=stack.index.alias)
    assert list(aliases) == [f"{stack.index.alias}-v{MAPPING_VERSION}"]


async def test_wait_for_seq_sees_the_write(stack: Stack) -> None:
    seq = await stack.put("org.a:w1", {"attributes": {"site": "x"}})
    assert await stack.ids('eq(attributes/site,"x")', wait_for_seq=seq) == ["org.a:w1"]
    await stack.index.wait_for_seq(seq)
    assert await stack.index.count(SearchQuery(parse_filter("exists(attributes)"))) == 1
    seq = await stack.delete("org.a:w1")
    assert await stack.ids(wait_for_seq=seq) == []


async def test_a_wait_that_caught_up_at_its_deadline_still_refreshes(
    search_engine: SearchEngine, tmp_path: Path
) -> None:
    """Caught up with no time left (a wait timeout shorter than one look at the outbox):
    the refresh that makes the writes searchable was cut short at once, 503 index.timeout
    for writes the index had taken."""
    async for short in make_stack(
        search_engine, tmp_path, refresh_interval="60s", wait_timeout_seconds=0.001
    ):
        seq = await short.put("org.a:due", {"attributes": {"site": "x"}})
        while not await short.index.covers(seq):
            await asyncio.sleep(0.05)
        assert await short.ids('eq(attributes/site,"x")', wait_for_seq=seq) == ["org.a:due"]


async def test_wait_times_out_with_index_timeout(stalled: Stack) -> None:
    seq = await stalled.put("org.a:t1", {"attributes": {"n": 1}})
    with pytest.raises(Unavailable) as caught:
        await stalled.ids(wait_for_seq=seq)
    assert caught.value.code == "index.timeout"
    assert caught.value.status == 503
    health = await stalled.index.health()
    assert health["status"] == "up" and health["kind"] == "elasticsearch"
    assert health["backlog"] == 1 and health["lagSeconds"] >= 0
    assert await stalled.index.index_pending() == 1
    assert await stalled.ids(wait_for_seq=seq) == ["org.a:t1"]
    assert (await stalled.index.health())["backlog"] == 0


async def test_stale_and_duplicate_versions_are_harmless(stalled: Stack) -> None:
    index = stalled.index
    new = {"twinId": "org.a:v", "namespace": "org.a", "attributes": {"v": "new"}}
    old = {"twinId": "org.a:v", "namespace": "org.a", "attributes": {"v": "old"}}
    assert await index.write([Change("org.a:v", 10, new)]) == [Outcome.DONE]
    # Another replica late with an older state, and the same state twice: both "done".
    assert await index.write([Change("org.a:v", 9, old)]) == [Outcome.DONE]
    assert await index.write([Change("org.a:v", 10, new)]) == [Outcome.DONE]
    await index.client.indices.refresh(index=index.alias)
    query = SearchQuery(parse_filter('eq(attributes/v,"new")'))
    assert (await index.search_ids(query))[0] == ["org.a:v"]
    # A stale delete does not remove a newer state; a newer one does, and stays deleted.
    assert await index.write([Change("org.a:v", 5, None)]) == [Outcome.DONE]
    assert await index.write([Change("org.a:v", 11, None)]) == [Outcome.DONE]
    assert await index.write([Change("org.a:v", 10, new)]) == [Outcome.DONE]
    await index.client.indices.refresh(index=index.alias)
    assert await index.count(SearchQuery()) == 0


async def test_search_after_a_type_change(stack: Stack) -> None:
    await stack.put("org.a:x", {"attributes": {"level": 5}})
    seq = await stack.put("org.a:x", {"attributes": {"level": "high"}})
    assert await stack.ids("gt(attributes/level,1)", wait_for_seq=seq) == []
    assert await stack.ids('eq(attributes/level,"high")') == ["org.a:x"]
    seq = await stack.put("org.a:x", {"attributes": {"level": 7}})
    assert await stack.ids("gt(attributes/level,1)", wait_for_seq=seq) == ["org.a:x"]


async def test_unreachable_engine_is_unavailable(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        search="elasticsearch",
        elasticsearch_url="http://127.0.0.1:9",
        elasticsearch={"request_timeout_seconds": 2},
    )
    store = SqliteStore(tmp_path / "t.sqlite3", settings.sqlite, settings.stream, outbox=True)
    # Without its indexer (the `index` commands), the start fails and says why.
    bare = ElasticsearchIndex(settings, store, run_indexer=False)
    with pytest.raises(Unavailable) as caught:
        await bare.start()
    assert caught.value.code == "index.unavailable"
    await bare.stop()
    # The service's starts all the same (its indexer waits for the engine); searches fail.
    index = ElasticsearchIndex(settings, store)
    await index.start()
    try:
        with pytest.raises(Unavailable) as caught:
            await index.search_ids(SearchQuery(None))
        assert caught.value.code == "index.unavailable"
    finally:
        await index.stop()


async def test_an_index_of_an_older_mapping_takes_new_documents_and_asks_for_a_rebuild(
    search_engine: SearchEngine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Version 2 added ``leaves.f``: an index made by version 1 refused every document
    holding it (strict mapping), for good. Starting on it now adds the field and logs that
    the index needs a rebuild."""
    settings = es_settings(search_engine, tmp_path, index_name("old"))
    alias = settings.elasticsearch.index_name
    old = copy.deepcopy(MAPPING)
    del old["_meta"], old["properties"]["leaves"]["properties"]["f"]
    client = make_client(settings)
    index = ElasticsearchIndex(settings, cast(TwinStore, None), client=client, run_indexer=False)
    try:
        await client.indices.create(
            index=f"{alias}-v1",
            mappings=old,
            settings={"number_of_replicas": 0},
            aliases={alias: {}},
        )
        with caplog.at_level(logging.WARNING, "twin_service.index.elasticsearch"):
            await index.start()
        assert "run `twin-service index rebuild`" in caplog.text
        doc = {"twinId": "org.a:old", "namespace": "org.a", "attributes": {"x": "Café"}}
        assert await index.write([Change("org.a:old", 1, doc)]) == [Outcome.DONE]
        await index.client.indices.refresh(index=alias)
        ids, _ = await index.search_ids(SearchQuery(parse_filter('ilike(attributes/x,"CAFÉ")')))
        assert ids == ["org.a:old"]
    finally:
        await client.indices.delete(index=f"{alias}-*")
        await index.stop()
        await client.close()


async def test_a_write_the_same_twin_superseded_is_covered_only_once_indexed(
    stalled: Stack,
) -> None:
    """The outbox kept only each twin's latest seq: once the twin was written again, its
    earlier write counted as indexed before anything was (``waitFor`` of it answered without
    the twin), and the lag was the age of the latest write, not of the oldest one."""
    first = await stalled.put("org.a:twice", {"attributes": {"v": 1}})
    await asyncio.sleep(1.0)
    second = await stalled.put("org.a:twice", {"attributes": {"v": 2}})
    assert not await stalled.index.covers(first)
    with pytest.raises(Unavailable) as caught:
        await stalled.ids(wait_for_seq=first)
    assert caught.value.code == "index.timeout"
    health = await stalled.index.health()
    assert health["backlog"] == 1 and health["lagSeconds"] >= 1.0, health
    assert await stalled.index.index_pending() == 1
    assert await stalled.index.covers(second)
    assert await stalled.ids(wait_for_seq=first) == ["org.a:twice"]
    assert (await stalled.index.health())["lagSeconds"] == 0


async def test_a_new_index_is_not_taken_for_covering_the_store_while_it_fills(
    search_engine: SearchEngine, tmp_path: Path
) -> None:
    """An index created over a store that holds twins (the index deleted, a new cluster) is
    filled before the outbox is taken. The fill was invisible: waits for any write passed
    at once (``waitFor=latest`` counted part of the twins) and /ready said nothing."""
    settings = es_settings(
        search_engine, tmp_path, index_name("fill"), batch_size=10, wait_timeout_seconds=0.5
    )
    store = SqliteStore(tmp_path / "twins.sqlite3", settings.sqlite, settings.stream, outbox=True)
    await store.open()
    service = TwinService(store, Limits(), "default")
    for i in range(40):
        edit = replace_twin({"attributes": {"n": i}}, f"org.f:t{i:02d}")
        await service.mutate(f"org.f:t{i:02d}", lambda _, e=edit: e, origin="test", may_create=True)
    # Taken by an index that is then lost: the outbox is empty.
    await store.mark_indexed(await store.pending_index(100))
    last = await store.last_seq()
    index = ElasticsearchIndex(settings, store)
    try:
        await index.start()  # creates the index: its indexer fills it first
        # Before the indexer's first step (frozen synchronously): nothing of the fill is done.
        with search_engine.frozen():
            assert not await index.covers(last)
            with pytest.raises(Unavailable) as caught:
                await index.wait_for_seq(last)
            assert caught.value.code == "index.timeout"
            lag = await index.lag()
            health = await index.health()
        assert health["filling"] == {"twins": 0, "of": 40}, health
        assert lag[1] >= 0.4 and health["lagSeconds"] >= 0.4, (lag, health)
        deadline = asyncio.get_running_loop().time() + 60
        while not await index.covers(last):
            assert asyncio.get_running_loop().time() < deadline, await index.health()
            await asyncio.sleep(0.05)
        await index.wait_for_seq(last)
        assert await index.count(SearchQuery(None)) == 40
        health = await index.health()
        assert "filling" not in health and health["lagSeconds"] == 0, health
    finally:
        await index.client.indices.delete(index=f"{index.alias}-*")
        await index.stop()
        await store.close()


async def lose_the_index(stack: Stack, what: str) -> None:
    """Delete the index behind the alias, or only the alias, as an operator might."""
    client, alias = stack.index.client, stack.index.alias
    if what == "alias":
        await client.indices.delete_alias(index=f"{alias}-*", name=alias)
    else:
        await client.indices.delete(index=f"{alias}-*")


@pytest.mark.parametrize("what", ["index", "alias"])
async def test_a_delete_first_after_the_index_was_lost_gets_the_index_back(
    stack: Stack, what: str
) -> None:
    """The index (or its alias) lost, and the first write after it a twin's deletion: the
    engine ignores ``require_alias`` for a delete with an external version, auto-created a
    plain unmapped index under the alias's name and answered 404, which counted as done.
    Searches then found nothing and every filter failed, for good, while /ready said up."""
    for i in range(3):
        seq = await stack.put(f"org.a:l{i}", {"attributes": {"n": i}})
    assert await stack.ids(wait_for_seq=seq) == ["org.a:l0", "org.a:l1", "org.a:l2"]
    await lose_the_index(stack, what)
    seq = await stack.delete("org.a:l1")
    deadline = asyncio.get_running_loop().time() + 30
    while not await stack.index.covers(seq):
        assert asyncio.get_running_loop().time() < deadline, await stack.index.health()
        await asyncio.sleep(0.05)
    assert await stack.ids(wait_for_seq=seq) == ["org.a:l0", "org.a:l2"]
    assert await stack.ids("eq(attributes/n,2)") == ["org.a:l2"]
    assert await stack.index.count(SearchQuery(None)) == 2
    aliases = await stack.index.client.indices.get_alias(name=stack.index.alias)
    assert list(aliases) == [f"{stack.index.alias}-v{MAPPING_VERSION}"]
    assert (await stack.index.health())["status"] == "up"


async def test_an_index_auto_created_under_the_alias_is_down_and_rebuild_replaces_it(
    stalled: Stack,
) -> None:
    """The unmapped index a lost index's first delete left under the alias's name (by this
    service before it noticed, or the engine restarted empty): /ready said up with every
    search broken, and ``index rebuild`` failed on it (invalid_alias_name_exception)."""
    client, alias = stalled.index.client, stalled.index.alias
    await stalled.put("org.a:s1", {"attributes": {"n": 1}})
    await stalled.put("org.a:s2", {"attributes": {"n": 2}})
    assert await stalled.index.index_pending() == 2
    await lose_the_index(stalled, "index")
    await stalled.delete("org.a:s1")
    with pytest.raises(Unavailable):
        # Not taken: the index must come back first.
        await stalled.index.index_pending()
    assert await client.indices.exists(index=alias)  # the engine's stray index
    health = await stalled.index.health()
    assert health["status"] == "down", health
    assert "not an alias" in health["error"], health
    result = await rebuild(stalled.settings, stalled.store)
    assert (result.indexed, result.refused) == (1, 0)
    assert await stalled.index.count(SearchQuery(None)) == 1
    assert await stalled.index.count(SearchQuery(parse_filter("eq(attributes/n,2)"))) == 1
    assert (await stalled.index.health())["status"] == "up"
