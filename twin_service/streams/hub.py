"""The hub: tails the change journal and fans events out to subscribers.

Live delivery is driven by the journal, not by in-memory callbacks: a single tailer per
process reads ``events_after(last)`` whenever it is poked (a local commit or a bus notice)
and at least every poll interval, so every subscriber sees every event once, in sequence
order, whichever process committed it.

Fan-out goes through one :class:`SubscriptionIndex` shared by every session of the process:
an event is offered only to the subscriptions it may concern, as one :class:`EventFrame`
whose encodings they share. The tailer yields the event loop every couple of milliseconds
of work so that HTTP requests and socket writes keep flowing during a large batch.

Receivers queue their messages and :meth:`EventHub.defer` their session; before every pause
(a yield, a journal read, the end of a drain) the hub flushes each deferred session once, so
a session that received several events in one stretch writes them together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Protocol

from twin_service.budget import ByteBudget
from twin_service.errors import TooManyStreams, Unavailable
from twin_service.store.base import StoredEvent, TwinStore
from twin_service.streams.messages import EventFrame
from twin_service.streams.routing import SubscriptionIndex
from twin_service.streams.subscription import Subscription
from twin_service.tasks import stop_task
from twin_service.twin.document import Twin
from twin_service.types import JSONObject

log = logging.getLogger(__name__)

#: Receives (stored event, document before, document after); must not block.
Sink = Callable[[StoredEvent, JSONObject | None, JSONObject | None], None]

#: Journal events read at a time (the hub's tail, and a replay at most).
JOURNAL_BATCH = 500
#: Longest stretch of fan-out work, in seconds, before the tailer lets other tasks run.
_SLICE = 0.002


class Receiver(Protocol):
    """One subscription's delivery handle, filed in the hub's index; must not block."""

    def receive(self, frame: EventFrame) -> None: ...

    def __hash__(self) -> int: ...


class Flushable(Protocol):
    """A session with queued messages, flushed by the hub before it pauses; must not block."""

    def flush(self) -> None: ...

    def __hash__(self) -> int: ...


class StateCache:
    """The latest known document of recently changed twins, to evaluate filters "before"."""

    def __init__(self, store: TwinStore, capacity: int = 10_000) -> None:
        self._store = store
        self._capacity = capacity
        self._docs: OrderedDict[str, tuple[int, JSONObject | None]] = OrderedDict()

    async def before(self, stored: StoredEvent) -> JSONObject | None:
        """The twin's document right before ``stored`` (``None`` if it did not exist)."""
        event = stored.event
        if event.action == "created":
            return None
        cached = self._docs.get(event.twin_id)
        if cached is not None and cached[0] == event.revision - 1:
            return cached[1]
        previous = await self._store.twin_at(event.twin_id, event.revision - 1)
        return previous.to_document() if previous is not None else None

    def clear(self) -> None:
        self._docs.clear()

    def remember(self, stored: StoredEvent, after: JSONObject | None) -> None:
        twin_id = stored.event.twin_id
        self._docs[twin_id] = (stored.event.revision, after)
        self._docs.move_to_end(twin_id)
        while len(self._docs) > self._capacity:
            self._docs.popitem(last=False)


def document_after(stored: StoredEvent) -> JSONObject | None:
    state: Twin | None = stored.state
    return state.to_document() if state is not None else None


class EventHub:
    def __init__(
        self,
        store: TwinStore,
        poll_interval: float = 1.0,
        queued_limit: int = 2**62,
        max_readers: int = 2**62,
    ) -> None:
        self._store = store
        #: Readers it serves (``StreamSession``), at most ``max_readers``: each holds a
        #: connection (a file descriptor) for as long as its client likes.
        self.readers = 0
        self.max_readers = max_readers
        #: Bytes queued for the readers it serves (``StreamSession``), against their bound.
        self.queued = ByteBudget(queued_limit)
        self._poll_interval = poll_interval
        self._index: SubscriptionIndex[Receiver] = SubscriptionIndex()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._cache = StateCache(store)
        self._deferred: dict[Flushable, None] = {}
        #: Highest sequence number offered to the receivers.
        self.position = 0
        #: Highest sequence number a commit notice reported.
        self._poked = 0
        #: Why the journal cannot be read now (None: it can).
        self._failing: str | None = None

    async def start(self) -> None:
        self.position = await self._store.last_seq()
        self._task = asyncio.create_task(self._run(), name="event-hub")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)

    def poke(self, seq: int | None = None) -> None:
        if seq is not None and seq > self._poked:
            self._poked = seq
        if seq is None or (seq > self.position and (self._index or self._store.commits_in_order)):
            # Not where nobody listens and the notice cannot move the hub (see _drain_batches):
            # the periodic poll finds the journal's end, one store query a poll rather than
            # one per commit.
            self._wake.set()

    def register(self, receiver: Receiver, subscription: Subscription) -> int:
        """File a subscription; it is offered every event it may concern after the returned
        position (events are offered between awaits, never during this call)."""
        self._index.add(receiver, subscription)
        return self.position

    def unregister(self, receiver: Receiver) -> None:
        self._index.remove(receiver)

    def admit(self) -> None:
        """Count one reader more, or refuse it with :class:`TooManyStreams` at the bound."""
        if self.readers >= self.max_readers:
            raise TooManyStreams(
                f"This process serves {self.readers} change-stream readers, its most "
                "(stream.max_connections, open files); try again later."
            )
        self.readers += 1

    def release(self) -> None:
        """Count one reader fewer (one :meth:`admit` earlier)."""
        self.readers -= 1

    def defer(self, target: Flushable) -> None:
        """Have ``target`` flushed before the hub next pauses (once, however often deferred)."""
        self._deferred[target] = None

    def _flush(self) -> None:
        deferred, self._deferred = self._deferred, {}
        for target in deferred:
            try:
                target.flush()
            except Exception:
                log.exception("event receiver failed to flush")

    @property
    def subscriptions(self) -> int:
        return len(self._index)

    def health(self) -> dict[str, object]:
        """The ``streams`` check of /ready: down while the journal cannot be read."""
        out: dict[str, object] = {
            "status": "down" if self._failing else "up",
            "subscriptions": self.subscriptions,
            "readers": self.readers,
            "maxReaders": self.max_readers,
            "position": self.position,
            "queuedBytes": self.queued.used,
        }
        if self._failing:
            out["error"] = self._failing
        return out

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_interval)
            self._wake.clear()
            try:
                await self._drain()
            except Unavailable as exc:
                # One line per outage of the store, not a traceback per poll.
                if not self._failing:
                    log.warning("event hub cannot read the journal, retrying: %s", exc.message)
                self._failing = exc.message
                await asyncio.sleep(self._poll_interval)
                continue
            except Exception as exc:
                log.exception("event hub failed to read the journal; retrying")
                self._failing = f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(self._poll_interval)
                continue
            if self._failing:
                log.warning("event hub reads the journal again")
                self._failing = None

    async def _drain(self) -> None:
        try:
            await self._drain_batches()
        finally:
            self._flush()

    async def _drain_batches(self) -> None:
        slice_start = time.perf_counter()
        while True:
            self._flush()
            if not self._index:
                # Nobody listens: move to the end of the journal instead of reading and
                # decoding every event (a sixth of a write's CPU when nobody subscribes).
                # Where commits are numbered in order, a notice of a later commit says where
                # that is without asking the store (a query on a reader thread per commit,
                # 5% of a PATCH's CPU); commits that no notice reported are found by the
                # periodic poll. Elsewhere (MongoDB) a lower number may still commit: moved
                # past it, the hub would file a new subscription after an event it never
                # delivers, so it asks for the journal's stable end.
                poked = self._poked > self.position and self._store.commits_in_order
                last = self._poked if poked else await self._store.last_seq()
                if not self._index:  # nobody registered while we waited either
                    if last > self.position:
                        self.position = last
                        self._cache.clear()  # it no longer follows every change
                    return
            batch = await self._store.events_after(self.position, JOURNAL_BATCH)
            if not batch:
                return
            for stored in batch:
                before = await self._cache.before(stored)
                after = document_after(stored)
                self._cache.remember(stored, after)
                self.position = stored.seq
                self._fan_out(EventFrame(stored, before, after))
                # Between two events every receiver has seen everything up to `position`,
                # so a subscription registered while we yield starts exactly there.
                if time.perf_counter() - slice_start >= _SLICE:
                    self._flush()
                    await asyncio.sleep(0)
                    slice_start = time.perf_counter()
            if len(batch) < JOURNAL_BATCH:
                return

    def _fan_out(self, frame: EventFrame) -> None:
        twin_id = frame.stored.event.twin_id
        for receiver in self._index.candidates(twin_id, frame.before, frame.after):
            try:
                receiver.receive(frame)
            except Exception:
                log.exception("event receiver failed")


class ReplayOverrun(Exception):
    """Retention removed events a replay had yet to read (its reader was slower than
    ``stream.journal_max_per_twin`` or ``journal_max_age_seconds`` allow): it cannot go on
    without a gap."""


async def replay(
    store: TwinStore,
    since: int,
    until: int,
    sink: Sink,
    batch: int = JOURNAL_BATCH,
    room: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Feed ``sink`` every journaled event with since < seq <= until, in order; before
    each event, wait for ``room`` (the sink's reader is paced: per event, because what
    fits in the sink's queue depends on the events' sizes).

    Raises :class:`ReplayOverrun` once events after the position it reached were pruned:
    checked after each read (retention records what it removes before, or as, it removes
    it), since a paced replay may read long after its subscribe checked ``since``. Unchecked,
    it went on past the events removed meanwhile, and its reader never learnt of the gap."""
    cache = StateCache(store, capacity=1000)
    position = since
    while position < until:
        events = await store.events_after(position, batch)
        if await store.pruned_seq() > position:
            raise ReplayOverrun(f"events after {position} were pruned before they were replayed")
        if not events:
            return
        for stored in events:
            if stored.seq > until:
                return
            if room is not None:
                await room()
            before = await cache.before(stored)
            after = document_after(stored)
            cache.remember(stored, after)
            sink(stored, before, after)
            position = stored.seq
