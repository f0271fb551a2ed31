"""Per-leaf metadata: when each leaf of desired, reported and live was last written.

The metadata tree mirrors the section it describes; at each leaf it holds
``{"modified": <iso>, "revision": <n>}``. Leaves are non-empty-object values (scalars,
arrays, empty objects), matching :func:`twin_service.twin.delta.leaf_paths`.
"""

from __future__ import annotations

from twin_service.twin.delta import leaf_paths
from twin_service.twin.patch import json_equal
from twin_service.types import JSON, JSONObject


def stamp(
    old_meta: JSONObject,
    old_section: JSONObject,
    new_section: JSONObject,
    written: set[tuple[str, ...]] | None,
    timestamp: str,
    revision: int,
) -> JSONObject:
    """New metadata for ``new_section``.

    A leaf gets ``(timestamp, revision)`` when its value changed or when it lies under one of
    the ``written`` paths (a write of the same value still counts as a write, as in AWS);
    ``written=None`` means the whole section was written. Other leaves keep their old stamp.
    """
    old_leaves = leaf_paths(old_section) if old_section else {}
    result: JSONObject = {}
    for path, value in (leaf_paths(new_section) if new_section else {}).items():
        previous = _lookup(old_meta, path)
        touched = written is None or any(path[: len(w)] == w for w in written)
        if (
            touched
            or previous is None
            or path not in old_leaves
            or not json_equal(old_leaves[path], value)
        ):
            previous = {"modified": timestamp, "revision": revision}
        _insert(result, path, previous)
    return result


def written_paths(patch: JSON, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """The leaf paths a merge patch writes (deletions included).

    An empty object merges nothing (RFC 7396), so it writes no path; if it replaces a
    non-object value the leaf is still stamped, because its value changed.
    """
    if isinstance(patch, dict):
        out: set[tuple[str, ...]] = set()
        for key, value in patch.items():
            out |= written_paths(value, (*prefix, key))
        return out
    return {prefix}


def _lookup(meta: JSONObject, path: tuple[str, ...]) -> JSONObject | None:
    node: JSON = meta
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, dict) and "modified" in node and "revision" in node:
        return node
    return None


def _insert(tree: JSONObject, path: tuple[str, ...], leaf: JSONObject) -> None:
    if not path:
        tree.update(leaf)
        return
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = leaf
