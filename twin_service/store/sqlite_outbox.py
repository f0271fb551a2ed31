"""The SQLite outbox of the external search index: the SQL more than one writer step runs."""

from __future__ import annotations

import sqlite3


def queue_every_twin(conn: sqlite3.Connection, seq: int) -> int:
    """Queue every twin and every tombstone for the external index at ``seq`` (its first
    unindexed write too): a version above any the index holds, so each is written again
    (a tombstone deletes what the index may still hold). Rows already queued keep their
    first unindexed write. Returns how many rows were queued."""
    queued = 0
    for table in ("twins", "tombstones"):
        queued += conn.execute(
            "INSERT INTO index_outbox (twin_id, seq, first_seq) "
            f"SELECT twin_id, ?, ? FROM {table} WHERE true "
            "ON CONFLICT (twin_id) DO UPDATE SET seq = MAX(seq, excluded.seq)",
            (seq, seq),
        ).rowcount
    return queued
