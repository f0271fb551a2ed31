"""The reference evaluator: does a twin document match a filter? Pure, no I/O.

Walking a path fans out over arrays: ``attributes/a/b`` reaches ``b`` in every element of an
array ``a``. The *values* at a path are the scalars reached (array elements flattened,
objects skipped); a path *exists* when a scalar (null included) or an array (empty included)
sits at or below it, so empty objects, at any depth, count as absent.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from twin_service.types import JSON, JSONObject

from . import patterns
from .ast import And, Compare, Exists, Filter, In, Like, Not, Or, Path, Value
from .ast import type_rank as type_rank


def nodes_at(node: JSON, path: Path) -> Iterator[JSON]:
    """Every JSON node reached by ``path`` from ``node``, fanning out over arrays."""
    if not path:
        yield node
    elif isinstance(node, dict):
        if path[0] in node:
            yield from nodes_at(node[path[0]], path[1:])
    elif isinstance(node, list):
        for element in node:
            yield from nodes_at(element, path)


def _scalars(node: JSON) -> Iterator[Value]:
    if isinstance(node, list):
        for element in node:
            yield from _scalars(element)
    elif not isinstance(node, dict):
        yield node


def values_at(doc: JSONObject, path: Path) -> Iterator[Value]:
    """The scalars at ``path``: direct values and (nested) array elements, never objects."""
    for node in nodes_at(doc, path):
        yield from _scalars(node)


def present(node: JSON) -> bool:
    """False only for objects holding nothing but (nested) empty objects."""
    if isinstance(node, dict):
        return any(present(child) for child in node.values())
    return True


def exists(doc: JSONObject, path: Path) -> bool:
    """Whether ``path`` holds something: see the module docstring."""
    return any(present(node) for node in nodes_at(doc, path))


def equal(a: Value, b: Value) -> bool:
    """Typed equality: ``1 == 1.0`` but ``1 != true``."""
    return type_rank(a) == type_rank(b) and a == b


def _compare(op: str, actual: Value, expected: Value) -> bool:
    if op == "eq":
        return equal(actual, expected)
    if type_rank(actual) != type_rank(expected) or expected is None:
        return False
    a: Any = actual
    b: Any = expected
    if op == "gt":
        return bool(a > b)
    if op == "ge":
        return bool(a >= b)
    if op == "lt":
        return bool(a < b)
    return bool(a <= b)


def matches(node: Filter, doc: JSONObject) -> bool:
    """Whether the twin document ``doc`` satisfies the filter."""
    if isinstance(node, Compare):
        if node.op == "ne":
            return exists(doc, node.path) and not any(
                equal(v, node.value) for v in values_at(doc, node.path)
            )
        return any(_compare(node.op, v, node.value) for v in values_at(doc, node.path))
    if isinstance(node, In):
        typed = node.typed_values
        return any((type_rank(v), v) in typed for v in values_at(doc, node.path))
    if isinstance(node, Like):
        return any(
            isinstance(v, str) and patterns.like(node.pattern, node.ignore_case, v)
            for v in values_at(doc, node.path)
        )
    if isinstance(node, Exists):
        return exists(doc, node.path)
    if isinstance(node, And):
        return all(matches(op, doc) for op in node.operands)
    if isinstance(node, Or):
        return any(matches(op, doc) for op in node.operands)
    assert isinstance(node, Not)
    return not matches(node.operand, doc)
