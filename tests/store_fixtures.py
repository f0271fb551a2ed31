"""The ``store_factory`` fixture: every store implementation, on a real database (the store
contract and the device handlers run on each)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from twin_service.settings import Settings, StreamSettings
from twin_service.store.base import TwinStore


def mongodb_settings(data_dir: Path, url: str, database: str, /, **options: Any) -> Settings:
    """The settings of a MongoDB store on ``url``'s ``database``: ``options`` are settings
    where they name one (``stream``, ``search``...), else ``mongodb.*`` settings."""
    top = {name: options.pop(name) for name in list(options) if name in Settings.model_fields}
    mongo = {"database": database, **options}
    return Settings(data_dir=data_dir, store="mongodb", mongodb_url=url, mongodb=mongo, **top)


@contextlib.asynccontextmanager
async def raw_database(url: str, name: str) -> AsyncIterator[AsyncDatabase[dict[str, Any]]]:
    """A MongoDB store's database through a client of the test's own: to leave there what
    another process (a killed writer, an older replica) would, or to read what the store
    left."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(url)
    try:
        yield client.get_database(name)
    finally:
        await client.close()


#: ``make(stream=..., outbox=...)`` opens another store on the same database.
StoreFactory = Callable[..., Awaitable[TwinStore]]


@pytest.fixture(params=["sqlite", "mongodb"])
async def store_factory(
    request: pytest.FixtureRequest, tmp_path: Path, unique_name: str
) -> AsyncIterator[StoreFactory]:
    """Opens stores sharing one database (like replicas); all closed after the test."""
    opened: list[TwinStore] = []
    url = None
    if request.param == "mongodb":
        url = request.getfixturevalue("ferretdb_server").url

    async def make(
        stream: StreamSettings | None = None, outbox: bool = False, **mongo: Any
    ) -> TwinStore:
        store: TwinStore
        if request.param == "sqlite":
            from twin_service.store.sqlite import SqliteStore

            settings = Settings(data_dir=tmp_path)
            store = SqliteStore(
                tmp_path / "twins.sqlite3",
                settings.sqlite,
                stream or StreamSettings(),
                outbox=outbox,
            )
        else:
            from twin_service.store.mongodb import MongoStore

            assert url is not None
            settings = mongodb_settings(
                tmp_path,
                url,
                unique_name,
                search="elasticsearch" if outbox else "builtin",
                elasticsearch_url="http://127.0.0.1:9" if outbox else None,
                stream=stream or StreamSettings(),
                **{"gap_timeout_seconds": 2.0, **mongo},
            )
            store = MongoStore(settings)
        await store.open()
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()
