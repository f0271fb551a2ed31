"""The delta: the leaves of desired that reported does not match yet.

An empty object in desired holds no leaf: it used to be one, in the delta (and pending in the
lifecycle) whenever reported held anything else there, though a device echoing it as a merge
patch changes nothing (RFC 7396), and search counts ``{}`` as absent (``exists(delta)``).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.twin.strategies import non_null_scalars, objects, scalars
from twin_service.twin.delta import compute_delta, leaf_paths
from twin_service.twin.patch import merge_patch
from twin_service.types import JSON, JSONObject

Path = tuple[str, ...]

DELTAS: list[tuple[JSONObject, JSONObject, JSONObject]] = [
    ({}, {}, {}),
    ({}, {"a": 1}, {}),
    ({"a": 1}, {}, {"a": 1}),
    ({"a": 1}, {"a": 1}, {}),
    ({"a": 1}, {"a": 2}, {"a": 1}),
    ({"a": 1}, {"a": 1.0}, {}),
    ({"a": 1.0}, {"a": 1}, {}),
    ({"a": 0}, {"a": -0.0}, {}),
    ({"a": True}, {"a": 1}, {"a": True}),
    ({"a": 1}, {"a": True}, {"a": 1}),
    ({"a": 0}, {"a": False}, {"a": 0}),
    ({"a": False}, {"a": 0.0}, {"a": False}),
    ({"a": True}, {"a": True}, {}),
    ({"a": "1"}, {"a": 1}, {"a": "1"}),
    ({"a": None}, {"a": None}, {}),
    ({"a": None}, {}, {"a": None}),
    ({"a": 1}, {"b": 1}, {"a": 1}),
    ({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}}, {"a": {"c": 2}}),
    ({"a": {"b": 1}}, {"a": {"b": 1, "x": 9}}, {}),
    ({"a": {"b": 1}}, {"a": 5}, {"a": {"b": 1}}),
    ({"a": {"b": 1}}, {"a": [1]}, {"a": {"b": 1}}),
    ({"a": {"b": {"c": 1}}}, {}, {"a": {"b": {"c": 1}}}),
    ({"a": {"b": {"c": 1, "d": 2}}}, {"a": {"b": {"c": 1}}}, {"a": {"b": {"d": 2}}}),
    ({"a": 5}, {"a": {"b": 1}}, {"a": 5}),
    ({"a": [1, 2]}, {"a": [1, 2]}, {}),
    ({"a": [1, 2]}, {"a": [1.0, 2.0]}, {}),
    ({"a": [1, 2]}, {"a": [2, 1]}, {"a": [1, 2]}),
    ({"a": [1, 2]}, {"a": [1, 2, 3]}, {"a": [1, 2]}),
    ({"a": [1]}, {"a": [True]}, {"a": [1]}),
    ({"a": [{"x": 1}]}, {"a": [{"x": 1, "y": 2}]}, {"a": [{"x": 1}]}),
    ({"a": []}, {}, {"a": []}),
    ({"a": []}, {"a": {}}, {"a": []}),
    ({"a": {}}, {}, {}),
    ({"a": {}}, {"a": {}}, {}),
    ({"a": {}}, {"a": {"b": 1}}, {}),
    ({"a": {}}, {"a": 5}, {}),
    ({"a": {}}, {"a": None}, {}),
    ({"a": {"b": {}}}, {"a": {"b": {}}}, {}),
    ({"a": {"b": {}}}, {"a": 1}, {}),
    ({"a": {"b": {}, "c": 1}}, {}, {"a": {"c": 1}}),
    ({"a": [{}]}, {"a": []}, {"a": [{}]}),  # inside an array, {} is part of a whole value
    ({"a": {"b": 1}, "c": 2}, {"a": {"b": 1, "x": 9}, "y": 0}, {"c": 2}),
    (
        {"fan": {"speed": 3, "mode": "auto"}},
        {"fan": {"speed": 3.0, "mode": "eco"}, "extra": 1},
        {"fan": {"mode": "auto"}},
    ),
]


@pytest.mark.parametrize(("desired", "reported", "delta"), DELTAS)
def test_delta_table(desired: JSONObject, reported: JSONObject, delta: JSONObject) -> None:
    before = copy.deepcopy((desired, reported))
    result = compute_delta(desired, reported)
    assert result == delta
    assert _delta_oracle(desired, reported) == delta
    assert (desired, reported) == before


@pytest.mark.parametrize(
    ("value", "leaves"),
    [
        ({}, {(): {}}),
        (1, {(): 1}),
        ({"a": 1}, {("a",): 1}),
        ({"a": {"b": [1]}, "c": {}}, {("a", "b"): [1], ("c",): {}}),
    ],
)
def test_leaf_paths_table(value: JSON, leaves: dict[Path, JSON]) -> None:
    assert leaf_paths(value) == leaves


# -- an independent oracle -------------------------------------------------------------------


def _same(a: JSON, b: JSON) -> bool:
    """JSON equality written independently of ``json_equal``."""
    kinds = (_kind(a), _kind(b))
    if kinds[0] != kinds[1]:
        return False
    if kinds[0] == "map":
        return sorted(a) == sorted(b) and all(_same(a[k], b[k]) for k in a)
    if kinds[0] == "array":
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if kinds[0] == "number":
        return float(a) == float(b)
    return bool(a == b)


def _kind(value: JSON) -> str:
    if value is True or value is False:
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, dict):
        return "map"
    if isinstance(value, list):
        return "array"
    return type(value).__name__


def _leaves(value: JSONObject) -> list[tuple[Path, JSON]]:
    out: list[tuple[Path, JSON]] = []
    stack: list[tuple[Path, JSON]] = [((), value)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, dict):  # an empty object holds no leaf
            stack.extend(((*path, k), v) for k, v in node.items())
        else:
            out.append((path, node))
    return out


_ABSENT = object()


def _at(value: JSON, path: Path) -> Any:
    for part in path:
        if not isinstance(value, dict) or part not in value:
            return _ABSENT
        value = value[part]
    return value


def _subset(desired: JSONObject, reported: JSONObject) -> bool:
    """Every leaf of desired is present in reported with the same value."""
    for path, want in _leaves(desired):
        have = _at(reported, path)
        if have is _ABSENT or not _same(want, have):
            return False
    return True


def _delta_oracle(desired: JSONObject, reported: JSONObject) -> JSONObject:
    out: JSONObject = {}
    for path, want in _leaves(desired):
        have = _at(reported, path)
        if have is _ABSENT or not _same(want, have):
            node = out
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = want
    return out


# Desired values are often built from reported so that equal and near-equal paths are common.
@st.composite
def desired_and_reported(
    draw: st.DrawFn, leaves: st.SearchStrategy[JSON] = scalars
) -> tuple[JSONObject, JSONObject]:
    reported = draw(objects(leaves))
    if draw(st.booleans()):
        return draw(objects(leaves)), reported
    desired: JSONObject = {}
    for path, value in _leaves(reported):
        keep: bool = draw(st.booleans())
        if not path or not keep:
            continue
        if draw(st.booleans()):
            value = draw(leaves)
        node = desired
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                break
            node = child
        else:
            node[path[-1]] = value
    return desired, reported


@given(desired_and_reported())
def test_delta_matches_the_oracle(pair: tuple[JSONObject, JSONObject]) -> None:
    desired, reported = pair
    assert compute_delta(desired, reported) == _delta_oracle(desired, reported)


@given(desired_and_reported())
def test_delta_is_empty_exactly_when_desired_is_a_subset(
    pair: tuple[JSONObject, JSONObject],
) -> None:
    desired, reported = pair
    assert (compute_delta(desired, reported) == {}) is _subset(desired, reported)


@given(desired_and_reported())
def test_delta_leaves_come_from_desired(pair: tuple[JSONObject, JSONObject]) -> None:
    desired, reported = pair
    delta = compute_delta(desired, reported)
    desired_leaves = dict(_leaves(desired))
    for path, value in _leaves(delta):
        if path:
            assert path in desired_leaves and _same(desired_leaves[path], value)
            assert not _same(_at(reported, path), value)
    assert set(delta) <= set(desired)


@given(desired_and_reported(non_null_scalars))
def test_applying_the_delta_clears_it(pair: tuple[JSONObject, JSONObject]) -> None:
    desired, reported = pair
    delta = compute_delta(desired, reported)
    assert compute_delta(desired, merge_patch(reported, delta)) == {}


@given(objects())
def test_delta_with_itself_is_empty(value: JSONObject) -> None:
    assert compute_delta(value, value) == {}
    assert compute_delta(value, copy.deepcopy(value)) == {}


@given(objects(empty_objects=False))
def test_delta_against_empty_reported_is_desired(value: JSONObject) -> None:
    assert compute_delta(value, {}) == value


@given(objects())
def test_delta_against_empty_reported_is_desired_without_empty_objects(value: JSONObject) -> None:
    assert compute_delta(value, {}) == _pruned(value)


def _pruned(value: JSONObject) -> JSONObject:
    """``value`` without its empty objects, nor the objects that held only those."""
    out: JSONObject = {}
    for key, child in value.items():
        if isinstance(child, dict):
            child = _pruned(child)
            if not child:
                continue
        out[key] = child
    return out


@given(desired_and_reported())
def test_delta_does_not_alias_desired(pair: tuple[JSONObject, JSONObject]) -> None:
    desired, reported = pair
    before = copy.deepcopy(pair)
    delta = compute_delta(desired, reported)
    for _, value in _leaves(delta):
        if isinstance(value, list):
            value.append(0)
        elif isinstance(value, dict):
            value["x"] = 0
    assert (desired, reported) == before
