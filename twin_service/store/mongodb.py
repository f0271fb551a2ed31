"""The scale-out store: MongoDB (or a MongoDB-wire server) through PyMongo's asyncio API.

One document per twin in ``twins``: ``_id`` (twin id), ``ns``, ``rev`` (0 for a deleted twin,
kept as a tombstone: ``gone``, ``gdv`` and ``grv`` hold its :class:`Tombstone`), ``doc``
(the stored twin as a JSON string, because twins may hold keys with ``.`` or ``$`` that
FerretDB refuses), the search fields ``e`` and ``k`` (:mod:`search.mongodb`), ``ev``
(change events not yet journaled), ``ix`` (the seq the external search index has yet to
take) and ``ixf`` (the twin's first write it has yet to take: every write below the lowest
``ixf`` is indexed). Every write is one ``update_one`` filtered on ``rev`` (compare-and-set;
``upsert`` with the unique ``_id`` for creation), so replicas never lose an update and the twin, its
search fields and its change event commit together. A twin document over
``mongodb.max_document_bytes`` is refused before its write takes anything. The journal and
its sequence numbers are in :mod:`twin_service.store.mongodb_journal`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import bson
import pymongo
from pymongo import AsyncMongoClient, IndexModel, ReadPreference, WriteConcern
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import ConnectionFailure, DocumentTooLarge, DuplicateKeyError, PyMongoError

from search import mongodb as mongo_index
from twin_service.errors import PayloadTooLarge, StoreMissing, StoreUnreachable, Unavailable
from twin_service.settings import Settings
from twin_service.store.base import IndexTask, RevisionConflict, StoredEvent, Write, unconfirmed
from twin_service.store.mongodb_journal import (
    DRIVER_ERRORS,
    Allocator,
    InsertAllocator,
    Journal,
    Pending,
    SeqAllocator,
    upsert_meta,
)
from twin_service.tasks import stop_task
from twin_service.twin.document import Tombstone, Twin, tombstone_of
from twin_service.twin.jsonvalue import dumps
from twin_service.types import JSONObject

if TYPE_CHECKING:
    from search.rql.query import SearchQuery

log = logging.getLogger(__name__)

Collection = AsyncCollection[dict[str, Any]]

_READ_PREFERENCES = {
    "primary": ReadPreference.PRIMARY,
    "primaryPreferred": ReadPreference.PRIMARY_PREFERRED,
    "secondary": ReadPreference.SECONDARY,
    "secondaryPreferred": ReadPreference.SECONDARY_PREFERRED,
    "nearest": ReadPreference.NEAREST,
}

_TWIN_INDEXES = [
    IndexModel([("ns", 1), ("_id", 1)], name="ns_id"),
    IndexModel([("ev", 1)], name="pending_events"),
    IndexModel([("ix", 1)], name="index_outbox"),
    IndexModel([("ixf", 1)], name="index_outbox_first"),
    IndexModel([("rev", 1)], name="rev"),
]
_EVENT_INDEXES = [
    IndexModel([("o", 1)], name="allocated_seq", unique=True),
    IndexModel([("t", 1), ("r", 1)], name="twin_revision"),
    IndexModel([("ts", 1)], name="timestamp"),
]
#: Answers filters on any path (MongoDB 4.2+; not created on FerretDB, see open()).
_WILDCARD = IndexModel([("e.$**", 1)], name="search_values")
#: A claim (FerretDB, see MongoStore._claim) seen held for this many gap timeouts is taken
#: for the claim of a dead writer; its holder sends its update within the second figure.
_CLAIM_LEASE = 1.5
_CLAIM_SEND_WITHIN = 0.5
#: Claims this process remembers seeing (the oldest are forgotten first).
_CLAIMS_SEEN_KEPT = 10_000
#: A write holds its claim for tens of milliseconds. Writers that find one held longer than
#: this retry this much apart, so that they outlast the lease of a dead writer's claim
#: (their attempts, MAX_ATTEMPTS, would be spent in a few seconds otherwise).
_CLAIM_SLOW_SECONDS = 1.0
_CLAIM_RETRY_SECONDS = 0.25


#: Seconds the driver's close may wait for the server (see MongoStore.close).
CLOSE_SECONDS = 2.0
#: Every other operation is bounded by mongodb.operation_timeout_ms (the client's timeoutMS),
#: but for work over every twin or the whole journal, which a server that answers may take
#: minutes over on a large database, and which no request waits for. The setup in open()
#: (index builds, the once-per-database queueing of older twins): a start that cut it short
#: would begin it again at every attempt, and never get through.
_SETUP_SECONDS = 3600.0
#: One maintenance round (sweep, watermark, retention: on FerretDB, scans of the journal). A
#: round that times out is logged and tried again at the next; a frozen server holds it this
#: long at most.
_MAINTENANCE_SECONDS = 300.0


def _failure(what: str, exc: BaseException) -> Unavailable:
    """The error for a driver failure. No answer (server selection timed out, connection
    lost) may be a server still starting or restarting: a service starting meanwhile waits
    for it, at any step of its start (the event hub's first read, too). An answer that
    refuses (credentials, a command failed) will not change by waiting."""
    # A timeout (PyMongoError.timeout: no answer within mongodb.operation_timeout_ms, or the
    # server's own maxTimeMS ran out) is also an answer that waiting may bring.
    timed_out = isinstance(exc, PyMongoError) and exc.timeout
    error = StoreUnreachable if isinstance(exc, ConnectionFailure) or timed_out else Unavailable
    # Server selection's message ends with the driver's timeouts and the whole topology
    # description, the reason of each server again among internals: /ready and the log
    # keep the reason.
    reason = str(exc).split(", Topology Description: ", 1)[0].split(" (configured timeouts: ")[0]
    return error(f"{what}: {reason}")


def _twin(raw: dict[str, Any]) -> Twin:
    return Twin.from_storage(json.loads(raw["doc"]))


class MongoStore:
    """:class:`twin_service.store.base.TwinStore` on MongoDB."""

    def __init__(
        self, settings: Settings, *, existing: bool = False, must_exist: bool = False
    ) -> None:
        """``existing``, ``must_exist``: see ``api.app.build_store``."""
        if settings.mongodb_url is None:
            raise ValueError("MongoStore needs settings.mongodb_url")
        self._url = settings.mongodb_url
        self._existing = existing
        self._must_exist = existing or must_exist
        self._settings = settings.mongodb
        # Within /ready's bound for each check (api/routes/health.py), as the index's is.
        self._ping_seconds = settings.ready_check_timeout_seconds * 0.75
        # Claims of other writers and when this process first saw each (see _claim).
        self._claims_seen: OrderedDict[str, float] = OrderedDict()
        # Names this process's claims; and its claims whose insert had no answer (it may
        # have landed all the same).
        self._claimant = uuid.uuid4().hex
        self._claims_unsure: set[str] = set()
        self._stream = settings.stream
        self._client: AsyncMongoClient[dict[str, Any]] | None = None
        self._maintenance: asyncio.Task[None] | None = None
        self._server = "mongodb"
        #: One above the allocation counter at the previous maintenance round: events still
        #: pending below it were committed by writers that have had a whole round to journal
        #: them. (The counter itself once: the latest number was never swept.)
        self._swept_since = 0
        self._swept_below = 0

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        mongo = self._settings
        w: int | str = int(mongo.write_concern) if mongo.write_concern.isdigit() else "majority"
        self._client = AsyncMongoClient(
            self._url,
            serverSelectionTimeoutMS=mongo.server_selection_timeout_ms,
            # Without it, an operation on a server that takes connections and answers
            # nothing waited the socket timeouts and a retry: about 26 s before its 503.
            timeoutMS=mongo.operation_timeout_ms,
            maxPoolSize=mongo.max_pool_size,
            tz_aware=False,
        )
        db = self._client.get_database(mongo.database, write_concern=WriteConcern(w=w))
        # Compare-and-set reads and the journal always go to the primary: a stale read there
        # would only cost retries, but the watermark must see the latest fences.
        self._twins: Collection = db.get_collection("twins")
        self._reads: Collection = db.get_collection(
            "twins", read_preference=_READ_PREFERENCES[mongo.read_preference]
        )
        self._events: Collection = db.get_collection("events")
        self._meta: Collection = db.get_collection("meta")
        self._claims: Collection = db.get_collection("claims")
        try:
            info = await self._client.admin.command("buildInfo")
            self._server = "ferretdb" if "ferretdbVersion" in info else "mongodb"
            # Before anything is written: MongoDB creates a database by writing to it.
            if self._must_exist and "twins" not in await db.list_collection_names():
                await self._client.close()
                raise StoreMissing(
                    f"there is no twin store in the MongoDB database {mongo.database}"
                )
            self._allocator: Allocator
            if self._racy_updates:
                self._allocator = InsertAllocator(db.get_collection("numbers"))
            else:
                self._allocator = SeqAllocator(self._meta)
            self._journal = Journal(
                self._events,
                self._twins,
                self._meta,
                self._allocator,
                mongo.gap_timeout_seconds,
                pull=not self._racy_updates,
            )
            with pymongo.timeout(_SETUP_SECONDS):
                await self._set_up()
        except DRIVER_ERRORS as exc:
            await self._client.close()
            raise _failure("The twin store cannot open MongoDB", exc) from exc
        self._maintenance = asyncio.get_running_loop().create_task(self._maintenance_loop())

    async def _set_up(self) -> None:
        """Indexes, the first maintenance round, the outbox record (see open)."""
        # One index per call: FerretDB 1.24 panics on a createIndexes of several indexes
        # that all exist already (the second replica to start).
        for model in _TWIN_INDEXES:
            await self._twins.create_indexes([model])
        for model in _EVENT_INDEXES:
            await self._events.create_indexes([model])
        if not self._racy_updates:
            # FerretDB 1.x accepts a wildcard index but then fails every write to the
            # collection ("bad JSON path"): searches there scan, which is correct.
            await self._twins.create_indexes([_WILDCARD])
        await self._maintain(prune=True)
        if not self._existing:  # the outbox record is the service's to make
            await self._queue_older_writes()
            await self._first_of_older_writes()

    async def _queue_older_writes(self) -> None:
        """Once per database: queue for the external index the twins written before every
        write was (those a store without search = elasticsearch left out of the outbox)."""
        if await self._meta.find_one({"_id": "outbox"}) is not None:
            return
        # Above any version the index has seen, and below any later write; several replicas
        # doing this at once only queue the same twins twice.
        last = await self._allocator.current()
        result = await self._twins.update_many(
            {"ix": {"$exists": False}}, {"$set": {"ix": last, "ixf": last}}
        )
        if result.modified_count:
            log.warning(
                "queued %d twins and tombstones for the external search index (written "
                "before every write was queued)",
                result.modified_count,
            )
        await upsert_meta(self._meta, "outbox", {"$set": {"since": datetime.now(UTC)}})

    async def _first_of_older_writes(self) -> None:
        """Give the twins queued before ``ixf`` (by a replica of an older version, maybe
        still running) their latest write as the first: what they counted as indexed stays
        so, the next write of the twin is exact. Filtered on ``ix``: a twin indexed or
        written meanwhile is left to that."""
        older = self._twins.find({"ix": {"$exists": True}, "ixf": {"$exists": False}}, {"ix": 1})
        updates = [
            pymongo.UpdateOne({"_id": raw["_id"], "ix": raw["ix"]}, {"$min": {"ixf": raw["ix"]}})
            async for raw in older
        ]
        if updates:
            await self._twins.bulk_write(updates, ordered=False)

    async def close(self) -> None:
        await stop_task(self._maintenance)
        if self._client is not None:
            # The driver ends the server's sessions with a command as it closes, and waited
            # the socket timeout (20 s) for a server that takes connections and answers
            # nothing: a stopping replica overran its pod's grace period. Ending them is a
            # courtesy (the server times idle sessions out itself), so it gets 2 s.
            with pymongo.timeout(CLOSE_SECONDS):
                await self._client.close()

    @property
    def _racy_updates(self) -> bool:
        """FerretDB 1.x applies an update as a read and a later write (not atomically)."""
        return self._server == "ferretdb"

    def describe(self) -> dict[str, Any]:
        return {"kind": "mongodb", "server": self._server, "database": self._settings.database}

    async def ping(self) -> None:
        assert self._client is not None
        try:
            # Server selection alone waits server_selection_timeout_ms (5 s by default):
            # /ready gave up first and said "no answer", not the reason the driver had
            # (connection refused, a certificate refused). Bounded here, the driver's
            # timeout error carries that reason.
            with pymongo.timeout(self._ping_seconds):
                await self._client.admin.command("ping")
        except DRIVER_ERRORS as exc:
            raise _failure("MongoDB does not answer", exc) from exc

    # -- maintenance -----------------------------------------------------------------------

    async def _maintenance_loop(self) -> None:
        rounds = 0
        while True:
            await asyncio.sleep(self._settings.maintenance_interval_seconds)
            rounds += 1
            try:
                with pymongo.timeout(_MAINTENANCE_SECONDS):
                    await self._maintain(prune=rounds % 12 == 0)
            except DRIVER_ERRORS as exc:
                log.warning("journal maintenance failed: %s", exc)

    async def _maintain(self, *, prune: bool) -> None:
        """Advance the watermark, journal events of crashed writers, apply retention."""
        below = await self._allocator.current() + 1
        await self._journal.sweep(self._swept_since, self._swept_below)
        self._swept_since, self._swept_below = self._swept_below, below
        await self._journal.read(after=2**62, limit=None)
        if prune:
            now = datetime.now(UTC)
            cutoff = now - timedelta(seconds=self._stream.journal_max_age_seconds)
            await self._journal.prune(cutoff.strftime("%Y-%m-%dT%H:%M:%S.000Z"))
            if self._racy_updates:
                assert isinstance(self._allocator, InsertAllocator)
                await self._allocator.trim()
                await self._claims.delete_many({"at": {"$lt": now - timedelta(minutes=10)}})
            else:
                # A tombstone from before they were kept (no ``gone``) may go once nothing
                # is pending in it. Not where updates race: a re-creation could be read,
                # then lost to this delete.
                await self._twins.delete_many(
                    {
                        "rev": 0,
                        "gone": {"$exists": False},
                        "ev.0": {"$exists": False},
                        "ix": {"$exists": False},
                    }
                )

    # -- reads -----------------------------------------------------------------------------

    async def get(self, twin_id: str) -> Twin | None:
        try:
            # Filtered on _id only (FerretDB decodes every twin for anything else).
            raw = await self._twins.find_one({"_id": twin_id}, {"doc": 1, "rev": 1})
        except DRIVER_ERRORS as exc:
            raise _failure("The twin store failed to read", exc) from exc
        return _twin(raw) if raw and raw.get("rev") else None

    async def tombstone(self, twin_id: str) -> Tombstone | None:
        try:
            raw = await self._twins.find_one(
                {"_id": twin_id}, {"rev": 1, "gone": 1, "gdv": 1, "grv": 1}
            )
        except DRIVER_ERRORS as exc:
            raise _failure("The twin store failed to read", exc) from exc
        if not raw or raw.get("rev") or not raw.get("gone"):
            return None
        return Tombstone(int(raw["gone"]), int(raw.get("gdv", 0)), int(raw.get("grv", 0)))

    async def created_from(self, twin_id: str) -> Tombstone | None:
        return await self.tombstone(twin_id)  # no restore to go on from (docs/backup.md)

    async def get_many(self, twin_ids: list[str]) -> list[Twin]:
        try:
            found = {
                raw["_id"]: _twin(raw)
                async for raw in self._reads.find(
                    {"_id": {"$in": list(dict.fromkeys(twin_ids))}, "rev": {"$gt": 0}},
                    {"doc": 1},
                )
            }
        except DRIVER_ERRORS as exc:
            raise _failure("The twin store failed to read", exc) from exc
        return [found[i] for i in twin_ids if i in found]

    async def scan(
        self, after_id: str | None, limit: int, *, containing: str | None = None
    ) -> list[Twin]:
        # ``containing`` is only a hint; every twin is returned here.
        try:
            rows = await (
                self._reads.find({"_id": {"$gt": after_id or ""}, "rev": {"$gt": 0}}, {"doc": 1})
                .sort("_id", 1)
                .limit(limit)
            ).to_list()
        except DRIVER_ERRORS as exc:
            raise _failure("The twin store failed to read", exc) from exc
        return [_twin(raw) for raw in rows]

    async def twin_count(self) -> int:
        try:
            return await self._reads.count_documents({"rev": {"$gt": 0}})
        except DRIVER_ERRORS as exc:
            raise _failure("The twin store failed to count", exc) from exc

    @property
    def commits_in_order(self) -> bool:
        return False  # numbers are allocated before the compare-and-set (mongodb_journal)

    @property
    def searchable(self) -> bool:
        # The search fields live in each twin document and are written with it, whatever
        # the search setting: there is no separate index to keep or rebuild.
        return True

    @property
    def restored(self) -> bool:
        return False  # MongoDB is restored with its own tools: nothing marks it (docs/backup.md)

    async def search(self, query: SearchQuery) -> tuple[list[Twin], str | None]:
        twins: dict[str, Twin] = {}

        def document(raw: dict[str, Any]) -> dict[str, Any]:
            return twins.setdefault(raw["_id"], _twin(raw)).to_document()

        try:
            rows, cursor = await mongo_index.search_page(self._reads, query, document, {"doc": 1})
        except DRIVER_ERRORS as exc:
            raise _failure("The twin store failed to search", exc) from exc
        return [twins.get(raw["_id"]) or _twin(raw) for raw in rows], cursor

    async def count(self, query: SearchQuery) -> int:
        try:
            return await mongo_index.count(self._reads, query.filter, query.namespaces)
        except DRIVER_ERRORS as exc:
            raise _failure("The twin store failed to count", exc) from exc

    async def events_after(
        self, seq: int, limit: int, *, containing: str | None = None
    ) -> list[StoredEvent]:
        # ``containing`` is only a hint; every event is returned here.
        try:
            events, _ = await self._journal.read(seq, limit)
        except DRIVER_ERRORS as exc:
            raise _failure("The twin store failed to read the journal", exc) from exc
        return events

    async def history(
        self, twin_id: str, since: int, until: int | None, limit: int | None = None
    ) -> list[StoredEvent]:
        try:
            return await self._journal.history(twin_id, since, until, limit)
        except DRIVER_ERRORS as exc:
            raise _failure("The twin store failed to read the journal", exc) from exc

    async def twin_at(self, twin_id: str, revision: int) -> Twin | None:
        try:
            return await self._journal.twin_at(twin_id, revision)
        except DRIVER_ERRORS as exc:
            raise _failure("The twin store failed to read the journal", exc) from exc

    async def privates_at(self, twin_id: str, revisions: Sequence[int]) -> dict[int, JSONObject]:
        try:
            return await self._journal.privates_at(twin_id, revisions)
        except DRIVER_ERRORS as exc:
            raise _failure("The twin store failed to read the journal", exc) from exc

    async def pruned_seq(self) -> int:
        try:
            return await self._journal.pruned()
        except DRIVER_ERRORS as exc:
            raise _failure("The twin store failed to read the journal", exc) from exc

    async def oldest_seq(self) -> int:
        try:
            return await self._journal.oldest()
        except DRIVER_ERRORS as exc:
            raise _failure("The twin store failed to read the journal", exc) from exc

    async def last_seq(self) -> int:
        """The stable watermark: every event up to it is journaled (see the journal module)."""
        try:
            _, stable = await self._journal.read(after=2**62, limit=None)
        except DRIVER_ERRORS as exc:
            raise _failure("The twin store failed to read the journal", exc) from exc
        return stable

    # -- external index outbox -------------------------------------------------------------

    async def pending_index(self, limit: int) -> list[IndexTask]:
        try:
            rows = await (
                self._twins.find({"ix": {"$exists": True}}, {"ix": 1, "rev": 1, "doc": 1})
                .sort("ix", 1)
                .limit(limit)
            ).to_list()
        except DRIVER_ERRORS as exc:
            raise _failure("The twin store failed to read", exc) from exc
        return [
            IndexTask(raw["_id"], int(raw["ix"]), _twin(raw) if raw.get("rev") else None)
            for raw in rows
        ]

    async def mark_indexed(self, tasks: list[IndexTask]) -> None:
        if not tasks:
            return
        if self._racy_updates:
            for task in tasks:
                await self._mark_indexed_claimed(task)
            return
        # A twin written again since stays pending, and its writes up to the one indexed
        # are covered: left as it was, its ixf held every wait for a later write for as long
        # as the twin was written faster than the indexer took it. The filters are disjoint.
        updates = [
            update
            for t in tasks
            for update in (
                pymongo.UpdateOne(
                    {"_id": t.twin_id, "ix": t.seq}, {"$unset": {"ix": "", "ixf": ""}}
                ),
                pymongo.UpdateOne(
                    {"_id": t.twin_id, "ix": {"$gt": t.seq}}, {"$max": {"ixf": t.seq + 1}}
                ),
            )
        ]
        try:
            await self._twins.bulk_write(updates, ordered=False)
        except DRIVER_ERRORS as exc:
            raise _failure("The twin store failed to commit", exc) from exc

    async def _mark_indexed_claimed(self, task: IndexTask) -> None:
        """:meth:`mark_indexed` of one twin where updates race (FerretDB): there an update
        is a read and a later write of the whole document, so one outside a claim wrote
        the version it had read back over a write acknowledged meanwhile (the write was
        undone, its revision journaled twice, and its writer's claim left to lapse). The
        version's claim is taken, as a writer takes it, for the update only, then given
        back; a twin being written is left pending for the indexer's next round."""
        try:
            raw = await self._twins.find_one({"_id": task.twin_id}, {"seq": 1, "ix": 1})
            if raw is None or int(raw.get("ix", -1)) < task.seq:
                return  # marked already
            version, queued = int(raw.get("seq", 0)), int(raw["ix"])
            claim = f"{task.twin_id}@{version}"
            try:
                await self._claims.insert_one(
                    {"_id": claim, "at": datetime.now(UTC), "by": self._claimant}
                )
            except DuplicateKeyError:
                return
            try:
                # As mark_indexed's filters: the write indexed, or one written since.
                if queued == task.seq:
                    update: dict[str, Any] = {"$unset": {"ix": "", "ixf": ""}}
                else:
                    update = {"$max": {"ixf": task.seq + 1}}
                gap = self._settings.gap_timeout_seconds
                with pymongo.timeout(min(gap * 0.8, self._settings.operation_timeout_ms / 1000)):
                    await self._twins.update_one(
                        {"_id": task.twin_id, "seq": version, "ix": queued}, update
                    )
            finally:
                await self._claims.delete_one({"_id": claim, "by": self._claimant})
        except DRIVER_ERRORS as exc:
            raise _failure("The twin store failed to commit", exc) from exc

    async def index_backlog(self) -> tuple[int, int | None]:
        try:
            pending = await self._twins.count_documents({"ix": {"$exists": True}})
            # On ix too: a replica of an older version acknowledges by unsetting ix alone.
            first = await self._twins.find_one(
                {"ixf": {"$exists": True}, "ix": {"$exists": True}}, {"ixf": 1}, sort=[("ixf", 1)]
            )
            # A replica of an older version (a rolling upgrade) queues a write with ix alone,
            # at any time: its ix is its first write (see _first_of_older_writes).
            older = await self._twins.find_one(
                {"ix": {"$exists": True}, "ixf": {"$exists": False}}, {"ix": 1}, sort=[("ix", 1)]
            )
        except DRIVER_ERRORS as exc:
            raise _failure("The twin store failed to read", exc) from exc
        lowest = [int(first["ixf"])] if first else []
        lowest += [int(older["ix"])] if older else []
        return pending, min(lowest, default=None)

    # -- writes ----------------------------------------------------------------------------

    async def write(self, write: Write) -> int:
        event = write.event
        twin = write.twin
        state = dumps(twin.to_storage()) if twin is not None else None
        event_json = dumps(event.to_json())
        fields = self._stored_fields(write, state)
        # Refused before a claim or a seq is taken: nothing to release, no gap for readers.
        self._check_stored_size(write, fields, event_json, state)
        # The service's writers of one twin take turns (twin_service.turns): a crowd on a hot
        # twin costs the server one attempt per replica at a time, not one per request.
        claimed = await self._claim(write) if self._racy_updates else None
        try:
            seq = await self._allocator.next(write.twin_id)
        except BaseException as exc:
            if claimed is not None:  # nothing of the write was sent (see _may_claim_again)
                self._may_claim_again(claimed[0])
            if isinstance(exc, DRIVER_ERRORS):
                raise _failure("The twin store failed to commit", exc) from exc
            raise
        pending = Pending(seq, write.twin_id, event.revision, event.timestamp, event_json, state)
        token = pending.token()
        # Queued for the external index whatever ``search`` is now: a switch to elasticsearch
        # later (even by some replicas of a rolling update first) finds every write since
        # pending, with no one to fill the outbox. The field costs nothing on this update.
        fields["ix"] = seq
        # The twin's first write the index has yet to take: kept when it is written again.
        first = {"$min": {"ixf": seq}}
        update: dict[str, Any]
        if self._racy_updates:
            # The claimed writer is alone on this twin: events pending before were journaled
            # by _claim, so the array is replaced, never pulled from (a pull would race).
            update = {"$set": {**fields, "ev": [token], "seq": seq}, **first}
        else:
            update = {"$set": {**fields, "seq": seq}, "$push": {"ev": token}, **first}
        gap = self._settings.gap_timeout_seconds
        if claimed is not None and time.monotonic() - claimed[1] > gap * _CLAIM_SEND_WITHIN:
            # Too late to send it: the claim may be taken over (see _claim) while the update
            # is on its way. Nothing of this write was sent, so this process's next attempt
            # may take the claim's next generation at once.
            self._may_claim_again(claimed[0])
            await self._fence_quietly(seq)
            raise RevisionConflict(f"Twin {write.twin_id}: the claim of its revision lapsed.")
        bound = min(gap * 0.8, self._settings.operation_timeout_ms / 1000)
        try:
            # A bounded commit (the server gets maxTimeMS on MongoDB) keeps the window in which
            # a stalled write could land after readers fenced its number off small.
            with pymongo.timeout(bound):
                result = await self._twins.update_one(
                    self._cas_filter(write),
                    update,
                    upsert=write.event.action == "created",
                )
            committed = result.matched_count == 1 or result.upserted_id is not None
        except DuplicateKeyError:
            committed = False
        except DocumentTooLarge as exc:
            # Refused by the driver before sending (over the server's largest document,
            # which _check_stored_size should have seen first): release what was taken.
            if claimed is not None:
                self._may_claim_again(claimed[0])
            await self._fence_quietly(seq)
            raise PayloadTooLarge(f"Twin {write.twin_id} is too large for MongoDB: {exc}") from exc
        except DRIVER_ERRORS as exc:
            # Outcome unknown: if it committed, the event is pending in the twin and gets
            # journaled by readers or the sweep; if not, readers fence the number off.
            raise unconfirmed(
                f"The database did not confirm this write ({exc})", settles_after=bound
            ) from exc
        if not committed:
            if claimed is not None:  # the twin is as it was: this process may claim it again
                self._may_claim_again(claimed[0])
            await self._fence_quietly(seq)
            raise RevisionConflict(
                f"Twin {write.twin_id} is not at revision {write.expected_revision}."
            )
        return await self._journal_written(write, pending, token)

    def _check_stored_size(
        self, write: Write, fields: dict[str, Any], event_json: str, state: str | None
    ) -> None:
        """Refuse a write whose twin document would be over ``mongodb.max_document_bytes``.

        The stored form is many times the twin's JSON: the JSON again in the pending event,
        and a search field named by the whole path of every node of desired, delta and
        metadata, in ``e`` and ``k``. Deep nesting with long keys took a twin of 8 KB past
        BSON's 16 MiB (the driver refused it after the claim and the seq were taken), and
        documents of megabytes kept FerretDB busy for minutes.
        """
        event = write.event
        # The seq is fixed-width in the token and an int64 in ``seq``, ``ix`` and ``ixf``: 0 in
        # its place gives the exact size.
        token = Pending(0, write.twin_id, event.revision, event.timestamp, event_json, state)
        stored = {
            "_id": write.twin_id,
            **fields,
            "ix": 0,
            "ixf": 0,
            "seq": 0,
            "ev": [token.token()],
        }
        size = len(bson.encode(stored))
        limit = self._settings.max_document_bytes
        if size > limit:
            raise PayloadTooLarge(
                f"Twin {write.twin_id}: its stored form in MongoDB would be {size} bytes, over "
                f"the store's limit of {limit} bytes (mongodb.max_document_bytes; MongoDB "
                "refuses any document over 16 MiB).",
                description="Besides its JSON, the stored twin holds a search field named by "
                "the full path of every node of desired, delta and metadata, so deep nesting "
                "and long keys multiply its size: use shallower or shorter paths, or fewer "
                "leaves.",
            )

    @staticmethod
    def _stored_fields(write: Write, state: str | None) -> dict[str, Any]:
        """The fields of the twin's document this write sets (but ``ix``, ``seq``, ``ev``)."""
        fields: dict[str, Any]
        event = write.event
        twin = write.twin
        if twin is None:
            fields = {"rev": 0, "doc": None, "e": {}, "k": {}, "cr": None}
            # The next twin of the id goes on from here. (A creation over a tombstone leaves
            # these behind: creations match on ``rev`` 0 only, and the next deletion
            # replaces them.)
            gone = tombstone_of(write.previous) if write.previous else Tombstone(event.revision)
            fields |= {"gone": gone.revision, "gdv": gone.desired_version}
            fields["grv"] = gone.reported_version
        else:
            fields = {
                "ns": twin.namespace,
                "rev": twin.revision,
                # Revisions restart after a delete: see Twin.incarnation. (Documents written
                # before there were incarnation tokens hold the creation time, which is what
                # Twin.incarnation falls back to for them.)
                "cr": twin.incarnation,
                "doc": state,
                **mongo_index.index_fields(twin.to_document()),
            }
        return fields

    @staticmethod
    def _cas_filter(write: Write) -> dict[str, Any]:
        """The compare-and-set filter: the revision, and the incarnation when it is known;
        for a creation, no twin and the tombstone's revision (none: no tombstone, or one
        from before they were kept)."""
        if write.event.action == "created":
            gone = write.expected_revision or {"$in": [0, None]}
            return {"_id": write.twin_id, "rev": 0, "gone": gone}
        cas: dict[str, Any] = {"_id": write.twin_id, "rev": write.expected_revision}
        if write.previous is not None:
            cas["cr"] = write.previous.incarnation
        return cas

    async def _claim(self, write: Write) -> tuple[str, float]:
        """Win the right to replace the twin's current version (servers with racy updates);
        returns the claim's id and when it was won (``time.monotonic``).

        The claim is a unique insert keyed by the seq of the version being replaced (0 when
        there is none), the one operation FerretDB 1.24 performs atomically; exactly one
        writer wins each version, so the update that follows has the twin to itself.

        A writer that died holding a claim (a replica killed between its claim and its
        update) would keep every other writer off the twin until maintenance deletes old
        claims, 10 minutes on: seen in bench.chaos, every write of the twin retried until
        it gave up. So claims have generations. A writer that finds a claim it has itself
        seen standing for ``_CLAIM_LEASE`` times the gap timeout inserts the next
        generation instead, again a unique insert, so again one winner. A claim is never
        changed or deleted (FerretDB's deletes and updates race), and the time is this
        process's own from when it first saw the claim, so clocks of replicas that differ
        cannot cut a live claim short. The holder sends its update within
        ``_CLAIM_SEND_WITHIN`` of the gap timeout or gives up (see write), and the update
        is bounded by 0.8 of it, so a live holder is done before the lease ends.

        A claim names this process (``by``): a claim insert that got no answer may have
        landed, and this process's next attempt that finds the claim takes it for its own
        that came to nothing, not for a live writer's that it waited out the lease of.
        """
        try:
            raw = await self._twins.find_one(
                {"_id": write.twin_id}, {"rev": 1, "seq": 1, "ev": 1, "cr": 1, "gone": 1}
            )
            current = int(raw["rev"] or raw.get("gone", 0)) if raw else 0
            if current != write.expected_revision:
                raise RevisionConflict(
                    f"Twin {write.twin_id} is at revision {current}, not {write.expected_revision}."
                )
            expected = self._cas_filter(write).get("cr")
            if raw and expected is not None and raw.get("cr") != expected:
                raise RevisionConflict(f"Twin {write.twin_id} was deleted and created again.")
            version = int(raw.get("seq", 0)) if raw else 0
            claim = f"{write.twin_id}@{version}"
            lease = self._settings.gap_timeout_seconds * _CLAIM_LEASE
            generation = 0
            while True:
                try:
                    await self._claims.insert_one(
                        {"_id": claim, "at": datetime.now(UTC), "by": self._claimant}
                    )
                    claimed = time.monotonic()
                    break
                except DuplicateKeyError:
                    if claim in self._claims_unsure and await self._claimed_here(claim):
                        self._may_claim_again(claim)
                    held = self._claim_held(claim)
                    if held < lease:
                        conflict = RevisionConflict(
                            f"Twin {write.twin_id} revision {current} is being replaced."
                        )
                        if held >= _CLAIM_SLOW_SECONDS:  # likely a dead writer's: wait it out
                            conflict.retry_after = _CLAIM_RETRY_SECONDS
                        raise conflict from None
                    if held < math.inf:  # not this process's own (see _may_claim_again)
                        log.warning(
                            "the claim %s was seen held for %.1f s (its lease is %.1f s): its "
                            "writer is taken for dead and the next generation claimed",
                            claim,
                            held,
                            lease,
                        )
                    generation += 1
                    claim = f"{write.twin_id}@{version}~{generation}"
                except BaseException:
                    # No answer: it may have landed all the same (see _claimed_here).
                    if len(self._claims_unsure) >= _CLAIMS_SEEN_KEPT:
                        self._claims_unsure.clear()  # forgotten, one only costs a lease
                    self._claims_unsure.add(claim)
                    raise
            try:
                for token in raw.get("ev", []) if raw else []:
                    if not await self._journal.journaled(Pending.parse(token).seq):
                        await self._journal.help(write.twin_id, token)
            except BaseException:
                # The twin is as it was: else this process's next write of it waited out
                # the lease of its own claim, as though it were a dead writer's.
                self._may_claim_again(claim)
                raise
        except DRIVER_ERRORS as exc:
            raise _failure("The twin store failed to commit", exc) from exc
        return claim, claimed

    def _may_claim_again(self, claim: str) -> None:
        """This process's own claim ``claim`` came to nothing (its update was never sent, or
        matched nothing): its next attempt takes the claim's next generation at once."""
        self._claims_seen[claim] = -math.inf

    async def _claimed_here(self, claim: str) -> bool:
        """Whether ``claim``, whose insert this process sent without an answer, is its own
        (nothing was sent after it: the twin is free to this process)."""
        raw = await self._claims.find_one({"_id": claim}, {"by": 1})
        self._claims_unsure.discard(claim)
        return raw is not None and raw.get("by") == self._claimant

    def _claim_held(self, claim: str) -> float:
        """For how long this process has seen ``claim`` held (see _claim)."""
        now = time.monotonic()
        seen = self._claims_seen.setdefault(claim, now)
        if len(self._claims_seen) > _CLAIMS_SEEN_KEPT:
            self._claims_seen.popitem(last=False)
        return now - seen

    async def _fence_quietly(self, seq: int) -> None:
        try:
            await self._journal.fence(seq)
        except DRIVER_ERRORS as exc:  # readers fence it after gap_timeout_seconds
            log.warning("could not fence off seq %s: %s", seq, exc)

    async def _journal_written(self, write: Write, pending: Pending, token: str) -> int:
        """Copy the committed event into the journal; the write is acknowledged either way."""
        try:
            seq = await self._journal.commit(pending)
            if not self._racy_updates:
                await self._twins.update_one({"_id": write.twin_id}, {"$pull": {"ev": token}})
            if seq != pending.seq:
                await self._twins.update_one(
                    {"_id": write.twin_id, "ix": pending.seq},
                    {"$set": {"ix": seq}, "$min": {"ixf": seq}},
                )
            keep = self._stream.journal_max_per_twin
            if write.event.revision > keep:
                await self._journal.prune_twin(
                    write.twin_id, write.event.revision - keep, below_seq=seq
                )
        except DRIVER_ERRORS as exc:
            # The twin and its pending event are committed; readers journal it later.
            log.warning("journaling seq %s deferred: %s", pending.seq, exc)
            return pending.seq
        return seq
