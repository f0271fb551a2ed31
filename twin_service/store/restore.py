"""How a SQLite database restored from a backup goes on without handing out a number twice.

A backup copy is stamped (:func:`stamp_backup`); the live database never is. When the
service opens a database that carries the stamp, that database was put back in place of
another, which went on writing after the copy was taken: the event sequence, the twins'
revisions and their desired and reported versions of the lost writes were seen by readers,
caches (ETags) and devices, and the restored database would hand the same numbers out
again for other states. The writer therefore raises every counter by :func:`restore_gap`
before anything else is written, and removes the stamp (docs/backup.md).
"""

from __future__ import annotations

import math
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from twin_service.store.sqlite_outbox import queue_every_twin

#: Meta rows of a backup copy: when it was taken (Unix seconds) and its last event's seq.
BACKUP_TIME_KEY = "backup_time"
BACKUP_SEQ_KEY = "backup_seq"
#: Meta row the restore leaves: a twin created with no tombstone starts its revision,
#: desiredVersion and reportedVersion there, not at 0 (the lost database may have had it).
FLOOR_KEY = "restore_floor"

#: What a twin created now under the id (``?``) goes on from: its tombstone's numbers, never
#: below the restore's floor; NULLs when there is neither (from 0). The service reads it to
#: compute the creation, the writer to check it.
CREATED_FROM_SQL = (
    "SELECT MAX(revision), MAX(desired_version), MAX(reported_version) FROM ("
    "SELECT revision, desired_version, reported_version FROM tombstones WHERE twin_id = ? "
    f"UNION ALL SELECT value, value, value FROM meta WHERE key = '{FLOOR_KEY}')"
)

#: The least gap: more writes than the lost database could have made in any short while.
MIN_GAP = 2**32
#: Writes per second no deployment makes: the single SQLite writer commits some tens of
#: thousands (docs/performance.md). A gap of this rate times the time since the backup holds
#: every number the lost database handed out, however long it ran after the copy.
MAX_WRITES_PER_SECOND = 1_000_000


def restore_gap(backup_time: int, now: float) -> int:
    """How far to raise every counter of a database restored at ``now`` from a backup taken
    at ``backup_time``.

    Grows with the time since the backup, not a constant: restoring the same backup a second
    time must also pass every number the first restore's database handed out meanwhile. A
    year adds about 2**45, so JSON readers (exact up to 2**53) keep exact numbers through
    centuries of restores. A clock set back (``now`` before the backup) still gets
    :data:`MIN_GAP`.
    """
    elapsed = max(0, math.ceil(now - backup_time))
    return MIN_GAP + elapsed * MAX_WRITES_PER_SECOND


def stamp_backup(copy: Path, last_seq: int, taken: float) -> None:
    """Mark ``copy``, a backup whose snapshot was read after ``taken``, as one.

    A copy of a restored database the service has not opened yet keeps its older stamp:
    the database lost then may have gone on writing since that one."""
    conn = sqlite3.connect(copy)
    try:
        with conn:
            conn.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = MIN(value, excluded.value)",
                [(BACKUP_TIME_KEY, math.floor(taken)), (BACKUP_SEQ_KEY, last_seq)],
            )
    finally:
        conn.close()


@dataclass(frozen=True)
class Restored:
    """What :func:`renumber_restored` did: the journal's last seq before and after."""

    backup_seq: int
    seq: int
    gap: int


#: The versions of a stored twin document raised by the gap (``:gap``), in ``json_set`` form.
_RAISED = (
    "'$.revision', json_extract({0}, '$.revision') + :gap, "
    "'$.desiredVersion', COALESCE(json_extract({0}, '$.desiredVersion'), 0) + :gap, "
    "'$.reportedVersion', COALESCE(json_extract({0}, '$.reportedVersion'), 0) + :gap"
)


def renumber_restored(conn: sqlite3.Connection, now: float, *, outbox: bool) -> Restored | None:
    """In the writer's opening transaction: when the database carries a backup's stamp,
    raise the event sequence and every twin's and tombstone's revision, desiredVersion and
    reportedVersion by :func:`restore_gap`, and remove the stamp. ``None``: no restore.

    Readers resuming from before the new sequence are asked to resync (as after pruning);
    the latest journaled event of each id takes its twin's new revision, so the journal
    still holds each twin's current state (the streams' filters read the state before a
    change there); ``outbox``: every twin and tombstone is queued for the external index
    with a version above any it holds. Metadata and older events keep their revisions:
    those states are the same in both databases.
    """
    stamp = dict(
        conn.execute(
            "SELECT key, value FROM meta WHERE key IN (?, ?)", (BACKUP_TIME_KEY, BACKUP_SEQ_KEY)
        ).fetchall()
    )
    if BACKUP_TIME_KEY not in stamp:
        return None
    gap = restore_gap(int(stamp[BACKUP_TIME_KEY]), now)
    (last,) = conn.execute(
        "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0), "
        "COALESCE((SELECT MAX(seq) FROM events), 0))"
    ).fetchone()
    seq = int(last) + gap
    conn.execute("DELETE FROM sqlite_sequence WHERE name = 'events'")
    conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('events', ?)", (seq,))
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('pruned_seq', ?) "
        "ON CONFLICT (key) DO UPDATE SET value = MAX(value, excluded.value)",
        (seq,),
    )
    conn.execute(
        "UPDATE events SET revision = revision + :gap, "
        "event = json_set(event, '$.revision', revision + :gap), "
        f"state = json_set(state, {_RAISED.format('state')}) "  # NULL (a deletion) stays NULL
        "WHERE seq IN (SELECT MAX(seq) FROM events GROUP BY twin_id)",
        {"gap": gap},
    )
    conn.execute(
        "UPDATE twins SET revision = revision + :gap, "
        f"doc = json_set(doc, {_RAISED.format('doc')}) WHERE true",
        {"gap": gap},
    )
    conn.execute(
        "UPDATE tombstones SET revision = revision + :gap, "
        "desired_version = desired_version + :gap, reported_version = reported_version + :gap",
        {"gap": gap},
    )
    # Raised like every counter: a twin of the lost database may be created again.
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (:key, :gap) "
        "ON CONFLICT (key) DO UPDATE SET value = value + :gap",
        {"key": FLOOR_KEY, "gap": gap},
    )
    if outbox:
        queue_every_twin(conn, seq)
    conn.execute("DELETE FROM meta WHERE key IN (?, ?)", (BACKUP_TIME_KEY, BACKUP_SEQ_KEY))
    return Restored(int(stamp.get(BACKUP_SEQ_KEY, last)), seq, gap)
