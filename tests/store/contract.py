"""The one contract every :class:`twin_service.store.base.TwinStore` keeps.

Subclass :class:`StoreContract` in a test module and provide a ``store_factory`` fixture
(``await make(stream=..., outbox=...)`` opens a store; several stores from one factory share
one database, like replicas do). ``tests/store/conftest.py`` provides it for SQLite and for
MongoDB on FerretDB.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from typing import Any

import pytest

from search.rql import SearchQuery, parse_filter
from tests.legacy import forget_sqlite_tombstone
from tests.store_fixtures import StoreFactory
from twin_service.settings import StreamSettings
from twin_service.store.base import IndexTask, RevisionConflict, TwinStore, Write
from twin_service.twin.document import (
    ChangeEvent,
    Tombstone,
    Twin,
    apply_change,
    deletion_event,
    now_iso,
)
from twin_service.twin.jsonvalue import Limits
from twin_service.types import JSONObject


def change(
    current: Twin | None,
    twin_id: str,
    values: JSONObject,
    tombstone: Tombstone | None = None,
    **kwargs: Any,
) -> Write:
    """The write that applies ``values`` (whole sections) to ``current`` (``None``: creates
    the twin, going on from ``tombstone`` as the service does)."""
    new, event = apply_change(
        current,
        twin_id=twin_id,
        namespace=twin_id.split(":")[0],
        values=values,
        written={name: None for name in values},
        timestamp=kwargs.pop("timestamp", now_iso()),
        origin="test",
        limits=Limits(),
        # As the service does: every creation draws its own incarnation token.
        incarnation=secrets.token_hex(8) if current is None else None,
        tombstone=tombstone,
    )
    expected = current.revision if current else tombstone.revision if tombstone else 0
    return Write(twin_id, expected, new, event, current)


def deletion(current: Twin, timestamp: str | None = None) -> Write:
    return Write(
        current.twin_id,
        current.revision,
        None,
        deletion_event(current, timestamp=timestamp or now_iso(), origin="test"),
        current,
    )


async def forget_tombstone(store: TwinStore, twin_id: str) -> None:
    """Remove the tombstone of ``twin_id`` as a database from before there were tombstones
    lacks it: the next twin of the id starts again at revision 1."""
    from twin_service.store.mongodb import MongoStore
    from twin_service.store.sqlite import SqliteStore

    if isinstance(store, SqliteStore):
        forget_sqlite_tombstone(store._path, twin_id)
    else:
        assert isinstance(store, MongoStore)
        await store._twins.update_one(
            {"_id": twin_id}, {"$unset": {"gone": "", "gdv": "", "grv": ""}}
        )


async def mutate(store: TwinStore, twin_id: str, key: str) -> int:
    """Add ``desired[key]`` with compare-and-set, retrying on conflicts like the service."""
    for _ in range(500):
        current = await store.get(twin_id)
        desired = dict(current.desired) if current else {}
        desired[key] = key
        try:
            return await store.write(change(current, twin_id, {"desired": desired}))
        except RevisionConflict:
            await asyncio.sleep(random.uniform(0, 0.01))
    raise AssertionError("never won the compare-and-set")


async def mutate_in_turn(store: TwinStore, twin_id: str, keys: list[str]) -> None:
    """Add each of ``keys`` in turn, as :func:`mutate` does."""
    for key in keys:
        await mutate(store, twin_id, key)


async def all_events(store: TwinStore) -> list[tuple[int, ChangeEvent]]:
    out: list[tuple[int, ChangeEvent]] = []
    position = 0
    for _ in range(1000):
        batch = await store.events_after(position, 50)
        if not batch:
            return out
        out.extend((e.seq, e.event) for e in batch)
        position = batch[-1].seq
    raise AssertionError("journal never ended")


#: A timestamp older than any journal_max_age_seconds: its event is past the age at once.
AGES_AGO = "2000-01-01T00:00:00.000Z"


async def wait_pruned(store: TwinStore, seq: int) -> None:
    """Until pruning by age has passed ``seq`` (in the background: SQLite's writer every
    tenth of the age, MongoDB's maintenance every 12th round)."""
    deadline = time.monotonic() + 120  # a bound for a busy machine, not a timing claim
    while await store.pruned_seq() < seq and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert await store.pruned_seq() >= seq


class StoreContract:
    async def test_a_change_from_an_older_incarnation_is_refused(
        self, store_factory: StoreFactory
    ) -> None:
        """Delete and re-create to the same revision (a database from before tombstones,
        where revisions restarted): a write computed from the twin as it was before the
        delete must not pass the compare-and-set."""
        store = await store_factory()
        twin_id = "org.acme:incarnations"
        await store.write(
            change(None, twin_id, {"desired": {"a": 1}}, timestamp="2026-01-01T00:00:00.000Z")
        )
        old = await store.get(twin_id)
        assert old is not None and old.revision == 1
        await store.write(deletion(old))
        await forget_tombstone(store, twin_id)
        await store.write(
            change(None, twin_id, {"desired": {"b": 2}}, timestamp="2026-01-01T00:00:01.000Z")
        )
        reborn = await store.get(twin_id)
        assert reborn is not None and reborn.revision == 1 and reborn.created != old.created
        stale = change(old, twin_id, {"desired": {"a": 9}})
        with pytest.raises(RevisionConflict):
            await store.write(Write(stale.twin_id, 1, stale.twin, stale.event, previous=old))
        current = await store.get(twin_id)
        assert current is not None and current.desired == {"b": 2}
        fresh = change(current, twin_id, {"desired": {"b": 3}})
        await store.write(Write(fresh.twin_id, 1, fresh.twin, fresh.event, previous=current))
        final = await store.get(twin_id)
        assert final is not None and final.desired == {"b": 3} and final.revision == 2

    async def test_a_twin_created_again_in_the_same_millisecond_is_another_incarnation(
        self, store_factory: StoreFactory
    ) -> None:
        """Same id, same revision, same creation time (revisions restarted before there were
        tombstones): only the incarnation token tells the two twins apart, and a write
        computed from the first must still be refused."""
        store = await store_factory()
        twin_id = "org.acme:same-ms"
        stamp = "2026-01-01T00:00:00.000Z"
        await store.write(change(None, twin_id, {"desired": {"a": 1}}, timestamp=stamp))
        old = await store.get(twin_id)
        assert old is not None
        await store.write(deletion(old))
        await forget_tombstone(store, twin_id)
        await store.write(change(None, twin_id, {"desired": {"b": 2}}, timestamp=stamp))
        reborn = await store.get(twin_id)
        assert reborn is not None and reborn.revision == old.revision
        assert reborn.created == old.created and reborn.incarnation != old.incarnation
        stale = change(old, twin_id, {"desired": {"a": 9}})
        with pytest.raises(RevisionConflict):
            await store.write(Write(stale.twin_id, 1, stale.twin, stale.event, previous=old))
        current = await store.get(twin_id)
        assert current is not None and current.desired == {"b": 2}
        assert current.incarnation == reborn.incarnation

    async def test_create_update_delete_with_compare_and_set(
        self, store_factory: StoreFactory
    ) -> None:
        store = await store_factory()
        tid = "org.acme:cas"
        assert await store.get(tid) is None
        first = change(None, tid, {"attributes": {"a": 1}})
        seq1 = await store.write(first)
        assert seq1 > 0
        created = await store.get(tid)
        assert created == first.twin
        with pytest.raises(RevisionConflict):
            await store.write(change(None, tid, {"attributes": {"a": 2}}))
        second = change(created, tid, {"attributes": {"a": 2}})
        seq2 = await store.write(second)
        assert seq2 > seq1
        with pytest.raises(RevisionConflict):
            await store.write(change(created, tid, {"attributes": {"a": 3}}))
        current = await store.get(tid)
        assert current is not None and current.revision == 2 and current.attributes == {"a": 2}
        with pytest.raises(RevisionConflict):
            await store.write(deletion(created))
        seq3 = await store.write(deletion(current))
        assert seq3 > seq2
        assert await store.get(tid) is None
        assert await store.get_many([tid]) == []
        with pytest.raises(RevisionConflict):
            await store.write(deletion(current))

    async def test_get_many_keeps_the_requested_order(self, store_factory: StoreFactory) -> None:
        store = await store_factory()
        ids = [f"org.acme:m{i}" for i in range(5)]
        for tid in ids:
            await store.write(change(None, tid, {"attributes": {"i": tid}}))
        wanted = [ids[3], "org.acme:missing", ids[0], ids[4]]
        assert [t.twin_id for t in await store.get_many(wanted)] == [ids[3], ids[0], ids[4]]
        assert await store.get_many([]) == []

    async def test_concurrent_writers_on_two_stores_lose_nothing(
        self, store_factory: StoreFactory
    ) -> None:
        one, two = await store_factory(), await store_factory()
        tid = "org.acme:hot"
        await one.write(change(None, tid, {"desired": {}}))
        keys = [f"k{i}" for i in range(40)]
        seqs = await asyncio.gather(
            *(mutate(one if i % 2 else two, tid, key) for i, key in enumerate(keys))
        )
        assert len(set(seqs)) == len(keys)
        for store in (one, two):
            twin = await store.get(tid)
            assert twin is not None and twin.revision == len(keys) + 1
            assert twin.desired == {key: key for key in keys}
        history = await one.history(tid, 1, None)
        assert [e.event.revision for e in history] == list(range(1, len(keys) + 2))
        assert [e.seq for e in history] == sorted(e.seq for e in history)

    async def test_every_event_exactly_once_in_increasing_seq(
        self, store_factory: StoreFactory
    ) -> None:
        one, two = await store_factory(), await store_factory()
        ids = [f"org.acme:e{i}" for i in range(6)]
        await asyncio.gather(
            *(mutate(one if i % 2 else two, ids[i % 6], f"k{i}") for i in range(48))
        )
        events = await all_events(one)
        seqs = [seq for seq, _ in events]
        assert seqs == sorted(set(seqs))
        assert len(events) == 48
        for tid in ids:
            revisions = [e.revision for _, e in events if e.twin_id == tid]
            assert revisions == list(range(1, 9))
        assert await one.last_seq() == seqs[-1]
        assert await two.last_seq() == seqs[-1]
        assert 0 < await one.oldest_seq() <= seqs[0]
        middle = seqs[20]
        after = await two.events_after(middle, 5)
        assert [e.seq for e in after] == seqs[21:26]
        assert all(e.state is not None for e in after)

    async def test_empty_journal(self, store_factory: StoreFactory) -> None:
        store = await store_factory()
        assert await store.last_seq() == 0
        assert await store.oldest_seq() == 0
        assert await store.events_after(0, 10) == []
        assert await store.pruned_seq() == 0

    async def test_history_twin_at_and_privates_at(self, store_factory: StoreFactory) -> None:
        store = await store_factory()
        tid = "org.acme:hist"
        twin = None
        for i in range(5):
            await store.write(change(twin, tid, {"reported": {"n": i}}))
            twin = await store.get(tid)
        history = await store.history(tid, 2, 4)
        assert [e.event.revision for e in history] == [2, 3, 4]
        assert history[0].event.changes == {"reported": {"n": 1}}
        assert [e.event.revision for e in await store.history(tid, 4, None)] == [4, 5]
        at3 = await store.twin_at(tid, 3)
        assert at3 is not None and at3.revision == 3 and at3.reported == {"n": 2}
        assert await store.twin_at(tid, 9) is None
        privates = await store.privates_at(tid, [5, 3, 9, 1, 3])
        assert twin is not None and privates.keys() == {5, 3, 1} and privates[5] == twin.private
        assert await store.privates_at(tid, [9]) == {}
        assert await store.privates_at("org.acme:no", [1]) == {}

    async def test_history_takes_a_limit_and_leaves_out_an_earlier_lifetime(
        self, store_factory: StoreFactory
    ) -> None:
        store = await store_factory()
        tid = "org.acme:pages"
        twin = None
        for i in range(6):
            await store.write(change(twin, tid, {"reported": {"n": i}}))
            twin = await store.get(tid)
        assert [e.event.revision for e in await store.history(tid, 1, None, 2)] == [1, 2]
        assert [e.event.revision for e in await store.history(tid, 3, 5, 10)] == [3, 4, 5]
        assert [e.event.revision for e in await store.history(tid, 5, None, 1)] == [5]
        assert twin is not None
        # A twin created again in a database from before tombstones starts again at 1:
        # its history, limited or not, holds none of the earlier twin's events.
        await store.write(deletion(twin))
        await forget_tombstone(store, tid)
        twin = None
        for i in range(3):
            await store.write(change(twin, tid, {"desired": {"n": i}}))
            twin = await store.get(tid)
        whole = await store.history(tid, 0, None)
        assert [(e.event.revision, e.event.action) for e in whole] == [
            (1, "created"),
            (2, "modified"),
            (3, "modified"),
        ]
        assert all("desired" in e.event.changes for e in whole)
        assert [e.event.revision for e in await store.history(tid, 2, None, 1)] == [2]
        assert await store.history(tid, 4, None, 5) == []
        at2 = await store.twin_at(tid, 2)
        assert at2 is not None and at2.desired == {"n": 1}

    async def test_delete_and_recreate_continues_revisions(
        self, store_factory: StoreFactory
    ) -> None:
        store = await store_factory(outbox=True)
        tid = "org.acme:phoenix"
        await store.write(change(None, tid, {"attributes": {"life": 1}}))
        old = await store.get(tid)
        assert old is not None
        await store.write(change(old, tid, {"attributes": {"life": 1.5}}))
        old = await store.get(tid)
        assert old is not None
        deleted_seq = await store.write(deletion(old))
        (task,) = await store.pending_index(10)
        assert task == IndexTask(tid, deleted_seq, None)
        tombstone = await store.tombstone(tid)
        assert tombstone == Tombstone(3, old.desired_version, old.reported_version)
        # A creation that did not see the tombstone would reuse revision 1: refused.
        with pytest.raises(RevisionConflict):
            await store.write(change(None, tid, {"attributes": {"life": 0}}))
        reborn = change(None, tid, {"attributes": {"life": 2}}, tombstone)
        reborn_seq = await store.write(reborn)
        assert reborn_seq > deleted_seq
        assert await store.tombstone(tid) is None
        twin = await store.get(tid)
        assert twin is not None and twin.revision == 4 and twin.attributes == {"life": 2}
        assert twin.desired_version == old.desired_version + 1
        events = [e for _, e in await all_events(store) if e.twin_id == tid]
        assert [(e.revision, e.action) for e in events] == [
            (1, "created"),
            (2, "modified"),
            (3, "deleted"),
            (4, "created"),
        ]
        (task,) = await store.pending_index(10)
        assert task.seq == reborn_seq and task.twin == twin
        at1 = await store.twin_at(tid, 1)
        assert at1 is not None and at1.attributes == {"life": 1}
        at4 = await store.twin_at(tid, 4)
        assert at4 is not None and at4.attributes == {"life": 2}
        # The deletion (revision 3) left no twin, so no private part either.
        assert (await store.privates_at(tid, [1, 3, 4])).keys() == {1, 4}

    async def test_a_creation_from_a_stale_tombstone_is_refused(
        self, store_factory: StoreFactory
    ) -> None:
        """Two creators read the same tombstone; one creates, deletes: the other's creation,
        computed from the older tombstone, would reuse a revision and must lose."""
        one, two = await store_factory(), await store_factory()
        tid = "org.acme:lazarus"
        await one.write(change(None, tid, {"desired": {"v": 1}}))
        first = await one.get(tid)
        assert first is not None
        await one.write(deletion(first))
        seen = await two.tombstone(tid)
        assert seen is not None and seen.revision == 2 and seen.desired_version == 1
        await one.write(change(None, tid, {"desired": {"v": 2}}, seen))
        second = await one.get(tid)
        assert second is not None and second.revision == 3 and second.desired_version == 2
        await one.write(deletion(second))
        with pytest.raises(RevisionConflict):
            await two.write(change(None, tid, {"desired": {"v": 3}}, seen))
        latest = await two.tombstone(tid)
        assert latest == Tombstone(4, 2, 2)
        await two.write(change(None, tid, {"desired": {"v": 3}}, latest))
        third = await one.get(tid)
        assert third is not None and third.revision == 5 and third.desired == {"v": 3}

    async def test_retention_per_twin(self, store_factory: StoreFactory) -> None:
        store = await store_factory(stream=StreamSettings(journal_max_per_twin=3))
        tid = "org.acme:short"
        twin = None
        for i in range(140):
            await store.write(change(twin, tid, {"reported": {"n": i}}))
            twin = await store.get(tid)
        revisions = [e.event.revision for e in await store.history(tid, 1, None)]
        assert revisions[-3:] == [138, 139, 140]
        assert len(revisions) < 140 and revisions[0] > 1
        assert await store.pruned_seq() > 0
        assert await store.oldest_seq() > 1

    async def test_retention_by_age(self, store_factory: StoreFactory) -> None:
        stream = StreamSettings(journal_max_age_seconds=60)
        store = await store_factory(stream=stream)
        old = change(None, "org.acme:old", {"attributes": {}}, timestamp=AGES_AGO)
        old_seq = await store.write(old)
        created = await store.get("org.acme:old")
        assert created is not None
        gone_seq = await store.write(deletion(created, AGES_AGO))
        await store.close()
        again = await store_factory(stream=stream)
        await again.write(change(None, "org.acme:new", {"attributes": {}}))
        await again.last_seq()  # lets a store that prunes in the background catch up
        reopened = await store_factory(stream=stream)
        await reopened.write(change(None, "org.acme:newer", {"attributes": {}}))
        seqs = [seq for seq, _ in await all_events(reopened)]
        assert old_seq not in seqs and gone_seq not in seqs and len(seqs) == 2
        assert await reopened.pruned_seq() >= gone_seq

    async def test_retention_by_age_goes_on_without_writes(
        self, store_factory: StoreFactory
    ) -> None:
        """SQLite pruned by age only inside a commit (every 100th): on a service no longer
        written to, events older than journal_max_age_seconds stayed for good."""
        stream = StreamSettings(journal_max_age_seconds=60)
        store = await store_factory(stream=stream, maintenance_interval_seconds=0.2)
        # Not first: a store's first commit prunes by age, its own event included.
        await store.write(change(None, "org.acme:idle-new", {"attributes": {}}))
        tid = "org.acme:idle-old"
        old_seq = await store.write(change(None, tid, {"attributes": {}}, timestamp=AGES_AGO))
        newest = await store.write(
            change(await store.get(tid), tid, {"attributes": {"n": 1}}, timestamp=AGES_AGO)
        )
        await wait_pruned(store, newest)
        seqs = [seq for seq, _ in await all_events(store)]
        assert old_seq not in seqs and newest in seqs  # the newest event of a twin stays

    async def test_the_journal_end_stays_when_its_newest_events_age_out(
        self, store_factory: StoreFactory
    ) -> None:
        """SQLite took last_seq from the newest event left: once a deletion at the end of
        the journal aged out, it went back below numbers readers had been handed, and a
        process started then put its streams' start before them (a resume from the
        deletion was told it came from another journal)."""
        stream = StreamSettings(journal_max_age_seconds=60)
        store = await store_factory(stream=stream, maintenance_interval_seconds=0.2)
        await store.write(change(None, "org.acme:end-kept", {"attributes": {}}, timestamp=AGES_AGO))
        tid = "org.acme:end-gone"
        await store.write(change(None, tid, {"attributes": {}}, timestamp=AGES_AGO))
        created = await store.get(tid)
        assert created is not None
        gone = await store.write(deletion(created, AGES_AGO))
        await wait_pruned(store, gone)
        assert gone not in [seq for seq, _ in await all_events(store)]
        assert await store.last_seq() == gone
        await store.close()
        reopened = await store_factory(stream=stream)
        assert await reopened.last_seq() == gone

    async def test_retention_by_age_keeps_what_the_next_change_is_compared_with(
        self, store_factory: StoreFactory
    ) -> None:
        """Pruning by age removed every twin's newest event too: a twin written again after
        journal_max_age_seconds had no state before its change (twin_at was None), and
        change streams delivered its deletion, or its leaving a filter, to no one."""
        stream = StreamSettings(journal_max_age_seconds=60)
        store = await store_factory(stream=stream, maintenance_interval_seconds=0.2)
        seqs: dict[str, list[int]] = {}

        async def write(tid: str, values: JSONObject | None, timestamp: str = AGES_AGO) -> None:
            current = await store.get(tid)
            if values is None:
                assert current is not None
                made = deletion(current, timestamp)
            else:
                made = change(current, tid, values, timestamp=timestamp)
            seqs.setdefault(tid, []).append(await store.write(made))

        # Twins written only long ago, one of them deleted long ago.
        for tid in ("org.acme:aged-idle", "org.acme:aged-gone"):
            await write(tid, {"attributes": {"n": 1}})
            await write(tid, {"attributes": {"n": 2}})
        await write("org.acme:aged-gone", None)
        # Written long ago, then changed (or deleted) now: the old state is the "before".
        await write("org.acme:aged-changed", {"attributes": {"n": 1}})
        await write("org.acme:aged-deleted", {"attributes": {"n": 1}})
        await write("org.acme:aged-changed", {"attributes": {"n": 2}}, now_iso())
        await write("org.acme:aged-deleted", None, now_iso())
        await wait_pruned(store, seqs["org.acme:aged-deleted"][0])

        kept = {seq for seq, _ in await all_events(store)}
        expected = {
            "org.acme:aged-idle": [False, True],
            "org.acme:aged-gone": [False, False, False],
            "org.acme:aged-changed": [True, True],
            "org.acme:aged-deleted": [True, True],
        }
        assert {tid: [seq in kept for seq in seqs[tid]] for tid in seqs} == expected
        idle = await store.twin_at("org.acme:aged-idle", 2)
        assert idle is not None and idle.attributes == {"n": 2}
        for tid in ("org.acme:aged-changed", "org.acme:aged-deleted"):
            before = await store.twin_at(tid, 1)
            assert before is not None and before.attributes == {"n": 1}, tid

    async def test_a_deletion_that_aged_out_stays_out(self, store_factory: StoreFactory) -> None:
        """On FerretDB a tombstone keeps its deletion pending in the twin document: once the
        deletion aged out of the journal, history still held it (GET /history 200, not 410
        with deletedRevision), and creating the twin again wrote it back into the journal."""
        stream = StreamSettings(journal_max_age_seconds=60)
        store = await store_factory(stream=stream, maintenance_interval_seconds=0.2)
        tid = "org.acme:aged-away"
        await store.write(change(None, tid, {"attributes": {"n": 1}}, timestamp=AGES_AGO))
        twin = await store.get(tid)
        await store.write(change(twin, tid, {"attributes": {"n": 2}}, timestamp=AGES_AGO))
        twin = await store.get(tid)
        assert twin is not None
        gone = await store.write(deletion(twin, AGES_AGO))
        await wait_pruned(store, gone)
        assert await store.history(tid, 0, None) == []
        assert await store.history(tid, 3, 3) == []
        assert await store.twin_at(tid, 2) is None
        tombstone = await store.tombstone(tid)
        assert tombstone is not None and tombstone.revision == 3
        await store.write(change(None, tid, {"attributes": {"n": 4}}, tombstone))
        assert [e.event.revision for e in await store.history(tid, 0, None)] == [4]
        assert [e.revision for _, e in await all_events(store) if e.twin_id == tid] == [4]

    async def test_writes_made_without_the_outbox_are_pending_once_it_is_kept(
        self, store_factory: StoreFactory
    ) -> None:
        """search switched from builtin (or off) to elasticsearch: what was written meanwhile,
        deletions included, reaches the external index with no rebuild."""
        plain = await store_factory()
        ids = [f"org.acme:o-{name}" for name in "abc"]
        for tid in ids:
            await plain.write(change(None, tid, {"attributes": {"n": 1}}))
        doomed = await plain.get(ids[1])
        assert doomed is not None
        await plain.write(deletion(doomed))
        kept = await store_factory(outbox=True)
        tasks = {t.twin_id: t.twin for t in await kept.pending_index(100)}
        assert set(tasks) == set(ids) and tasks[ids[1]] is None
        assert tasks[ids[0]] == await kept.get(ids[0])
        await kept.mark_indexed(await kept.pending_index(100))
        assert await store_factory(outbox=True) and await kept.pending_index(100) == []

    async def test_index_outbox(self, store_factory: StoreFactory) -> None:
        store = await store_factory(outbox=True)
        assert await store.index_backlog() == (0, None)
        a, b = "org.acme:ox-a", "org.acme:ox-b"
        seq_a = await store.write(change(None, a, {"attributes": {"x": 1}}))
        seq_b = await store.write(change(None, b, {"attributes": {"x": 2}}))
        tasks = await store.pending_index(10)
        assert [(t.twin_id, t.seq) for t in tasks] == [(a, seq_a), (b, seq_b)]
        assert await store.index_backlog() == (2, seq_a)
        twin_a = await store.get(a)
        seq_a2 = await store.write(change(twin_a, a, {"attributes": {"x": 3}}))
        # The lowest is a's first write the index has yet to take, not its latest: an index
        # that took neither must not count seq_a as covered.
        assert await store.index_backlog() == (2, seq_a)
        await store.mark_indexed(tasks)  # a was written again since: it stays pending
        (left,) = await store.pending_index(10)
        assert left.twin_id == a and left.seq == seq_a2 and left.twin is not None
        assert left.twin.attributes == {"x": 3}
        # What the index took of a (seq_a) is covered; the write after it is not.
        count, lowest = await store.index_backlog()
        assert count == 1 and lowest is not None and seq_a < lowest <= seq_a2
        await store.mark_indexed([left])
        assert await store.pending_index(10) == []
        assert await store.index_backlog() == (0, None)

    async def test_marking_writes_indexed_while_the_twins_are_written_loses_none(
        self, store_factory: StoreFactory
    ) -> None:
        """On FerretDB (updates there are a read and a later write) the indexer's update
        of the outbox, outside any claim, wrote back a version it had read over a write
        acknowledged meanwhile: with Elasticsearch search, PATCHes answered 200 were
        undone, revisions journaled twice, and writers waited out 15 s claims."""
        store = await store_factory(outbox=True)
        tids = [f"org.acme:ix-{n}" for n in range(4)]
        for tid in tids:
            await store.write(change(None, tid, {"desired": {}}))
        keys = [f"k{i}" for i in range(25)]
        writing = asyncio.gather(*(mutate_in_turn(store, tid, keys) for tid in tids))
        while not writing.done():
            await store.mark_indexed(await store.pending_index(100))
            await asyncio.sleep(0)
        await writing
        for tid in tids:
            twin = await store.get(tid)
            assert twin is not None and twin.desired == {key: key for key in keys}, tid
            history = await store.history(tid, 1, None)
            assert [e.event.revision for e in history] == list(range(1, len(keys) + 2)), tid
        await store.mark_indexed(await store.pending_index(100))
        assert await store.index_backlog() == (0, None)

    async def test_search_and_count(self, store_factory: StoreFactory) -> None:
        store = await store_factory()
        for i in range(7):
            await store.write(change(None, f"org.s:t{i}", {"attributes": {"n": i % 3}}))
        query = SearchQuery(filter=parse_filter("ge(attributes/n,1)"), size=2)
        assert await store.count(query) == 4
        seen: list[str] = []
        while True:
            twins, cursor = await store.search(query)
            seen.extend(t.twin_id for t in twins)
            if cursor is None:
                break
            query = SearchQuery(query.filter, query.sort, query.size, cursor)
        assert seen == ["org.s:t1", "org.s:t2", "org.s:t4", "org.s:t5"]
        twin = await store.get("org.s:t1")
        assert twin is not None
        await store.write(deletion(twin))
        assert await store.count(SearchQuery(filter=parse_filter("ge(attributes/n,1)"))) == 3

    async def test_scan_and_twin_count(self, store_factory: StoreFactory) -> None:
        store = await store_factory()
        ids = [f"org.scan:t{i}" for i in (3, 1, 4, 0, 2)]
        for tid in ids:
            await store.write(change(None, tid, {}))
        gone = await store.get("org.scan:t4")
        assert gone is not None
        await store.write(deletion(gone))
        assert await store.twin_count() == 4
        first = await store.scan(None, 3)
        assert [t.twin_id for t in first] == ["org.scan:t0", "org.scan:t1", "org.scan:t2"]
        rest = await store.scan(first[-1].twin_id, 3)
        assert [t.twin_id for t in rest] == ["org.scan:t3"]
        # ``containing`` is a hint: twins holding the text are never left out.
        await store.write(change(None, "org.scan:t5", {"attributes": {"mark": "zz-hint"}}))
        hinted = [t.twin_id for t in await store.scan(None, 10, containing="zz-hint")]
        assert "org.scan:t5" in hinted
        assert set(hinted) <= {t.twin_id for t in await store.scan(None, 10)}
        # So is it for the journal: the events whose twin holds the text are all there, in
        # order, and no event is made up.
        every = await store.events_after(0, 100)
        events = await store.events_after(0, 100, containing="zz-hint")
        assert [e.seq for e in events if e.event.twin_id == "org.scan:t5"] == [
            e.seq for e in every if e.event.twin_id == "org.scan:t5"
        ]
        assert {e.seq for e in events} <= {e.seq for e in every}
        assert [e.seq for e in events] == sorted(e.seq for e in events)
