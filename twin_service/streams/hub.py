"""The hub: tails the change journal and fans events out to subscribers.

Live delivery is driven by the journal, not by in-memory callbacks: a single tailer per
process reads ``events_after(last)`` whenever it is poked (a local commit or a bus notice)
and at least every poll interval, so every subscriber sees every event once, in sequence
order, whichever process committed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable

from twin_service.store.base import StoredEvent, TwinStore
from twin_service.twin.document import Twin
from twin_service.types import JSONObject

log = logging.getLogger(__name__)

#: Receives (stored event, document before, document after); must not block.
Sink = Callable[[StoredEvent, JSONObject | None, JSONObject | None], None]

_BATCH = 500


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
    def __init__(self, store: TwinStore, poll_interval: float = 1.0) -> None:
        self._store = store
        self._poll_interval = poll_interval
        self._sinks: set[Sink] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._cache = StateCache(store)
        #: Highest sequence number delivered to the sinks.
        self.position = 0

    async def start(self) -> None:
        self.position = await self._store.last_seq()
        self._task = asyncio.create_task(self._run(), name="event-hub")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def poke(self, seq: int | None = None) -> None:
        if seq is None or seq > self.position:
            self._wake.set()

    def add(self, sink: Sink) -> int:
        """Register a sink; it receives every event after the returned position."""
        self._sinks.add(sink)
        return self.position

    def remove(self, sink: Sink) -> None:
        self._sinks.discard(sink)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_interval)
            self._wake.clear()
            try:
                await self._drain()
            except Exception:
                log.exception("event hub failed to read the journal; retrying")
                await asyncio.sleep(self._poll_interval)

    async def _drain(self) -> None:
        while True:
            batch = await self._store.events_after(self.position, _BATCH)
            if not batch:
                return
            for stored in batch:
                before = await self._cache.before(stored)
                after = document_after(stored)
                self._cache.remember(stored, after)
                self.position = stored.seq
                for sink in list(self._sinks):
                    try:
                        sink(stored, before, after)
                    except Exception:
                        log.exception("event sink failed")
            if len(batch) < _BATCH:
                return


async def replay(store: TwinStore, since: int, until: int, sink: Sink, batch: int = _BATCH) -> None:
    """Feed ``sink`` every journaled event with since < seq <= until, in order."""
    cache = StateCache(store, capacity=1000)
    position = since
    while position < until:
        events = await store.events_after(position, batch)
        if not events:
            return
        for stored in events:
            if stored.seq > until:
                return
            before = await cache.before(stored)
            after = document_after(stored)
            cache.remember(stored, after)
            sink(stored, before, after)
            position = stored.seq
