"""One client's subscriptions (a WebSocket or an SSE stream) and its bounded outbox.

Resume without gap or duplicate: a subscription with ``since`` is registered with the hub
first (live events are held back), then the journal is replayed up to the hub's position at
registration, then the held-back live events are released. A consumer that falls more than
``queue_size`` messages behind is cut off (``overflowed``) and resumes with ``since``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from twin_service.auth import Principal
from twin_service.store.base import StoredEvent, TwinStore
from twin_service.streams.hub import EventHub, replay
from twin_service.streams.subscription import Subscription
from twin_service.types import JSONObject

Item = tuple[StoredEvent, JSONObject | None, JSONObject | None]


@dataclass
class _Active:
    subscription: Subscription
    replaying: bool = False
    held: list[Item] = field(default_factory=list)


class StreamSession:
    def __init__(
        self, hub: EventHub, store: TwinStore, principal: Principal, queue_size: int
    ) -> None:
        self._hub = hub
        self._store = store
        self._principal = principal
        self._queue_size = queue_size
        self._outbox: deque[JSONObject] = deque()
        self._ready = asyncio.Event()
        self._subs: dict[str, _Active] = {}
        self.overflowed = False
        #: Highest sequence number handed to the client, for the resume hint.
        self.delivered_seq = 0
        hub.add(self._on_event)

    def close(self) -> None:
        self._hub.remove(self._on_event)
        self._subs.clear()

    # -- outbox ----------------------------------------------------------------------------

    def send(self, message: JSONObject) -> None:
        if self.overflowed:
            return
        if len(self._outbox) >= self._queue_size:
            self.overflowed = True
            self._outbox.clear()
        else:
            self._outbox.append(message)
        self._ready.set()

    async def next(self) -> JSONObject | None:
        """The next message to send; ``None`` once the consumer overflowed."""
        while not self._outbox:
            if self.overflowed:
                return None
            self._ready.clear()
            await self._ready.wait()
        if self.overflowed:
            return None
        message = self._outbox.popleft()
        seq = message.get("seq")
        if isinstance(seq, int) and message.get("type") in ("event", "left"):
            self.delivered_seq = max(self.delivered_seq, seq)
        return message

    # -- subscriptions ---------------------------------------------------------------------

    async def subscribe(self, subscription: Subscription, since: int | None) -> None:
        if subscription.id in self._subs:
            from twin_service.errors import BadRequest

            raise BadRequest(f"Subscription {subscription.id!r} already exists.")
        active = _Active(subscription, replaying=since is not None)
        self._subs[subscription.id] = active
        position = self._hub.position
        if since is not None:
            pruned = await self._store.pruned_seq()
            if since < pruned:
                active.replaying = False
                active.held.clear()
                self.send(
                    {
                        "type": "resync.required",
                        "subscription": subscription.id,
                        "seq": position,
                        "message": (
                            f"The journal no longer holds every event after {since} (events "
                            f"up to {pruned} were removed): reload the twins, then subscribe "
                            f"with since={position}."
                        ),
                    }
                )
                return
        self.send({"type": "subscribed", "subscription": subscription.id, "seq": position})
        if since is None or since >= position:
            active.replaying = False
            return

        def emit_replayed(
            stored: StoredEvent, before: JSONObject | None, after: JSONObject | None
        ) -> None:
            self._deliver(active.subscription, stored, before, after)

        try:
            await replay(self._store, since, position, emit_replayed)
        finally:
            held, active.held = active.held, []
            active.replaying = False
            for stored, before, after in held:
                if stored.seq > position:
                    self._deliver(active.subscription, stored, before, after)

    def unsubscribe(self, subscription_id: str) -> bool:
        return self._subs.pop(subscription_id, None) is not None

    def _on_event(
        self, stored: StoredEvent, before: JSONObject | None, after: JSONObject | None
    ) -> None:
        for active in list(self._subs.values()):
            if active.replaying:
                if len(active.held) >= self._queue_size:
                    self.overflowed = True
                    self._ready.set()
                    return
                active.held.append((stored, before, after))
            else:
                self._deliver(active.subscription, stored, before, after)

    def _deliver(
        self,
        subscription: Subscription,
        stored: StoredEvent,
        before: JSONObject | None,
        after: JSONObject | None,
    ) -> None:
        event = stored.event
        if not self._principal.may_see(event.twin_id.partition(":")[0]):
            return
        outcome = subscription.classify(event, before, after)
        if outcome is None:
            return
        message: JSONObject = {
            "type": outcome,
            "subscription": subscription.id,
            "seq": stored.seq,
            "event": event.to_json(),
        }
        if outcome == "event":
            message["twin"] = subscription.view(after)
        self.send(message)
