"""The change journal of the MongoDB store: sequence numbers, fencing and the stable watermark.

Atomicity without transactions. A write's change event is first committed *inside the twin
document*, as a pending entry of its ``ev`` array, by the same compare-and-set update that
writes the twin; only then is it copied into the ``events`` collection (``_id`` = its
sequence number, ``o`` = the number it was allocated with, unique) and pulled from the twin.
A crash between the two leaves the event pending in the twin, where readers and the
maintenance sweep find it and journal it; copying is idempotent (unique ``_id`` and ``o``).

Sequence numbers. ``seq`` is allocated with ``$inc`` on one counter document *before* the
compare-and-set, so a later revision of a twin always gets a higher number than an earlier
one. Allocations commit out of order, so readers only hand out events below the *stable
watermark*: the highest ``n`` such that every number up to ``n`` is journaled or fenced off.
A number that stays missing longer than ``gap_timeout_seconds`` while a higher one is
journaled is resolved by the reader: journaled from the twin holding it as pending, or fenced
off with a placeholder (``b: true``) under its ``_id``. A writer whose number was fenced off
journals its event under a fresh number instead, above everything any reader has seen. So a
reader that has seen ``n`` never later finds an event below ``n``, and every event is
journaled exactly once. Writers fence off their own number at once when the compare-and-set
fails. The highest verified watermark is kept in ``meta`` (``stable``) so that readers start
from it, and retention only ever deletes entries below it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pymongo import ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError, PyMongoError

from twin_service.errors import Unavailable
from twin_service.store.base import StoredEvent, latest_lifetime
from twin_service.twin.document import ChangeEvent, Twin
from twin_service.types import JSONObject

Collection = AsyncCollection[dict[str, Any]]

#: What a failed driver call raises. pymongo 4.x lets a bare ``OSError("connection closed")``
#: out of a read whose connection the server dropped (seen when MongoDB stopped under load);
#: it means the same as ``AutoReconnect``: the database is out of reach.
DRIVER_ERRORS = (PyMongoError, OSError)

#: Journal entries read per round trip while verifying the watermark.
_BATCH = 256
#: Twins, or journal entries, named in one query of a prune by age.
_PRUNE_BATCH = 500


@dataclass(frozen=True)
class Pending:
    """A committed change event waiting in its twin document to be journaled."""

    seq: int
    twin_id: str
    revision: int
    timestamp: str
    event: str
    #: The stored twin right after the change (JSON), None for a deletion.
    state: str | None

    def token(self) -> str:
        """The string kept in the twin's ``ev`` array; sortable and searchable by seq."""
        body = json.dumps(
            {
                "t": self.twin_id,
                "r": self.revision,
                "ts": self.timestamp,
                "e": self.event,
                "s": self.state,
            },
            separators=(",", ":"),
            ensure_ascii=False,
        )
        return f"{seq_prefix(self.seq)}|{body}"

    @classmethod
    def parse(cls, token: str) -> Pending:
        seq, _, body = token.partition("|")
        data = json.loads(body)
        return cls(int(seq), data["t"], data["r"], data["ts"], data["e"], data["s"])

    def stored(self) -> StoredEvent:
        return _stored(self.seq, self.event, self.state)


def seq_prefix(seq: int) -> str:
    """Zero-padded so that string order is numeric order."""
    return f"{seq:020d}"


def _stored(seq: int, event: str, state: str | None) -> StoredEvent:
    twin = Twin.from_storage(json.loads(state)) if state else None
    return StoredEvent(seq, ChangeEvent.from_json(json.loads(event)), twin)


def stored_event(doc: dict[str, Any]) -> StoredEvent:
    return _stored(int(doc["_id"]), doc["e"], doc.get("st"))


async def upsert_meta(meta: Collection, key: str, update: dict[str, Any]) -> None:
    """Apply ``update`` to the ``meta`` document ``key``, creating it if need be.

    FerretDB runs an upsert as a read and an insert: replicas that create the document at
    once collide on its ``_id`` (E11000, seen when the event hubs of three replicas first
    saved the watermark). The loser's document exists by then, so it updates it.
    """
    try:
        await meta.update_one({"_id": key}, update, upsert=True)
    except DuplicateKeyError:
        await meta.update_one({"_id": key}, update)


class SeqAllocator:
    """Hands out sequence numbers; concurrent requests of one process share one ``$inc``."""

    def __init__(self, meta: Collection) -> None:
        self._meta = meta
        self._waiting: list[asyncio.Future[int]] = []
        self._running = False
        self._task: asyncio.Task[None] | None = None

    async def next(self, twin_id: str | None = None) -> int:
        """A fresh number (``twin_id``, the twin whose event takes it, is not kept here)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._waiting.append(future)
        if not self._running:
            self._running = True
            # In a context of its own: the task serves every caller while some wait, so it
            # must not run under the pymongo.timeout deadline of the one that started it (a
            # maintenance round's, past which it would fail everyone's allocations).
            self._task = loop.create_task(self._run(), context=contextvars.Context())
        return await future

    async def current(self) -> int:
        doc = await self._meta.find_one({"_id": "seq"})
        return int(doc["n"]) if doc is not None else 0

    async def holders(self, since: int, below: int) -> dict[int, str] | None:
        """Not known here: MongoDB finds pending events by the index on ``ev``."""
        return None

    async def _run(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                try:
                    doc = await self._meta.find_one_and_update(
                        {"_id": "seq"},
                        {"$inc": {"n": len(batch)}},
                        upsert=True,
                        return_document=ReturnDocument.AFTER,
                    )
                except DRIVER_ERRORS as exc:
                    error = Unavailable(f"The twin store failed to allocate a sequence: {exc}")
                    for future in batch:
                        if not future.done():
                            future.set_exception(error)
                    continue
                assert doc is not None  # upsert with ReturnDocument.AFTER
                first = int(doc["n"]) - len(batch) + 1
                for offset, future in enumerate(batch):
                    if not future.done():
                        future.set_result(first + offset)
        finally:
            self._running = False


class InsertAllocator:
    """Sequence numbers from unique inserts, for servers whose updates are not atomic.

    FerretDB 1.24 on SQLite runs an update as a read and a separate write, so two concurrent
    ``$inc`` may return the same number; a unique ``_id`` insert is atomic there. Each number
    is the highest allocated so far plus one, so an allocation that starts after another
    finished always gets a higher number. Each number names the twin whose event took it
    (``t``), so that the maintenance sweep and readers find a twin holding a pending event
    by its string ``_id`` (FerretDB decodes every document of the collection for any other
    filter)
    """

    def __init__(self, numbers: Collection) -> None:
        self._numbers = numbers

    async def current(self) -> int:
        top = await self._numbers.find_one({}, {"_id": 1}, sort=[("_id", -1)])
        return int(top["_id"]) if top is not None else 0

    async def next(self, twin_id: str | None = None) -> int:
        """A fresh number for an event of ``twin_id``."""
        while True:
            candidate = await self.current() + 1
            number: dict[str, Any] = {"_id": candidate}
            if twin_id is not None:
                number["t"] = twin_id
            try:
                await self._numbers.insert_one(number)
            except DuplicateKeyError:
                continue
            if candidate % 200 == 0:
                # Keep the collection small: finding the highest number sorts all of it.
                await self._numbers.delete_many({"_id": {"$lt": candidate - 100}})
            return candidate

    async def holders(self, since: int, below: int) -> dict[int, str] | None:
        """The twin of each number ``since <= n < below`` still kept (the latest hundred at
        least, see next); None when one does not say (allocated by an older version)."""
        found = self._numbers.find({"_id": {"$gte": since, "$lt": below}})
        numbers = {int(doc["_id"]): doc.get("t") async for doc in found}
        if None in numbers.values():
            return None
        return {n: str(twin_id) for n, twin_id in numbers.items()}

    async def trim(self) -> None:
        """Forget old numbers (the highest one must stay)."""
        await self._numbers.delete_many({"_id": {"$lt": await self.current() - 1000}})


Allocator = SeqAllocator | InsertAllocator


class Journal:
    """The ``events`` collection, read only below the stable watermark."""

    def __init__(
        self,
        events: Collection,
        twins: Collection,
        meta: Collection,
        allocator: Allocator,
        gap_timeout: float,
        *,
        pull: bool = True,
    ) -> None:
        self._events = events
        self._twins = twins
        self._meta = meta
        self._allocator = allocator
        self._gap_timeout = gap_timeout
        #: Whether journaled events are pulled from their twin (not where updates race).
        self._pull = pull
        #: When this process first saw each unresolved gap (monotonic clock: no skew).
        self._gaps: dict[int, float] = {}
        #: The highest watermark this process knows to be verified.
        self.stable_hint = 0

    # -- writing -----------------------------------------------------------------------------

    async def commit(self, pending: Pending) -> int:
        """Journal ``pending`` (idempotent); returns the seq it is journaled under."""
        seq = pending.seq
        while True:
            try:
                await self._events.insert_one(
                    {
                        "_id": seq,
                        "o": pending.seq,
                        "t": pending.twin_id,
                        "r": pending.revision,
                        "ts": pending.timestamp,
                        "e": pending.event,
                        "st": pending.state,
                    }
                )
                return seq
            except DuplicateKeyError:
                same = await self._events.find_one({"_id": seq}, {"o": 1})
                if same is not None and same.get("o") == pending.seq:
                    return seq
                existing = await self._events.find_one({"o": pending.seq}, {"_id": 1})
                if existing is not None:
                    return int(existing["_id"])
            # A reader fenced our number off: take a fresh one, above all it has seen.
            seq = await self._allocator.next(pending.twin_id)

    async def journaled(self, allocated: int) -> bool:
        """Whether the event allocated ``allocated`` is in the journal (maybe renumbered), or
        was and retention removed it (see ``_retired``)."""
        # By _id first: most events are journaled under their own number. (Both lookups scan
        # the journal on FerretDB 1.24, which pushes no integer filter down to SQLite.)
        entry = await self._events.find_one({"_id": allocated}, {"o": 1})
        if entry is not None and entry.get("o") == allocated:
            return True
        if await self._events.find_one({"o": allocated}, {"_id": 1}) is not None:
            return True
        return bool(await self._retired([allocated]))

    async def _retired(self, allocated: Sequence[int]) -> set[int]:
        """Those of the numbers ``allocated``, of events found pending in a twin, that are no
        longer pending: their events were journaled, and may have been pruned since.

        On FerretDB a twin keeps its last event pending once journaled (see MongoStore.write),
        a tombstone its deletion for good. Once retention removed that event, it looked like
        one not journaled yet: history listed the deletion again (no 410 for a twin whose
        history aged out), and the next creation's writer journaled it again. Every number
        up to the stable watermark is journaled or fenced off, and entries go only at or
        below the pruned mark (events) or the watermark (fences): so a number at or below
        both with no fence was journaled. A fenced number's event, if it was committed at
        all, is journaled under a fresh number (found by ``o``), by its writer at once.
        """
        bound = min(await self.pruned(), await self._load_hint())
        below = [seq for seq in allocated if seq <= bound]
        if not below:
            return set()
        fences = self._events.find({"_id": {"$in": below}, "b": True}, {"_id": 1})
        return set(below) - {int(doc["_id"]) async for doc in fences}

    async def fence(self, seq: int) -> None:
        """Make ``seq`` permanently empty (no error if it is already used)."""
        with contextlib.suppress(DuplicateKeyError):
            await self._events.insert_one({"_id": seq, "o": -seq, "b": True})

    async def help(self, twin_id: str, token: str) -> int:
        """Journal a pending event found in a twin and pull it from there."""
        seq = await self.commit(Pending.parse(token))
        if self._pull:
            await self._twins.update_one({"_id": twin_id}, {"$pull": {"ev": token}})
        return seq

    # -- reading -----------------------------------------------------------------------------

    async def _load_hint(self) -> int:
        doc = await self._meta.find_one({"_id": "stable"})
        if doc is not None:
            self.stable_hint = max(self.stable_hint, int(doc["n"]))
        return self.stable_hint

    async def _save_hint(self, verified: int) -> None:
        if verified > self.stable_hint:
            self.stable_hint = verified
            await upsert_meta(self._meta, "stable", {"$max": {"n": verified}})

    async def read(self, after: int, limit: int | None) -> tuple[list[StoredEvent], int]:
        """Events with ``after < seq <= watermark`` (at most ``limit``), and the watermark."""
        hint = await self._load_hint()
        position = min(after, hint)
        verified = hint
        out: list[StoredEvent] = []
        done = False
        while not done:
            batch = await (
                self._events.find({"_id": {"$gt": position}}).sort("_id", 1).limit(_BATCH)
            ).to_list()
            rescan = False
            for doc in batch:
                seq = int(doc["_id"])
                if seq > verified + 1:
                    if await self._settle(verified + 1, seq):
                        rescan = True
                    else:
                        done = True
                    break
                verified = max(verified, seq)
                position = seq
                if seq > after and not doc.get("b"):
                    out.append(stored_event(doc))
                    if limit is not None and len(out) >= limit:
                        done = True
                        break
            if not rescan and len(batch) < _BATCH:
                done = True
        await self._save_hint(verified)
        return out, verified

    async def _settle(self, low: int, high: int) -> bool:
        """Resolve the missing numbers ``low..high-1`` once they are old enough."""
        now = time.monotonic()
        missing = range(low, high)
        first_seen = [self._gaps.setdefault(seq, now) for seq in missing]
        if any(now - seen < self._gap_timeout for seen in first_seen):
            return False
        for seq in missing:
            await self._resolve(seq)
            self._gaps.pop(seq, None)
        return True

    async def _resolve(self, seq: int) -> None:
        known = await self._allocator.holders(seq, seq + 1)
        where: dict[str, Any]
        if known and seq in known:
            where = {"_id": known[seq]}  # the one twin that can hold it
        else:
            where = {"ev": {"$regex": f"^{seq_prefix(seq)}\\|"}}
        holder = await self._twins.find_one(where, {"ev": 1})
        if holder is not None:
            for token in holder.get("ev", []):
                if token.startswith(seq_prefix(seq) + "|"):
                    await self.help(holder["_id"], token)
                    return
        await self.fence(seq)

    async def sweep(self, since: int, below: int) -> int:
        """Journal events left pending in twins with ``since <= seq < below`` (crashed writers).

        Costs what is pending, not the number of twins. On MongoDB, journaled events are
        pulled from ``ev`` and its index finds the pending ones. On FerretDB a twin keeps its
        last event in ``ev`` (see MongoStore.write) and any filter but ``_id`` scans the
        collection: matching ``ev`` read every twin with its state, on every replica at every
        round. There the numbers of the window name their twins, and only those of numbers
        not journaled are read, by ``_id``. A number trimmed from ``numbers`` before its sweep
        (over a hundred allocations old) lies below a later number, journaled or to be
        journaled by this sweep: readers then find it missing and resolve it (``_settle``).
        """
        if since >= below:
            return 0
        low, high = seq_prefix(since), seq_prefix(below)
        numbers = await self._allocator.holders(since, below)
        holders: AsyncIterable[dict[str, Any]]
        done: set[int] = set()
        if numbers is None:
            holders = self._twins.find({"ev": {"$lt": high}}, {"ev": 1})
        else:
            window = {"$gte": since, "$lt": below}
            journaled = self._events.find({"o": window}, {"o": 1})
            done = {int(doc["o"]) async for doc in journaled}
            names = sorted({twin for n, twin in numbers.items() if n not in done})
            holders = self._read_each(names)
        found = [
            (holder["_id"], token, int(token.partition("|")[0]))
            async for holder in holders
            for token in holder.get("ev", [])
            if low <= token < high
        ]
        retired = await self._retired([seq for _, _, seq in found if seq not in done])
        helped = 0
        for twin_id, token, seq in found:
            if seq not in done and seq not in retired:
                await self.help(twin_id, token)
                helped += 1
        return helped

    async def _read_each(self, twin_ids: Sequence[str]) -> AsyncIterator[dict[str, Any]]:
        """The pending events of each twin, one lookup by ``_id`` each (see sweep)."""
        for twin_id in twin_ids:
            holder = await self._twins.find_one({"_id": twin_id}, {"ev": 1})
            if holder is not None:
                yield holder

    async def history(
        self, twin_id: str, since: int, until: int | None, limit: int | None = None
    ) -> list[StoredEvent]:
        """Journaled and still pending events of one twin in a revision range, by seq, from
        the id's latest revision 1 on (see ``TwinStore.history``)."""
        pending = await self._pending(twin_id)
        creations = [event.seq for event in pending if event.revision == 1]
        creation = await self._events.find_one({"t": twin_id, "r": 1}, {"o": 1}, sort=[("o", -1)])
        if creation is not None:
            creations.append(int(creation["o"]))
        start = max(creations, default=0)
        revisions: dict[str, int] = {"$gte": since}
        if until is not None:
            revisions["$lte"] = until
        found = self._events.find({"t": twin_id, "r": revisions, "o": {"$gte": start}})
        journaled = await found.sort("o", 1).limit(limit or 0).to_list()
        events = {int(doc["o"]): stored_event(doc) for doc in journaled}
        # The first `limit` of journaled and pending together: any of them is either
        # pending or among the first `limit` journaled (a pending one past those is not).
        past = int(journaled[-1]["o"]) if limit and len(journaled) == limit else None
        wanted = [
            event
            for event in pending
            if since <= event.revision
            and (until is None or event.revision <= until)
            and event.seq >= start
            and (past is None or event.seq < past)
        ]
        await self._add_pending(events, wanted)
        return sorted(events.values(), key=lambda stored: stored.seq)[:limit]

    async def twin_at(self, twin_id: str, revision: int) -> Twin | None:
        """The twin right after ``revision`` (the latest lifetime's), journaled or pending."""
        candidates = [
            event for event in await self.history(twin_id, revision, revision) if event.state
        ]
        return candidates[-1].state if candidates else None

    async def privates_at(self, twin_id: str, revisions: Sequence[int]) -> dict[int, JSONObject]:
        """The twin's private part right after each revision, journaled or pending."""
        wanted = sorted(set(revisions))
        events = await self._events_of(twin_id, {"$in": wanted}, set(wanted).__contains__)
        return latest_lifetime(
            (e.event.revision, None if e.state is None else e.state.private) for e in events
        )

    async def _events_of(
        self, twin_id: str, revisions: dict[str, Any], pending_wanted: Callable[[int], bool]
    ) -> list[StoredEvent]:
        """Journaled and pending events of one twin whose revisions match, by seq
        (``revisions`` as a query, ``pending_wanted`` for the pending ones)."""
        journaled = await self._events.find({"t": twin_id, "r": revisions}).to_list()
        events = {int(doc["o"]): stored_event(doc) for doc in journaled}
        pending = await self._pending(twin_id)
        await self._add_pending(events, [e for e in pending if pending_wanted(e.revision)])
        return sorted(events.values(), key=lambda stored: stored.seq)

    async def _pending(self, twin_id: str) -> list[Pending]:
        """The events found pending in one twin's document (journaled maybe: see _add_pending)."""
        holder = await self._twins.find_one({"_id": twin_id}, {"ev": 1})
        return [Pending.parse(token) for token in (holder or {}).get("ev", [])]

    async def _add_pending(self, events: dict[int, StoredEvent], pending: list[Pending]) -> None:
        """Add to ``events`` (journaled ones, by allocated seq) those of ``pending`` missing
        there but not journaled and pruned since (``_retired``)."""
        missing = [event for event in pending if event.seq not in events]
        retired = await self._retired([event.seq for event in missing])
        events.update((event.seq, event.stored()) for event in missing if event.seq not in retired)

    async def pruned(self) -> int:
        doc = await self._meta.find_one({"_id": "pruned"})
        return int(doc["n"]) if doc else 0

    async def _delete(self, where: dict[str, Any], boundary: dict[str, Any]) -> None:
        """Delete journal entries, first recording as pruned the highest seq removed or
        matching ``boundary`` (entries kept below the mark, never replayed)."""
        highest = await self._events.find_one(
            {"$or": [where, boundary]}, {"_id": 1}, sort=[("_id", -1)]
        )
        if highest is None:
            return
        await upsert_meta(self._meta, "pruned", {"$max": {"n": int(highest["_id"])}})
        await self._events.delete_many({"$and": [where, {"_id": {"$lte": highest["_id"]}}]})

    async def oldest(self) -> int:
        doc = await self._events.find_one({"b": {"$exists": False}}, sort=[("_id", 1)])
        return int(doc["_id"]) if doc else 0

    # -- retention ---------------------------------------------------------------------------

    async def prune_twin(self, twin_id: str, below_revision: int, *, below_seq: int) -> None:
        """Keep the newest revisions of one twin (called by its writer, after its own seq).

        The entry of ``below_revision`` stays, as pruning by age keeps one, but below the
        pruned mark: no reader replays it, and the twin's next change is compared with its
        state (a change stream's ``left``, or a deletion, needs it).

        Entries above the watermark may go too: a reader that meets such a hole before the
        watermark passes it only waits ``gap_timeout`` and fences it, and nothing it has not
        already delivered is lost that retention did not mean to drop.
        """
        older = {"t": twin_id, "_id": {"$lt": below_seq}}
        await self._delete({**older, "r": {"$lt": below_revision}}, {**older, "r": below_revision})

    async def prune(self, cutoff: str) -> None:
        """Prune by age below the watermark, as the SQLite store does: of the events up to
        the newest one older than ``cutoff``, each twin's newest stays unless it is a
        deletion, so a twin's next change is compared with the state it replaces however
        long the twin was idle (a change stream's ``left`` or deletion needs it). Each prune
        reads the events aged since the last, and the older ones of their twins. Fences
        below the watermark go too."""
        stable = await self._load_hint()
        aged = {"ts": {"$lt": cutoff}, "_id": {"$lte": stable}, "b": {"$exists": False}}
        newest = await self._events.find_one(aged, {"_id": 1}, sort=[("_id", -1)])
        done = await self._meta.find_one({"_id": "aged"})
        since = int(done["n"]) if done else 0
        if newest is not None and (latest := int(newest["_id"])) > since:
            window = {"_id": {"$gt": since, "$lte": latest}, "b": {"$exists": False}}
            tops: dict[str, int] = {}
            async for doc in self._events.find(window, {"t": 1}):
                tops[doc["t"]] = max(tops.get(doc["t"], 0), int(doc["_id"]))
            doomed = await self._aged_out(tops, latest)
            # Recorded first: a reader never replays a range with a hole it was not told of.
            await upsert_meta(self._meta, "pruned", {"$max": {"n": latest}})
            for start in range(0, len(doomed), _PRUNE_BATCH):
                chunk = doomed[start : start + _PRUNE_BATCH]
                await self._events.delete_many({"_id": {"$in": chunk}})
            await upsert_meta(self._meta, "aged", {"$max": {"n": latest}})
        await self._events.delete_many({"b": True, "_id": {"$lt": stable}})

    async def _aged_out(self, tops: dict[str, int], latest: int) -> list[int]:
        """The events up to ``latest`` of the twins in ``tops`` (twin id: its newest event
        up to ``latest``) but the newest of each, which goes too if it is a deletion."""
        doomed: list[int] = []
        twins = sorted(tops)
        for start in range(0, len(twins), _PRUNE_BATCH):
            chunk = twins[start : start + _PRUNE_BATCH]
            kept = {tops[twin_id] for twin_id in chunk}
            deletions = self._events.find({"_id": {"$in": sorted(kept)}, "st": None}, {"_id": 1})
            kept -= {int(doc["_id"]) async for doc in deletions}
            found = self._events.find({"t": {"$in": chunk}, "_id": {"$lte": latest}}, {"_id": 1})
            doomed.extend(
                seq for doc in await found.to_list() if (seq := int(doc["_id"])) not in kept
            )
        return doomed
