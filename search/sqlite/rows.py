"""Flattening a twin document into index rows. Pure."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeAlias

from search.rql.ordering import ARRAY, OBJECT
from search.rql.paths import FIXED_PATHS, TREE_ROOTS, escape_key, format_path
from twin_service.types import JSON, JSONObject

#: ``(path, t, v, a)`` as described in :mod:`search.sqlite.schema`.
Leaf: TypeAlias = tuple[str, int, Any, int]

_INT64 = range(-(2**63), 2**63)


def _flatten(node: JSON, path: str, in_array: int, out: list[Leaf]) -> None:
    if isinstance(node, dict):
        # An object is present exactly when something below it produced a row (scalars and
        # arrays always do); deciding that bottom-up avoids re-walking every subtree.
        before = len(out)
        for key, child in node.items():
            _flatten(child, f"{path}/{escape_key(key)}", in_array, out)
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
    elif isinstance(node, int):
        # SQLite integers are 64-bit; larger ones are indexed (approximately) as doubles.
        out.append((path, 2, node if node in _INT64 else float(node), in_array))
    elif isinstance(node, float):
        out.append((path, 2, node, in_array))
    else:
        out.append((path, 3, str(node), in_array))


def _lookup(doc: JSONObject, path: tuple[str, ...]) -> tuple[bool, JSON]:
    node: Any = doc
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return False, None
        node = node[key]
    return True, node


def leaves(doc: JSONObject, roots: Iterable[str] | None = None) -> list[Leaf]:
    """Every searchable node of ``doc`` as an index row.

    ``roots`` limits the tree roots flattened (the fixed properties always are).
    """
    out: list[Leaf] = []
    for fixed in sorted(FIXED_PATHS):
        found, node = _lookup(doc, fixed)
        if found:
            _flatten(node, format_path(fixed), 0, out)
    for root in sorted(TREE_ROOTS if roots is None else roots):
        if root in doc:
            _flatten(doc[root], escape_key(root), 0, out)
    return out
