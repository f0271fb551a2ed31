"""Marks desired values whose time to live ran out as ``expired`` when they fall due.

Without this, an overdue ``pending`` entry would only turn ``expired`` at the twin's next
write. The sweeper learns due times from every committed twin (and, at start-up, from a scan
of the store), sleeps until the earliest, then commits the expiry as a ``system`` change.
Every replica may sweep: the compare-and-set and the "is anything due" check make a second
sweeper of the same twin a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from twin_service.api.context import AppContext
from twin_service.errors import Conflict, TwinServiceError, Unavailable
from twin_service.store.base import StoredEvent
from twin_service.tasks import stop_task
from twin_service.twin.document import Twin, now_iso
from twin_service.twin.lifecycle import expire_due, next_expiry
from twin_service.twin.operations import Edit

log = logging.getLogger(__name__)

SCAN_PAGE = 500
IDLE_WAIT = 3600.0
#: Seconds before an expiry the store could not take is tried again.
RETRY_SECONDS = 2.0


class _NothingDue(Exception):
    """The twin has no overdue entry (any more): nothing to commit."""


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
            asyncio.create_task(self._scan(), name="expiry-scan"),
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
        self._wake.set()

    async def _on_commit(self, _stored: StoredEvent, twin: Twin | None) -> None:
        if twin is not None:
            self.watch(twin)

    async def _scan(self) -> None:
        assert self._ctx is not None
        after: str | None = None
        while True:
            try:
                # Only twins whose text holds an expiry can have one due.
                twins = await self._ctx.store.scan(after, SCAN_PAGE, containing='"expires":')
            except TwinServiceError as exc:
                log.warning("expiry scan paused: %s", exc.message)
                await asyncio.sleep(5)
                continue
            if not twins:
                return
            for twin in twins:
                self.watch(twin)
            after = twins[-1].twin_id

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
            if twin is None or expire_due(twin.lifecycle, moment) is None:
                raise _NothingDue(twin)
            return Edit(values={}, written={})

        def amend(twin: Twin | None, _edit: Edit) -> dict[str, Any]:
            assert twin is not None
            return {"lifecycle": expire_due(twin.lifecycle, moment)}

        try:
            await self._ctx.service.mutate(twin_id, edit, origin="system", amend=amend)
            self.expired += 1  # the commit watched the twin again (_on_commit)
        except _NothingDue as nothing:
            # Its expiry changed since it was scheduled (a later TTL, or applied).
            twin = nothing.args[0]
            if twin is not None:
                self.watch(twin)
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
