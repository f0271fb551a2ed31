"""How a SQLite database restored from a backup goes on without handing out a number twice.

A backup copy is stamped (:func:`stamp_backup`); the live database never is. When the
service opens a database that carries the stamp, that database was put back in place of
another, which went on writing after the copy was taken: the event sequence, the twins'
revisions and their desired and reported versions of the lost writes were seen by readers,
caches (ETags) and devices, and the restored database would hand the same numbers out
again for other states. The writer therefore raises every counter before anything else is
written, and removes the stamp (docs/backup.md).

How far: the lost database may itself descend from restores (restore Z, back it up as W,
restore W, then go back to Z), each of which made its numbers jump, so the time since the
backup alone does not bound them. Every database of a lineage keeps one invariant instead:
every number it has handed out by time ``t`` is below ``F(t)`` (:func:`restore_floor`),
:data:`MIN_GAP` plus :data:`MAX_WRITES_PER_SECOND` for every second since :data:`EPOCH`.
A new database starts at 0, below it, and its counters grow slower than ``F``. A restore
at ``now`` raises each counter ``c`` to ``F(now)``: above every number any database of the
lineage handed out, lost or not, and from there the counter again grows slower than ``F``,
so the invariant holds for the next restore, however many came before and whichever
backup it goes back to. Were every counter raised by one gap instead, the jumps would add
up across restores and outrun any bound.

``F(now)`` is the same for every counter: the twins' revisions, and their versions, all
land on it, and their order among twins is lost (nothing relies on it; each twin's own
versions keep theirs: the raise is monotonic). A counter already at ``F(now)`` or beyond
says the clock was set back (or the invariant never held for it): it goes up by
:data:`MIN_GAP`, more than any burst of writes, the best that can be done then.

``F`` grows by about 2**45 a year and stays below 2**53 (exact for JSON readers) until
about 2300.
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

#: Meta row a command other than the service (``mqtt retire``) leaves when it raised the
#: numbers of a restored database, its journal's last seq before and after: the service's
#: first start announces the restore (:func:`deferred_restore`).
DEFERRED_KEYS = ("restored_backup_seq", "restored_seq")

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
#: thousands (docs/performance.md).
MAX_WRITES_PER_SECOND = 1_000_000
#: Before any database of this service was created (2020-01-01 UTC, Unix seconds).
EPOCH = 1_577_836_800


def restore_floor(now: float) -> int:
    """``F(now)``: above every number a database of the lineage has handed out by ``now``
    (see the module's docstring), so where a database restored at ``now`` goes on from."""
    return MIN_GAP + max(0, math.ceil(now - EPOCH)) * MAX_WRITES_PER_SECOND


def _raised(counter: str) -> str:
    """SQL for ``counter`` raised to the floor (``:floor``); one that is already there or
    beyond goes up by :data:`MIN_GAP` (``:gap``), a clock set back."""
    return f"(CASE WHEN {counter} < :floor THEN :floor ELSE {counter} + :gap END)"


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
    """What :func:`renumber_restored` did: the journal's last seq before and after, and the
    floor every counter was raised to."""

    backup_seq: int
    seq: int
    floor: int


#: The versions of a stored twin document, raised (:func:`_raised`), in ``json_set`` form.
_RAISED = ", ".join(
    f"'$.{key}', " + _raised(f"COALESCE(json_extract({{0}}, '$.{key}'), 0)")
    for key in ("revision", "desiredVersion", "reportedVersion")
)


def renumber_restored(conn: sqlite3.Connection, now: float, *, outbox: bool) -> Restored | None:
    """In the writer's opening transaction: when the database carries a backup's stamp,
    raise the event sequence and every twin's and tombstone's revision, desiredVersion and
    reportedVersion to :func:`restore_floor` (see the module's docstring), record the floor
    new twins start from (:data:`FLOOR_KEY`), and remove the stamp. ``None``: no restore.

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
    floor = restore_floor(now)
    raise_to = {"floor": floor, "gap": MIN_GAP}
    (last,) = conn.execute(
        "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0), "
        "COALESCE((SELECT MAX(seq) FROM events), 0))"
    ).fetchone()
    seq = floor if last < floor else last + MIN_GAP  # _raised
    conn.execute("DELETE FROM sqlite_sequence WHERE name = 'events'")
    conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('events', ?)", (seq,))
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('pruned_seq', ?) "
        "ON CONFLICT (key) DO UPDATE SET value = MAX(value, excluded.value)",
        (seq,),
    )
    conn.execute(
        f"UPDATE events SET revision = {_raised('revision')}, "
        f"event = json_set(event, '$.revision', {_raised('revision')}), "
        f"state = json_set(state, {_RAISED.format('state')}) "  # NULL (a deletion) stays NULL
        "WHERE seq IN (SELECT MAX(seq) FROM events GROUP BY twin_id)",
        raise_to,
    )
    conn.execute(
        f"UPDATE twins SET revision = {_raised('revision')}, "
        f"doc = json_set(doc, {_RAISED.format('doc')}) WHERE true",
        raise_to,
    )
    conn.execute(
        f"UPDATE tombstones SET revision = {_raised('revision')}, "
        f"desired_version = {_raised('desired_version')}, "
        f"reported_version = {_raised('reported_version')}",
        raise_to,
    )
    # Where a twin created with no tombstone starts: the lost database may have had one of
    # its id. A counter too: a later restore raises it with the others.
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (:key, :floor) "
        f"ON CONFLICT (key) DO UPDATE SET value = {_raised('value')}",
        {"key": FLOOR_KEY, **raise_to},
    )
    if outbox:
        queue_every_twin(conn, seq)
    # With what a command left of an earlier restore: this one supersedes it.
    conn.execute(
        "DELETE FROM meta WHERE key IN (?, ?, ?, ?)",
        (BACKUP_TIME_KEY, BACKUP_SEQ_KEY, *DEFERRED_KEYS),
    )
    return Restored(int(stamp.get(BACKUP_SEQ_KEY, last)), seq, floor)


def defer_announcement(conn: sqlite3.Connection, restored: Restored) -> None:
    """For a command other than the service that raised the numbers (it may write, so it
    must not hand out the lost database's): leave announcing the restore, and clearing what
    the lost database left on the broker, to the service's first start."""
    conn.executemany(
        "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
        zip(DEFERRED_KEYS, (restored.backup_seq, restored.seq), strict=True),
    )


def deferred_restore(conn: sqlite3.Connection) -> Restored | None:
    """For the service's start: the restore a command renumbered before it, if any, to
    announce now; removes the record of it."""
    found = dict(
        conn.execute(
            "SELECT key, value FROM meta WHERE key IN (?, ?, ?)", (*DEFERRED_KEYS, FLOOR_KEY)
        ).fetchall()
    )
    if DEFERRED_KEYS[0] not in found:
        return None
    conn.execute("DELETE FROM meta WHERE key IN (?, ?)", DEFERRED_KEYS)
    backup_seq, seq = (int(found[key]) for key in DEFERRED_KEYS)
    return Restored(backup_seq, seq, int(found.get(FLOOR_KEY, 0)))
