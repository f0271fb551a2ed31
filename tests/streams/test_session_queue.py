"""How a stream session queues its reader's messages: how far live events may get ahead of
the reader, how a replay (a resume with ``since``) is paced and ended, and where a reader
cut off resumes. One session on the real SQLite store and event hub, with no connection,
so that "nobody reads" is exact."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from tests.store.contract import change, mutate
from twin_service.auth import Credential, Principal
from twin_service.settings import Settings, StreamSettings
from twin_service.store.sqlite import SqliteStore
from twin_service.streams.hub import EventHub
from twin_service.streams.session import StreamSession
from twin_service.streams.subscription import Subscription


@asynccontextmanager
async def journal(tmp_path: Path, events: int) -> AsyncIterator[tuple[SqliteStore, EventHub]]:
    """A store with ``events`` journaled changes of four twins, and a hub that has seen them."""
    settings = Settings(data_dir=tmp_path)
    store = SqliteStore(tmp_path / "twins.sqlite3", settings.sqlite, StreamSettings())
    await store.open()
    hub = EventHub(store, poll_interval=0.05)
    await hub.start()
    try:
        for n in range(events):
            await mutate(store, f"org.acme:t{n % 4}", f"k{n}")
        while hub.position < events:
            await asyncio.sleep(0.01)
        yield store, hub
    finally:
        await hub.stop()
        await store.close()


def admin_session(
    hub: EventHub, store: SqliteStore, queue_size: int, queue_bytes: int = 8 << 20
) -> StreamSession:
    admin = Credential(None, "", Principal(name="t", role="admin"))
    return StreamSession(hub, store, admin, queue_size, 5, queue_bytes=queue_bytes)


async def big_changes(store: SqliteStore, hub: EventHub, count: int) -> None:
    """``count`` twins created with a 10 KB desired value (a message of 30.7 KB: the twin,
    with its metadata and lifecycle, and the change), once the hub has offered them."""
    for _ in range(count):
        twin_id = f"org.acme:big{next(_KEYS)}"
        target = await store.write(change(None, twin_id, {"desired": {"blob": "x" * 10_000}}))
    while hub.position < target:
        await asyncio.sleep(0.01)


async def live_and_replaying(
    hub: EventHub, store: SqliteStore, queue_size: int
) -> tuple[StreamSession, asyncio.Task[None]]:
    """A session with a live subscription, ``live``, and one replaying from seq 7, ``s``,
    whose replay has filled its share of the queue (nobody reads) and waits for room."""
    session = admin_session(hub, store, queue_size)
    await session.subscribe(Subscription(id="live"), since=None)
    subscribing = asyncio.create_task(session.subscribe(Subscription(id="s"), since=7))
    await asyncio.sleep(0.3)
    assert not subscribing.done()
    return session, subscribing


_KEYS = itertools.count()


async def live_events(store: SqliteStore, hub: EventHub, count: int) -> None:
    """``count`` more changes, once the hub has offered them to the subscriptions."""
    for _ in range(count):
        target = await mutate(store, "org.acme:live", f"k{next(_KEYS)}")
    while hub.position < target:
        await asyncio.sleep(0.01)


async def test_a_replay_waits_for_its_reader_and_a_reader_cut_off_resumes_where_it_asked(
    tmp_path: Path,
) -> None:
    """A replay waits for its reader to make room (it used to fill the queue and cut the
    reader off). Live events do not wait: a reader that falls ``queue_size`` of them behind
    is cut off, told where to resume: the highest event it was handed, and before any, the
    point it resumed from (it was 0: a replay of the whole journal, or a resync)."""
    async with journal(tmp_path, 40) as (store, hub):
        session = admin_session(hub, store, queue_size=10)
        subscribing = asyncio.create_task(session.subscribe(Subscription(id="s"), since=7))
        await asyncio.sleep(0.3)  # nobody reads: 33 events to replay, room for 10
        assert not subscribing.done()
        assert not session.overflowed
        for n in range(12):  # live events, held back while the replay waits
            await mutate(store, "org.acme:live", f"k{n}")
        await asyncio.wait_for(subscribing, 5)
        assert session.overflowed
        assert session.resume_hint() == 7


async def test_an_unsubscribe_ends_its_replay(tmp_path: Path) -> None:
    """A subscription unsubscribed while its replay waits for room: the replay ends, and
    nothing of it is queued after the ``unsubscribed`` reply, while the connection and its
    other subscription go on. The replay used to go on, with events the client had said it
    no longer wanted, and a replay waiting for room waited until the connection closed."""
    async with journal(tmp_path, 40) as (store, hub):
        session, subscribing = await live_and_replaying(hub, store, queue_size=10)
        queued = [item.text for item in session.take_all()]
        assert session.unsubscribe("s")
        session.send({"type": "unsubscribed", "subscription": "s", "found": True})
        await asyncio.wait_for(subscribing, 5)
        await mutate(store, "org.acme:after", "k")
        await asyncio.sleep(0.3)  # the hub offers the live subscription the new event
        after = [item.text for item in session.take_all()]
        assert '"subscription":"s"' in "".join(queued)  # the replay had begun
        assert after[0].startswith('{"type":"unsubscribed"'), after
        assert len(after) == 2 and '"subscription":"live"' in after[1], after
        assert not session.overflowed


async def test_a_replay_leaves_room_for_the_live_events_of_other_subscriptions(
    tmp_path: Path,
) -> None:
    """A replay fills at most half the queue: the other half is for the live events of the
    connection's other subscriptions and for replies. A replay used to fill the whole
    queue while its reader was slow, and the next live event of another subscription cut
    off a reader the replay itself had put behind."""
    async with journal(tmp_path, 40) as (store, hub):
        session, subscribing = await live_and_replaying(hub, store, queue_size=10)
        await live_events(store, hub, 4)
        await asyncio.sleep(0.1)
        assert not session.overflowed
        messages = taken(session)
        assert [m["seq"] for m in messages if m["subscription"] == "live"] == [40, 41, 42, 43, 44]
        replayed = [m for m in messages if m["subscription"] == "s" and m["type"] == "event"]
        while not subscribing.done():  # a reader at last: the replay goes on, and ends
            await asyncio.sleep(0.01)
            replayed += taken(session)
        subscribing.result()
        assert [m["seq"] for m in replayed] == list(range(8, 45))  # then the held ones


async def test_the_resume_hint_leaves_no_subscription_a_gap(tmp_path: Path) -> None:
    """Cut off while one subscription replays far behind another, live one, the reader is
    told to resume from the last event the replay had handed over. It was told the highest
    event handed over, whichever subscription's: resumed from there, the replaying
    subscription missed every event it had not been handed yet."""
    async with journal(tmp_path, 40) as (store, hub):
        session, subscribing = await live_and_replaying(hub, store, queue_size=20)
        await live_events(store, hub, 3)
        handed = taken(session)
        replayed = [m["seq"] for m in handed if m["subscription"] == "s" and "event" in m]
        assert replayed and max(replayed) < 40, handed
        assert max(m.get("seq", 0) for m in handed) == 43  # the live ones, handed over too
        await live_events(store, hub, 30)  # nobody reads any more: they cut the reader off
        assert session.overflowed
        assert session.resume_hint() == max(replayed)
        await asyncio.wait_for(subscribing, 5)


def taken(session: StreamSession) -> list[dict[str, Any]]:
    """Every message queued, as the reader would parse it."""
    return [json.loads(item.text) for item in session.take_all()]


async def test_live_events_cut_off_a_reader_queue_bytes_behind(tmp_path: Path) -> None:
    """Counted only in messages, a thousand messages of large twins held 130 MB for each
    reader that did not read: a few such readers and the service ran out of memory."""
    async with journal(tmp_path, 0) as (store, hub):
        session = admin_session(hub, store, queue_size=1000, queue_bytes=100_000)
        await session.subscribe(Subscription(id="live"), since=None)
        await big_changes(store, hub, 3)  # 92 KB queued
        assert not session.overflowed
        await big_changes(store, hub, 1)
        assert session.overflowed
        assert session.resume_hint() == 0  # nothing was handed over


async def test_one_message_larger_than_queue_bytes_still_goes_to_an_empty_queue(
    tmp_path: Path,
) -> None:
    async with journal(tmp_path, 0) as (store, hub):
        session = admin_session(hub, store, queue_size=1000, queue_bytes=10_000)
        await session.subscribe(Subscription(id="live"), since=None)
        taken(session)  # the "subscribed" reply
        await big_changes(store, hub, 1)
        assert not session.overflowed
        assert [m["seq"] for m in taken(session)] == [1]


async def test_a_replay_of_large_events_is_paced_by_bytes(tmp_path: Path) -> None:
    """The replay fills half of ``queue_bytes`` (and one message), then waits for its
    reader, however few messages that is."""
    async with journal(tmp_path, 0) as (store, hub):
        await big_changes(store, hub, 20)
        session = admin_session(hub, store, queue_size=1000, queue_bytes=100_000)
        subscribing = asyncio.create_task(session.subscribe(Subscription(id="s"), since=0))
        await asyncio.sleep(0.3)  # nobody reads
        assert not subscribing.done() and not session.overflowed
        first = taken(session)
        assert len(first) == 3, len(first)  # "subscribed", then events up to 50 KB, and one
        replayed = first[1:]
        while not subscribing.done():
            await asyncio.sleep(0.01)
            replayed += taken(session)
        subscribing.result()
        assert [m["seq"] for m in replayed] == list(range(1, 21))


async def test_readers_behind_are_cut_once_all_readers_hold_the_process_bound(
    tmp_path: Path,
) -> None:
    """Each reader bounded alone (``queue_bytes``), a hundred slow readers held 800 MB.
    With the process's bound reached, a reader that is behind is cut when its next event
    comes, and what it held is let go; a reader that keeps up goes on."""
    async with journal(tmp_path, 0) as (store, hub):
        budget = hub.queued
        budget.limit = 140_000  # four messages of 30.7 KB, not five
        slow = [admin_session(hub, store, 1000) for _ in range(2)]
        keeping_up = admin_session(hub, store, 1000)
        for session in [*slow, keeping_up]:
            await session.subscribe(Subscription(id="live"), since=None)
            taken(session)
        cut = []
        for n in range(1, 6):
            await big_changes(store, hub, 1)
            assert [m["seq"] for m in taken(keeping_up)] == [n]
            assert budget.used <= budget.limit
            cut.append(sum(session.overflowed for session in slow))
        # The first slow reader is cut at the third event (five held otherwise), which
        # lets the second one hold two more.
        assert cut == [0, 0, 1, 1, 2]
        assert not keeping_up.overflowed and budget.used == 0
        # Readers that leave give back what they held.
        late = admin_session(hub, store, 1000)
        await late.subscribe(Subscription(id="live"), since=None)
        await big_changes(store, hub, 1)
        assert budget.used > 60_000
        late.close()
        keeping_up.close()
        assert budget.used == 0
        # Nor does a reply to a connection already closed count (nobody would take it).
        late.send({"type": "error", "message": "x" * 1000})
        assert budget.used == 0


async def test_a_replay_waits_while_the_process_bound_is_three_quarters_used(
    tmp_path: Path,
) -> None:
    """Replays are paced by the process's bound too: filled, it would leave the live
    events of readers that keep up nothing but cuts."""
    async with journal(tmp_path, 0) as (store, hub):
        await big_changes(store, hub, 10)
        budget = hub.queued
        budget.limit = 400_000
        stuck = admin_session(hub, store, 1000)
        await stuck.subscribe(Subscription(id="live"), since=None)
        await big_changes(store, hub, 10)  # 10 x 31 KB that nobody reads
        held = budget.used
        assert 300_000 < held < 400_000
        resumed = admin_session(hub, store, 1000)
        replay = asyncio.create_task(resumed.subscribe(Subscription(id="s"), since=0))
        await asyncio.sleep(0.3)
        assert not replay.done()
        assert [m["type"] for m in taken(resumed)] == ["subscribed"]
        for _ in range(2):  # one message at a time while it waits
            await asyncio.sleep(0.1)
            assert [m["type"] for m in taken(resumed)] == ["event"]
        assert not replay.done()
        stuck.close()  # room again: the replay runs to its end
        replayed = 2
        while not replay.done():
            await asyncio.sleep(0.01)
            replayed += len([m for m in taken(resumed) if m["type"] == "event"])
        replay.result()
        replayed += len([m for m in taken(resumed) if m["type"] == "event"])
        assert replayed == 20 and not resumed.overflowed
