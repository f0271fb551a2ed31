"""The twin service: read-modify-write of twins with preconditions, retried on conflicts.

Routes, the WebSocket handler and the MQTT loop all go through here, so every transport
gets the same semantics: limits, compare-and-set on the revision, one change event per
committed write, and notification of listeners after the commit.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twin_service.errors import (
    Conflict,
    NotFound,
    PreconditionFailed,
    TwinServiceError,
    Unavailable,
    Unconfirmed,
)
from twin_service.store.base import RevisionConflict, StoredEvent, TwinStore, Write
from twin_service.turns import Turns
from twin_service.twin.document import (
    ChangeEvent,
    Tombstone,
    Twin,
    apply_change,
    deletion_event,
    now_iso,
    validate_writable,
)
from twin_service.twin.ids import parse_twin_id
from twin_service.twin.jsonvalue import Limits
from twin_service.twin.lifecycle import continue_versions, lifecycle_amend
from twin_service.twin.operations import Edit

if TYPE_CHECKING:
    from search.rql.ast import Filter

log = logging.getLogger(__name__)

#: Attempts of one write under contention before giving up with 409.
MAX_ATTEMPTS = 200
#: Twins kept for the write path's first read (see TwinService._recent).
RECENT_CAPACITY = 10_000

#: A listener is told about every committed change, after the commit, in commit order per twin.
#: It runs in the twin's turn: awaiting a write of the same twin there would wait forever
#: (start a task for that instead).
Listener = Callable[[StoredEvent, Twin | None], Awaitable[None]]
#: Told of a write of the twin (by id) that the store may have committed without confirming
#: it: no listener hears of that change from this process, however it ends. Called on the
#: write path, so it must return at once (start a task for anything more).
DoubtListener = Callable[[str, Unconfirmed], None]


@dataclass(frozen=True)
class Preconditions:
    """HTTP-style preconditions, checked against the twin read inside the CAS loop."""

    if_match: frozenset[int] | None = None
    """The revisions ``If-Match`` accepts (an empty set accepts none)."""
    if_match_any: bool = False
    if_none_match_any: bool = False
    condition: Filter | None = None

    def check(self, current: Twin | None) -> None:
        if self.if_none_match_any and current is not None:
            raise PreconditionFailed(
                f"Twin exists at revision {current.revision} (If-None-Match: *).",
                extra={"revision": current.revision},
            )
        if self.if_match_any and current is None:
            raise PreconditionFailed("Twin does not exist (If-Match: *).")
        if self.if_match is not None and (current is None or current.revision not in self.if_match):
            asked = (
                f"If-Match asked for {', '.join(map(str, sorted(self.if_match)))}"
                if self.if_match
                else 'If-Match names no strong ETag of this service ("rev:N"; a weak W/ tag '
                "never matches, as If-Match compares strongly)"
            )
            if current is None:
                # No revision to report: 0 would name one that no twin ever has.
                raise PreconditionFailed(f"Twin does not exist ({asked}).")
            raise PreconditionFailed(
                f"Twin is at revision {current.revision}, {asked}.",
                extra={"revision": current.revision},
            )
        if self.condition is not None:
            from search.rql.evaluator import matches

            if current is None or not matches(self.condition, current.to_document()):
                raise PreconditionFailed(
                    "The condition does not hold for the current twin.",
                    code="twin.condition.failed",
                )


@dataclass(frozen=True)
class Outcome:
    twin: Twin | None
    previous: Twin | None
    stored: StoredEvent

    @property
    def created(self) -> bool:
        return self.previous is None and self.twin is not None


#: Computes the edit from the current twin; ``None`` means "delete the twin".
EditFn = Callable[[Twin | None], Edit | None]
#: Optional hook that adjusts a computed change (device lifecycle, connection, private).
Amend = Callable[[Twin | None, Edit], dict[str, Any]]


class TwinService:
    def __init__(self, store: TwinStore, limits: Limits, default_namespace: str) -> None:
        self.store = store
        self.limits = limits
        self.default_namespace = default_namespace
        self._listeners: list[Listener] = []
        self._doubt_listeners: list[DoubtListener] = []
        # Latest twins this process committed or read for a write. Only the write path uses
        # it: a stale entry (another process wrote since) loses the compare-and-set, or fails
        # a check, and the write is retried from a fresh read, so it can never cause a wrong
        # result, only save the read in the common case.
        self._recent: OrderedDict[str, Twin] = OrderedDict()
        # Writers of one twin in this process take turns (see Turns).
        self._turns = Turns()
        #: Writes committed, and attempts that lost the compare-and-set to another writer.
        self.committed = 0
        self.retried = 0
        #: Writes the store failed (out of reach, full, not confirmed), and the last such
        #: failure with when it happened (ISO 8601), for /ready: reads and pings can go on
        #: working while no write does (a full disk).
        self.failed = 0
        self.last_failure: tuple[str, str] | None = None

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def add_doubt_listener(self, listener: DoubtListener) -> None:
        self._doubt_listeners.append(listener)

    async def get(self, twin_id: str) -> Twin:
        twin = await self.store.get(twin_id)
        if twin is None:
            raise NotFound(f"Twin {twin_id} does not exist.")
        return twin

    async def mutate(
        self,
        twin_id: str,
        edit: EditFn,
        *,
        origin: str,
        preconditions: Preconditions | None = None,
        may_create: bool = False,
        amend: Amend | None = None,
    ) -> Outcome:
        """Apply ``edit`` to the current twin with compare-and-set, retrying on conflicts."""
        namespace, _ = parse_twin_id(twin_id)
        preconditions = preconditions or Preconditions()
        # Every transport keeps the desired lifecycle (pending/applied/...) up to date.
        amend = amend or lifecycle_amend
        async with self._turn(twin_id) as trust_recent:
            for attempt in range(MAX_ATTEMPTS):
                cached = self._recent.get(twin_id) if attempt == 0 and trust_recent else None
                current = cached if cached is not None else await self.store.get(twin_id)
                # A new twin goes on from what a deleted one of its id left (see Tombstone),
                # or from above what a database lost by a restore handed out.
                tombstone = (
                    await self.store.created_from(twin_id)
                    if current is None and may_create
                    else None
                )
                try:
                    new, event = self._compute(
                        current,
                        tombstone,
                        twin_id,
                        namespace,
                        edit,
                        origin,
                        preconditions,
                        may_create,
                        amend,
                    )
                except TwinServiceError:
                    if cached is None:
                        raise
                    self._forget(twin_id)  # judged on a cached copy: judge again on a fresh one
                    continue
                expected = current.revision if current else tombstone.revision if tombstone else 0
                write = Write(twin_id, expected, new, event, current)
                try:
                    seq = await self.store.write(write)
                except Unavailable as exc:
                    self.failed += 1
                    self.last_failure = (f"{exc.code}: {exc.message}", now_iso())
                    if isinstance(exc, Unconfirmed):
                        self._doubt(twin_id, exc)
                    raise
                except RevisionConflict as conflict:
                    self.retried += 1
                    # Another process committed first: re-read and recompute, with jitter so that
                    # replicas writing one twin drift apart instead of colliding again.
                    self._forget(twin_id)
                    if cached is None or conflict.retry_after:
                        jitter = random.uniform(0, min(0.05, 0.001 * (attempt + 1)))
                        await asyncio.sleep(max(jitter, conflict.retry_after))
                    continue
                self.committed += 1
                self._remember(twin_id, new)
                outcome = Outcome(new, current, StoredEvent(seq, event))
                # Still in the twin's turn: listeners hear of its changes in commit order.
                await self._notify(outcome)
                return outcome
            raise Conflict(
                f"Twin {twin_id} is changing too fast: gave up after {MAX_ATTEMPTS} attempts.",
                code="twin.contention",
            )

    @asynccontextmanager
    async def _turn(self, twin_id: str) -> AsyncIterator[bool]:
        """Hold the twin's turn (see Turns); yields whether the copy in ``_recent`` may be
        trusted for the first attempt."""
        async with self._turns.take(twin_id) as ticket:
            if ticket.failed_ahead:
                # Each would wait out the same failure (a whole server selection on MongoDB)
                # one after another: minutes for a crowd, and shutdown waited for all of it.
                raise Unavailable(
                    f"A write of twin {twin_id} ahead of this one found the store out of reach."
                )
            try:
                # A writer that waited for its turn reads afresh rather than trust the copy its
                # predecessor left. That copy is right unless another process wrote, but with
                # it the writers of this process would always beat those of another process
                # (who must read after losing) to the next revision.
                yield not ticket.waited
            except Unavailable:
                ticket.fail()
                raise

    def _compute(
        self,
        current: Twin | None,
        tombstone: Tombstone | None,
        twin_id: str,
        namespace: str,
        edit: EditFn,
        origin: str,
        preconditions: Preconditions,
        may_create: bool,
        amend: Amend | None,
    ) -> tuple[Twin | None, ChangeEvent]:
        preconditions.check(current)
        if current is None and not may_create:
            raise NotFound(f"Twin {twin_id} does not exist.")
        change = edit(current)
        timestamp = now_iso()
        if change is None:
            if current is None:
                raise NotFound(f"Twin {twin_id} does not exist.")
            return None, deletion_event(current, timestamp=timestamp, origin=origin)
        # Validate before the amend hook, which reads the new sections.
        validate_writable(change.values, self.limits, current)
        extra = amend(current, change) if amend else {}
        if current is None and tombstone is not None and "lifecycle" in extra:
            extra["lifecycle"] = continue_versions(extra["lifecycle"], tombstone.desired_version)
        return apply_change(
            current,
            incarnation=secrets.token_hex(8) if current is None else None,
            tombstone=tombstone,
            twin_id=twin_id,
            namespace=namespace,
            values=change.values,
            written=change.written,
            timestamp=timestamp,
            origin=origin,
            limits=self.limits,
            **extra,
        )

    def _remember(self, twin_id: str, twin: Twin | None) -> None:
        if twin is None:
            self._recent.pop(twin_id, None)
            return
        self._recent[twin_id] = twin
        self._recent.move_to_end(twin_id)
        while len(self._recent) > RECENT_CAPACITY:
            self._recent.popitem(last=False)

    def _forget(self, twin_id: str) -> None:
        self._recent.pop(twin_id, None)

    def _doubt(self, twin_id: str, error: Unconfirmed) -> None:
        for listener in self._doubt_listeners:
            try:
                listener(twin_id, error)
            except Exception:  # the client gets the write's own 503, not a listener's failure
                log.exception("doubt listener failed")

    async def _notify(self, outcome: Outcome) -> None:
        for listener in self._listeners:
            try:
                await listener(outcome.stored, outcome.twin)
            except Exception:  # a broken listener must never fail a committed write
                log.exception("change listener failed")
