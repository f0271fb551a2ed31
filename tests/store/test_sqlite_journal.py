"""SQLite-specific journal upkeep (the behaviour itself is in the store contract)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from twin_service.settings import SqliteSettings, StreamSettings
from twin_service.store.sqlite import SqliteStore
from twin_service.store.sqlite_writer import LATEST_EXPIRED_SQL, PRUNE_AGED_SQL


def plan(tmp_path: Path, sql: str, params: object) -> str:
    """How SQLite answers ``sql`` on a store's schema."""
    path = tmp_path / "twins.sqlite3"

    async def create() -> None:
        store = SqliteStore(path, SqliteSettings(), StreamSettings())
        await store.open()
        await store.close()

    asyncio.run(create())
    with sqlite3.connect(path) as conn:
        return " | ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params))


def test_age_pruning_finds_expired_events_through_the_timestamp_index(tmp_path: Path) -> None:
    """Every 100th commit asks for the newest expired event. Answered from the table, that
    walked the whole journal backwards when nothing had expired (230 ms at 190,000 events,
    inside the writer); through ``events_by_ts`` it reads only what has expired."""
    found = plan(tmp_path, LATEST_EXPIRED_SQL, ("x",))
    assert "USING COVERING INDEX events_by_ts (ts<?)" in found, found
    assert "SCAN" not in found, found


def test_age_pruning_reads_what_aged_since_the_last_and_the_older_events_of_its_twins(
    tmp_path: Path,
) -> None:
    """Pruning by age keeps each twin's newest event: a prune that looked at every event
    past the age read those again each time (70-120 ms at 100,000 idle twins)."""
    window = {"since": 0, "latest": 1}
    grouped, deletions = (plan(tmp_path, sql, window) for sql in PRUNE_AGED_SQL)
    assert "SEARCH events USING INTEGER PRIMARY KEY (rowid>? AND rowid<?)" in grouped, grouped
    assert "SEARCH older USING COVERING INDEX events_by_twin_seq" in grouped, grouped
    assert "SCAN events" not in grouped and "SCAN older" not in grouped, grouped
    assert "SEARCH events USING INTEGER PRIMARY KEY (rowid>? AND rowid<?)" in deletions
