"""How much of an id's history the journal still holds: whether a revision a request asks
for (history's ``since``, a GET's ``at``) was pruned (410) or never was the id's (404).

Pruning only ever removes the oldest events of an id (per twin, keeping the one before those
kept; by age, keeping the newest of the aged ones unless it is a deletion), so what the
journal holds of an id is everything from its oldest retained event on. Its revisions need
not be contiguous there: a SQLite restore (docs/backup.md) renumbers only each id's latest
event to the restore's floor, and older ones keep theirs, so a gap above the oldest retained
event is renumbering, not loss. And an id's first twin does not always start at revision 1:
created after a restore with no tombstone, it starts past the floor, with nothing before.
"""

from __future__ import annotations

from twin_service.store.base import StoredEvent, TwinStore


async def oldest_retained(store: TwinStore, twin_id: str) -> StoredEvent | None:
    """The oldest event of ``twin_id`` the journal still holds."""
    first = await store.history(twin_id, 0, None, 1)
    return first[0] if first else None


async def holds_from(store: TwinStore, twin_id: str, first: StoredEvent, revision: int) -> bool:
    """Whether the journal, whose oldest event of ``twin_id`` is ``first``, holds every
    event the id had from ``revision`` on: ``revision`` is at or past ``first``, or
    ``first`` is the id's first creation: revision 1; past the floor of a restore the twin
    was created after (:meth:`TwinStore.created_from` of a live twin is that floor); or at
    the floor itself, a creation the restore renumbered (the twin's only event then).

    A twin created again from a tombstone the restore raised to the floor, whose deletion
    then aged out, looks the same as a first creation: its pruned earlier twin is missed.
    """
    start = first.event
    if revision >= start.revision or start.revision == 1:
        return True
    if start.action != "created":
        return False
    floor = await store.created_from(twin_id)
    return floor is not None and start.revision in (floor.revision, floor.revision + 1)
