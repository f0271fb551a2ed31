"""Publishing the retained ``.../delta`` of each twin, in order, never stale.

Ordering rules (per twin):

- one worker task per twin publishes; a change that arrives while it is busy replaces the
  pending one, so a burst of changes ends in one message carrying the newest delta;
- a twin's delta is published only for a revision above the last one published for it, and only
  when the payload differs from the last one, so a reported update that leaves the delta as it
  was costs nothing;
- after each publish the worker re-reads the twin: if another replica committed a newer change
  meanwhile whose delta differs, it publishes that too, so the retained message ends at the
  newest state even when two replicas race;
- an empty delta (or a deleted twin) publishes an empty retained payload, which clears it;
- a publish that fails (broker down) is remembered and retried after the next connection;
- a delta over the broker's packet size limit (an MQTT 5 broker announcing less than the
  twin's size) is not sent: the retained delta is cleared instead, since the one it holds is
  older and a device would apply values desired no longer has; the device's ``get`` is
  answered with a 413 (``twin.toolarge``) as well, so it learns why;
- a write the store may have committed without confirming it (:class:`Unconfirmed`, a 503
  "may or may not have been committed") gets no change event here; its commit may land
  after any read, so the twin is read again at spaced times (:meth:`DeltaPublisher.on_doubt`)
  and its delta published when it changed;
- after each connection every non-empty delta is published again (the broker may have lost
  them), and every retained delta the broker holds that is not the twin's current one is
  corrected (:meth:`DeltaPublisher.correct`): a commit whose publish never went out (the
  process killed, or stopped while a writer it had cancelled still committed) would otherwise
  leave a delta the twin no longer has, and a reconnecting device would apply it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass

from connectivity.errors import MqttUnavailable, PacketTooLarge
from connectivity.sync_messages import delta_message
from connectivity.topics import TopicLayout, fits_topics
from search.rql.parser import parse_filter
from search.rql.query import SearchQuery
from twin_service.errors import Unavailable, Unconfirmed
from twin_service.store.base import StoredEvent, TwinStore
from twin_service.tasks import stop_task
from twin_service.twin.document import Twin
from twin_service.twin.jsonvalue import dumps

log = logging.getLogger(__name__)

#: ``publish(topic, payload)``: QoS 1, retained; returns after the broker's PUBACK.
Publish = Callable[[str, bytes], Awaitable[None]]

#: A twin with a write in doubt is read again after the store's bound on the write (at least
#: the first figure), then after twice as long since the failure, and so on, the last time
#: the second figure after it: a stalled commit (FerretDB goes on with an update its client
#: gave up on) may land seconds later.
DOUBT_FIRST_SECONDS = 1.0
DOUBT_HORIZON_SECONDS = 300.0
#: Twins watched at once for a write in doubt; beyond, the next connection's correct() is left
#: to put a delta right (a store that confirms nothing: every write is in doubt).
DOUBTS_WATCHED = 1000


@dataclass(frozen=True)
class _Job:
    revision: int
    twin: Twin | None
    force: bool = False


class DeltaPublisher:
    """A :data:`twin_service.service.Listener` that keeps each twin's retained delta current."""

    def __init__(
        self, publish: Publish, layout: TopicLayout, store: TwinStore, memory: int = 100_000
    ) -> None:
        self._publish = publish
        self._layout = layout
        self._store = store
        self._memory = memory
        #: twin id -> (revision, payload) last published, least recently used first.
        self._published: OrderedDict[str, tuple[int, bytes]] = OrderedDict()
        self._pending: dict[str, _Job] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._failed: set[str] = set()
        self._doubts: dict[str, asyncio.Task[None]] = {}
        self._stopped = False
        self._told_no_topics: set[str] = set()
        self.published = 0
        self.failures = 0
        #: Whether the deltas of ids the store does not know are still to be cleared: only
        #: after a restore (:attr:`TwinStore.restored`), until one correction went through.
        self._orphans_unchecked = store.restored

    async def on_change(self, stored: StoredEvent, twin: Twin | None) -> None:
        event = stored.event
        if event.action == "modified" and not {"desired", "reported"} & set(event.changes):
            return
        if event.action != "modified":
            # Revisions start again at 1 when a deleted twin is created anew.
            self._published.pop(event.twin_id, None)
        self.submit(event.twin_id, _Job(event.revision, twin))

    def on_doubt(self, twin_id: str, error: Unconfirmed) -> None:
        """A :data:`twin_service.service.DoubtListener`: watch the twin until the write's
        fate is known (see DOUBT_FIRST_SECONDS). A read right away is not enough: the commit
        can land after a read that already answered."""
        if self._stopped or not fits_topics(twin_id):
            return  # stopped: a watch started now would outlive the service
        watching = self._doubts.pop(twin_id, None)
        if watching is not None:
            watching.cancel()  # the newer doubt watches at least as long
        elif len(self._doubts) >= DOUBTS_WATCHED:
            log.warning(
                "delta of %s not watched after a write in doubt (%d twins are): put right "
                "after the next connection",
                twin_id,
                len(self._doubts),
            )
            return
        first = max(error.settles_after, DOUBT_FIRST_SECONDS)
        self._doubts[twin_id] = asyncio.create_task(self._watch_doubt(twin_id, first))

    async def _watch_doubt(self, twin_id: str, first: float) -> None:
        try:
            elapsed, wait = 0.0, first
            while elapsed < DOUBT_HORIZON_SECONDS:
                wait = min(wait, DOUBT_HORIZON_SECONDS - elapsed)
                await asyncio.sleep(wait)
                elapsed += wait
                wait = elapsed
                try:
                    twin = await self._store.get(twin_id)
                    gone = await self._store.tombstone(twin_id) if twin is None else None
                except Unavailable as exc:
                    log.warning(
                        "delta of %s: could not read it after a write in doubt: %s", twin_id, exc
                    )
                    continue
                # Not forced: published only when above the revision and unlike the payload
                # published last (see _publish_job).
                if twin is not None:
                    self.submit(twin_id, _Job(twin.revision, twin))
                elif gone is not None:  # a deletion in doubt
                    self.submit(twin_id, _Job(gone.revision, None))
        finally:
            if self._doubts.get(twin_id) is asyncio.current_task():
                del self._doubts[twin_id]

    def submit(self, twin_id: str, job: _Job) -> None:
        if not fits_topics(twin_id):
            self._no_topics(twin_id)
            return
        current = self._pending.get(twin_id)
        if current is None or job.revision >= current.revision:
            self._pending[twin_id] = _Job(
                job.revision, job.twin, job.force or bool(current and current.force)
            )
        if twin_id not in self._workers:
            self._workers[twin_id] = asyncio.create_task(self._drain(twin_id))

    async def republish(self, page_size: int = 200) -> int:
        """Publish every non-empty delta again, plus any that failed to go out.

        Called after each connection: the broker may have lost its retained messages (the
        embedded broker keeps none across restarts), and a crash between a commit and its
        publish would otherwise leave the device with an old delta. Retained publishes are
        idempotent and devices ignore versions they have, so repeating one is harmless.
        """
        count = 0
        for twin_id in list(self._failed):
            twin = await self._store.get(twin_id)
            self.submit(twin_id, _Job(twin.revision if twin else 0, twin, force=True))
            count += 1
        async for twin in self._twins_with_delta(page_size):
            if twin.twin_id not in self._failed:
                self.submit(twin.twin_id, _Job(twin.revision, twin, force=True))
                count += 1
        return count

    async def correct(self, retained: Mapping[str, bytes], page_size: int = 200) -> int:
        """Publish the current delta of every twin whose retained one (``retained``: twin id
        -> the payload the broker holds) is not it: cleared when the twin has none any more
        or was deleted. Returns how many were queued.

        An id the store has never known (no twin, no tombstone) is left alone: its delta is
        not this deployment's (another one on the same broker, a test's). Except on the first
        start after a restore: the twins created after the backup are such ids, and their
        devices would apply the deltas the lost database left; so the first correction of a
        restored store clears every delta under this deployment's topics that no twin has.
        """
        count = 0
        orphans: list[str] = []
        ids = sorted(retained)
        for start in range(0, len(ids), page_size):
            page = ids[start : start + page_size]
            twins = {twin.twin_id: twin for twin in await self._store.get_many(page)}
            for twin_id in page:
                twin = twins.get(twin_id)
                if retained[twin_id] == delta_payload(twin):
                    continue
                if twin is None and await self._store.tombstone(twin_id) is None:
                    if not self._orphans_unchecked:
                        continue
                    orphans.append(twin_id)
                self.submit(twin_id, _Job(twin.revision if twin else 0, twin, force=True))
                count += 1
        if self._orphans_unchecked:
            self._orphans_unchecked = False
        if orphans:
            log.warning(
                "clearing the retained deltas of %d twins the restored database does not have: %s",
                len(orphans),
                ", ".join(orphans[:20]) + (" ..." if len(orphans) > 20 else ""),
            )
        return count

    async def _twins_with_delta(self, page_size: int) -> AsyncIterator[Twin]:
        """Every twin with a non-empty delta, page by page: through the store's index, or
        without one (``search`` off or external, on SQLite) by reading every twin (an
        external index may lag behind the store, so it cannot say which twins have one)."""
        if self._store.searchable:
            query = SearchQuery(filter=parse_filter("exists(delta)"), size=page_size)
            while True:
                twins, cursor = await self._store.search(query)
                for twin in twins:
                    yield twin
                if cursor is None:
                    return
                query = SearchQuery(filter=query.filter, size=page_size, cursor=cursor)
        after: str | None = None
        while True:
            page = await self._store.scan(after, page_size)
            for twin in page:
                if twin.delta:
                    yield twin
            if len(page) < page_size:
                return
            after = page[-1].twin_id

    async def idle(self) -> None:
        """Wait until nothing is queued (tests, shutdown)."""
        while self._workers:
            await asyncio.gather(*list(self._workers.values()), return_exceptions=True)

    async def stop(self) -> None:
        # The watches first: they queue work for the workers.
        self._stopped = True
        await asyncio.gather(*(stop_task(task) for task in list(self._doubts.values())))
        await asyncio.gather(*(stop_task(task) for task in list(self._workers.values())))

    async def _drain(self, twin_id: str) -> None:
        try:
            while twin_id in self._pending:
                job = self._pending.pop(twin_id)
                if await self._publish_job(twin_id, job):
                    try:
                        newer = await self._store.get(twin_id)
                    except Unavailable as exc:
                        # Only a newer commit of another replica is missed (it publishes its
                        # own delta too); leaving here would strand a job queued meanwhile.
                        log.warning("delta of %s: could not look for a newer one: %s", twin_id, exc)
                        continue
                    if newer is not None and newer.revision > job.revision:
                        self.submit(twin_id, _Job(newer.revision, newer))
        finally:
            del self._workers[twin_id]

    async def _publish_job(self, twin_id: str, job: _Job) -> bool:
        last = self._published.get(twin_id)
        payload = delta_payload(job.twin)
        if last is not None:
            if job.revision < last[0] or (job.revision == last[0] and not job.force):
                return False
            if payload == last[1] and not job.force:
                self._remember(twin_id, job.revision, payload)
                return False
        topic = self._layout.topic(twin_id, "delta")
        try:
            try:
                await self._publish(topic, payload)
            except PacketTooLarge as exc:  # nothing sent
                log.warning("delta of %s cleared on the broker: %s", twin_id, exc.message)
                await self._publish(topic, b"")
            if job.twin is None:
                # Deleted: its device's retained status goes too. The broker kept it for
                # good (the embedded one in the service's memory: a fleet replacing its
                # devices grew without end).
                await self._publish(self._layout.topic(twin_id, "status"), b"")
        except MqttUnavailable as exc:
            self.failures += 1
            self._failed.add(twin_id)
            log.warning("delta of %s not published (retried on reconnect): %s", twin_id, exc)
            return False
        self._failed.discard(twin_id)
        self.published += 1
        self._remember(twin_id, job.revision, payload)
        return True

    def _no_topics(self, twin_id: str) -> None:
        """Say once per twin (not on every change of it) that its delta cannot go out."""
        if twin_id in self._told_no_topics:
            return
        if len(self._told_no_topics) < self._memory:
            self._told_no_topics.add(twin_id)
        log.warning(
            "twin %s gets no delta over MQTT: its id contains '+', which MQTT forbids in a "
            "topic name (rename the twin to reach a device)",
            twin_id,
        )

    def _remember(self, twin_id: str, revision: int, payload: bytes) -> None:
        self._published[twin_id] = (revision, payload)
        self._published.move_to_end(twin_id)
        while len(self._published) > self._memory:
            self._published.popitem(last=False)


def delta_payload(twin: Twin | None) -> bytes:
    """The retained payload of a twin's delta topic: empty (cleared) without a delta."""
    return dumps(delta_message(twin)).encode() if twin and twin.delta else b""
