"""``index rebuild`` cancelled (Ctrl-C, SIGTERM, SIGHUP) at each of its requests to the
engine: no index is left behind, and the live index holds every write, those made during
the rebuild included. Real store, real service core, real Elasticsearch; the rebuild is
cancelled when a given request goes out (or has come back), as a signal landing there."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from elasticsearch._async.client.indices import IndicesClient

from search.rql import SearchQuery, parse_filter
from tests.index.helpers import es_env
from tests.index.test_indexer import Stack
from tests.index.test_rebuild_switch import TWINS, assert_one_write_index, filled
from tests.servers.search_engine import SearchEngine
from tests.service_process import service_env
from twin_service.index.cli import main
from twin_service.index.elasticsearch import FillResult, _rebuild

pytestmark = pytest.mark.server("elasticsearch")

# (request, which call of it, when the cancellation lands, whether the alias has moved):
# "out" while the request is at an engine that acts on it late (the client cannot take back
# what it sent), "back" once it answered (at the rebuild's next await).
STOPS = [
    ("create", 2, "out", False),  # the new index (the first call makes the lock)
    ("put_settings", 1, "back", False),
    ("refresh", 1, "back", False),
    ("get_alias", 1, "back", False),
    ("update_aliases", 1, "out", True),
    ("update_aliases", 1, "back", True),
    ("get_alias", 2, "back", True),  # the catch-up after the switch comes next
]


@pytest.fixture
async def stalled(search_engine: SearchEngine, tmp_path: Path) -> AsyncIterator[Stack]:
    async for s in filled(search_engine, tmp_path, "60s"):
        yield s


async def write_meanwhile(stack: Stack) -> None:
    """What the service does while the rebuild fills: writes, indexed by its indexer into
    the index the alias is on (the old one), cleared from the outbox."""
    for i in range(5):
        await stack.put(f"org.a:t{i:02}", {"attributes": {"n": 100 + i}})
    for i in range(5, 8):
        await stack.delete(f"org.a:t{i:02}")
    await stack.put("org.a:new", {"attributes": {"n": 200}})
    await stack.index.index_pending()


def stop_at(
    stack: Stack, request: str, nth: int, when: str, rebuild: Callable[[], asyncio.Task[Any]]
) -> None:
    """Cancel ``rebuild()`` at the ``nth`` call of ``client.indices.<request>``; the service
    writes when the rebuild sets the new index's settings (its fill caught up)."""
    indices = stack.index.client.indices
    real: Callable[..., Awaitable[Any]] = getattr(indices, request)
    calls = 0

    async def hooked(**kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls != nth:
            return await real(**kwargs)
        if when == "back":
            answer = await real(**kwargs)
            rebuild().cancel()
            return answer

        async def late() -> Any:
            await asyncio.sleep(0.5)
            return await real(**kwargs)

        sent = asyncio.ensure_future(late())
        rebuild().cancel()
        return await asyncio.shield(sent)

    setattr(indices, request, hooked)
    real_settings = indices.put_settings

    async def settings(**kwargs: Any) -> Any:
        await write_meanwhile(stack)
        return await real_settings(**kwargs)

    indices.put_settings = settings  # type: ignore[method-assign]


async def in_live_index(stack: Stack) -> dict[str, list[str]]:
    """The twins in the live index, and those it finds by each value written meanwhile."""
    await stack.index.client.indices.refresh(index=stack.index.alias)
    found = {}
    for rql in [None, *(f"eq(attributes/n,{n})" for n in (100, 101, 102, 103, 104, 200))]:
        query = SearchQuery(parse_filter(rql) if rql else None, size=1000)
        found[rql or "all"] = sorted((await stack.index.search_ids(query))[0])
    return found


@pytest.mark.parametrize(("request_name", "nth", "when", "moved"), STOPS)
async def test_a_rebuild_stopped_at_any_request_leaves_one_full_index(
    stalled: Stack, request_name: str, nth: int, when: str, moved: bool
) -> None:
    """Stopped once the alias had moved (two replicas writing), the rebuild left the live
    index with stale twins and ghosts of deleted ones, for good, and the old index; stopped
    between the fill and the switch it left the full new index; stopped while the engine
    made the new index, it left that one, empty."""
    client, alias = stalled.index.client, stalled.index.alias
    (before,) = await client.indices.get_alias(name=alias)
    switched: list[FillResult] = []
    task: asyncio.Task[FillResult] | None = None

    def rebuild() -> asyncio.Task[FillResult]:
        assert task is not None
        return task

    stop_at(stalled, request_name, nth, when, rebuild)
    task = asyncio.create_task(
        _rebuild(
            stalled.index,
            stalled.store,
            None,
            7,
            on_switch=lambda _, result: switched.append(result),
        )
    )
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(1)  # an engine that read a request late has acted on it
    indexes = sorted(await client.indices.get(index=f"{alias}-*"))
    assert len(indexes) == 1, indexes  # no lock, no new index, no old one
    assert (indexes[0] != before) is moved, (indexes, before)
    assert [r.indexed for r in switched] == ([TWINS] if moved else [])
    await assert_one_write_index(stalled)
    found = await in_live_index(stalled)
    if request_name == "create":  # stopped before the service wrote
        assert found["all"] == [f"org.a:t{i:02}" for i in range(TWINS)]
        return
    twins = [f"org.a:t{i:02}" for i in range(TWINS) if not 5 <= i < 8]
    assert found == {
        "all": sorted(["org.a:new", *twins]),
        **{f"eq(attributes/n,{100 + i})": [f"org.a:t{i:02}"] for i in range(5)},
        "eq(attributes/n,200)": ["org.a:new"],
    }


def test_sigterm_after_the_switch_ends_the_rebuild_and_says_so(
    search_engine: SearchEngine,
    stalled: Stack,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``index rebuild`` said "rebuild stopped by SIGTERM" and exited 143, which the docs
    say leaves the index as it was, when the alias had moved (and the old index stayed)."""
    alias = stalled.index.alias
    for name in [name for name in os.environ if name.startswith("TWIN_")]:
        monkeypatch.delenv(name)
    for name, value in service_env(es_env(search_engine, alias)).items():
        monkeypatch.setenv(name, value)
    real = IndicesClient.update_aliases

    async def update_aliases(self: IndicesClient, **kwargs: Any) -> Any:
        answer = await real(self, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return answer

    monkeypatch.setattr(IndicesClient, "update_aliases", update_aliases)
    code = main(["rebuild", "--data-dir", str(stalled.settings.data_dir)])
    err = capsys.readouterr().err
    indexes = httpx.get(f"{search_engine.url}/{alias}-*").json()
    assert list(indexes) == [target := next(iter(indexes))], err  # the old one deleted
    assert code == 0, err
    assert f"SIGTERM came after the alias moved to {target}: the rebuild ended" in err, err
    assert f"rebuilt the index with {TWINS} twins" in err, err
