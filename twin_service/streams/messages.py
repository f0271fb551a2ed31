"""Stream messages encoded once and shared by every subscriber of an event. Pure, no I/O.

A change delivered to N subscriptions used to be JSON-encoded N times. An :class:`EventFrame`
encodes the ``event`` object once and the twin view once per distinct ``fields``
selection; each subscriber's message is then composed from those parts. The composed text
is byte for byte what ``dumps(message)`` gives for the message object (same keys, same
order, same compact separators).
"""

from __future__ import annotations

from dataclasses import dataclass

from twin_service.store.base import StoredEvent
from twin_service.streams.subscription import FieldsKey, Outcome, Subscription
from twin_service.twin.jsonvalue import dumps
from twin_service.types import JSONObject


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message ready to send: its JSON text, plus its type and seq for SSE and resume."""

    kind: str
    text: str
    seq: int | None = None

    @classmethod
    def of(cls, message: JSONObject) -> Outgoing:
        """Encode a message object (control messages: subscribed, response, error...)."""
        seq = message.get("seq")
        return cls(
            kind=str(message.get("type")),
            text=dumps(message),
            seq=seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
        )

    @property
    def advances_resume(self) -> bool:
        """Whether handing this message out moves the ``since`` a client resumes from."""
        return self.seq is not None and self.kind in ("event", "left")


class EventFrame:
    """One journaled change with the documents around it and its shared encodings."""

    __slots__ = ("_event_text", "_views", "after", "before", "stored")

    def __init__(
        self, stored: StoredEvent, before: JSONObject | None, after: JSONObject | None
    ) -> None:
        self.stored = stored
        self.before = before
        self.after = after
        self._event_text: str | None = None
        self._views: dict[FieldsKey, str] = {}

    @property
    def event_text(self) -> str:
        if self._event_text is None:
            self._event_text = dumps(self.stored.event.to_json())
        return self._event_text

    def view_text(self, subscription: Subscription) -> str:
        """The encoded twin view for ``subscription.fields`` (``null`` after a deletion)."""
        key = subscription.fields_key
        text = self._views.get(key)
        if text is None:
            view = subscription.view(self.after)
            text = self._views[key] = dumps(view)
        return text

    def message(self, outcome: Outcome, subscription: Subscription) -> Outgoing:
        """The message of ``outcome`` for ``subscription``: same shape as ever.

        ``{"type", "subscription", "seq", "event"}`` plus ``"twin"`` for ``event``.
        """
        assert outcome is not None
        seq = self.stored.seq
        head = f'{{"type":"{outcome}","subscription":{subscription.id_json},"seq":{seq}'
        if outcome == "event":
            text = f'{head},"event":{self.event_text},"twin":{self.view_text(subscription)}}}'
        else:
            text = f'{head},"event":{self.event_text}}}'
        return Outgoing(kind=outcome, text=text, seq=seq)
