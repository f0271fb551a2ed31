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
start-up when missing, and again whenever a write finds it gone (deleted by hand): the indexer
that creates it fills it with every twin of the store before it takes the outbox again
(meanwhile no write counts as covered there, and its health says it fills).
:func:`rebuild` fills a fresh one and moves the alias over.

A twin whose document the engine cannot take (too large, refused) is deleted from the index
instead and logged with the reason, and never blocks the others: searches may miss it, but
never find it by values it no longer has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

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
    Operation,
    Outcome,
    batches,
    delete_operation,
    encode,
    index_settings,
    item_outcome,
    item_reason,
    keys_from_hit,
    max_leaves,
    search_after,
    search_query,
    sort_clause,
)
from search.rql.query import SearchQuery
from twin_service.errors import Conflict, RqlInvalid, TwinServiceError, Unavailable
from twin_service.settings import Settings
from twin_service.store.base import IndexTask, TwinStore
from twin_service.tasks import stop_task
from twin_service.twin.document import Twin

log = logging.getLogger(__name__)

#: Seconds a wait for the index that caught up is given to refresh, past its deadline if
#: need be (a refresh of an engine that answers takes milliseconds).
REFRESH_GRACE = 1.0

#: ``progress(done, total)`` callback of :func:`rebuild`.
Progress = Callable[[int, int], None]
# Called by a rebuild once the alias is on its new index: that index, the fill's result.
Switched = Callable[[str, "FillResult"], None]
_T = TypeVar("_T")


def _reason(exc: BadRequestError) -> str:
    """The first root cause of an Elasticsearch error, else the whole error (shortened)."""
    body = exc.body if isinstance(exc.body, dict) else {}
    causes = body.get("error", {}).get("root_cause") or [{}]
    reason = causes[0].get("reason") if isinstance(causes[0], dict) else None
    return str(reason or exc)[:500]


@contextlib.asynccontextmanager
async def _es_errors(action: str, *, query: bool = False) -> AsyncIterator[None]:
    """Translate client exceptions into :class:`Unavailable` (the one mapping point); with
    ``query``, a 400 is the query's fault (translate.py keeps the ones it can foresee out,
    such as terms over Lucene's length limit; an automaton too large to build is left):
    :class:`RqlInvalid`, not a failure of the index."""
    try:
        yield
    except BadRequestError as exc:
        if not query:
            raise Unavailable(
                f"The search index failed to {action}.",
                code="index.unavailable",
                description=str(exc)[:500],
            ) from exc
        raise RqlInvalid(
            f"The search index cannot run this query, too complex or too large for it: "
            f"{_reason(exc)}"
        ) from exc
    except (ApiError, TransportError) as exc:
        reason = str(exc)
        if isinstance(exc, ApiError) and exc.status_code == 413:
            reason = f"{reason}: the request is larger than the engine's http.max_content_length"
        raise Unavailable(
            f"The search index failed to {action}.",
            code="index.unavailable",
            description=reason[:500],
        ) from exc


def _status(exc: Unavailable) -> int | None:
    """The engine's HTTP status behind ``exc``, if it answered."""
    return exc.__cause__.status_code if isinstance(exc.__cause__, ApiError) else None


def _too_large(exc: Unavailable) -> bool:
    """Whether the engine refused a request for its size (HTTP 413)."""
    return _status(exc) == 413


def describe(exc: BaseException) -> str:
    """An exception for a log line: what failed and why."""
    if isinstance(exc, TwinServiceError):
        return exc.message + (f" ({exc.description})" if exc.description else "")
    return f"{type(exc).__name__}: {exc}"


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
        #: Whether this indexer created the index and must fill it from the store.
        self._fill = False
        #: The start's check of the index, when it outlasted start_timeout_seconds.
        self._late_check: asyncio.Task[bool] | None = None
        #: The fill under way (from its first attempt until it succeeds), for /ready.
        self._filling: Filling | None = None
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
        check = asyncio.create_task(self.ensure_index(), name="es-start-check")
        # With the indexer, at most start_timeout_seconds: an engine that does not answer
        # (a long pause of its JVM) held the start for the whole request timeout.
        bound = self._es.start_timeout_seconds if self._run_indexer else None
        try:
            self._fill = await asyncio.wait_for(asyncio.shield(check), bound) and self._run_indexer
            self._ensured = True
        except TimeoutError:
            # Not cancelled: an index it creates once the engine answers must be filled.
            self._late_check = check
            check.add_done_callback(self._checked_late)
            log.warning(
                "search engine did not answer within %gs at start, indexing waits for it",
                bound,
            )
        except asyncio.CancelledError:
            # Stopped while starting (Ctrl-C on a rebuild): the shielded check went on
            # alone, and ended in "Task exception was never retrieved" once closed under it.
            check.cancel()
            raise
        except Unavailable as exc:
            if not self._run_indexer:
                raise
            log.warning("search engine out of reach at start, indexing waits for it: %s", exc)
        if self._run_indexer:
            self._task = asyncio.create_task(self.run(), name="es-indexer")

    def _checked_late(self, check: asyncio.Task[bool]) -> None:
        """The start's check of the index, answered after the start: the indexer fills an
        index it created (its own check found the index there already)."""
        if not check.cancelled() and check.exception() is None and check.result():
            self._fill = True

    async def stop(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)
        check, self._late_check = self._late_check, None
        await stop_task(check)
        if self._client is not None and self._own_client:
            await self._client.close()
            self._client = None

    async def ensure_index(self) -> bool:
        """Create the concrete index and its alias unless the alias exists (idempotent);
        whether this call created an index (then empty)."""
        name = f"{self.alias}-v{MAPPING_VERSION}"
        async with _es_errors("create its index"):
            if await self.client.indices.exists_alias(name=self.alias):
                await self._upgrade_mapping()
                return False
            await self._remove_stray()
            try:
                await self.create_index(name, alias=True)
            except BadRequestError as exc:
                # Another replica created it first: fine once the alias is there.
                if exc.error != "resource_already_exists_exception":
                    raise
                if not await self.client.indices.exists_alias(name=self.alias):
                    # Only the alias was removed: the index still holds every twin.
                    await self.client.indices.put_alias(index=name, name=self.alias)
                    log.warning("the alias %s of the search index was missing: put back", name)
                return False
        log.info("created the search index %s (alias %s)", name, self.alias)
        return True

    async def _remove_stray(self) -> None:
        """Delete the index the engine auto-created under the alias's name when a delete
        found the index gone (see :func:`item_outcome`): it holds no document and lacks the
        twin mapping. Any other index of that name is someone's data: refused, never deleted.
        """
        try:
            found = await self.client.indices.get_mapping(index=self.alias)
        except NotFoundError:
            return
        for name, body in found.items():
            held = int((await self.client.count(index=name))["count"])
            if held or "leaves" in body["mappings"].get("properties", {}):
                raise Unavailable(
                    f"The index {name} is there where the alias of the search index must be.",
                    code="index.unavailable",
                    description=f"It holds {held} documents or the twin mapping: the service "
                    f"does not delete it. Move it away (or DELETE /{name} on the engine); the "
                    "indexer then creates the search index and fills it from the store.",
                )
            with contextlib.suppress(NotFoundError):  # another replica was first
                await self.client.indices.delete(index=name)
            log.warning(
                "deleted the index %s: empty and unmapped, the engine auto-created it under "
                "the alias's name when the search index was lost",
                name,
            )

    async def _upgrade_mapping(self) -> None:
        """Add the fields of a newer mapping to an index made with an older one, so that the
        documents this service writes are taken (the mapping is strict), and ask for a
        rebuild: the documents already there lack what the new version added."""
        found = await self.client.indices.get_mapping(index=self.alias)
        for name, body in found.items():
            version = body["mappings"].get("_meta", {}).get("version", 1)
            if version >= MAPPING_VERSION:
                continue
            # Not _meta: the index keeps its version until a rebuild replaces it.
            await self.client.indices.put_mapping(index=name, properties=MAPPING["properties"])
            log.warning(
                "search index %s has mapping version %s, this service writes version %s: "
                "run `twin-service index rebuild` (until then some searches miss twins "
                "indexed before, see docs/scaling.md)",
                name,
                version,
                MAPPING_VERSION,
            )

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
            aliases={self.alias: {"is_write_index": True}} if alias else None,
        )

    # -- indexing --------------------------------------------------------------------------

    async def write(self, changes: Sequence[Change], index: str | None = None) -> list[Outcome]:
        """Bulk-write ``changes`` (to the alias by default); one outcome per change.

        Requests hold at most ``elasticsearch.bulk_max_bytes``; a twin refused (its
        document too large, or refused by the engine) is deleted from the index instead,
        logged, and ``REJECTED`` once that delete went through.
        """
        outcomes, _ = await self._write(changes, index)
        return outcomes

    async def _write(
        self, changes: Sequence[Change], index: str | None
    ) -> tuple[list[Outcome], list[str]]:
        """:meth:`write`, with the engine's reasons for the outcomes to retry."""
        target, limit = index or self.alias, self._es.bulk_max_bytes
        outcomes: list[Outcome] = []
        reasons: list[str] = []
        # Encoded as the requests go: memory holds one request, not the whole batch.
        for batch in batches((encode(target, c, limit) for c in changes), limit):
            got, why = await self._send(batch, target, require_alias=index is None)
            outcomes += got
            reasons += why
        return outcomes, reasons

    async def _send(
        self, batch: list[Operation], target: str, *, require_alias: bool
    ) -> tuple[list[Outcome], list[str]]:
        try:
            async with _es_errors("index twins"):
                # Through the alias only: a missing alias must not auto-create an unmapped
                # index.
                response = await self.client.bulk(
                    operations=[line for op in batch for line in op.lines],  # type: ignore[misc]
                    require_alias=require_alias,
                )
        except Unavailable as exc:
            # The engine takes less than bulk_max_bytes: halve the request down to the
            # twin that is too large by itself, which is refused alone.
            if not _too_large(exc) or (len(batch) == 1 and batch[0].refusal is not None):
                raise
            if len(batch) == 1:
                refusal = f"the engine refused its document as too large ({exc.description})"
                batch = [delete_operation(target, batch[0].change, refusal)]
                return await self._send(batch, target, require_alias=require_alias)
            half = len(batch) // 2
            first = await self._send(batch[:half], target, require_alias=require_alias)
            second = await self._send(batch[half:], target, require_alias=require_alias)
            return first[0] + second[0], first[1] + second[1]
        items: list[dict[str, Any]] = response["items"]
        alias = target if require_alias else None
        outcomes = [item_outcome(item, alias) for item in items]
        retry = (Outcome.RETRY, Outcome.NO_INDEX)
        reasons = [item_reason(i) for i, o in zip(items, outcomes, strict=True) if o in retry]
        # Documents the engine refused: delete what the index holds of those twins.
        refused = [
            i
            for i, (op, outcome) in enumerate(zip(batch, outcomes, strict=True))
            if outcome is Outcome.REJECTED and op.refusal is None and op.change.doc is not None
        ]
        if refused:
            deletes = [
                delete_operation(target, batch[i].change, item_reason(items[i])) for i in refused
            ]
            again, why = await self._send(deletes, target, require_alias=require_alias)
            for i, outcome in zip(refused, again, strict=True):
                outcomes[i] = outcome
            reasons += why
        for i, op in enumerate(batch):
            if outcomes[i] is Outcome.DONE and op.refusal is not None:
                outcomes[i] = Outcome.REJECTED
                self.rejected += 1
                log.error(
                    "search index refused twin %s (write %d): %s; its old document is "
                    "removed, so searches miss it until a write the index takes",
                    op.change.twin_id,
                    op.change.seq,
                    op.refusal,
                )
            elif outcomes[i] is Outcome.REJECTED and op.refusal is not None:
                # The delete replacing a refused document failed: the old document would
                # stay searchable by values the twin no longer has. Kept pending.
                outcomes[i] = Outcome.RETRY
                reasons.append(
                    f"twin {op.change.twin_id}: the delete of its refused document failed: "
                    f"{item_reason(items[i])}"
                )
            elif outcomes[i] is Outcome.REJECTED and op.change.doc is None:
                self.rejected += 1
                log.error(
                    "search index refused to delete twin %s: %s",
                    op.change.twin_id,
                    item_reason(items[i]),
                )
        return outcomes, reasons

    def _check(self, outcomes: Sequence[Outcome], reasons: Sequence[str], what: str) -> None:
        """Raise :class:`Unavailable` naming the reason when some changes must be retried;
        a missing index makes the indexer create it again first."""
        again = sum(o in (Outcome.RETRY, Outcome.NO_INDEX) for o in outcomes)
        if not again:
            return
        if Outcome.NO_INDEX in outcomes:
            self._ensured = False
        raise Unavailable(
            f"{again} {what} must be indexed again",
            code="index.unavailable",
            description="; ".join(dict.fromkeys(reasons))[:500] or None,
        )

    async def index_pending(self) -> int:
        """Index one batch of the outbox; the number of tasks taken (0: nothing pending).

        Raises :class:`Unavailable` when some of them must be retried.
        """
        tasks = await self._store.pending_index(self._es.batch_size)
        if not tasks:
            return 0
        outcomes, reasons = await self._write(changes_of(tasks), None)
        retry = (Outcome.RETRY, Outcome.NO_INDEX)
        done = [t for t, o in zip(tasks, outcomes, strict=True) if o not in retry]
        if done:
            await self._store.mark_indexed(done)
        self._check(outcomes, reasons, "twins")
        return len(tasks)

    async def fill(
        self,
        store: TwinStore,
        index: str | None = None,
        progress: Progress | None = None,
        page_size: int | None = None,
    ) -> FillResult:
        """Write every twin of ``store`` (to the alias by default), versioned with the
        store's last sequence number at the start: a write committed meanwhile has a
        higher one, so whichever of the two arrives last, the index ends with the newer.

        Raises :class:`Unavailable` when some twins must be retried.
        """
        version = await store.last_seq()
        total = await store.twin_count()
        result = FillResult()
        after: str | None = None
        while twins := await store.scan(after, page_size or self._es.batch_size):
            after = twins[-1].twin_id
            changes = [Change(t.twin_id, version, t.to_document()) for t in twins]
            outcomes, reasons = await self._write(changes, index)
            self._check(outcomes, reasons, "twins of the fill")
            result.indexed += outcomes.count(Outcome.DONE)
            result.refused += outcomes.count(Outcome.REJECTED)
            if progress is not None:
                done = result.indexed + result.refused
                progress(done, max(total, done))
        return result

    async def run(self) -> None:
        """The indexer loop (``start`` runs it as a task): index, back off on failures."""
        delay = self._es.retry_initial_seconds
        while True:
            try:
                if not self._ensured:
                    # Never index before: a bulk write to a missing alias is refused for good.
                    if await self.ensure_index():
                        self._fill = True
                        log.warning(
                            "created the search index %s again (it was missing): indexing "
                            "every twin of the store into it",
                            self.alias,
                        )
                    self._ensured = True
                    log.info("search engine reached: indexing")
                if self._fill:
                    # Before the outbox: a search that waits for a write then also finds
                    # the twins written before the index was created.
                    if self._filling is None:
                        self._filling = Filling(time.monotonic())
                    self._filling.total = await self._store.twin_count()
                    filled = await self.fill(self._store, progress=self._filling.progress)
                    self._fill, self._filling = False, None
                    log.info(
                        "filled the search index: %d twins, %d refused",
                        filled.indexed,
                        filled.refused,
                    )
                taken = await self.index_pending()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("indexer: %s; retrying in %.1fs", describe(exc), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._es.retry_max_seconds)
                continue
            delay = self._es.retry_initial_seconds
            if taken < self._es.batch_size:
                await asyncio.sleep(self._es.poll_interval_seconds)

    # -- consistency -----------------------------------------------------------------------

    async def covers(self, seq: int) -> bool:
        """Whether every write up to ``seq`` is acknowledged by the index (not yet refreshed).
        Never while this indexer fills a new index: the twins written before it are not all
        there, and the outbox does not list them."""
        if self._fill:
            return False
        _, lowest = await self._store.index_backlog()
        return lowest is None or lowest > seq

    async def wait_for_seq(self, seq: int) -> None:
        """Return once searches see every write up to ``seq``; 503 ``index.timeout`` if late."""
        deadline = time.monotonic() + self._es.wait_timeout_seconds
        late = Unavailable(
            f"The search index did not reach write {seq} within "
            f"{self._es.wait_timeout_seconds:g}s.",
            code="index.timeout",
        )
        while not await self.covers(seq):
            if time.monotonic() >= deadline:
                raise late
            await asyncio.sleep(self._es.poll_interval_seconds)
        # The refresh is part of the wait: an engine that does not answer held it for the
        # whole request timeout (30 s) past the deadline, then said "failed to refresh".
        # At least REFRESH_GRACE: a wait that caught up just at its deadline had no time
        # left, and answered 503 for writes the index had taken.
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), REFRESH_GRACE)):
                await self._refresh_since(time.monotonic())
        except TimeoutError:
            raise late from None

    async def _refresh_since(self, moment: float) -> None:
        """Make searchable what was indexed before ``moment``; concurrent waiters share one."""
        async with self._refresh_lock:
            if self._last_refresh_start > moment:
                return
            started = time.monotonic()
            async with _es_errors("refresh"):
                await self.client.indices.refresh(index=self.alias)
            # Only once done: a refresh that failed or was given up covers no one.
            self._last_refresh_start = started

    async def lag(self) -> tuple[int, float]:
        """(pending twins, age in seconds of the oldest write the index has not taken).
        While a new index is filled, at least the time since the fill began: every twin not
        yet written to it is older."""
        backlog, lowest = await self._store.index_backlog()
        filling = 0.0 if self._filling is None else time.monotonic() - self._filling.since
        if lowest is None:
            return backlog, filling
        # The oldest journaled from there: that write itself may be pruned, or ``lowest``
        # only a bound (the store knows the index took a twin's writes up to one before it).
        events = await self._store.events_after(lowest - 1, 1)
        if not events:
            return backlog, filling
        written = datetime.fromisoformat(events[0].event.timestamp.replace("Z", "+00:00"))
        return backlog, max(filling, (datetime.now(UTC) - written).total_seconds())

    # -- queries ---------------------------------------------------------------------------

    async def search_ids(self, query: SearchQuery) -> tuple[list[str], str | None]:
        """The twin ids of one page in order, and the cursor of the next page."""
        extra: dict[str, Any] = {}
        if query.after is not None:
            extra["search_after"] = search_after(query.sort, query.after)
        async with _es_errors("search", query=True):
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

    async def search(self, query: SearchQuery) -> tuple[list[Twin], str | None]:
        ids, cursor = await self.search_ids(query)
        # Twins deleted since they were indexed drop out of the page.
        return await self._store.get_many(ids), cursor

    async def count(self, query: SearchQuery) -> int:
        async with _es_errors("count", query=True):
            response = await self.client.count(
                index=self.alias, query=search_query(query.filter, query.namespaces)
            )
        return int(response["count"])

    async def health(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": "up", "kind": "elasticsearch", "index": self.alias}
        # Within /ready's bound for each check (api/routes/health.py), so that an engine that
        # does not answer still leaves the backlog in the answer.
        bound = self._settings.ready_check_timeout_seconds * 0.75
        missing = f"The search index {self.alias} does not exist."
        stray_error = (
            f"The search index {self.alias} is not an alias: an index of that name holds its "
            "place (see docs/scaling.md)."
        )
        try:
            backlog, lag = await self.lag()
            out.update(backlog=backlog, lagSeconds=round(lag, 3), rejected=self.rejected)
            if self._fill:
                # Up (the engine answers, as with a backlog), but searches miss twins and
                # waits for writes wait until the fill is done.
                filling = self._filling or Filling(time.monotonic())
                out["filling"] = {"twins": filling.done, "of": filling.total}
            async with _es_errors("answer"), asyncio.timeout(bound):
                # The health of a plain index under the alias's name (auto-created, see
                # item_outcome) was that of an index where every search fails.
                if not await self.client.indices.exists_alias(name=self.alias):
                    stray = await self.client.indices.exists(index=self.alias)
                    out.update(status="down", error=stray_error if stray else missing)
                    return out
                # No wait: for an index it does not have, the engine waited out the
                # timeout (2 s, past the bound) for it to appear, then answered 408.
                cluster = await self.client.cluster.health(index=self.alias, timeout="0s")
            out["cluster"] = cluster["status"]
            if cluster["status"] == "red":
                out["status"] = "down"
        except TimeoutError:
            out.update(status="down", error=f"The search index did not answer within {bound:g} s.")
        except Unavailable as exc:
            if _status(exc) in (404, 408):
                out.update(status="down", error=missing)
                return out
            out.update(status="down", error=exc.message)
            if exc.description:  # the client's reason: refused, certificate, timeout...
                out["reason"] = exc.description
        return out


class RebuildRunning(Conflict):
    """Another ``index rebuild`` of the same alias holds its lock."""


def rebuild_lock(alias: str) -> str:
    """The index whose existence says a rebuild of ``alias`` runs."""
    return f"{alias}-rebuild-lock"


@contextlib.asynccontextmanager
async def _locked(index: ElasticsearchIndex) -> AsyncIterator[None]:
    """Hold the rebuild lock of the index's alias, else raise :class:`RebuildRunning`.

    Two rebuilds at once each moved the alias from the indexes it was on when they looked:
    it could end on both new ones, with no write index. The lock is an index: creating
    one is atomic across the cluster, and it outlives nothing but a rebuild killed
    outright (the refusal says how to remove it).
    """
    client, lock = index.client, rebuild_lock(index.alias)
    holder = (
        f"{socket.gethostname()} pid {os.getpid()} since {datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ}"
    )
    async with _es_errors("lock the rebuild"):
        try:
            # Stopped while the engine made it, the lock refused every later rebuild.
            await _create(
                index,
                lock,
                client.indices.create(
                    index=lock,
                    settings={"number_of_shards": 1, "number_of_replicas": 0},
                    mappings={"_meta": {"holder": holder}},
                ),
            )
        except BadRequestError as exc:
            if exc.error != "resource_already_exists_exception":
                raise
            raise RebuildRunning(
                f"another index rebuild of {index.alias} is running "
                f"({await _lock_holder(index)}): this one did nothing.",
                description=f"Wait for it to end. If none runs (one was killed), remove its "
                f"lock on the engine (DELETE /{lock}) and run this again.",
            ) from exc
    try:
        yield
    finally:
        try:
            await client.indices.delete(index=lock)
        except (ApiError, TransportError) as exc:
            log.error(
                "could not remove the rebuild lock %s (%s): the next rebuild is refused "
                "until it is deleted (DELETE /%s on the engine)",
                lock,
                exc,
                lock,
            )


async def _create(index: ElasticsearchIndex, name: str, request: Awaitable[object]) -> None:
    """Await ``request``, which creates the index ``name``; cancelled meanwhile (Ctrl-C,
    SIGTERM), wait for its answer and delete what it made before the cancellation goes on.

    A request out is not taken back: the engine made the index after a delete sent at once
    had found nothing, and the index outlived the run.
    """
    creating = asyncio.ensure_future(request)
    try:
        await asyncio.shield(creating)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await creating
            await index.client.indices.delete(index=name)
        raise


async def _to_the_end(work: Awaitable[_T]) -> tuple[_T, bool]:
    """Await ``work`` to its end through any cancellation (deferred, not lost): its result,
    and whether it was cancelled meanwhile (the caller then raises the cancellation)."""
    running = asyncio.ensure_future(work)
    cancelled = False
    while True:
        try:
            return await asyncio.shield(running), cancelled
        except asyncio.CancelledError:
            if running.cancelled():
                raise
            cancelled = True


async def _lock_holder(index: ElasticsearchIndex) -> str:
    lock = rebuild_lock(index.alias)
    try:
        found = await index.client.indices.get_mapping(index=lock)
        return str(found[lock]["mappings"]["_meta"]["holder"])
    except (ApiError, TransportError, KeyError):
        return "holder unknown"


@dataclass
class Filling:
    """The indexer's fill of a new index: when it began, twins written and to write."""

    since: float
    done: int = 0
    total: int = 0

    def progress(self, done: int, total: int) -> None:
        self.done, self.total = done, total


@dataclass
class FillResult:
    """Twins written to an index, and twins refused (logged, not in the index)."""

    indexed: int = 0
    refused: int = 0


async def rebuild(
    settings: Settings,
    store: TwinStore,
    progress: Progress | None = None,
    page_size: int = 500,
    *,
    allow_empty: bool = False,
    on_switch: Switched | None = None,
) -> FillResult:
    """Reindex every twin of ``store`` into a fresh index and move the alias to it.

    A store with no twins does not replace an index that holds some (:class:`Conflict`,
    the index left as it was) unless ``allow_empty``: that is the store of a mistyped
    setting far more often than one whose twins were all deleted.

    Twins are read from the store in id order (``scan``), in pages, and
    written with the store's last sequence number at the start as version; writes committed
    meanwhile are caught up from the journal after the alias moved, so the running indexers
    of the service lose nothing. Returns the twins indexed and refused (logged).

    Cancelled (Ctrl-C, SIGTERM) before the alias moved, it deletes the new index. Once the
    alias moved it calls ``on_switch`` with the new index and the result, and ends with the
    catch-up and the old index's deletion even when cancelled meanwhile: the cancellation is
    raised after them.

    One rebuild of an alias runs at a time: another one started meanwhile raises
    :class:`RebuildRunning` and changes nothing.
    """
    _check_page_size(page_size)
    index = ElasticsearchIndex(settings, store, run_indexer=False)
    try:
        await index.start()  # inside: a start that fails has a client to close
        return await _rebuild(
            index, store, progress, page_size, allow_empty=allow_empty, on_switch=on_switch
        )
    finally:
        await index.stop()


async def _rebuild(
    index: ElasticsearchIndex,
    store: TwinStore,
    progress: Progress | None,
    page_size: int,
    *,
    allow_empty: bool = False,
    on_switch: Switched | None = None,
) -> FillResult:
    _check_page_size(page_size)
    async with _locked(index):
        result, target, old, caught_up, stopped = await _rebuild_locked(
            index, store, progress, page_size, allow_empty=allow_empty
        )
        if on_switch is not None:
            on_switch(target, result)
        # The service indexed the writes made since the catch-up into the old index, and
        # took them from its outbox: stopped before they are in the new one, the live index
        # kept stale twins, and deleted ones, for good.
        _, later = await _to_the_end(_finish_switch(index, store, target, old, caught_up))
        if stopped or later:
            raise asyncio.CancelledError
    return result


async def _rebuild_locked(
    index: ElasticsearchIndex,
    store: TwinStore,
    progress: Progress | None,
    page_size: int,
    *,
    allow_empty: bool,
) -> tuple[FillResult, str, list[str], int, bool]:
    """Fill a new index and move the alias onto it: the result, the new index, the indexes
    the alias was on, the last seq caught up, and whether cancelled during the move."""
    client, alias = index.client, index.alias
    start_seq = await store.last_seq()
    target = f"{alias}-v{MAPPING_VERSION}-{int(time.time() * 1000)}"
    try:
        async with _es_errors("rebuild"):
            # Stopped while the engine made it, the index was left behind, empty.
            await _create(index, target, index.create_index(target, alias=False, refresh="-1"))
        result = await index.fill(store, target, progress, page_size)
        if not result.indexed and not allow_empty:
            await _refuse_to_empty(index)
        # The service indexes what is written meanwhile into the old index and counts it
        # as covered (waitFor): brought into the new one before the alias moves, searches
        # just after the switch miss only what was written in the moment of the switch.
        caught_up = await _catch_up(index, store, start_seq, target)
        async with _es_errors("rebuild"):
            await client.indices.put_settings(
                index=target,
                settings={"refresh_interval": index.settings.elasticsearch.refresh_interval},
            )
            # Searchable before the alias points at it: the refresh the new interval
            # schedules is not awaited, and searches without waitFor found it empty.
            await client.indices.refresh(index=target)
            old = await _alias_indexes(index)
            # A stop that came with the last answer lands here, before the switch: the
            # switch below goes out even when the task is already cancelled.
            await asyncio.sleep(0)
            # One step, off every index it is on (not only those seen above), onto the new
            # one as the write index: an alias on two indexes with none for writes refuses
            # them all. Awaited to its answer when stopped meanwhile: only the answer says
            # whether the new index is the live one.
            _, stopped = await _to_the_end(
                client.indices.update_aliases(
                    actions=[
                        {"remove": {"index": "*", "alias": alias, "must_exist": False}},
                        {"add": {"index": target, "alias": alias, "is_write_index": True}},
                    ]
                )
            )
    except BaseException:
        # A half-filled index (that never refreshes), or a full one the alias is not on, is
        # of no use to the next attempt; one the alias is on (a switch whose answer was
        # lost) is the live index.
        with contextlib.suppress(Exception):
            if target not in await _alias_indexes(index):
                await client.indices.delete(index=target)
        raise
    return result, target, [name for name in old if name != target], caught_up, stopped


async def _finish_switch(
    index: ElasticsearchIndex, store: TwinStore, target: str, old: list[str], caught_up: int
) -> None:
    """After the alias moved to ``target``: the writes since ``caught_up`` into it, and the
    indexes the alias was on (``old``) deleted."""
    client, alias = index.client, index.alias
    async with _es_errors("rebuild"):
        now = await _alias_indexes(index)
    if now != [target]:
        raise Unavailable(
            f"The alias {alias} is on {', '.join(now) or 'no index'} after the switch, "
            f"not on {target} alone.",
            code="index.unavailable",
        )
    await _catch_up(index, store, caught_up)
    async with _es_errors("rebuild"):
        for name in old:
            await client.indices.delete(index=name)
        await client.indices.refresh(index=alias)


async def _alias_indexes(index: ElasticsearchIndex) -> list[str]:
    try:
        return sorted(await index.client.indices.get_alias(name=index.alias))
    except NotFoundError:
        return []


async def _refuse_to_empty(index: ElasticsearchIndex) -> None:
    async with _es_errors("rebuild"):
        try:
            held = int((await index.client.count(index=index.alias))["count"])
        except NotFoundError:
            return  # no index yet: an empty one is what there is to make
    if held:
        raise Conflict(
            f"The store has no twins and the index holds {held:,}: the index was left as it was.",
            description="Check --data-dir (or the MongoDB database); pass --allow-empty to "
            "empty the index.",
        )


def _check_page_size(page_size: int) -> None:
    # Pages of no twins read nothing: the alias would move to an empty index and the full
    # one be deleted.
    if page_size < 1:
        raise ValueError(f"the rebuild's page size must be at least 1, not {page_size}")


async def _catch_up(
    index: ElasticsearchIndex, store: TwinStore, after: int, into: str | None = None
) -> int:
    """Index (again) every twin written after ``after``, with its latest journaled seq,
    into ``into`` (the alias by default); the last seq it read."""
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
        await index.write(changes, into)
    return after
