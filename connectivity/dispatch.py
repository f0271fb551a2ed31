"""Ordered handling of inbound messages: per-key order, bounded concurrency, in-order acks.

MQTT requires PUBACKs in the order the PUBLISHes arrived (MQTT-4.6.0-2), while we want handlers
for different twins to run concurrently. :class:`AckWindow` is the pure part: it releases
acknowledgements strictly in arrival order. :class:`KeyedDispatcher` runs the handlers: one
worker per active ordering key, so messages sharing a key are handled one after the other, and a
semaphore caps how many handlers run at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from twin_service.tasks import stop_task

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(eq=False)
class Slot(Generic[T]):
    """One message's place in the ack window."""

    token: T
    generation: int
    state: str = field(default="pending")  # pending | done | failed


class AckWindow(Generic[T]):
    """Releases ack tokens in arrival order, once every earlier message is settled.

    A message whose handler failed is *settled without an ack*: it is skipped so the window keeps
    moving, and the broker redelivers it on the next session. :meth:`reset` forgets everything
    (the connection was lost, so the broker will redeliver all of it and the old packet ids mean
    nothing on the new connection).
    """

    def __init__(self) -> None:
        self._slots: deque[Slot[T]] = deque()
        self._generation = 0

    @property
    def generation(self) -> int:
        """How many times the window was reset: a slot of an older one is stale."""
        return self._generation

    def __len__(self) -> int:
        return len(self._slots)

    def open(self, token: T) -> Slot[T]:
        """Reserve the next place for a message that has just arrived."""
        slot = Slot(token, self._generation)
        self._slots.append(slot)
        return slot

    def settle(self, slot: Slot[T], ok: bool) -> list[T]:
        """Mark a message handled (``ok``) or failed; return the tokens to ack now, in order."""
        if slot.generation != self._generation:
            return []
        slot.state = "done" if ok else "failed"
        ready: list[T] = []
        while self._slots and self._slots[0].state != "pending":
            head = self._slots.popleft()
            if head.state == "done":
                ready.append(head.token)
        return ready

    def reset(self) -> None:
        """Drop every open slot: their acks must never be sent."""
        self._slots.clear()
        self._generation += 1


Job = Callable[[], Awaitable[None]]
#: Called when a job is dropped unrun because the broker sends its message again.
Dropped = Callable[[], None]


class KeyedDispatcher(Generic[T]):
    """Runs jobs concurrently across keys, sequentially within a key, and acks in order.

    ``ack`` is called on the event loop with each token as soon as the window allows it.
    """

    def __init__(self, max_in_flight: int, ack: Callable[[T], None]) -> None:
        self._sem = asyncio.Semaphore(max_in_flight)
        self._ack = ack
        self._window: AckWindow[T] = AckWindow()
        self._queues: dict[str, deque[tuple[Job, Slot[T] | None, Dropped | None]]] = {}
        self._workers: set[asyncio.Task[None]] = set()
        self._running: set[str] = set()  # keys whose first queued job is running
        self.failures = 0
        #: Messages of a lost connection dropped unhandled, because the broker sends them again.
        self.dropped_for_redelivery = 0
        # Whether the broker redelivers a lost connection's unacknowledged messages, known at
        # the next CONNACK (see resumed).
        self._redelivers: asyncio.Future[bool] | None = None

    @property
    def pending_acks(self) -> int:
        """How many acknowledgeable messages are waiting for their handler or an earlier one."""
        return len(self._window)

    def submit(self, key: str, job: Job, token: T | None, dropped: Dropped | None = None) -> None:
        """Queue ``job`` behind earlier jobs of ``key``; ``token`` (if any) is acked after it.
        ``dropped`` is called when the job is to be dropped unrun for the broker's redelivery."""
        slot = self._window.open(token) if token is not None else None
        queue = self._queues.get(key)
        if queue is not None:
            queue.append((job, slot, dropped))
            return
        self._queues[key] = deque([(job, slot, dropped)])
        task = asyncio.create_task(self._drain(key), name=f"mqtt-key:{key}")
        self._workers.add(task)
        task.add_done_callback(self._workers.discard)

    def reset_acks(self) -> None:
        """The connection was lost: running handlers finish, but nothing they held is acked,
        and acknowledgeable jobs not started yet wait for :meth:`resumed`."""
        self._window.reset()
        if self._redelivers is None or self._redelivers.done():
            self._redelivers = asyncio.get_running_loop().create_future()

    def resumed(self, redelivers: bool) -> None:
        """Connected again. ``redelivers``: the broker kept the session, so it sends every
        unacknowledged message of the lost connection again, and the jobs of those not started
        yet are dropped instead of handled twice (a backlog of hundreds was, after a broker
        restart, past what client tokens dedupe). Otherwise they are handled: the only copy."""
        if self._redelivers is not None and not self._redelivers.done():
            self._redelivers.set_result(redelivers)
            if redelivers:
                # Said now, not as each worker reaches them: the copies follow this CONNACK
                # at once, ahead of the workers.
                for key, queue in self._queues.items():
                    waiting = itertools.islice(queue, 1 if key in self._running else 0, None)
                    for _job, slot, dropped in waiting:
                        if dropped is not None and self._stale(slot):
                            dropped()

    async def _drain(self, key: str) -> None:
        queue = self._queues[key]
        try:
            while queue:
                job, slot, _dropped = queue[0]
                if await self._redelivered(slot):
                    queue.popleft()
                    self.dropped_for_redelivery += 1
                    continue
                ok = False
                async with self._sem:
                    self._running.add(key)
                    try:
                        await job()
                        ok = True
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        self.failures += 1
                        log.exception("MQTT handler failed for key %r; message left unacked", key)
                    finally:
                        self._running.discard(key)
                queue.popleft()
                if slot is not None:
                    for token in self._window.settle(slot, ok):
                        self._ack(token)
        finally:
            del self._queues[key]

    async def _redelivered(self, slot: Slot[T] | None) -> bool:
        """Whether the broker sends this job's message again (a stale slot: waits until the
        next connection says)."""
        if not self._stale(slot):
            return False
        redelivers = self._redelivers
        return redelivers is not None and await asyncio.shield(redelivers)

    def _stale(self, slot: Slot[T] | None) -> bool:
        """Whether the job's message came on a connection since lost (it cannot be acked)."""
        return slot is not None and slot.generation != self._window.generation

    async def join(self) -> None:
        """Wait until every queued job has run."""
        while self._workers:
            await asyncio.gather(*list(self._workers), return_exceptions=True)

    async def cancel(self) -> None:
        """Stop all workers now; queued jobs are dropped (and stay unacked)."""
        await asyncio.gather(*(stop_task(task) for task in list(self._workers)))
