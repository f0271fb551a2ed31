"""Marks desired values whose time to live ran out as ``expired`` when they fall due.

Without this, an overdue ``pending`` entry would only turn ``expired`` at the twin's next
write. The sweeper learns due times from the twins this process commits, at start-up from a
scan of the store, and after it from the change journal, which holds every process's commits
(the process that set a time to live may have stopped since); it sleeps until the earliest,
then commits the expiry as a ``system`` change. Every replica may sweep: the compare-and-set
and the "is anything due" check make a second sweeper of the same twin a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TypeVar

from twin_service.api.context import AppContext
from twin_service.errors import Conflict, NotFound, TwinServiceError, Unavailable
from twin_service.store.base import StoredEvent
from twin_service.tasks import stop_task
from twin_service.twin.document import Twin, now_iso
from twin_service.twin.lifecycle import expire_due, next_expiry
from twin_service.twin.operations import Edit

log = logging.getLogger(__name__)

T = TypeVar("T")

SCAN_PAGE = 500
IDLE_WAIT = 3600.0
#: Seconds before an expiry the store could not take is tried again.
RETRY_SECONDS = 2.0


class _NothingDue(TwinServiceError):
    """The twin has no overdue entry (any more): nothing to commit.

    A :class:`TwinServiceError` so that the service judges again on a fresh copy when it
    judged the one it keeps of its last write, which lacks what other processes wrote since
    (the expiry that one of them set). The sweeper catches it: no client sees it.
    """

    def __init__(self, twin: Twin | None) -> None:
        super().__init__("Nothing of the twin is due to expire.")
        self.twin = twin


class ExpirySweeper:
    def __init__(self) -> None:
        self._due: list[tuple[str, str]] = []  # (expires ISO, twin id), a heap
        # The entry of the heap that counts for each twin: every commit of a twin with a
        # pending expiry watches it, and one heap entry per commit grew the heap without
        # bound (a device reporting 10 times a second under a day's TTL: 864,000 of them).
        self._next: dict[str, str] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._ctx: AppContext | None = None
        self.expired = 0

    async def start(self, ctx: AppContext) -> None:
        self._ctx = ctx
        ctx.service.add_listener(self._on_commit)
        self._tasks = [
            asyncio.create_task(self._run(), name="expiry-sweeper"),
            asyncio.create_task(self._learn(), name="expiry-learn"),
        ]

    async def stop(self) -> None:
        await asyncio.gather(*(stop_task(task) for task in self._tasks))

    @property
    def scheduled(self) -> int:
        """Twins with an expiry to sweep."""
        return len(self._next)

    def watch(self, twin: Twin) -> None:
        expires = next_expiry(twin.lifecycle)
        if expires is not None:
            self._schedule(expires, twin.twin_id)

    def _schedule(self, expires: str, twin_id: str) -> None:
        """Sweep ``twin_id`` at ``expires`` unless it is due as early already. A later
        expiry waits for the sweep of the earlier one, which schedules what the twin then
        holds."""
        scheduled = self._next.get(twin_id)
        if scheduled is not None and scheduled <= expires:
            return
        self._next[twin_id] = expires
        heapq.heappush(self._due, (expires, twin_id))
        self._compact()
        self._wake.set()

    def _forget(self, twin_id: str) -> None:
        """Nothing of ``twin_id`` is due any more (deleted)."""
        if self._next.pop(twin_id, None) is not None:
            self._compact()

    def _compact(self) -> None:
        """The heap keeps a dropped or superseded entry until its time (up to 100 years
        for a time to live): a twin deleted, or given an earlier expiry, over and over grew
        it without end. Rebuilt once most of it is such entries."""
        if len(self._due) > 2 * len(self._next) + 64:
            self._due = [(at, tid) for at, tid in self._due if self._next.get(tid) == at]
            heapq.heapify(self._due)

    async def _on_commit(self, stored: StoredEvent, twin: Twin | None) -> None:
        if twin is not None:
            self.watch(twin)
        else:
            self._forget(stored.event.twin_id)

    async def _learn(self) -> None:
        """Watch the stored twins, then every twin the journal's later events leave.

        The journal is read every stream poll interval (1 s by default): an expiry set by
        another process is committed at most that late. Each read is one query and the
        decoding of the events committed since, as the event hub's tail does; a periodic
        rescan of the twins instead would read every twin each time (MongoDB cannot skip
        those without an expiry), however few are written.
        """
        assert self._ctx is not None
        interval = self._ctx.settings.stream.poll_interval_seconds
        # Taken before the scan: what commits after the scan read a twin follows it there.
        position = await self._paused_on_failure(self._ctx.store.last_seq)
        await self._scan()
        while True:
            await asyncio.sleep(interval)
            try:
                position = await self._follow(position)
            except TwinServiceError as exc:
                log.warning("expiry sweeper cannot read the journal, retrying: %s", exc.message)

    async def _follow(self, position: int) -> int:
        """Watch the twins of the journaled events after ``position``; returns where it read
        up to."""
        assert self._ctx is not None
        store = self._ctx.store
        # Every event up to it is journaled: those the hint below skips are read past too.
        head = await store.last_seq()
        while True:
            # Only twins whose text holds an expiry can have one due. Decoding every event
            # (the store skips the others) cost 5.5% of the CPU of a PATCH (bench.ab).
            events = await store.events_after(position, SCAN_PAGE, containing='"expires":')
            for stored in events:
                if stored.state is not None:
                    self.watch(stored.state)
                position = stored.seq
            if len(events) < SCAN_PAGE:
                return max(position, head)

    async def _scan(self) -> None:
        assert self._ctx is not None
        store = self._ctx.store
        after: str | None = None
        while True:
            # Only twins whose text holds an expiry can have one due.
            twins = await self._paused_on_failure(
                partial(store.scan, after, SCAN_PAGE, containing='"expires":')
            )
            if not twins:
                return
            for twin in twins:
                self.watch(twin)
            after = twins[-1].twin_id

    @staticmethod
    async def _paused_on_failure(read: Callable[[], Awaitable[T]]) -> T:
        """``read()``, tried again every few seconds while the store cannot answer."""
        while True:
            try:
                return await read()
            except TwinServiceError as exc:
                log.warning("expiry scan paused: %s", exc.message)
                await asyncio.sleep(5)

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            wait = IDLE_WAIT
            if self._due:
                due_at = datetime.fromisoformat(self._due[0][0].replace("Z", "+00:00"))
                wait = max(0.0, (due_at - datetime.now(UTC)).total_seconds())
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
                continue
            now = now_iso()
            while self._due and self._due[0][0] <= now:
                expires, twin_id = heapq.heappop(self._due)
                if self._next.get(twin_id) != expires:
                    continue  # superseded by an earlier entry, which has been swept
                del self._next[twin_id]
                await self._expire(twin_id)

    async def _expire(self, twin_id: str) -> None:
        assert self._ctx is not None
        moment = datetime.now(UTC)

        def edit(twin: Twin | None) -> Edit:
            if twin is None or expire_due(twin.lifecycle, moment, desired=twin.desired) is None:
                raise _NothingDue(twin)
            return Edit(values={}, written={})

        def amend(twin: Twin | None, _edit: Edit) -> dict[str, Any]:
            assert twin is not None
            return {"lifecycle": expire_due(twin.lifecycle, moment, desired=twin.desired)}

        try:
            await self._ctx.service.mutate(twin_id, edit, origin="system", amend=amend)
            self.expired += 1  # the commit watched the twin again (_on_commit)
        except _NothingDue as nothing:
            # Its expiry changed since it was scheduled (a later TTL, or applied).
            if nothing.twin is not None:
                self.watch(nothing.twin)
        except NotFound:
            pass  # deleted since (by another process: this one forgets its own deletions)
        except (Unavailable, Conflict) as exc:
            # Dropped, the expiry would wait for the twin's next write or the next start.
            log.warning(
                "could not expire desired values of %s, again in %.0f s: %s",
                twin_id,
                RETRY_SECONDS,
                exc.message,
            )
            again = moment + timedelta(seconds=RETRY_SECONDS)
            self._schedule(now_iso(again), twin_id)
        except TwinServiceError as exc:
            log.warning("could not expire desired values of %s: %s", twin_id, exc.message)
