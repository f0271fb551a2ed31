"""What the index takes: every twin within the service's limits is indexed, a twin the
engine refuses anyway never blocks the others or leaves its old document searchable, and an
index deleted under the running service is created again and filled. Real store, real
service core, real Elasticsearch."""

from __future__ import annotations

import json
import logging
import os
import string
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from search.elasticsearch import MAPPING_VERSION, Change, Outcome, max_leaves, to_es_document
from search.rql import SearchQuery, parse_filter
from tests.index.helpers import es_env
from tests.index.test_indexer import Stack, make_stack
from tests.servers.search_engine import SearchEngine
from tests.service_process import ServiceProcess
from twin_service.errors import Unavailable
from twin_service.index.elasticsearch import _rebuild
from twin_service.twin.lifecycle import lifecycle_amend_ttl
from twin_service.twin.operations import replace_twin

pytestmark = pytest.mark.server("elasticsearch")

LIMIT = 64 * 1024  # limits.max_twin_bytes, the default the stacks run with
KEY = string.ascii_letters + string.digits


@pytest.fixture
async def stalled(search_engine: SearchEngine, tmp_path: Path) -> AsyncIterator[Stack]:
    async for s in make_stack(search_engine, tmp_path, run_indexer=False):
        yield s


@pytest.fixture
async def small_bulk(search_engine: SearchEngine, tmp_path: Path) -> AsyncIterator[Stack]:
    async for s in make_stack(
        search_engine, tmp_path, run_indexer=False, bulk_max_bytes=1024 * 1024
    ):
        yield s


async def indexed(stack: Stack, rql: str | None = None) -> list[str]:
    """The ids the index itself finds (not only those the store still has)."""
    await stack.index.client.indices.refresh(index=stack.index.alias)
    query = SearchQuery(parse_filter(rql) if rql else None, size=200)
    return (await stack.index.search_ids(query))[0]


def at_limit(shape: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
    """The largest ``shape(n)`` whose twin stays within LIMIT (with room for the rest)."""
    low, high = 1, LIMIT
    while low < high:
        mid = (low + high + 1) // 2
        size = len(json.dumps(shape(mid), separators=(",", ":"), ensure_ascii=False))
        low, high = (mid, high) if size <= LIMIT - 200 else (low, mid - 1)
    return shape(low)


def short_keys(n: int) -> dict[str, Any]:
    """n leaves under the shortest keys there are: single characters, three levels deep."""
    out: dict[str, Any] = {}
    for i in range(n):
        a, b, c = i // len(KEY) ** 2, i // len(KEY) % len(KEY), i % len(KEY)
        out.setdefault(KEY[a], {}).setdefault(KEY[b], {})[KEY[c]] = 0
    return {"desired": out}


#: The shapes with the most index entries per byte of twin: desired leaves come back in
#: the delta, and each desired leaf path has a lifecycle entry of four or five values.
WORST_CASES: dict[str, Callable[[int], dict[str, Any]]] = {
    "keys": lambda n: {"desired": {f"k{i}": 0 for i in range(n)}},
    "short-keys": short_keys,
    "array": lambda n: {"desired": {"a": [0] * n}},
    "array-of-arrays": lambda n: {"desired": {"a": [[]] * n}},
    "attributes-array": lambda n: {"attributes": {"a": [0] * n}},
}


async def test_every_twin_within_the_size_limit_is_indexed(stalled: Stack) -> None:
    """ES refused 'The number of nested documents has exceeded the allowed limit of
    [32832]' for a PUT of 6,000 desired keys (59 KB): the limit counted 2 bytes of twin
    per entry and forgot the delta and the lifecycle."""
    amend = lifecycle_amend_ttl(3600)  # pending with an expiry: the longest lifecycle entry
    for name, shape in WORST_CASES.items():
        edit = replace_twin(at_limit(shape), f"org.a:{name}")
        outcome = await stalled.service.mutate(
            f"org.a:{name}", lambda _, e=edit: e, origin="test", may_create=True, amend=amend
        )
        assert outcome.twin is not None
        entries = len(to_es_document(outcome.twin.to_document(), 1)["leaves"])
        assert entries <= max_leaves(LIMIT), name
    while await stalled.index.index_pending():
        pass
    assert stalled.index.rejected == 0
    assert await indexed(stalled) == sorted(f"org.a:{n}" for n in WORST_CASES)


async def test_a_refused_twin_leaves_no_stale_document(
    stalled: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    """A twin rewritten into a shape the engine refuses kept its old document: a search by
    the values it had found it forever. Its old document goes; the log names it and why."""
    index = stalled.index
    before = {"twinId": "org.a:s", "namespace": "org.a", "attributes": {"site": "A"}}
    assert await index.write([Change("org.a:s", 1, before)]) == [Outcome.DONE]
    # A path over Lucene's 32,766 bytes per term (keys longer than the default limits allow).
    deep = {"€" * 4000: {"€" * 4000: {"€" * 4000: 1}}}
    after = {"twinId": "org.a:s", "namespace": "org.a", "attributes": {"site": "B", **deep}}
    with caplog.at_level(logging.ERROR):
        assert await index.write([Change("org.a:s", 2, after)]) == [Outcome.REJECTED]
    assert "org.a:s" in caplog.text and "immense" in caplog.text, caplog.text
    assert await indexed(stalled, 'eq(attributes/site,"A")') == []
    # The next write the engine takes is indexed as usual.
    assert await index.write([Change("org.a:s", 3, before)]) == [Outcome.DONE]
    assert await indexed(stalled, 'eq(attributes/site,"A")') == ["org.a:s"]


def long_path_doc(twin_id: str, values: list[Any]) -> dict[str, Any]:
    """14 keys of 256 characters above one array: every entry of it repeats a 3.6 KB path."""
    node: Any = values
    for level in range(14):
        node = {f"{level:x}" * 256: node}
    return {"twinId": twin_id, "namespace": "org.a", "attributes": {"x": 1, "deep": node}}


async def test_a_twin_of_long_paths_does_not_stop_the_indexer(stalled: Stack) -> None:
    """The twin of 30,000 zeros under a long path became a 112 MB bulk request; ES answered
    413, and the indexer retried that batch for good, indexing nothing else after it."""
    zeros = long_path_doc("org.a:zeros", [0] * 30_000)
    assert len(json.dumps(zeros, separators=(",", ":"))) < LIMIT
    other = {"twinId": "org.a:other", "namespace": "org.a", "attributes": {"x": 1}}
    outcomes = await stalled.index.write(
        [Change("org.a:zeros", 1, zeros), Change("org.a:other", 2, other)]
    )
    assert outcomes == [Outcome.DONE, Outcome.DONE]
    assert await indexed(stalled, "eq(attributes/x,1)") == ["org.a:other", "org.a:zeros"]
    rql = "eq(attributes/deep/" + "/".join(f"{i:x}" * 256 for i in reversed(range(14))) + ",0)"
    assert await indexed(stalled, rql) == ["org.a:zeros"]


async def test_a_document_over_the_bulk_size_is_refused_alone(
    small_bulk: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    """Bulk requests are split to stay within elasticsearch.bulk_max_bytes; a twin whose
    document alone is larger is refused by itself, its old document removed, and the log
    names it and its size; the twins around it are indexed."""
    index = small_bulk.index
    small = [
        Change(
            f"org.a:n{i}",
            1,
            {
                "twinId": f"org.a:n{i}",
                "namespace": "org.a",
                "attributes": {"x": 1, "pad": "p" * 8000},
            },
        )
        for i in range(300)
    ]
    big = long_path_doc("org.a:big", list(range(1000)))
    assert await index.write([Change("org.a:big", 1, {**big, "attributes": {"x": 2}})]) == [
        Outcome.DONE
    ]
    with caplog.at_level(logging.ERROR):
        outcomes = await index.write([*small[:150], Change("org.a:big", 2, big), *small[150:]])
    assert outcomes == [Outcome.DONE] * 150 + [Outcome.REJECTED] + [Outcome.DONE] * 150
    assert "org.a:big" in caplog.text and "bytes" in caplog.text, caplog.text
    assert await indexed(small_bulk, "eq(attributes/x,2)") == []
    assert await index.count(SearchQuery(parse_filter("eq(attributes/x,1)"))) == 300


@pytest.fixture
async def running(search_engine: SearchEngine, tmp_path: Path) -> AsyncIterator[Stack]:
    async for s in make_stack(
        search_engine, tmp_path, retry_max_seconds=0.5, wait_timeout_seconds=60
    ):
        yield s


async def test_a_deleted_index_is_created_again_and_filled(
    running: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    """After DELETE twins-v1-* the indexer said "1 twins must be indexed again" for good and
    searches answered 503 until an index rebuild. It creates the index again, says so, and
    fills it with every twin of the store, old and new."""
    await running.put("org.a:old", {"attributes": {"n": 1}})
    await running.put("org.a:gone", {"attributes": {"n": 2}})
    seq = await running.delete("org.a:gone")
    assert await running.ids("exists(attributes/n)", wait_for_seq=seq) == ["org.a:old"]
    with caplog.at_level(logging.WARNING):
        await running.index.client.indices.delete(index=f"{running.index.alias}-*")
        seq = await running.put("org.a:new", {"attributes": {"n": 3}})
        # The old twin is back as soon as the new write is covered: the indexer fills the
        # index before it takes the outbox again.
        assert await running.ids("exists(attributes/n)", wait_for_seq=seq) == [
            "org.a:new",
            "org.a:old",
        ]
    assert "created the search index" in caplog.text, caplog.text


async def test_rebuild_reports_the_twins_it_could_not_index(
    search_engine: SearchEngine, tmp_path: Path, stalled: Stack
) -> None:
    """It printed "rebuilt the index with 3 twins" and exited 0 with one of them refused."""
    data = tmp_path / "refusals"
    builtin = ServiceProcess(data, env={"TWIN_LIMITS__MAX_KEY_LENGTH": "4096"}).start()
    try:
        with builtin.client() as api:
            for name, body in (
                ("a", {"attributes": {"n": 1}}),
                ("b", {"attributes": {"€" * 4000: {"€" * 4000: {"€" * 4000: 1}}}}),
                ("c", {"attributes": {"n": 3}}),
            ):
                assert api.put(f"/api/v1/twins/org.a:{name}", json=body).status_code == 201
    finally:
        builtin.stop()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWIN_")}
    env.update(es_env(search_engine, stalled.index.alias))
    result = subprocess.run(
        [sys.executable, "-m", "twin_service.index.cli", "rebuild", "--data-dir", str(data)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 1, result.stderr
    assert "rebuilt the index with 2 of 3 twins" in result.stderr, result.stderr
    assert "1 refused" in result.stderr and "org.a:b" in result.stderr, result.stderr
    assert await indexed(stalled) == ["org.a:a", "org.a:c"]


async def test_a_failed_rebuild_deletes_its_new_index(stalled: Stack) -> None:
    """Each failed rebuild left its half-filled index (refresh_interval -1) behind."""
    for i in range(3):
        await stalled.put(f"org.a:r{i}", {"attributes": {"n": i}})

    def interrupted(done: int, total: int) -> None:
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        await _rebuild(stalled.index, stalled.store, interrupted, 1)
    names = await stalled.index.client.indices.get(index=f"{stalled.index.alias}-*")
    assert list(names) == [f"{stalled.index.alias}-v{MAPPING_VERSION}"]


async def block_writes(stack: Stack) -> None:
    """An operator's write block (``index.blocks.write``, as for a snapshot or a move)."""
    await stack.index.client.indices.put_settings(
        index=stack.index.alias, settings={"index.blocks.write": True}
    )


async def unblock_writes(stack: Stack) -> None:
    await stack.index.client.indices.put_settings(
        index=stack.index.alias, settings={"index.blocks.write": None}
    )


async def alias_on_two_indexes(stack: Stack) -> None:
    """The alias on two indexes with no write index, as two rebuilds at once left it:
    "no write index is defined"."""
    alias = stack.index.alias
    await stack.index.client.indices.create(index=f"{alias}-stray", aliases={alias: {}})
    await _writes_to_the_index(stack, False)


async def alias_on_one_index(stack: Stack) -> None:
    await stack.index.client.indices.delete(index=f"{stack.index.alias}-stray")
    await _writes_to_the_index(stack, True)


async def _writes_to_the_index(stack: Stack, writes: bool) -> None:
    """Whether the alias takes writes to the service's index (its write index)."""
    alias = stack.index.alias
    add = {"index": f"{alias}-v{MAPPING_VERSION}", "alias": alias, "is_write_index": writes}
    await stack.index.client.indices.update_aliases(actions=[{"add": add}])


@pytest.mark.parametrize(
    ("refuse", "accept", "reason"),
    [
        (block_writes, unblock_writes, "cluster_block_exception"),
        (alias_on_two_indexes, alias_on_one_index, "no write index is defined"),
    ],
)
async def test_writes_the_index_refuses_for_itself_stay_pending(
    stalled: Stack,
    refuse: Callable[[Stack], Any],
    accept: Callable[[Stack], Any],
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bulk item refused for the index's sake, not the document's, was taken as a refused
    document and dropped from the outbox: with a write block, 4 updates and 1 delete were
    lost for good (the index kept the old states and the deleted twin), backlog 0, and only
    the delete was logged. They stay pending, and are indexed once the index takes writes."""
    for i in range(5):
        await stalled.put(f"org.a:b{i}", {"attributes": {"v": 1}})
    await stalled.index.index_pending()
    await refuse(stalled)
    try:
        for i in range(1, 5):
            await stalled.put(f"org.a:b{i}", {"attributes": {"v": 2}})
        await stalled.delete("org.a:b0")
        with pytest.raises(Unavailable, match="5 twins must be indexed again") as retry:
            await stalled.index.index_pending()
        assert reason in (retry.value.description or ""), retry.value.description
        assert (await stalled.store.index_backlog())[0] == 5
        assert stalled.index.rejected == 0
    finally:
        await accept(stalled)
    assert await stalled.index.index_pending() == 5
    assert await indexed(stalled) == [f"org.a:b{i}" for i in range(1, 5)]
    assert await indexed(stalled, "eq(attributes/v,1)") == []
    assert "refused" not in caplog.text, caplog.text
