"""``index rebuild`` against a live index: one rebuild at a time, the alias moved in one step
onto one write index, and no search (without ``waitFor``) that finds the new index empty.
Real store, real service core, real Elasticsearch."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.index.helpers import es_env
from tests.index.test_indexer import Stack, make_stack
from tests.index.test_rebuild_existing_store import rebuild
from tests.servers.search_engine import SearchEngine
from tests.service_process import service_env
from twin_service.index.elasticsearch import RebuildRunning, _rebuild, rebuild_lock

pytestmark = pytest.mark.server("elasticsearch")

TWINS = 30


async def filled(engine: SearchEngine, tmp_path: Path, refresh: str) -> AsyncIterator[Stack]:
    async for s in make_stack(engine, tmp_path, run_indexer=False, refresh_interval=refresh):
        for i in range(TWINS):
            await s.put(f"org.a:t{i:02}", {"attributes": {"n": i}})
        await s.index.index_pending()
        await s.index.client.indices.refresh(index=s.index.alias)
        yield s


@pytest.fixture
async def stalled(search_engine: SearchEngine, tmp_path: Path) -> AsyncIterator[Stack]:
    async for s in filled(search_engine, tmp_path, "60s"):
        yield s


@pytest.fixture
async def unrefreshed(search_engine: SearchEngine, tmp_path: Path) -> AsyncIterator[Stack]:
    """Only explicit refreshes make documents searchable: a switch to an index not yet
    refreshed shows as an empty answer until one (a setting of 1s made it a race)."""
    async for s in filled(search_engine, tmp_path, "-1"):
        yield s


async def count(stack: Stack) -> int:
    """What a search without ``waitFor`` counts (no refresh)."""
    return int((await stack.index.client.count(index=stack.index.alias))["count"])


async def assert_one_write_index(stack: Stack) -> None:
    found = await stack.index.client.indices.get_alias(name=stack.index.alias)
    assert len(found) == 1, list(found)
    ((_, body),) = found.items()
    assert body["aliases"][stack.index.alias].get("is_write_index") is True, body


async def test_a_second_rebuild_while_one_runs_is_refused(stalled: Stack) -> None:
    """Two rebuilds at once could leave the alias on both new indexes (2 runs in 6): every
    twin found twice, every later write refused for good ("no write index is defined for
    alias") with /ready saying up, and one run exiting 1 with index_not_found_exception."""
    started = asyncio.Event()
    first = asyncio.create_task(
        _rebuild(stalled.index, stalled.store, lambda done, total: started.set(), 1)
    )
    try:
        await started.wait()
        with pytest.raises(RebuildRunning, match="another index rebuild") as refused:
            await _rebuild(stalled.index, stalled.store, None, 1)
        assert rebuild_lock(stalled.index.alias) in (refused.value.description or "")
        assert (await first).indexed == TWINS
    finally:
        if not first.done():
            first.cancel()
            with contextlib.suppress(BaseException):
                await first
    await assert_one_write_index(stalled)
    assert await count(stalled) == TWINS
    # The lock went with the rebuild that held it, and the index takes writes.
    await stalled.put("org.a:later", {"attributes": {"n": 99}})
    await stalled.index.index_pending()
    assert await stalled.ids("eq(attributes/n,99)", wait_for_seq=await stalled.store.last_seq())
    assert (await _rebuild(stalled.index, stalled.store, None, 100)).indexed == TWINS + 1


async def test_a_lock_left_by_a_dead_rebuild_is_named_and_can_be_removed(
    search_engine: SearchEngine, stalled: Stack
) -> None:
    """A rebuild killed outright leaves its lock: the next one says how to remove it, and
    the command exits 3 (a job can tell it from a failed rebuild)."""
    lock = rebuild_lock(stalled.index.alias)
    await stalled.index.client.indices.create(index=lock)
    with pytest.raises(RebuildRunning) as refused:
        await _rebuild(stalled.index, stalled.store, None, 100)
    assert f"DELETE /{lock}" in (refused.value.description or "")
    data = str(stalled.settings.data_dir)
    command = rebuild(es_env(search_engine, stalled.index.alias), "--data-dir", data)
    assert command.returncode == 3, command.stderr
    assert "another index rebuild" in command.stderr and f"DELETE /{lock}" in command.stderr
    await stalled.index.client.indices.delete(index=lock)
    assert (await _rebuild(stalled.index, stalled.store, None, 100)).indexed == TWINS


async def test_the_switch_leaves_the_alias_on_the_new_index_alone(stalled: Stack) -> None:
    """An alias already on two indexes (left by an older version's concurrent rebuilds)
    ends on the new one only, as its write index."""
    client, alias = stalled.index.client, stalled.index.alias
    await client.indices.create(index=f"{alias}-stray", aliases={alias: {}})
    await _rebuild(stalled.index, stalled.store, None, 100)
    await assert_one_write_index(stalled)
    assert await count(stalled) == TWINS


async def test_searches_during_a_rebuild_find_every_twin(unrefreshed: Stack) -> None:
    """The alias moved to the new index before it was refreshed: searches without waitFor
    counted 0 instead of 863 for up to 0.24 s (2 rebuilds in 5), while the docs promise
    no downtime."""
    counts: list[int] = []

    async def watch() -> None:
        while True:
            counts.append(await count(unrefreshed))

    watcher = asyncio.create_task(watch())
    try:
        await _rebuild(unrefreshed.index, unrefreshed.store, None, 5)
        counts.append(await count(unrefreshed))
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    assert len(counts) > 10
    assert set(counts) == {TWINS}, counts


async def test_a_rebuild_stopped_while_it_takes_the_lock_leaves_none(
    search_engine: SearchEngine, stalled: Stack
) -> None:
    """Cancelled (Ctrl-C, SIGTERM) once its request for the lock was out, the rebuild left
    the lock the engine made after: every later rebuild was refused (7 times in a probe)."""
    lock = rebuild_lock(stalled.index.alias)
    with search_engine.frozen():  # the request waits at the engine
        task = asyncio.create_task(_rebuild(stalled.index, stalled.store, None, 100))
        await asyncio.sleep(1)
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(1)  # an engine that read the request late has acted on it
    assert not await stalled.index.client.indices.exists(index=lock)
    assert (await _rebuild(stalled.index, stalled.store, None, 100)).indexed == TWINS


async def test_sigterm_ends_a_rebuild_without_its_lock_or_its_new_index(
    search_engine: SearchEngine, stalled: Stack
) -> None:
    """SIGTERM (kill, timeout, systemd) ended the rebuild where it stood (exit -15): its
    lock refused every later rebuild, and its half-filled index stayed on the engine."""
    client, alias = stalled.index.client, stalled.index.alias
    for i in range(TWINS, 300):  # a fill of a page a request outlasts the wait below
        await stalled.put(f"org.a:t{i:03}", {"attributes": {"n": i}})
    before = sorted(await client.indices.get(index=f"{alias}-*"))
    data = str(stalled.settings.data_dir)
    command = [sys.executable, "-m", "twin_service", "index", "rebuild", "--data-dir", data]
    run = subprocess.Popen(
        [*command, "--page-size", "1"],
        env=service_env(es_env(search_engine, alias)),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while not await client.indices.exists(index=rebuild_lock(alias)):
            assert run.poll() is None, run.communicate()[1]
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        run.send_signal(signal.SIGTERM)
        err = await asyncio.to_thread(lambda: run.communicate(timeout=60)[1])
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 128 + signal.SIGTERM, err
    assert "rebuild stopped by SIGTERM" in err and "Traceback" not in err, err
    assert sorted(await client.indices.get(index=f"{alias}-*")) == before
