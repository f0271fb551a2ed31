"""``sqlite.page_size``: applied to a new database, never to an existing one."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path

import pytest
from pydantic import ValidationError

from tests.store.contract import change
from twin_service.settings import SqliteSettings, StreamSettings
from twin_service.store.sqlite import SqliteStore


def _page_size(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("PRAGMA page_size").fetchone()[0])


async def _write_and_read(path: Path, page_size: int, twin_id: str) -> None:
    store = SqliteStore(path, SqliteSettings(page_size=page_size), StreamSettings())
    await store.open()
    try:
        await store.write(change(None, twin_id, {"desired": {"x": "y" * 3000}}))
        twin = await store.get(twin_id)
        assert twin is not None and twin.desired == {"x": "y" * 3000}
    finally:
        await store.close()


def test_a_new_database_gets_the_page_size_and_an_old_one_keeps_its_own(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "twins.sqlite3"
    asyncio.run(_write_and_read(path, 2048, "org.acme:a"))  # 3 KB: overflows a 2 KiB page
    assert _page_size(path) == 2048
    with caplog.at_level(logging.INFO, logger="twin_service.store.sqlite"):
        asyncio.run(_write_and_read(path, 8192, "org.acme:b"))
    assert _page_size(path) == 2048
    assert "keeps its page size of 2048 bytes" in caplog.text


def test_page_size_must_be_a_power_of_two() -> None:
    with pytest.raises(ValidationError, match="power of two"):
        SqliteSettings(page_size=3000)
    with pytest.raises(ValidationError):
        SqliteSettings(page_size=512)
