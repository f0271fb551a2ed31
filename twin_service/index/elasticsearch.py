"""The search index on Elasticsearch: fed from the store's outbox, eventually consistent.

Every replica runs an indexer loop: it takes the twins the store lists as pending
(:meth:`TwinStore.pending_index`), bulk-indexes their current state with the store sequence
number as external version, and only then acknowledges them (:meth:`TwinStore.mark_indexed`).
A crash between a commit and its indexing leaves the twin pending, so it is indexed later;
several replicas indexing the same twin are harmless (a 409 means a newer state is there).

Searches find ids in Elasticsearch and read the twins from the store. A search may first wait
until the index covers a given write (``wait_for_seq``), bounded by
``elasticsearch.wait_timeout_seconds`` (then 503 ``index.timeout``).

The index is a concrete index behind an alias (``elasticsearch.index_name``), created at
start-up when missing; :func:`rebuild` fills a fresh one and moves the alias over.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from elasticsearch import (
    ApiError,
    AsyncElasticsearch,
    BadRequestError,
    NotFoundError,
    TransportError,
)

from search.elasticsearch import (
    MAPPING,
    MAPPING_VERSION,
    Change,
    Outcome,
    bulk_operations,
    index_settings,
    item_outcome,
    keys_from_hit,
    max_leaves,
    search_after,
    search_query,
    sort_clause,
)
from search.rql.query import SearchQuery
from twin_service.errors import Unavailable
from twin_service.settings import Settings
from twin_service.store.base import IndexTask, TwinStore
from twin_service.tasks import stop_task
from twin_service.twin.document import Twin

log = logging.getLogger(__name__)

#: ``progress(done, total)`` callback of :func:`rebuild`.
Progress = Callable[[int, int], None]


@contextlib.asynccontextmanager
async def _es_errors(action: str) -> AsyncIterator[None]:
    """Translate client exceptions into :class:`Unavailable` (the one mapping point)."""
    try:
        yield
    except (ApiError, TransportError) as exc:
        raise Unavailable(
            f"The search index failed to {action}.",
            code="index.unavailable",
            description=str(exc)[:500],
        ) from exc


def make_client(settings: Settings) -> AsyncElasticsearch:
    """A client for ``settings.elasticsearch_url``."""
    if not settings.elasticsearch_url:
        raise ValueError("search=elasticsearch needs elasticsearch_url.")
    es = settings.elasticsearch
    # Only what is set: the client's defaults (the certifi bundle) differ from None.
    tls: dict[str, Any] = {} if es.ca_file is None else {"ca_certs": es.ca_file}
    return AsyncElasticsearch(
        settings.elasticsearch_url,
        request_timeout=es.request_timeout_seconds,
        api_key=es.api_key,
        **tls,
    )


def _ndjson(operations: list[dict[str, Any]]) -> list[str]:
    """Bulk lines encoded up front: the client passes strings through, and the stdlib C
    encoder without its ``default`` hook is several times faster on these documents."""
    return [json.dumps(op, separators=(",", ":"), ensure_ascii=False) for op in operations]


def changes_of(tasks: Sequence[IndexTask]) -> list[Change]:
    """Outbox tasks as index changes."""
    return [
        Change(t.twin_id, t.seq, None if t.twin is None else t.twin.to_document()) for t in tasks
    ]


class ElasticsearchIndex:
    """:class:`twin_service.index.base.SearchIndex` on Elasticsearch (see the module doc)."""

    def __init__(
        self,
        settings: Settings,
        store: TwinStore,
        *,
        client: AsyncElasticsearch | None = None,
        run_indexer: bool = True,
    ) -> None:
        self._settings = settings
        self._es = settings.elasticsearch
        self._store = store
        self._client = client
        self._own_client = client is None
        self._run_indexer = run_indexer
        self._task: asyncio.Task[None] | None = None
        #: Whether the index and its alias are known to exist (see start).
        self._ensured = False
        self._refresh_lock = asyncio.Lock()
        self._last_refresh_start = 0.0
        self.rejected = 0
        """Changes Elasticsearch refused for good (logged); they are not retried."""

    @property
    def alias(self) -> str:
        return self._es.index_name

    @property
    def settings(self) -> Settings:
        return self._settings

    @property
    def client(self) -> AsyncElasticsearch:
        if self._client is None:
            raise RuntimeError("ElasticsearchIndex not started")
        return self._client

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the client and make sure of the index. With the indexer, an engine out of
        reach does not stop the start: the service then serves twins, searches answer 503
        and the indexer makes sure of the index once the engine answers (a service that
        refused to start took every restarted replica down with the search engine)."""
        if self._client is None:
            self._client = make_client(self._settings)
        try:
            await self.ensure_index()
            self._ensured = True
        except Unavailable as exc:
            if not self._run_indexer:
                raise
            log.warning("search engine out of reach at start, indexing waits for it: %s", exc)
        if self._run_indexer:
            self._task = asyncio.create_task(self.run(), name="es-indexer")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)
        if self._client is not None and self._own_client:
            await self._client.close()
            self._client = None

    async def ensure_index(self) -> None:
        """Create the concrete index and its alias unless the alias exists (idempotent)."""
        async with _es_errors("create its index"):
            if await self.client.indices.exists_alias(name=self.alias):
                return
            try:
                await self.create_index(f"{self.alias}-v{MAPPING_VERSION}", alias=True)
            except BadRequestError as exc:
                # Another replica created it first: fine once the alias is there.
                if exc.error != "resource_already_exists_exception":
                    raise
                if not await self.client.indices.exists_alias(name=self.alias):
                    raise

    async def create_index(self, name: str, *, alias: bool, refresh: str | None = None) -> None:
        """Create a concrete twin index (with the alias when ``alias``)."""
        settings = index_settings(
            max_leaves(self._settings.limits.max_twin_bytes),
            shards=self._es.shards,
            replicas=self._es.replicas,
            refresh_interval=refresh or self._es.refresh_interval,
        )
        await self.client.indices.create(
            index=name,
            mappings=MAPPING,
            settings=settings,
            aliases={self.alias: {}} if alias else None,
        )

    # -- indexing --------------------------------------------------------------------------

    async def write(self, changes: Sequence[Change], index: str | None = None) -> list[Outcome]:
        """Bulk-write ``changes`` (to the alias by default); one outcome per change."""
        if not changes:
            return []
        async with _es_errors("index twins"):
            # Through the alias only: a missing alias must not auto-create an unmapped index.
            response = await self.client.bulk(
                operations=_ndjson(bulk_operations(index or self.alias, changes)),  # type: ignore[arg-type]
                require_alias=index is None,
            )
        outcomes = [item_outcome(item) for item in response["items"]]
        for change, item, outcome in zip(changes, response["items"], outcomes, strict=True):
            if outcome is Outcome.REJECTED:
                self.rejected += 1
                log.error("search index refused twin %s: %s", change.twin_id, item)
        return outcomes

    async def index_pending(self) -> int:
        """Index one batch of the outbox; the number of tasks taken (0: nothing pending).

        Raises :class:`Unavailable` when some of them must be retried.
        """
        tasks = await self._store.pending_index(self._es.batch_size)
        if not tasks:
            return 0
        outcomes = await self.write(changes_of(tasks))
        done = [t for t, o in zip(tasks, outcomes, strict=True) if o is not Outcome.RETRY]
        if done:
            await self._store.mark_indexed(done)
        if len(done) < len(tasks):
            raise Unavailable(
                f"{len(tasks) - len(done)} twins must be indexed again", code="index.unavailable"
            )
        return len(tasks)

    async def run(self) -> None:
        """The indexer loop (``start`` runs it as a task): index, back off on failures."""
        delay = self._es.retry_initial_seconds
        while True:
            try:
                if not self._ensured:
                    # Never index before: a bulk write to a missing alias is refused for good.
                    await self.ensure_index()
                    self._ensured = True
                    log.info("search engine reached: indexing")
                taken = await self.index_pending()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("indexer: %s; retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._es.retry_max_seconds)
                continue
            delay = self._es.retry_initial_seconds
            if taken < self._es.batch_size:
                await asyncio.sleep(self._es.poll_interval_seconds)

    # -- consistency -----------------------------------------------------------------------

    async def covers(self, seq: int) -> bool:
        """Whether every write up to ``seq`` is acknowledged by the index (not yet refreshed)."""
        _, lowest = await self._store.index_backlog()
        return lowest is None or lowest > seq

    async def wait_for_seq(self, seq: int) -> None:
        """Return once searches see every write up to ``seq``; 503 ``index.timeout`` if late."""
        deadline = time.monotonic() + self._es.wait_timeout_seconds
        while not await self.covers(seq):
            if time.monotonic() >= deadline:
                raise Unavailable(
                    f"The search index did not reach write {seq} within "
                    f"{self._es.wait_timeout_seconds:g}s.",
                    code="index.timeout",
                )
            await asyncio.sleep(self._es.poll_interval_seconds)
        await self._refresh_since(time.monotonic())

    async def _refresh_since(self, moment: float) -> None:
        """Make searchable what was indexed before ``moment``; concurrent waiters share one."""
        async with self._refresh_lock:
            if self._last_refresh_start > moment:
                return
            self._last_refresh_start = time.monotonic()
            async with _es_errors("refresh"):
                await self.client.indices.refresh(index=self.alias)

    async def lag(self) -> tuple[int, float]:
        """(pending twins, age in seconds of the oldest write the index has not taken)."""
        backlog, lowest = await self._store.index_backlog()
        if lowest is None:
            return backlog, 0.0
        events = await self._store.events_after(lowest - 1, 1)
        if not events or events[0].seq != lowest:
            return backlog, 0.0
        written = datetime.fromisoformat(events[0].event.timestamp.replace("Z", "+00:00"))
        return backlog, max(0.0, (datetime.now(UTC) - written).total_seconds())

    # -- queries ---------------------------------------------------------------------------

    async def search_ids(self, query: SearchQuery) -> tuple[list[str], str | None]:
        """The twin ids of one page in order, and the cursor of the next page."""
        extra: dict[str, Any] = {}
        if query.after is not None:
            extra["search_after"] = search_after(query.sort, query.after)
        async with _es_errors("search"):
            response = await self.client.search(
                index=self.alias,
                query=search_query(query.filter, query.namespaces),
                sort=sort_clause(query.sort),
                size=query.size + 1,
                source=False,
                track_total_hits=False,
                **extra,
            )
        hits = response["hits"]["hits"]
        chosen = hits[: query.size]
        ids = [hit["_id"] for hit in chosen]
        if len(hits) <= query.size:
            return ids, None
        return ids, query.next_cursor(keys_from_hit(query.sort, chosen[-1]["sort"]))

    async def search(
        self, query: SearchQuery, *, wait_for_seq: int | None = None
    ) -> tuple[list[Twin], str | None]:
        if wait_for_seq is not None:
            await self.wait_for_seq(wait_for_seq)
        ids, cursor = await self.search_ids(query)
        # Twins deleted since they were indexed drop out of the page.
        return await self._store.get_many(ids), cursor

    async def count(self, query: SearchQuery, *, wait_for_seq: int | None = None) -> int:
        if wait_for_seq is not None:
            await self.wait_for_seq(wait_for_seq)
        async with _es_errors("count"):
            response = await self.client.count(
                index=self.alias, query=search_query(query.filter, query.namespaces)
            )
        return int(response["count"])

    async def health(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": "up", "kind": "elasticsearch", "index": self.alias}
        try:
            backlog, lag = await self.lag()
            out.update(backlog=backlog, lagSeconds=round(lag, 3), rejected=self.rejected)
            async with _es_errors("answer"):
                cluster = await self.client.cluster.health(index=self.alias, timeout="2s")
            out["cluster"] = cluster["status"]
            if cluster["status"] == "red":
                out["status"] = "down"
        except Unavailable as exc:
            out.update(status="down", error=exc.message)
            if exc.description:  # the client's reason: refused, certificate, timeout...
                out["reason"] = exc.description
        return out


async def rebuild(
    settings: Settings, store: TwinStore, progress: Progress | None = None, page_size: int = 500
) -> int:
    """Reindex every twin of ``store`` into a fresh index and move the alias to it.

    Twins are read from the store in id order (``scan``), in pages, and
    written with the store's last sequence number at the start as version; writes committed
    meanwhile are caught up from the journal after the alias moved, so the running indexers
    of the service lose nothing. Returns the number of twins indexed.
    """
    _check_page_size(page_size)
    index = ElasticsearchIndex(settings, store, run_indexer=False)
    try:
        await index.start()  # inside: a start that fails has a client to close
        return await _rebuild(index, store, progress, page_size)
    finally:
        await index.stop()


async def _rebuild(
    index: ElasticsearchIndex, store: TwinStore, progress: Progress | None, page_size: int
) -> int:
    _check_page_size(page_size)
    client, alias = index.client, index.alias
    start_seq = await store.last_seq()
    total = await store.twin_count()
    target = f"{alias}-v{MAPPING_VERSION}-{int(time.time() * 1000)}"
    async with _es_errors("rebuild"):
        await index.create_index(target, alias=False, refresh="-1")
    done = 0
    after: str | None = None
    while True:
        twins = await store.scan(after, page_size)
        if not twins:
            break
        after = twins[-1].twin_id
        changes = [Change(t.twin_id, start_seq, t.to_document()) for t in twins]
        outcomes = await index.write(changes, index=target)
        if any(o is Outcome.RETRY for o in outcomes):
            raise Unavailable("Elasticsearch is overloaded; run the rebuild again.")
        done += len(twins)
        if progress is not None:
            progress(done, max(total, done))
    async with _es_errors("rebuild"):
        await client.indices.put_settings(
            index=target,
            settings={"refresh_interval": index.settings.elasticsearch.refresh_interval},
        )
        try:
            old = list((await client.indices.get_alias(name=alias)).keys())
        except NotFoundError:
            old = []
        actions: list[dict[str, Any]] = [
            {"remove": {"index": name, "alias": alias}} for name in old
        ]
        actions.append({"add": {"index": target, "alias": alias}})
        await client.indices.update_aliases(actions=actions)
    await _catch_up(index, store, start_seq)
    async with _es_errors("rebuild"):
        for name in old:
            await client.indices.delete(index=name)
        await client.indices.refresh(index=alias)
    return done


def _check_page_size(page_size: int) -> None:
    # Pages of no twins read nothing: the alias would move to an empty index and the full
    # one be deleted.
    if page_size < 1:
        raise ValueError(f"the rebuild's page size must be at least 1, not {page_size}")


async def _catch_up(index: ElasticsearchIndex, store: TwinStore, after: int) -> None:
    """Index (again) every twin written after ``after``, with its latest journaled seq."""
    latest: dict[str, int] = {}
    while True:
        events = await store.events_after(after, 1000)
        if not events:
            break
        for stored in events:
            latest[stored.event.twin_id] = stored.seq
        after = events[-1].seq
    ids = list(latest)
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        found = {t.twin_id: t for t in await store.get_many(chunk)}
        changes = [
            Change(i, latest[i], found[i].to_document() if i in found else None) for i in chunk
        ]
        await index.write(changes)
