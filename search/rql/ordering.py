"""The total order of search results.

A twin's sort value for a path is taken only where the path reaches a node without going
through an array. Its key is ``(rank, value)`` with ranks, ascending:

    -1 missing (also an object holding only empty objects)
     0 null
     1 boolean (false < true)
     2 number (ints and floats compared numerically, 1 == 1.0)
     3 string (by Unicode code point)
     4 array  (all arrays tie)
     5 object (all objects tie)

``-path`` reverses the whole key, so missing values come first ascending and last descending.
Ties fall through to the next sort key and finally to ``+twinId``, which is unique.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import cmp_to_key
from typing import Any, TypeAlias

from twin_service.types import JSONObject

from .ast import TWIN_ID_PATH, Path, SortKey
from .evaluator import present, type_rank

MISSING, ARRAY, OBJECT = -1, 4, 5
#: ``(rank, value)``; value is ``None`` for missing, null, array and object, 0/1 for booleans.
Key: TypeAlias = tuple[int, int | float | str | None]


def normalize_sort(keys: Sequence[SortKey]) -> tuple[SortKey, ...]:
    """Drop repeated paths, stop after twinId, and end with ``+twinId`` to make a total order."""
    out: list[SortKey] = []
    seen: set[Path] = set()
    for key in keys:
        if key.path in seen:
            continue
        seen.add(key.path)
        out.append(key)
        if key.path == TWIN_ID_PATH:
            return tuple(out)
    out.append(SortKey(TWIN_ID_PATH))
    return tuple(out)


def sort_key(doc: JSONObject, path: Path) -> Key:
    """The ``(rank, value)`` of ``doc`` at ``path``."""
    node: Any = doc
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return (MISSING, None)
        node = node[key]
    if isinstance(node, list):
        return (ARRAY, None)
    if isinstance(node, dict):
        return (OBJECT, None) if present(node) else (MISSING, None)
    if isinstance(node, bool):
        return (1, int(node))
    return (type_rank(node), node)


def compare_keys(a: Key, b: Key) -> int:
    """-1, 0 or 1 in ascending order."""
    if a[0] != b[0]:
        return -1 if a[0] < b[0] else 1
    x: Any = a[1]
    y: Any = b[1]
    if x == y:
        return 0
    return -1 if x < y else 1


def sort_keys(doc: JSONObject, sort: Sequence[SortKey]) -> list[Key]:
    """The keys of ``doc`` for every entry of a (normalized) sort."""
    return [sort_key(doc, key.path) for key in sort]


def compare_positions(a: Sequence[Key], b: Sequence[Key], sort: Sequence[SortKey]) -> int:
    """Compare two rows' key lists under ``sort``."""
    for x, y, key in zip(a, b, sort, strict=True):
        c = compare_keys(x, y)
        if c:
            return -c if key.descending else c
    return 0


def order(docs: Iterable[JSONObject], sort: Sequence[SortKey]) -> list[JSONObject]:
    """``docs`` sorted by ``sort`` (normalized first, so the order is total)."""
    full = normalize_sort(sort)
    keyed = [(sort_keys(doc, full), doc) for doc in docs]
    keyed.sort(key=row_sort_key(full))
    return [doc for _, doc in keyed]


Row: TypeAlias = tuple[list[Key], JSONObject]


def row_sort_key(sort: Sequence[SortKey]) -> Callable[[Row], Any]:
    """A ``key=`` function ordering ``(keys, doc)`` rows under a normalized sort."""

    def cmp(a: Row, b: Row) -> int:
        return compare_positions(a[0], b[0], sort)

    return cmp_to_key(cmp)
