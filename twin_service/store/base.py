"""The storage protocol every twin store implements (SQLite, MongoDB).

A store persists twins and their change journal. Its one write operation is a
compare-and-set of (new twin, its change event) on the twin's revision, committed atomically,
so concurrent writers in one or many processes never lose an update and every committed
change has exactly one event.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from twin_service.errors import Conflict, Unconfirmed
from twin_service.twin.document import ChangeEvent, Tombstone, Twin
from twin_service.types import JSONObject

if TYPE_CHECKING:
    from search.rql.query import SearchQuery


#: The largest sequence number or revision a store holds (SQLite INTEGER, BSON int64). A
#: client's ``since``, ``until`` or ``at`` above it cannot name one, and would not fit the
#: store's query: the API refuses it (400) before it gets there.
MAX_SEQ = 2**63 - 1


class RevisionConflict(Conflict):
    """The twin's revision moved since it was read; the caller re-reads and retries.

    ``retry_after`` (seconds) is set when the store knows the conflict will not clear at
    once, so that retries wait instead of spending their attempts (see MongoStore._claim).
    """

    default_code = "twin.conflict"
    retry_after = 0.0


@dataclass(frozen=True)
class Write:
    """Replace the twin stored at ``expected_revision`` with ``twin``.

    For a creation (``event.action == "created"``), ``expected_revision`` is the revision
    of the id's :class:`Tombstone` (0: the id was never used, or its tombstone predates
    them), so a creation racing another delete and create of the id is refused like any
    stale write. ``twin is None`` deletes it and leaves a tombstone (its versions come from
    ``previous``, 0 without it). ``event`` is journaled in the same atomic step.
    """

    twin_id: str
    expected_revision: int
    twin: Twin | None
    event: ChangeEvent
    #: The twin this write replaces, when the caller has it (lets a store do less work).
    previous: Twin | None = None


@dataclass(frozen=True)
class StoredEvent:
    """A journaled change event with its global sequence number (increasing across twins)."""

    seq: int
    event: ChangeEvent
    #: The twin right after this change (``None`` for a deletion, or when not requested).
    state: Twin | None = None


@dataclass(frozen=True)
class IndexTask:
    """A twin whose latest committed state an external search index has not taken yet.

    ``seq`` is the global sequence number of the twin's latest write; it only grows, even
    across delete and re-create, so an index can use it as an external version and ignore
    stale updates. ``twin is None`` means the twin was deleted.
    """

    twin_id: str
    seq: int
    twin: Twin | None


def latest_lifetime(rows: Iterable[tuple[int, JSONObject | None]]) -> dict[int, JSONObject]:
    """Revision -> value from journal rows in sequence order: a later row of a revision (a
    twin of the id from before revisions went on across a deletion) replaces an earlier one,
    and a deletion (no value) leaves none."""
    found: dict[int, JSONObject] = {}
    for revision, value in rows:
        if value is None:
            found.pop(revision, None)
        else:
            found[revision] = value
    return found


class TwinStore(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise :class:`twin_service.errors.Unavailable` when the store cannot serve."""

    @property
    def commits_in_order(self) -> bool:
        """Whether a committed ``seq`` means every lower one is committed too (or never
        will be): a commit notice then says how far the journal is complete. SQLite numbers
        writes as it commits them; MongoDB numbers them first, and a lower number may
        commit later."""

    async def get(self, twin_id: str) -> Twin | None: ...

    async def get_many(self, twin_ids: list[str]) -> list[Twin]: ...

    async def tombstone(self, twin_id: str) -> Tombstone | None:
        """What the last deleted twin of this id left, when no twin of it exists now."""

    async def created_from(self, twin_id: str) -> Tombstone | None:
        """What a twin created now under this id goes on from (None: from 0). Its
        :meth:`tombstone`, but never below the floor a restore left (SQLite,
        :mod:`twin_service.store.restore`): the lost database may have had a twin of this id,
        with numbers readers, caches and devices saw."""

    async def write(self, write: Write) -> int:
        """Commit atomically; returns the event's global sequence number.

        Raises :class:`RevisionConflict` when the stored revision is not the expected one.
        """

    async def scan(
        self, after_id: str | None, limit: int, *, containing: str | None = None
    ) -> list[Twin]:
        """Up to ``limit`` twins with an id above ``after_id``, in id order (for rebuilds).

        ``containing`` is a hint: a store may skip twins whose stored JSON text lacks it
        (callers still check each twin returned).
        """

    async def twin_count(self) -> int: ...

    @property
    def searchable(self) -> bool:
        """Whether :meth:`search` and :meth:`count` work: the store keeps its own index (the
        SQLite store does not when ``search`` is ``off`` or ``elasticsearch``)."""

    @property
    def restored(self) -> bool:
        """Whether opening found the database restored from a backup (and raised its
        numbers, :mod:`twin_service.store.restore`): what the lost database left elsewhere
        (deltas on the broker) is then this store's to clear."""

    async def search(self, query: SearchQuery) -> tuple[list[Twin], str | None]:
        """One page of matching twins in order, and the cursor of the next page.

        Raises :class:`twin_service.errors.Unavailable` when the store is not
        :attr:`searchable`."""

    async def count(self, query: SearchQuery) -> int: ...

    async def events_after(
        self, seq: int, limit: int, *, containing: str | None = None
    ) -> list[StoredEvent]:
        """Journaled events with a sequence number above ``seq``, oldest first, with ``state``.

        A reader that has seen sequence number N never later finds a committed event below N
        (stores that allocate numbers before committing must hold back unsettled ones).
        ``containing`` is a hint, as :meth:`scan`'s: a store may skip events whose twin's
        stored JSON text lacks it.
        """

    async def twin_at(self, twin_id: str, revision: int) -> Twin | None:
        """The twin as it was right after ``revision``; ``None`` when the journal lost it."""

    async def privates_at(self, twin_id: str, revisions: Sequence[int]) -> dict[int, JSONObject]:
        """The twin's private part (:attr:`Twin.private`) as it was right after each of
        ``revisions``, in one read, for those the journal still holds (a deletion has none).
        Only that part: most of a stored twin is not needed there, and the device handlers
        read this for every report the broker sends again (see ``DeviceHandlers``)."""

    async def history(
        self, twin_id: str, since: int, until: int | None, limit: int | None = None
    ) -> list[StoredEvent]:
        """The first ``limit`` (all when None) journaled events of one twin with
        since <= revision <= until, oldest first. Revisions of an id go on across deletions,
        but a twin created again in a database from before tombstones started again at 1:
        events from before the id's latest revision 1 are left out."""

    async def pruned_seq(self) -> int:
        """The highest sequence number ever removed from the journal (0: nothing removed).

        A reader resuming after sequence number S gets a complete stream iff S >= this.
        """

    async def oldest_seq(self) -> int:
        """The lowest sequence number still journaled (0 when the journal is empty)."""

    async def last_seq(self) -> int:
        """The highest sequence number up to which the journal is complete (every lower
        event is readable, or was pruned: see :meth:`pruned_seq`); 0 when nothing was
        written. It never goes back, not even when retention removed the newest events:
        readers were handed those numbers, and resume from them."""

    # -- external index outbox: every write since the store last kept it is pending when --
    # -- it is opened with outbox=True (MongoDB queues every write; SQLite fills it then) --

    async def pending_index(self, limit: int) -> list[IndexTask]:
        """Twins whose latest write is not yet acknowledged by the external index."""

    async def mark_indexed(self, tasks: list[IndexTask]) -> None:
        """Forget tasks the index took; a twin written again since stays pending."""

    async def index_backlog(self) -> tuple[int, int | None]:
        """(pending twin count, the first write the index has yet to take, or None) for lag
        metrics and waiting: every write below it is indexed, including those of a twin
        written again since (its latest write alone is pending)."""

    def describe(self) -> dict[str, Any]: ...


def unconfirmed(reason: str, settles_after: float = 0.0) -> Unconfirmed:
    """The 503 of a write whose commit was under way when the store stopped answering: it
    may have been committed. Saying "failed" had clients write the same change again (a
    second revision of it)."""
    return Unconfirmed(
        f"{reason}: it may or may not have been committed. Read the twin before writing "
        "again (If-Match makes a retry safe).",
        settles_after=settles_after,
    )
