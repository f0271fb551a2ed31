"""Which subscriptions can a change concern? A pure index, no I/O.

Classifying every event against every subscription costs O(subscriptions) per write. The
index files each subscription under one selective key and, for an event, returns the
*candidates*: a superset of the subscriptions whose :meth:`Subscription.classify` is not
``None``. Only those are classified.

Where a subscription is filed, first that applies:

1. ``twins=[...]``: under each twin id (the scope already excludes every other twin);
2. a filter that implies ``path`` holds one of some literals (``eq``, ``in``, an indexable
   conjunct of ``and``, an ``or`` of indexable operands): under each ``(path, literal)``;
3. ``namespaces=[...]``: under each namespace;
4. otherwise in the list of the rest, a candidate for every event.

An event is looked up by its twin id, its namespace, and the values at every indexed path
in the documents *before and after* the change: a subscription that matched before and no
longer does (``left``, deletions) is found through the old values.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeAlias, TypeVar

from search.rql.ast import And, Compare, Filter, In, Or, Path, Value
from search.rql.evaluator import type_rank, values_at
from twin_service.streams.subscription import Subscription
from twin_service.types import JSONObject

E = TypeVar("E", bound=Hashable)

#: A literal as the evaluator compares it: ``1 == 1.0`` but ``1 != true``.
Key: TypeAlias = tuple[int, Value]
#: What a filter implies: the document holds at least one of these (path, key) pairs.
Terms: TypeAlias = frozenset[tuple[Path, Key]]


def key_of(value: Value) -> Key:
    return (type_rank(value), value)


def filter_terms(node: Filter) -> Terms | None:
    """(path, key) pairs of which a matching document holds one; ``None`` if not indexable."""
    if isinstance(node, Compare):
        return frozenset({(node.path, key_of(node.value))}) if node.op == "eq" else None
    if isinstance(node, In):
        return frozenset((node.path, key_of(v)) for v in node.values)
    if isinstance(node, And):
        # Every operand must hold, so any one indexable operand will do: take the narrowest.
        options = [t for t in (filter_terms(op) for op in node.operands) if t is not None]
        return min(options, key=len) if options else None
    if isinstance(node, Or):
        union: set[tuple[Path, Key]] = set()
        for op in node.operands:
            terms = filter_terms(op)
            if terms is None:
                return None
            union |= terms
        return frozenset(union)
    return None  # ne, gt..., like, exists, not: no single value to look up


@dataclass(frozen=True)
class _Filing:
    twins: frozenset[str] = frozenset()
    namespaces: frozenset[str] = frozenset()
    terms: Terms = frozenset()
    rest: bool = False


def filing_of(subscription: Subscription) -> _Filing:
    """Where ``subscription`` is filed: the first of the rules of the module docstring."""
    if subscription.twins is not None:
        return _Filing(twins=subscription.twins)
    terms = filter_terms(subscription.filter) if subscription.filter is not None else None
    if terms is not None:
        return _Filing(terms=terms)
    if subscription.namespaces is not None:
        return _Filing(namespaces=subscription.namespaces)
    return _Filing(rest=True)


class SubscriptionIndex(Generic[E]):
    """Subscriptions filed by twin id, namespace and filter literal; see the module docstring.

    Entries are caller-chosen hashable handles (one per subscription); :meth:`candidates`
    returns them in registration order, so a caller's own order of subscriptions is kept.
    """

    def __init__(self) -> None:
        self._order: dict[E, int] = {}
        self._filed: dict[E, _Filing] = {}
        self._by_twin: dict[str, set[E]] = {}
        self._by_namespace: dict[str, set[E]] = {}
        self._by_value: dict[Path, dict[Key, set[E]]] = {}
        self._rest: set[E] = set()
        self._counter = 0

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, entry: object) -> bool:
        return entry in self._order

    def add(self, entry: E, subscription: Subscription) -> None:
        """File ``entry`` (replacing an earlier filing of the same entry)."""
        self.remove(entry)
        self._counter += 1
        self._order[entry] = self._counter
        filing = filing_of(subscription)
        self._filed[entry] = filing
        for twin_id in filing.twins:
            self._by_twin.setdefault(twin_id, set()).add(entry)
        for namespace in filing.namespaces:
            self._by_namespace.setdefault(namespace, set()).add(entry)
        for path, key in filing.terms:
            self._by_value.setdefault(path, {}).setdefault(key, set()).add(entry)
        if filing.rest:
            self._rest.add(entry)

    def remove(self, entry: E) -> None:
        """Forget ``entry``; unknown entries are ignored."""
        if self._order.pop(entry, None) is None:
            return
        filing = self._filed.pop(entry)
        for twin_id in filing.twins:
            _discard(self._by_twin, twin_id, entry)
        for namespace in filing.namespaces:
            _discard(self._by_namespace, namespace, entry)
        for path, key in filing.terms:
            by_key = self._by_value[path]
            _discard(by_key, key, entry)
            if not by_key:
                del self._by_value[path]
        self._rest.discard(entry)

    def candidates(
        self, twin_id: str, before: JSONObject | None, after: JSONObject | None
    ) -> list[E]:
        """Entries whose subscription may classify this change as ``event`` or ``left``."""
        found: set[E] = set(self._rest)
        found.update(self._by_twin.get(twin_id, ()))
        found.update(self._by_namespace.get(twin_id.partition(":")[0], ()))
        for path, by_key in self._by_value.items():
            for doc in (before, after):
                if doc is not None:
                    for value in values_at(doc, path):
                        found.update(by_key.get(key_of(value), ()))
        if len(found) > 1:
            return sorted(found, key=self._order.__getitem__)
        return list(found)


K = TypeVar("K", bound=Hashable)


def _discard(table: dict[K, set[E]], key: K, entry: E) -> None:
    bucket = table.get(key)
    if bucket is not None:
        bucket.discard(entry)
        if not bucket:
            del table[key]
