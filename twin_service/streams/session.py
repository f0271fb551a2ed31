"""One client's subscriptions (a WebSocket or an SSE stream) and its bounded outbox.

Resume without gap or duplicate: a subscription with ``since`` is registered with the hub
first (live events are held back), then the journal is replayed up to the hub's position at
registration, then the held-back live events are released. A consumer that falls more than
``queue_size`` messages behind is cut off (``overflowed``) and resumes with ``since``.

Each subscription is filed in the hub's shared index (on subscribe; removed on unsubscribe and
close), so the hub offers it only the events it may concern. Messages are queued ready to
send (:class:`Outgoing`), composed from the parts the event's frame encoded once.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from twin_service.auth import Principal
from twin_service.store.base import StoredEvent, TwinStore
from twin_service.streams.hub import EventHub, replay
from twin_service.streams.messages import EventFrame, Outgoing
from twin_service.streams.subscription import Subscription
from twin_service.types import JSONObject


@dataclass(eq=False)
class _Active:
    """One subscription of a session: the hub's receiver for it (hashed by identity)."""

    session: StreamSession
    subscription: Subscription
    replaying: bool = False
    held: list[EventFrame] = field(default_factory=list)

    def receive(self, frame: EventFrame) -> None:
        self.session._receive(self, frame)


class StreamSession:
    def __init__(
        self, hub: EventHub, store: TwinStore, principal: Principal, queue_size: int
    ) -> None:
        self._hub = hub
        self._store = store
        self._principal = principal
        self._queue_size = queue_size
        self._outbox: deque[Outgoing] = deque()
        self._ready = asyncio.Event()
        self._subs: dict[str, _Active] = {}
        self.overflowed = False
        #: Highest sequence number handed to the client, for the resume hint.
        self.delivered_seq = 0
        self._closed = False

    def close(self) -> None:
        self._closed = True
        for active in self._subs.values():
            self._hub.unregister(active)
        self._subs.clear()

    # -- outbox ----------------------------------------------------------------------------

    def send(self, message: JSONObject) -> None:
        """Queue a control message (subscribed, response, error...)."""
        self._push(Outgoing.of(message))

    def _push(self, item: Outgoing) -> None:
        if self.overflowed:
            return
        if len(self._outbox) >= self._queue_size:
            self.overflowed = True
            self._outbox.clear()
        else:
            self._outbox.append(item)
        self._ready.set()

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
        if item.advances_resume and item.seq is not None:
            self.delivered_seq = max(self.delivered_seq, item.seq)
        return item

    # -- subscriptions ---------------------------------------------------------------------

    async def subscribe(self, subscription: Subscription, since: int | None) -> None:
        if subscription.id in self._subs:
            from twin_service.errors import BadRequest

            raise BadRequest(f"Subscription {subscription.id!r} already exists.")
        if self._closed:
            return  # a late message of a closed connection: filing it would leak
        active = _Active(self, subscription, replaying=since is not None)
        self._subs[subscription.id] = active
        position = self._hub.register(active, subscription)
        if since is not None:
            pruned = await self._store.pruned_seq()
            if since < pruned:
                self.send(
                    {
                        "type": "resync.required",
                        "subscription": subscription.id,
                        "seq": position,
                        "message": (
                            f"The journal no longer holds every event after {since} (events "
                            f"up to {pruned} were removed): reload the twins; this "
                            f"subscription goes on live after seq {position}."
                        ),
                    }
                )
                self._release(active, position)
                return
        self.send({"type": "subscribed", "subscription": subscription.id, "seq": position})
        if since is None or since >= position:
            active.replaying = False
            return

        def emit_replayed(
            stored: StoredEvent, before: JSONObject | None, after: JSONObject | None
        ) -> None:
            self._deliver(active.subscription, EventFrame(stored, before, after))

        try:
            await replay(self._store, since, position, emit_replayed)
        finally:
            self._release(active, position)

    def _release(self, active: _Active, position: int) -> None:
        """Go live: deliver the events held back while replaying, after ``position``."""
        held, active.held = active.held, []
        active.replaying = False
        for frame in held:
            if frame.stored.seq > position:
                self._deliver(active.subscription, frame)

    def unsubscribe(self, subscription_id: str) -> bool:
        active = self._subs.pop(subscription_id, None)
        if active is None:
            return False
        self._hub.unregister(active)
        return True

    def _receive(self, active: _Active, frame: EventFrame) -> None:
        if self.overflowed:
            return  # the writer is closing this session; spare the work
        if active.replaying:
            if len(active.held) >= self._queue_size:
                self.overflowed = True
                self._ready.set()
                return
            active.held.append(frame)
        else:
            self._deliver(active.subscription, frame)

    def _deliver(self, subscription: Subscription, frame: EventFrame) -> None:
        event = frame.stored.event
        if not self._principal.may_see(event.twin_id.partition(":")[0]):
            return
        outcome = subscription.classify(event, frame.before, frame.after)
        if outcome is None:
            return
        self._push(frame.message(outcome, subscription))
