"""The MongoDB store's index outbox while replicas of an older version share the database (a
rolling upgrade): they queue a write with ``ix`` alone, no ``ixf``, at any time, not only
before this version's open."""

from __future__ import annotations

import pytest

from tests.servers.ferretdb import FerretDB
from tests.store.contract import change
from tests.store_fixtures import StoreFactory, raw_database

on_ferretdb = pytest.mark.parametrize("store_factory", ["mongodb"], indirect=True)


async def as_an_older_replica_wrote(url: str, database: str, twin_id: str) -> None:
    """Make the twin's pending write look as a replica from before ``ixf`` leaves it: its
    seq in ``ix`` and nothing in ``ixf`` (its writes set ``ix`` alone)."""
    async with raw_database(url, database) as db:
        result = await db.twins.update_one({"_id": twin_id}, {"$unset": {"ixf": ""}})
    assert result.modified_count == 1


@on_ferretdb
async def test_a_write_queued_by_an_older_replica_is_not_covered_until_indexed(
    store_factory: StoreFactory, ferretdb_server: FerretDB, unique_name: str
) -> None:
    """Written by an older replica after this one opened, a write had no ``ixf`` and the
    lowest was read among twins with one only: none, so covers() was true for it at once
    (a search with its waitFor answered 0 items) and /ready showed lagSeconds 0."""
    store = await store_factory(outbox=True)
    old, new = "org.acme:old-writer", "org.acme:new-writer"
    seq_old = await store.write(change(None, old, {"attributes": {"x": 1}}))
    await as_an_older_replica_wrote(ferretdb_server.url, unique_name, old)
    assert await store.index_backlog() == (1, seq_old)
    # The lowest is the lower of both kinds, whichever kind it is.
    seq_new = await store.write(change(None, new, {"attributes": {"x": 2}}))
    assert seq_old < seq_new
    assert await store.index_backlog() == (2, seq_old)
    await store.mark_indexed([t for t in await store.pending_index(10) if t.twin_id == old])
    assert await store.index_backlog() == (1, seq_new)
    await store.mark_indexed(await store.pending_index(10))
    assert await store.index_backlog() == (0, None)
