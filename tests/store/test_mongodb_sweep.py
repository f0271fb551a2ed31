"""The maintenance sweep of the MongoDB store journals what crashed writers left in twins, and
costs what is pending, not the size of the fleet.

On FerretDB a twin keeps its last change event in ``ev`` for ever (no ``$pull`` outside a
claim), and every filter but one on ``_id`` scans the collection: a sweep that looked for
pending events in ``ev`` read every twin of the fleet, with its state, every 5 s on every
replica (FerretDB busy at 40-56% with 450 idle twins, writes of 3 replicas timing out at
850). The documents the server returns to the sweep are counted with PyMongo's command
monitoring, on the real server. Also here: replicas that save the first watermark at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from pymongo import monitoring

from tests.store.contract import change
from tests.store_fixtures import StoreFactory
from twin_service.store.base import TwinStore
from twin_service.store.mongodb import MongoStore
from twin_service.store.mongodb_journal import InsertAllocator, Pending

# The store fixture on the MongoDB store only.
on_mongodb = pytest.mark.parametrize("store_factory", ["mongodb"], indirect=True)
pytestmark = on_mongodb

#: No maintenance round but those the tests run.
IDLE = {"maintenance_interval_seconds": 3600.0}


class TwinReads(monitoring.CommandListener):
    """Counts the twin documents the server returns to ``find`` and ``getMore`` on the
    ``twins`` collection of one database (global: clients made after it is registered)."""

    def __init__(self) -> None:
        self.database: str | None = None
        self.count = 0
        self._twin_finds: set[tuple[Any, int]] = set()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.database_name != self.database:
            return
        command = event.command
        collection = command.get("find") or command.get("collection")
        if event.command_name in ("find", "getMore") and collection == "twins":
            self._twin_finds.add((event.connection_id, event.request_id))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        key = (event.connection_id, event.request_id)
        if key in self._twin_finds:
            self._twin_finds.discard(key)
            cursor = event.reply.get("cursor", {})
            self.count += len(cursor.get("firstBatch", cursor.get("nextBatch", [])))

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        self._twin_finds.discard((event.connection_id, event.request_id))


_LISTENER = TwinReads()
monitoring.register(_LISTENER)


@pytest.fixture
def twin_reads(unique_name: str) -> Iterator[TwinReads]:
    """The twin reads on this test's database (``store_factory`` names it ``unique_name``)."""
    _LISTENER.database, _LISTENER.count = unique_name, 0
    yield _LISTENER
    _LISTENER.database = None


async def maintenance_reads(store: TwinStore, twin_reads: TwinReads, rounds: int) -> int:
    """The twin documents ``rounds`` maintenance rounds read."""
    assert isinstance(store, MongoStore)
    before = twin_reads.count
    for _ in range(rounds):
        await store._maintain(prune=False)
    return twin_reads.count - before


async def crash_before_journaling(store: TwinStore, twin_id: str, seq: int) -> None:
    """Leave the event ``seq`` of ``twin_id`` as a writer killed between its compare-and-set
    and the journal leaves it: pending in the twin's ``ev``, not in ``events``."""
    assert isinstance(store, MongoStore)
    entry = await store._events.find_one_and_delete({"o": seq})
    assert entry is not None
    pending = Pending(seq, twin_id, entry["r"], entry["ts"], entry["e"], entry["st"])
    # FerretDB keeps the token there anyway; MongoDB pulls it once journaled.
    await store._twins.update_one({"_id": twin_id}, {"$addToSet": {"ev": pending.token()}})


async def write_twins(store: TwinStore, count: int) -> list[int]:
    return [
        await store.write(change(None, f"org.acme:idle-{i}", {"desired": {"n": i}}))
        for i in range(count)
    ]


async def test_maintenance_reads_no_twin_when_nothing_is_pending(
    store_factory: StoreFactory, twin_reads: TwinReads
) -> None:
    """Failed before the fix: 5 rounds over 30 idle twins read 116 twin documents (all but
    the twin holding the highest number, at every round but the first)."""
    store = await store_factory(**IDLE)
    await write_twins(store, 30)
    assert await maintenance_reads(store, twin_reads, rounds=5) == 0


async def test_a_replica_started_later_reads_no_twin_when_nothing_is_pending(
    store_factory: StoreFactory, twin_reads: TwinReads
) -> None:
    await write_twins(await store_factory(**IDLE), 30)
    later = await store_factory(**IDLE)
    assert await maintenance_reads(later, twin_reads, rounds=4) == 0


async def test_the_sweep_journals_the_last_event_of_a_crashed_writer(
    store_factory: StoreFactory, twin_reads: TwinReads
) -> None:
    """The highest number allocated, left pending: no later number shows readers the gap,
    so only the sweep journals it. Failed before the fix: the sweep covered the numbers
    below the allocation counter, never the counter's own number."""
    store = await store_factory(**IDLE)
    await write_twins(store, 10)
    crashed = await store.write(change(None, "org.acme:crashed", {"desired": {"n": 1}}))
    await crash_before_journaling(store, "org.acme:crashed", crashed)
    assert crashed not in [e.seq for e in await store.events_after(0, 1000)]
    replica = await store_factory(**IDLE)  # started after the writer died
    reads = await maintenance_reads(replica, twin_reads, rounds=3)
    (event,) = [e for e in await replica.events_after(0, 1000) if e.seq == crashed]
    assert event.event.twin_id == "org.acme:crashed" and event.state is not None
    assert reads == 1  # the crashed writer's twin, none of the 10 others


async def test_the_sweep_journals_an_event_of_a_crashed_writer_below_later_ones(
    store_factory: StoreFactory, twin_reads: TwinReads
) -> None:
    """Failed before the fix on its reads: 20 (the sweep read every twin), not 1."""
    store = await store_factory(**IDLE)
    crashed = await store.write(change(None, "org.acme:crashed", {"desired": {"n": 1}}))
    await crash_before_journaling(store, "org.acme:crashed", crashed)
    later = await write_twins(store, 10)
    reads = await maintenance_reads(store, twin_reads, rounds=3)
    seqs = [e.seq for e in await store.events_after(0, 1000)]
    assert seqs == sorted([crashed, *later])
    assert reads == 1


async def test_an_event_the_next_writer_of_its_twin_finds_is_journaled_once(
    store_factory: StoreFactory, twin_reads: TwinReads
) -> None:
    store = await store_factory(**IDLE)
    crashed = await store.write(change(None, "org.acme:crashed", {"desired": {"n": 1}}))
    await crash_before_journaling(store, "org.acme:crashed", crashed)
    current = await store.get("org.acme:crashed")
    await store.write(change(current, "org.acme:crashed", {"desired": {"n": 2}}))
    await maintenance_reads(store, twin_reads, rounds=3)
    history = await store.history("org.acme:crashed", 1, None)
    assert [e.event.revision for e in history] == [1, 2]
    assert [e.event.revision for e in await store.events_after(0, 1000)] == [1, 2]


async def test_an_event_whose_number_was_trimmed_is_journaled_by_readers(
    store_factory: StoreFactory, twin_reads: TwinReads
) -> None:
    """A number trimmed from ``numbers`` before the sweep saw it (over a hundred allocations
    later) is below a journaled one: readers find the gap and the twin holding it."""
    store = await store_factory(gap_timeout_seconds=0.2, **IDLE)
    assert isinstance(store, MongoStore)
    crashed = await store.write(change(None, "org.acme:crashed", {"desired": {"n": 1}}))
    await crash_before_journaling(store, "org.acme:crashed", crashed)
    (later,) = await write_twins(store, 1)
    assert isinstance(store._allocator, InsertAllocator)  # FerretDB's
    await store._allocator._numbers.delete_one({"_id": crashed})
    for _ in range(200):
        await store._maintain(prune=False)
        seqs = [e.seq for e in await store.events_after(0, 1000)]
        if crashed in seqs:
            break
        await asyncio.sleep(0.05)
    assert seqs == [crashed, later]


async def test_replicas_saving_the_first_watermark_at_once_all_succeed(
    store_factory: StoreFactory,
) -> None:
    """FerretDB runs an upsert as a read and an insert: replicas that first saved the stable
    watermark together got "E11000 duplicate key error collection: ...meta" (the event hubs
    of 3 replicas started on an empty database logged that they could not read the journal)."""
    replicas = [await store_factory(**IDLE) for _ in range(6)]
    first = replicas[0]
    assert isinstance(first, MongoStore)
    for round_ in range(10):
        await write_twins_named(first, f"r{round_}", 2)
        await first._meta.delete_one({"_id": "stable"})  # as before any reader saved it
        results = await asyncio.gather(
            *(replica.events_after(0, 1000) for replica in replicas), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        assert failures == [], failures


async def write_twins_named(store: TwinStore, prefix: str, count: int) -> None:
    for i in range(count):
        await store.write(change(None, f"org.acme:{prefix}-{i}", {"desired": {"n": i}}))
