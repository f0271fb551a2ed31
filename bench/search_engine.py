"""Elasticsearch index benchmark (issue 7), beside the built-in SQLite index. Not a test.

1. Loads ``--twins`` generated twins (those of :mod:`bench.search`, about 30 leaves each)
   through ``SqliteStore.write`` with the index outbox on, as the service does with
   ``search=elasticsearch``.
2. Drains the outbox with the service's own indexer step (``ElasticsearchIndex.index_pending``:
   read pending twins, ``_bulk`` with external versions, acknowledge) and reports twins/s.
3. Runs each query ``--runs`` times in process on both indexes (the same ``SearchQuery``;
   both read the page's twins from the store): p50 and p95 latency, and the ratio.
4. Runs the indexer loop while writing ``--rate`` merge patches per second for ``--seconds``
   and samples the index lag (age of the oldest unindexed write) every 100 ms.

The node is the test one (``tests/servers/search_engine.py``, 512 MB heap) unless ``--url``
names another. Run from the repository root: ``python -m bench.search_engine``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.common import machine, markdown_table, percentile
from bench.search import NAMESPACE, OWNERS, build_write, generate, twin_id
from search.rql import SearchQuery, parse_filter
from tests.terminate import interrupt_on_sigterm
from twin_service.index.elasticsearch import ElasticsearchIndex
from twin_service.settings import Settings
from twin_service.store.sqlite import SqliteStore


def queries(count: int) -> dict[str, Callable[[random.Random], tuple[str, bool]]]:
    """Name -> (random RQL filter, is it a count)."""
    digits = max(1, len(str(count)) - 3)
    return {
        "eq attribute (0.1%)": lambda r: (
            f'eq(attributes/owner,"owner-{r.randrange(OWNERS):04d}")',
            False,
        ),
        "range reported number (1%)": lambda r: (
            f"gt(reported/uptime,{9_900_000 - r.randrange(1000)})",
            False,
        ),
        "and of two (0.02%)": lambda r: (
            f'and(eq(attributes/site,"plant-{r.randrange(50):02d}"),'
            f"gt(reported/uptime,{9_000_000 + r.randrange(1000)}))",
            False,
        ),
        "exists(delta) (10%)": lambda r: ("exists(delta)", False),
        "prefix like (0.1%)": lambda r: (
            f'like(attributes/serial,"SN-{r.randrange(10 ** (7 - digits)):0{7 - digits}d}*")',
            False,
        ),
        "count of 10% match": lambda r: ("exists(delta)", True),
    }


async def load(store: SqliteStore, settings: Settings, count: int, seed: int) -> float:
    rng = random.Random(seed)
    limits = settings.limits.to_limits()
    started = time.perf_counter()
    for start in range(0, count, 2000):
        writes = [
            build_write(None, twin_id(i), generate(i, rng), limits)
            for i in range(start, min(count, start + 2000))
        ]
        await asyncio.gather(*(store.write(w) for w in writes))
    return count / (time.perf_counter() - started)


async def drain(index: ElasticsearchIndex, total: int) -> float:
    started = time.perf_counter()
    done = 0
    while taken := await index.index_pending():
        done += taken
        if done % 20_000 < taken:
            rate = done / (time.perf_counter() - started)
            print(f"  indexed {done:,}/{total:,} ({rate:,.0f} twins/s)", flush=True)
    await index.client.indices.refresh(index=index.alias)
    return done / (time.perf_counter() - started)


async def latencies(run: Callable[[], Awaitable[Any]], runs: int) -> tuple[float, float]:
    await run()  # warm caches
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        await run()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return percentile(samples, 50), percentile(samples, 95)


async def compare(
    store: SqliteStore, index: ElasticsearchIndex, count: int, runs: int
) -> list[list[object]]:
    rows: list[list[object]] = []
    for name, make in queries(count).items():
        results = []
        for backend in ("sqlite", "es"):
            rng = random.Random(1)

            async def once(
                backend: str = backend,
                rng: random.Random = rng,
                make: Callable[[random.Random], tuple[str, bool]] = make,
            ) -> Any:
                rql, is_count = make(rng)
                query = SearchQuery(parse_filter(rql), namespaces=(NAMESPACE,))
                if backend == "sqlite":
                    return await (store.count(query) if is_count else store.search(query))
                return await (index.count(query) if is_count else index.search(query))

            results.append(await latencies(once, runs))
        (s50, s95), (e50, e95) = results
        rows.append(
            [name, f"{s50:.2f}", f"{s95:.2f}", f"{e50:.2f}", f"{e95:.2f}", f"{e50 / s50:.1f}x"]
        )
    return rows


async def sustained(
    store: SqliteStore,
    index: ElasticsearchIndex,
    settings: Settings,
    rate: int,
    seconds: float,
    count: int,
) -> dict[str, float]:
    """Write ``rate`` patches/s with the indexer running; lag samples every 100 ms."""
    rng = random.Random(7)
    limits = settings.limits.to_limits()
    indexer = asyncio.create_task(index.run())
    samples: list[float] = []
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            samples.append((await index.lag())[1])
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    started = time.perf_counter()
    written = 0
    try:
        while (elapsed := time.perf_counter() - started) < seconds:
            due = int(elapsed * rate) - written
            if due > 0:
                ids = [twin_id(rng.randrange(count)) for _ in range(due)]
                currents = await store.get_many(ids)
                writes = [
                    build_write(
                        t, t.twin_id, {"reported": {"uptime": rng.randrange(10**7)}}, limits
                    )
                    for t in {t.twin_id: t for t in currents}.values()
                ]
                await asyncio.gather(*(store.write(w) for w in writes), return_exceptions=True)
                written += due
            await asyncio.sleep(0.01)
        end = time.perf_counter()
        while (await store.index_backlog())[0] > 0:
            await asyncio.sleep(0.01)
        converge = time.perf_counter() - end
    finally:
        stop.set()
        await sampler
        indexer.cancel()
    samples.sort()
    return {
        "writes/s": written / seconds,
        "lag p50 s": percentile(samples, 50),
        "lag p95 s": percentile(samples, 95),
        "lag max s": samples[-1],
        "drain after s": converge,
    }


async def main_async(args: argparse.Namespace, url: str, data_dir: Path) -> None:
    settings = Settings(
        data_dir=data_dir,
        search="elasticsearch",
        elasticsearch_url=url,
        elasticsearch={"index_name": "bench-twins", "replicas": 0, "batch_size": args.batch},
    )
    store = SqliteStore(
        data_dir / "twins.sqlite3",
        settings.sqlite,
        settings.stream,
        outbox=True,
        gc_thresholds=settings.gc_thresholds,
    )
    await store.open()
    index = ElasticsearchIndex(settings, store, run_indexer=False)
    await index.start()
    try:
        print(f"machine: {machine()}; twins: {args.twins:,}; batch {args.batch}")
        load_rate = await load(store, settings, args.twins, args.seed)
        print(f"store load (outbox on): {load_rate:,.0f} twins/s")
        index_rate = await drain(index, args.twins)
        print(f"Elasticsearch bulk indexing: {index_rate:,.0f} twins/s\n")
        rows = await compare(store, index, args.twins, args.runs)
        print(
            markdown_table(
                ["query", "SQLite p50 ms", "p95", "ES p50 ms", "p95", "ES/SQLite p50"], rows
            )
        )
        lag = await sustained(store, index, settings, args.rate, args.seconds, args.twins)
        print("\nsustained writes with the indexer running:")
        print(markdown_table(list(lag), [[f"{v:.3f}" for v in lag.values()]]))
    finally:
        await index.client.indices.delete(index="bench-twins-*")
        await index.stop()
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--twins", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=500, help="indexer bulk size")
    parser.add_argument("--runs", type=int, default=50, help="runs per query and index")
    parser.add_argument("--rate", type=int, default=500, help="writes/s of the lag test")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--url", help="an Elasticsearch to use instead of the test node")
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="twin-bench-es-"))
    node = None
    try:
        url = args.url
        if url is None:
            from tests.servers.search_engine import SearchEngine

            node = SearchEngine(heap_mb=1024).start()
            url = node.url
            print(f"Elasticsearch {node.version} (integ-test-zip) at {url}")
        asyncio.run(main_async(args, url, data_dir))
    finally:
        if node is not None:
            node.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    interrupt_on_sigterm()  # servers are stopped on SIGTERM too
    main()
