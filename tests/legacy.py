"""Databases as twin-service wrote them before it kept tombstones of deleted twins, and
journals after retention removed events.

A twin created again then started at revision 1, so caches and compare-and-set checks must
still tell two twins of one id at the same revision apart (their incarnation).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path


def forget_sqlite_tombstone(database: Path, twin_id: str) -> None:
    """Remove the tombstone of ``twin_id`` from the SQLite file ``database`` (the service
    may be running on it): the next twin of the id starts again at revision 1."""
    _execute(database, "DELETE FROM tombstones WHERE twin_id = ?", twin_id)


def age_out_sqlite_journal(database: Path, twin_id: str) -> None:
    """Remove every journal event of ``twin_id`` from ``database``, as pruning by age does
    once they are older than ``stream.journal_max_age_seconds``."""
    _execute(database, "DELETE FROM events WHERE twin_id = ?", twin_id)


def age_sqlite_journal(database: Path) -> None:
    """Date every journal event of ``database`` in 2000, past any
    ``stream.journal_max_age_seconds``, as if the service had been idle that long."""
    _execute(database, "UPDATE events SET ts = '2000-01-01T00:00:00.000Z'")


def _execute(database: Path, sql: str, *params: object) -> None:
    """One statement in its own transaction, beside a service that may be writing."""
    conn = sqlite3.connect(database, timeout=30)
    try:
        conn.execute(sql, params)
        conn.commit()
    finally:
        conn.close()
