"""The external index's outbox across starts with and without it (``search`` switched)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.store.contract import change, deletion
from twin_service.settings import SqliteSettings, StreamSettings
from twin_service.store.sqlite import SqliteStore


async def _open(path: Path, *, outbox: bool, builtin: bool = True) -> SqliteStore:
    store = SqliteStore(
        path, SqliteSettings(), StreamSettings(), outbox=outbox, builtin_index=builtin
    )
    await store.open()
    return store


async def _pending(path: Path, *, ack: bool = False) -> dict[str, bool]:
    """Twin id -> whether the pending task holds a twin (False: a deletion); ``ack``: then
    acknowledge them all, as the indexer does."""
    store = await _open(path, outbox=True, builtin=False)
    try:
        tasks = await store.pending_index(100)
        if ack:
            await store.mark_indexed(tasks)
        return {t.twin_id: t.twin is not None for t in tasks}
    finally:
        await store.close()


async def _write_without_outbox(path: Path, builtin: bool) -> None:
    store = await _open(path, outbox=False, builtin=builtin)
    try:
        for name in ("a", "b", "c"):
            await store.write(change(None, f"org.acme:{name}", {"attributes": {}}))
        doomed = await store.get("org.acme:b")
        assert doomed is not None
        await store.write(deletion(doomed))
    finally:
        await store.close()


@pytest.mark.parametrize("search", ["builtin", "off"])
async def test_a_start_with_the_outbox_queues_what_was_written_without_it(
    tmp_path: Path, search: str
) -> None:
    path = tmp_path / "twins.sqlite3"
    await _write_without_outbox(path, builtin=search == "builtin")
    expected = {"org.acme:a": True, "org.acme:b": False, "org.acme:c": True}
    assert await _pending(path, ack=True) == expected
    # Kept since: the next start with the outbox queues nothing again.
    assert await _pending(path) == {}


async def test_a_database_from_before_the_record_is_judged_by_its_builtin_index(
    tmp_path: Path,
) -> None:
    path = tmp_path / "twins.sqlite3"
    await _write_without_outbox(path, builtin=True)
    conn = sqlite3.connect(path)
    conn.execute("DELETE FROM meta WHERE key = 'outbox'")
    conn.commit()
    conn.close()
    # builtin_index 1: the last start kept the built-in index, so no outbox.
    assert set(await _pending(path)) == {"org.acme:a", "org.acme:b", "org.acme:c"}


async def test_a_new_database_queues_nothing(tmp_path: Path) -> None:
    assert await _pending(tmp_path / "twins.sqlite3") == {}


async def test_an_outbox_from_before_first_seq_is_migrated(tmp_path: Path) -> None:
    """Its rows knew only each twin's latest write: that becomes the first one, and the
    twin's next write keeps it."""
    path = tmp_path / "twins.sqlite3"
    store = await _open(path, outbox=True, builtin=False)
    try:
        seq = await store.write(change(None, "org.acme:old", {"attributes": {}}))
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    conn.execute("DROP INDEX index_outbox_by_first_seq")
    conn.execute("ALTER TABLE index_outbox DROP COLUMN first_seq")
    conn.execute("CREATE INDEX index_outbox_by_seq ON index_outbox (seq)")
    conn.commit()
    conn.close()
    store = await _open(path, outbox=True, builtin=False)
    try:
        assert await store.index_backlog() == (1, seq)
        twin = await store.get("org.acme:old")
        later = await store.write(change(twin, "org.acme:old", {"attributes": {"n": 1}}))
        assert await store.index_backlog() == (1, seq)
        (task,) = await store.pending_index(10)
        assert task.seq == later
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    indexes = {
        row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
    }
    conn.close()
    assert "index_outbox_by_first_seq" in indexes and "index_outbox_by_seq" not in indexes
