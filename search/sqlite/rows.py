"""Flattening a twin document into index rows. Pure."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from search.rql.ordering import ARRAY, OBJECT
from search.rql.paths import FIXED_PATHS, TREE_ROOTS, format_path, lookup
from twin_service.twin.pointer import escape_token
from twin_service.types import JSON, JSONObject

#: ``(path, t, v, a)`` as described in :mod:`search.sqlite.schema`.
Leaf: TypeAlias = tuple[str, int, Any, int]

#: The root whose rows the SQLite index stores without their values (``v`` NULL, type and
#: position kept). The delta at any path, when present, is desired's value there, so a
#: condition on a delta value is answered from desired's rows (:mod:`search.sqlite.translate`).
#: Valued, every desired write that the device has not applied yet moved the same values a
#: second time in the value index: two of the ten rows a PATCH of two leaves changes.
VALUELESS_ROOT = "delta"


def _flatten(node: JSON, path: str, in_array: int, out: list[Leaf]) -> None:
    if isinstance(node, dict):
        # An object is present exactly when something below it produced a row (scalars and
        # arrays always do); deciding that bottom-up avoids re-walking every subtree.
        before = len(out)
        for key, child in node.items():
            _flatten(child, f"{path}/{escape_token(key)}", in_array, out)
        if len(out) > before:
            out.insert(before, (path, OBJECT, None, in_array))
    elif isinstance(node, list):
        out.append((path, ARRAY, None, in_array))
        for element in node:
            _flatten(element, path, 1, out)
    elif node is None:
        out.append((path, 0, None, in_array))
    elif isinstance(node, bool):
        out.append((path, 1, int(node), in_array))
    elif isinstance(node, int | float):
        # Exact here; stored in two columns (search.sqlite.numbers).
        out.append((path, 2, node, in_array))
    else:
        out.append((path, 3, str(node), in_array))


def _flat(node: JSON, path: str, values: bool = True) -> list[Leaf]:
    """The rows of ``node`` (at ``path``, outside any array), without values if asked."""
    out: list[Leaf] = []
    _flatten(node, path, 0, out)
    return out if values else [(path_, t, None, a) for path_, t, _, a in out]


def leaves(
    doc: JSONObject, roots: Iterable[str] | None = None, *, delta_values: bool = True
) -> list[Leaf]:
    """Every searchable node of ``doc`` as an index row.

    ``roots`` limits the tree roots flattened (the fixed properties always are). Without
    ``delta_values``, the rows of :data:`VALUELESS_ROOT` have no values (the SQLite index).
    """
    out: list[Leaf] = []
    for fixed in sorted(FIXED_PATHS):
        found, node = lookup(doc, fixed)
        if found:
            _flatten(node, format_path(fixed), 0, out)
    for root in sorted(TREE_ROOTS if roots is None else roots):
        if root in doc:
            out += _flat(doc[root], escape_token(root), delta_values or root != VALUELESS_ROOT)
    return out


#: A row as stored: ``(path, seq, t, v, a)``; ``seq`` counts the rows of one path.
Row: TypeAlias = tuple[str, int, int, Any, int]

_ABSENT: Any = object()


@dataclass
class RowChanges:
    """What turns the index rows of one document into those of another.

    Apply ``subtrees`` first (each path and every path below it loses all its rows), then
    ``removed`` (single rows), then upsert ``rows``, then ``updated``: rows whose
    ``(path, seq)`` the old document already had, whose values change in place.
    """

    subtrees: list[str] = field(default_factory=list)
    removed: list[tuple[str, int]] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    updated: list[Row] = field(default_factory=list)


def _produces_rows(node: JSON) -> bool:
    """Whether ``node`` yields any index row (only objects holding nothing do not)."""
    if not isinstance(node, dict):
        return True
    # A loop, not any() over a generator: this runs for every object a write passes through.
    for child in node.values():  # noqa: SIM110
        if not isinstance(child, dict) or _produces_rows(child):
            return True
    return False


def numbered(leaves_: list[Leaf]) -> list[Row]:
    """The rows as stored: ``seq`` numbers the rows of each path in order."""
    counters: dict[str, int] = {}
    out: list[Row] = []
    for path, t, v, a in leaves_:
        seq = counters.get(path, 0)
        counters[path] = seq + 1
        out.append((path, seq, t, v, a))
    return out


def _same_rows(a: list[Row], b: list[Row]) -> bool:
    # 1 and 1.0 compare equal in Python but are stored differently: compare types too.
    return len(a) == len(b) and all(
        x == y and type(x[3]) is type(y[3]) for x, y in zip(a, b, strict=True)
    )


def _scalar_row(node: Any, path: str) -> Row | None:
    """The single row of a scalar outside any array (None for objects and arrays)."""
    if isinstance(node, (dict, list)):
        return None
    (leaf,) = _flat(node, path)
    return (leaf[0], 0, leaf[1], leaf[2], leaf[3])


def _rows(node: Any, path: str, values: bool) -> list[Row]:
    return [] if node is _ABSENT else numbered(_flat(node, path, values))


def _diff_node(old: Any, new: Any, path: str, out: RowChanges, values: bool = True) -> None:
    if old is new:
        return
    if type(old) is type(new) and not isinstance(old, (dict, list)):
        # The common case, a scalar replaced by another of the same type (which, without
        # values, leaves its row as it was).
        if values and old != new:
            row = _scalar_row(new, path)
            assert row is not None
            out.updated.append(row)
        return
    if isinstance(old, dict) and isinstance(new, dict):
        # Objects are never inside an array here (the walk does not enter arrays), so every
        # path below ``path`` gets its rows from this node alone and can be diffed key by key.
        # Children shared by identity are skipped before their path is even built.
        for key, child in new.items():
            before = old.get(key, _ABSENT)
            if before is not child:
                _diff_node(before, child, f"{path}/{escape_token(key)}", out, values)
        for key, before in old.items():
            if key not in new:
                _diff_node(before, _ABSENT, f"{path}/{escape_token(key)}", out, values)
        had, has = _produces_rows(old), _produces_rows(new)
        if had and not has:
            out.removed.append((path, 0))
        elif has and not had:
            out.rows.append((path, 0, OBJECT, None, 0))
        return
    old_rows, new_rows = _rows(old, path, values), _rows(new, path, values)
    if _same_rows(old_rows, new_rows):
        return
    if len(old_rows) == len(new_rows) == 1 and old_rows[0][:2] == new_rows[0][:2]:
        out.updated.append(new_rows[0])  # one value replaced by another in place
        return
    if old_rows:
        out.subtrees.append(path)
    out.rows.extend(new_rows)


def diff_rows(old: JSONObject, new: JSONObject) -> RowChanges:
    """The row changes from the index rows of ``old`` to those of ``new``, as the SQLite
    index stores them (no values under :data:`VALUELESS_ROOT`).

    Walks both documents together and skips shared subtrees by identity, so a write that
    changed a few leaves costs a few rows, not a re-flattening of the whole twin.
    """
    out = RowChanges()
    for fixed, text in _FIXED:
        before, after = _at(old, fixed), _at(new, fixed)
        if before is not after:
            _diff_node(before, after, text, out)
    for root, text in _ROOTS:
        before, after = old.get(root, _ABSENT), new.get(root, _ABSENT)
        if before is not after:
            _diff_node(before, after, text, out, root != VALUELESS_ROOT)
    return out


def _at(doc: JSONObject, path: tuple[str, ...]) -> Any:
    """The node at ``path``, or ``_ABSENT``."""
    found, node = lookup(doc, path)
    return node if found else _ABSENT


_FIXED = [(path, format_path(path)) for path in sorted(FIXED_PATHS)]
_ROOTS = [(root, escape_token(root)) for root in sorted(TREE_ROOTS)]
