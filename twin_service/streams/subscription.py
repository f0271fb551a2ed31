"""What a subscription sees of a change: pure decisions, no I/O.

A subscription is told about a change when the twin matches its filter after the change
(``event``), or when it matched before and no longer does (``left``, or the deletion event
itself), so a client-side view of "twins matching F" stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

from search.rql.ast import And, Filter, In, Not, Or
from search.rql.evaluator import matches
from twin_service.errors import BadRequest
from twin_service.twin.document import ChangeEvent
from twin_service.twin.fields import select
from twin_service.twin.jsonvalue import dumps
from twin_service.types import JSONObject

Outcome = Literal["event", "left"] | None
#: A ``fields`` selection as a dictionary key (``None``: the whole document).
FieldsKey = tuple[tuple[str, ...], ...] | None


def _in_values(node: Filter | None) -> int:
    """How many values the ``in`` lists of ``node`` hold in all."""
    if isinstance(node, In):
        return len(node.values)
    if isinstance(node, And | Or):
        return sum(_in_values(op) for op in node.operands)
    if isinstance(node, Not):
        return _in_values(node.operand)
    return 0


@dataclass(frozen=True)
class Subscription:
    id: str
    filter: Filter | None = None
    namespaces: frozenset[str] | None = None
    twins: frozenset[str] | None = None
    fields: list[list[str]] | None = None

    @cached_property
    def listed(self) -> int:
        """How many twin ids, namespaces and ``in`` values it lists: each is held by the
        connection, and filed in the shared index or in the set an ``in`` is tested by."""
        return len(self.twins or ()) + len(self.namespaces or ()) + _in_values(self.filter)

    @cached_property
    def id_json(self) -> str:
        """The id as JSON text, for messages composed from pre-encoded parts."""
        return dumps(self.id)

    @cached_property
    def fields_key(self) -> FieldsKey:
        """The ``fields`` selection as a hashable key: equal keys give equal views."""
        return None if self.fields is None else tuple(tuple(path) for path in self.fields)

    @cached_property
    def scope_key(self) -> str:
        """What :meth:`classify` depends on: subscriptions with equal keys classify alike.

        The representation of the filter tree (frozen dataclasses of tuples and literals,
        whose ``repr`` tells ``1``, ``1.0`` and ``true`` apart) and of the sorted scopes; a
        string, because its hash is computed once (the hash of a dataclass tree is not).
        """
        namespaces = sorted(self.namespaces) if self.namespaces is not None else None
        twins = sorted(self.twins) if self.twins is not None else None
        return repr((self.filter, namespaces, twins))

    def in_scope(self, twin_id: str) -> bool:
        if self.twins is not None and twin_id not in self.twins:
            return False
        if self.namespaces is not None:
            namespace = twin_id.partition(":")[0]
            return namespace in self.namespaces
        return True

    def _matches(self, doc: JSONObject | None) -> bool:
        return doc is not None and (self.filter is None or matches(self.filter, doc))

    def classify(
        self, event: ChangeEvent, before: JSONObject | None, after: JSONObject | None
    ) -> Outcome:
        """``event``, ``left`` or nothing for this change; documents are API documents."""
        if not self.in_scope(event.twin_id):
            return None
        if self._matches(after):
            return "event"
        # Whatever is known of the state before (retention keeps it, but a journal from
        # before it did may lack it): without a filter, the twin deleted was matched.
        if self._matches(before) or (event.action == "deleted" and self.filter is None):
            return "event" if event.action == "deleted" else "left"
        return None

    def view(self, doc: JSONObject | None) -> JSONObject | None:
        """The requested fields of the twin after the change."""
        if doc is None:
            return None
        return select(doc, self.fields)


def validate_id(value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > 128:
        raise BadRequest("A subscription needs an 'id' string of 1 to 128 characters.")
    return value
