"""Stream messages encoded once and shared by every subscriber of an event. Pure, no I/O.

A change delivered to N subscriptions used to be JSON-encoded N times. An :class:`EventFrame`
encodes everything after the subscription id once per outcome and distinct ``fields``
selection, and classifies the change once per distinct scope (filter, namespaces, twins);
each subscriber's message is then one concatenation. The composed text is byte for byte
what ``dumps(message)`` gives for the message object (same keys, same order, same compact
separators).
"""

from __future__ import annotations

from typing import NamedTuple

from twin_service.store.base import StoredEvent
from twin_service.streams.subscription import FieldsKey, Outcome, Subscription
from twin_service.twin.jsonvalue import dumps
from twin_service.types import JSONObject

_HEADS = {
    "event": '{"type":"event","subscription":',
    "left": '{"type":"left","subscription":',
}


class Outgoing(NamedTuple):
    """A message ready to send: its JSON text, plus its type and seq for SSE and resume.

    A named tuple rather than a frozen dataclass: one is made per delivered event.
    """

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

    __slots__ = (
        "_event_text", "_outcomes", "_tails", "_views", "after", "before", "namespace", "stored",
    )  # fmt: skip

    def __init__(
        self, stored: StoredEvent, before: JSONObject | None, after: JSONObject | None
    ) -> None:
        self.stored = stored
        self.namespace = stored.event.twin_id.partition(":")[0]
        self.before = before
        self.after = after
        self._event_text: str | None = None
        self._views: dict[FieldsKey, str] = {}
        self._tails: dict[tuple[str, FieldsKey], str] = {}
        self._outcomes: dict[str, Outcome] = {}

    def outcome(self, subscription: Subscription) -> Outcome:
        """``subscription.classify`` of this change, computed once per distinct scope."""
        key = subscription.scope_key
        try:
            return self._outcomes[key]
        except KeyError:
            pass
        event = self.stored.event
        outcome = self._outcomes[key] = subscription.classify(event, self.before, self.after)
        return outcome

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
        key = (outcome, subscription.fields_key if outcome == "event" else None)
        tail = self._tails.get(key)
        if tail is None:
            if outcome == "event":
                twin = self.view_text(subscription)
                tail = f',"seq":{seq},"event":{self.event_text},"twin":{twin}}}'
            else:
                tail = f',"seq":{seq},"event":{self.event_text}}}'
            self._tails[key] = tail
        return Outgoing(outcome, _HEADS[outcome] + subscription.id_json + tail, seq)
