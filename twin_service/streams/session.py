"""One client's subscriptions (a WebSocket or an SSE stream) and its bounded outbox.

Resume without gap or duplicate: a subscription with ``since`` is registered with the hub
first (live events are held back), then the journal is replayed up to the hub's position at
registration, then the held-back live events are released. A consumer that falls more than
``queue_size`` messages behind is cut off (``overflowed``) and resumes with ``since``; so is
one whose replay retention overtook (the journal no longer holds what it had yet to replay).

The session acts for its :class:`Credential`, which follows reloads of the tokens: each event
is checked against the token's namespaces now, and a token revoked cuts the reader off as an
overflow does, :attr:`StreamSession.revoked` telling its writer to close the stream instead
of giving a resume point.

Each subscription is filed in the hub's shared index (on subscribe; removed on unsubscribe and
close), so the hub offers it only the events it may concern. Messages are queued ready to
send (:class:`Outgoing`), composed from the parts the event's frame encoded once.

Live events are not sent one by one: the hub queues them and calls :meth:`StreamSession.flush`
once per session when it pauses (every couple of milliseconds of fan-out work). With an
:class:`Output` attached (a WebSocket's direct writer) that is ready, flush hands every queued
message to it at once; otherwise it wakes the connection's writer task, which uses
:meth:`wait` and :meth:`next`, or :meth:`flush` again once the output is writable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from twin_service.auth import Credential
from twin_service.errors import BadRequest, LimitExceeded, Unavailable
from twin_service.store.base import StoredEvent, TwinStore
from twin_service.streams.hub import JOURNAL_BATCH, EventHub, ReplayOverrun, replay
from twin_service.streams.messages import EventFrame, Outgoing
from twin_service.streams.subscription import Subscription
from twin_service.types import JSONObject

log = logging.getLogger(__name__)

#: How often a replay waiting for its reader to make room looks again.
_ROOM_POLL_SECONDS = 0.005


class _ReaderGone(Exception):
    """The reader of a replay closed its connection or was cut off: no one to replay to."""


#: A replay the store interrupted is tried again this long after, doubling up to the next.
_REPLAY_RETRY_SECONDS = 0.5
_REPLAY_RETRY_MAX_SECONDS = 5.0


class Output(Protocol):
    """Where a session's messages go when it can take them without waiting."""

    @property
    def ready(self) -> bool:
        """Whether :meth:`write_texts` may be called now (open, not paused)."""
        ...

    def write_texts(self, texts: Sequence[str]) -> None: ...


@dataclass(eq=False)
class _Active:
    """One subscription of a session: the hub's receiver for it (hashed by identity)."""

    session: StreamSession
    subscription: Subscription
    replaying: bool = False
    held: list[EventFrame] = field(default_factory=list)
    #: Events up to this one the reader had before it subscribed (see ``subscribe``).
    had_through: int = 0
    #: Every event of this subscription up to here was handed to the reader (so far as the
    #: marks below were settled; see :meth:`StreamSession.resume_hint`).
    through: int = 0
    #: (messages queued, seq) while replaying: once the reader was handed that many
    #: messages, it had every replayed event of this subscription up to seq.
    marks: deque[tuple[int, int]] = field(default_factory=deque)
    #: Messages queued when it went live; once that many were handed, the connection's
    #: highest event handed over counts for it too. ``None`` while replaying.
    live_from: int | None = None

    def receive(self, frame: EventFrame) -> None:
        session = self.session
        if session.overflowed:
            return  # the writer is closing this session; spare the work
        if frame.stored.seq <= self.had_through:
            return
        if self.replaying:
            session._hold(self, frame)
        elif session._deliver(self.subscription, frame):
            session._hub.defer(session)


class StreamSession:
    def __init__(
        self,
        hub: EventHub,
        store: TwinStore,
        credential: Credential,
        queue_size: int,
        max_subscriptions: int = 1,
        max_listed: int = 10_000,
        queue_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        hub.admit()  # first: a reader refused holds nothing
        self._hub = hub
        self._store = store
        self._credential = credential
        self._queue_size = queue_size
        self._queue_bytes = queue_bytes
        #: Characters of the messages queued (the JSON is ASCII but for non-ASCII text).
        self._outbox_bytes = 0
        #: What all readers of the process hold (the hub serves them all).
        self._budget = hub.queued
        self._max_subscriptions = max_subscriptions
        self._max_listed = max_listed
        self._outbox: deque[Outgoing] = deque()
        self._ready = asyncio.Event()
        self._subs: dict[str, _Active] = {}
        #: Per subscription id, set once the last subscribe or unsubscribe of it to arrive
        #: has taken effect (see :meth:`_turn`).
        self._turns: dict[str, asyncio.Event] = {}
        self.overflowed = False
        #: Set by :meth:`stop`: the service is stopping.
        self.stopping = False
        #: Highest sequence number handed to the client (see :meth:`resume_hint`).
        self.delivered_seq = 0
        #: Messages queued and handed over since the start, to settle replay marks.
        self._queued = 0
        self._handed = 0
        self._closed = False
        self._output: Output | None = None
        credential.on_revoked(self._cut_off)

    @property
    def revoked(self) -> bool:
        """Whether the reader was cut off because a reload revoked its token."""
        return self._credential.revoked

    def attach(self, output: Output) -> None:
        """Let :meth:`flush` write straight to ``output`` when it is ready."""
        self._output = output

    def close(self) -> None:
        if not self._closed:
            self._hub.release()
        self._closed = True
        self._credential.release()
        self._count(-self._outbox_bytes)
        self._outbox.clear()
        for active in self._subs.values():
            self._hub.unregister(active)
        self._subs.clear()

    # -- outbox ----------------------------------------------------------------------------

    def send(self, message: JSONObject) -> None:
        """Queue a control message (subscribed, response, error...)."""
        self._push(Outgoing.of(message))
        self._ready.set()

    def _push(self, item: Outgoing) -> bool:
        """Queue ``item``; the caller wakes the writer (or defers to a flush)."""
        if self.overflowed or self._closed:
            return False  # counted in the process's bound, it would never be let go
        size = len(item.text)
        if len(self._outbox) >= self._queue_size or (
            # Counted alone, a thousand messages of a 64 KiB twin (and its changes) held
            # 130 MB per reader that did not read: a few such readers, and the service ran
            # out of memory. A message always fits an empty queue.
            self._outbox
            and (
                self._outbox_bytes + size > self._queue_bytes
                # Of all readers, those behind are cut when the process's bound is reached.
                or self._budget.used + size > self._budget.limit
            )
        ):
            self._cut_off()
            return False
        self._outbox.append(item)
        self._count(size)
        self._queued += 1
        return True

    def _count(self, size: int) -> None:
        """Count ``size`` more (or fewer, when negative) bytes queued, here and process-wide."""
        self._outbox_bytes += size
        self._budget.used += size

    def _cut_off(self) -> None:
        """End the reader's stream: its writer sends where to resume (:meth:`resume_hint`),
        or that the token was revoked, and closes; nothing queued is sent any more."""
        self.overflowed = True
        self._outbox.clear()
        self._count(-self._outbox_bytes)
        # Filed no longer: the hub offered every event to a reader that did not read until
        # it went (an SSE writer waits for room in the socket to send the overflow).
        # Their marks stay, for the resume hint.
        for active in self._subs.values():
            self._hub.unregister(active)
        self._ready.set()

    def stop(self) -> None:
        """The service is stopping: :meth:`wait` returns from now on, for the writer to
        send what is queued and where to resume (:meth:`resume_hint`), and end the stream."""
        self.stopping = True
        self._ready.set()

    def flush(self) -> None:
        """Write every queued message to the attached output if it is ready, else wake the
        writer task."""
        if not self._outbox:
            if self.overflowed:
                self._ready.set()
            return
        output = self._output
        if output is None or self.overflowed or not output.ready:
            self._ready.set()
            return
        output.write_texts([item.text for item in self.take_all()])

    def take_all(self) -> deque[Outgoing]:
        """Hand over every queued message at once (a reader that writes them together)."""
        items, self._outbox = self._outbox, deque()
        self._count(-self._outbox_bytes)
        self._handed += len(items)
        for item in reversed(items):
            if item.advances_resume and item.seq is not None:
                self.delivered_seq = max(self.delivered_seq, item.seq)
                break
        return items

    async def wait(self) -> bool:
        """Wait until a message is queued or the service is stopping (:meth:`stop`): ``True``,
        or ``False`` once the consumer overflowed."""
        while not self._outbox and not self.stopping:
            if self.overflowed:
                return False
            self._ready.clear()
            await self._ready.wait()
        return not self.overflowed

    async def next(self) -> Outgoing | None:
        """The next message to send; ``None`` once the consumer overflowed."""
        while not self._outbox:
            if self.overflowed:
                return None
            self._ready.clear()
            await self._ready.wait()
        if self.overflowed:
            return None
        item = self._outbox.popleft()
        self._count(-len(item.text))
        self._handed += 1
        if item.advances_resume and item.seq is not None:
            self.delivered_seq = max(self.delivered_seq, item.seq)
        return item

    # -- subscriptions ---------------------------------------------------------------------

    async def subscribe(self, subscription: Subscription, since: int | None) -> None:
        """File ``subscription`` and queue its answer, then replay the journal from
        ``since`` (if given) until it goes live."""
        async with self._turn(subscription.id):
            replay_from = await self._answer_subscribe(subscription, since)
        if replay_from is not None:
            await self._replay(*replay_from)

    async def _answer_subscribe(
        self, subscription: Subscription, since: int | None
    ) -> tuple[_Active, int, int] | None:
        """Refuse ``subscription``, or file it and queue its ``subscribed`` (or
        ``resync.required``): the subscription, ``since`` and the hub's position when a
        replay from ``since`` to that position follows."""
        if subscription.id in self._subs:
            raise BadRequest(f"Subscription {subscription.id!r} already exists.")
        if len(self._subs) >= self._max_subscriptions:
            # Every event is classified once per distinct subscription scope: one connection
            # with unbounded subscriptions would slow every other reader's events.
            raise LimitExceeded(
                f"This connection has {len(self._subs)} subscriptions, the most "
                "stream.max_subscriptions allows: unsubscribe one, or widen one's filter.",
            )
        listed = sum(active.subscription.listed for active in self._subs.values())
        if listed + subscription.listed > self._max_listed:
            # Each id listed is held by the connection and filed in the shared index: 25,000
            # ids in one message (under 1 MiB) took 7 MB, and a connection may hold
            # stream.max_subscriptions such subscriptions. The values of a filter's in
            # lists too: 20 subscriptions of an in of 65,536 values took 600 MB.
            raise LimitExceeded(
                f"This subscription lists {subscription.listed} twins, namespaces and in "
                f"values, and the connection's others {listed}: stream.max_listed allows "
                f"{self._max_listed} in all. Subscribe by namespace or a wider filter instead.",
            )
        if self._closed or self.overflowed:
            return None  # a late message of a closed or cut-off connection: filing it would leak
        active = _Active(self, subscription, replaying=since is not None)
        self._subs[subscription.id] = active
        position = self._hub.register(active, subscription)
        active.through = position if since is None else since
        if since is not None:
            try:
                gap = await self._journal_gap(since, position)
            except BaseException:
                # The store did not answer: the error is the subscribe's answer, and the
                # subscription must not stay filed. Left, it held its events for good, and
                # the client could not subscribe again under its id.
                self._drop(active)
                raise
            if not self._reading(active):
                return None  # the connection closed, or its reader was cut off, meanwhile
            if gap is not None:
                active.through = position
                self.send(
                    {
                        "type": "resync.required",
                        "subscription": subscription.id,
                        "seq": position,
                        "message": f"{gap}: reload the twins; this subscription goes on live "
                        f"after seq {position}.",
                    }
                )
                self._release(active, position)
                return None
        self.send({"type": "subscribed", "subscription": subscription.id, "seq": position})
        if since is None or since >= position:
            # Resuming ahead of this hub: another replica's commits the reader has seen
            # and this hub has not yet. They reach it later, as live events: not again.
            # Events held while the journal was consulted above go out if they are new.
            active.had_through = since or 0
            self._release(active, max(position, since or 0))
            return None
        return active, since, position

    async def _replay(self, active: _Active, since: int, position: int) -> None:
        """Queue the journal's events of ``active`` after ``since`` up to ``position``, then
        the live events held back meanwhile."""
        replayed = since

        def emit_replayed(
            stored: StoredEvent, before: JSONObject | None, after: JSONObject | None
        ) -> None:
            nonlocal replayed
            self._check_reader(active)  # unsubscribed while a batch was being read
            self._deliver(active.subscription, EventFrame(stored, before, after))
            replayed = stored.seq
            self._mark(active, stored.seq)
            self._ready.set()

        # "subscribed" is out, so this subscribe has had its answer: a replay the store
        # interrupts goes on from where it stopped once the store answers. Released with a
        # gap instead, the subscription went live without the events it had not replayed.
        # Meanwhile live events are held; past stream.queue_size, the connection is closed
        # as a slow consumer's, told where to resume.
        delay = _REPLAY_RETRY_SECONDS
        while True:
            try:
                await replay(
                    self._store,
                    replayed,
                    position,
                    emit_replayed,
                    batch=max(1, min(JOURNAL_BATCH, self._queue_size // 4)),
                    room=lambda: self._room(active),
                )
                break
            except _ReaderGone:
                return
            except ReplayOverrun:
                # Retention overtook a slow reader: its stream ends as a slow consumer's, and
                # resuming from what it was handed, it is told to resync (since < pruned).
                self._cut_off()
                return
            except Unavailable:
                if not self._reading(active):
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, _REPLAY_RETRY_MAX_SECONDS)
            except BaseException:
                self._drop(active)  # never live with a gap
                raise
        self._release(active, position)

    async def _room(self, active: _Active) -> None:
        """Wait until the replay of ``active`` may queue one more message. A replay, which
        the service paces, waits for its reader; live events do not wait, and cut off a
        reader that falls ``queue_size`` messages or ``queue_bytes`` behind. Queued whole
        instead, a replay longer than the queue cut off every reader that resumed from that
        far back. Polled: a replay is a bulk read, and its reader empties the queue
        meanwhile.

        A replay fills at most half the queue, in messages and in bytes: the rest is for
        the live events of the connection's other subscriptions and for replies. Filled
        whole, the next of those cut off a reader that only the replay had put behind.
        Replays wait as well while the process's readers hold three quarters of
        ``stream.total_queue_bytes`` (one message at a time still goes to a reader that
        keeps up), so that live events, not a replay, reach the bound."""
        while self._outbox and (
            len(self._outbox) >= self._queue_size // 2
            or self._outbox_bytes >= self._queue_bytes // 2
            or self._budget.tight()
        ):
            self._check_reader(active)
            await asyncio.sleep(_ROOM_POLL_SECONDS)
        self._check_reader(active)
        self._settled(active)  # its marks stay as few as the messages queued

    def _reading(self, active: _Active) -> bool:
        """Whether anyone still wants the replay of ``active``: the connection is open, its
        reader was not cut off, and the subscription was not unsubscribed meanwhile."""
        return (
            not (self._closed or self.overflowed)
            and self._subs.get(active.subscription.id) is active
        )

    def _check_reader(self, active: _Active) -> None:
        """End a replay no one wants any more. Unchecked, a replay went on after its
        subscription's ``unsubscribed`` reply: events the client had said it no longer
        wanted, and a replay waiting for room waited until the connection closed."""
        if not self._reading(active):
            raise _ReaderGone

    async def _journal_gap(self, since: int, position: int) -> str | None:
        """Why the journal cannot bring a reader at ``since`` up to date, if it cannot."""
        pruned = await self._store.pruned_seq()
        if since < pruned:
            return (
                f"The journal no longer holds every event after {since} (events up to "
                f"{pruned} were removed)"
            )
        # Ahead of this hub is normal for a moment (another replica's commit not seen
        # yet); ahead of the store is a sequence number of another journal: the database
        # was restored from a backup or replaced, and the reader holds changes it lacks.
        if since > position and since > (head := await self._store.last_seq()):
            return (
                f"Sequence number {since} is beyond the newest event of this journal "
                f"({head}): it comes from another journal (a restored or replaced database)"
            )
        return None

    def _mark(self, active: _Active, seq: int) -> None:
        """Note that ``active`` is through ``seq`` once every message queued so far is
        handed over (one mark per message queued: a replay's marks stay few)."""
        marks = active.marks
        if marks and marks[-1][0] == self._queued:
            marks[-1] = (self._queued, seq)
        else:
            marks.append((self._queued, seq))

    def _settled(self, active: _Active) -> int:
        """How far ``active`` is through: its marks the reader was handed, and once it is
        live, the highest event handed over (live messages are queued in journal order, so
        the reader had every earlier one of each live subscription)."""
        marks = active.marks
        while marks and marks[0][0] <= self._handed:
            active.through = max(active.through, marks.popleft()[1])
        if active.live_from is not None and self._handed >= active.live_from:
            active.through = max(active.through, self.delivered_seq)
        return active.through

    def resume_hint(self) -> int:
        """The ``since`` from which every subscription of this connection resumes without
        a gap: the lowest point any of them is through. It was the highest event handed
        over, whichever subscription's: a reader cut off while one subscription replayed
        far behind another, live one was told to resume past the events the replay had
        not handed over yet. (Subscriptions further along get some events again.)"""
        return min(map(self._settled, self._subs.values()), default=self.delivered_seq)

    async def subscribe_in_background(
        self, subscription: Subscription, since: int | None
    ) -> asyncio.Task[None]:
        """:meth:`subscribe`, returning once its answer (``subscribed``, or
        ``resync.required``) is queued, or raising what it raised before that (the store
        out of reach: a 503). The replay goes on in the returned task while the caller
        reads the queue; a replay that fails after the answer ends the stream as an
        overflow does, so the reader resumes from what it was handed.

        For a reader that can only start reading once this returns (server-sent events:
        the status is sent first). Awaiting :meth:`subscribe` whole there queued the whole
        replay before the response started, and a replay longer than ``queue_size``
        overflowed at once, at every resume: such a reader could never catch up.
        """
        task = asyncio.create_task(self.subscribe(subscription, since), name="subscribe")
        answered = asyncio.create_task(self.wait(), name="subscribe-answered")
        try:
            await asyncio.wait({task, answered}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        finally:
            answered.cancel()
        if task.done():
            task.result()
        else:
            task.add_done_callback(self._replay_ended)
        return task

    def _replay_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        log.error("a replay failed; the stream ends", exc_info=task.exception())
        self._cut_off()

    def _release(self, active: _Active, position: int) -> None:
        """Go live: deliver the events held back while replaying, after ``position``."""
        held, active.held = active.held, []
        active.replaying = False
        for frame in held:
            if frame.stored.seq > position:
                self._deliver(active.subscription, frame)
        self._mark(active, position)
        active.live_from = self._queued
        self._ready.set()

    def _drop(self, active: _Active) -> None:
        """Unsubscribe ``active``, and not a later subscription that took its id after it
        was unsubscribed."""
        if self._subs.get(active.subscription.id) is active:
            self.unsubscribe(active.subscription.id)

    async def unsubscribe_answered(self, subscription_id: str) -> bool:
        """:meth:`unsubscribe` once the subscribes of ``subscription_id`` received before
        have their answers (see :meth:`_turn`)."""
        async with self._turn(subscription_id):
            return self.unsubscribe(subscription_id)

    @contextlib.asynccontextmanager
    async def _turn(self, subscription_id: str) -> AsyncIterator[None]:
        """Wait until the subscribes and unsubscribes of ``subscription_id`` that came
        before have taken effect (a subscribe once it is answered), and hold the later ones
        until this one has.

        A WebSocket handles each message in a task of its own, and a subscribe with
        ``since`` consults the journal before its answer. An ``unsubscribe`` right behind
        it, handled meanwhile, left that subscribe no answer at all (every message gets
        one), or an answer after ``unsubscribed`` (nothing of a subscription may follow
        that); and a ``subscribe`` of the same id behind that one (a resume retried) found
        the id still taken and was refused, and the unsubscribe then left the connection
        with no subscription. The turn is taken before the first await: the tasks of one
        connection start in the order its messages were received (the event loop runs
        them first in, first out)."""
        ahead = self._turns.get(subscription_id)
        mine = self._turns[subscription_id] = asyncio.Event()
        try:
            if ahead is not None:
                await ahead.wait()
            yield
        finally:
            mine.set()
            if self._turns.get(subscription_id) is mine:
                del self._turns[subscription_id]

    def unsubscribe(self, subscription_id: str) -> bool:
        active = self._subs.pop(subscription_id, None)
        if active is None:
            return False
        self._hub.unregister(active)
        return True

    def _hold(self, active: _Active, frame: EventFrame) -> None:
        """Keep a live event of a subscription that is still replaying."""
        if len(active.held) >= self._queue_size:
            self._cut_off()
            return
        active.held.append(frame)

    def _deliver(self, subscription: Subscription, frame: EventFrame) -> bool:
        """Queue the message of ``frame`` for ``subscription``, if any: whether one was."""
        if not self._credential.principal.may_see(frame.namespace):
            return False
        outcome = frame.outcome(subscription)
        if outcome is None:
            return False
        return self._push(frame.message(outcome, subscription))
