"""``sqlite.writer_cache_mib``: the writer's own small page cache, and batches larger than it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from search.rql import SearchQuery, parse_filter
from tests.store.contract import change
from twin_service.settings import SqliteSettings, StreamSettings
from twin_service.store.sqlite import SqliteStore
from twin_service.store.sqlite_writer import SqliteWriter, WriterConfig

TWINS = 300


def test_the_writer_connection_has_its_own_cache_size(tmp_path: Path) -> None:
    settings = SqliteSettings(cache_mib=64, writer_cache_mib=3)
    writer = SqliteWriter(
        WriterConfig(tmp_path / "twins.sqlite3", settings, StreamSettings(), False, True)
    )
    writer.open()
    try:
        conn = writer._conn
        assert conn is not None
        assert conn.execute("PRAGMA cache_size").fetchone()[0] == -3 * 1024
    finally:
        writer.close()


async def _write_many(path: Path) -> None:
    store = SqliteStore(path, SqliteSettings(writer_cache_mib=1), StreamSettings())
    await store.open()
    try:
        # Sent together, these share commits of up to max_batch (128) writes. Each twin,
        # and its copy in the journal, takes two pages: a commit dirties more than 512
        # pages, twice what a 1 MiB cache holds, so SQLite writes some to the WAL early.
        await asyncio.gather(
            *(
                store.write(
                    change(None, f"org.acme:t{i}", {"attributes": {"n": i, "pad": "p" * 6000}})
                )
                for i in range(TWINS)
            )
        )
    finally:
        await store.close()


async def _read_back(path: Path) -> None:
    store = SqliteStore(path, SqliteSettings(), StreamSettings())
    await store.open()
    try:
        twins = await store.get_many([f"org.acme:t{i}" for i in range(TWINS)])
        assert sorted(twin.attributes["n"] for twin in twins) == list(range(TWINS))
        query = SearchQuery(filter=parse_filter(f"ge(attributes/n,{TWINS - 10})"))
        assert await store.count(query) == 10
    finally:
        await store.close()


def test_batches_larger_than_the_writer_cache_commit_whole(tmp_path: Path) -> None:
    path = tmp_path / "twins.sqlite3"
    asyncio.run(_write_many(path))
    asyncio.run(_read_back(path))
