"""RFC 7396 merge patch, its inverse ``diff_merge_patch``, and JSON value equality."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.twin.strategies import non_null_scalars, objects, scalars, values
from tests.twin.test_delta import _same
from twin_service.twin.patch import diff_merge_patch, json_equal, merge_patch
from twin_service.types import JSON, JSONObject

# RFC 7396 section 3 and appendix A, as (target, patch, result).
RFC7396: list[tuple[JSON, JSON, JSON]] = [
    (
        {
            "title": "Goodbye!",
            "author": {"givenName": "John", "familyName": "Doe"},
            "tags": ["example", "sample"],
            "content": "This will be unchanged",
        },
        {
            "title": "Hello!",
            "phoneNumber": "+01-123-456-7890",
            "author": {"familyName": None},
            "tags": ["example"],
        },
        {
            "title": "Hello!",
            "author": {"givenName": "John"},
            "tags": ["example"],
            "content": "This will be unchanged",
            "phoneNumber": "+01-123-456-7890",
        },
    ),
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]

OURS: list[tuple[JSON, JSON, JSON]] = [
    ({}, {}, {}),
    ({"a": 1}, {}, {"a": 1}),
    ({"a": {"b": 1}}, {"a": {}}, {"a": {"b": 1}}),
    ({"a": 1}, {"a": {}}, {"a": {}}),
    ({"a": 1}, {"b": None}, {"a": 1}),
    ({"a": {"b": {"c": 1, "d": 2}}}, {"a": {"b": {"c": None}}}, {"a": {"b": {"d": 2}}}),
    ({"a": 1}, {"a": {"b": None}}, {"a": {}}),
    ({"a": [1, 2]}, {"a": [None]}, {"a": [None]}),
    ({"a": 1}, {"a": [{"b": None}]}, {"a": [{"b": None}]}),
    ("scalar", {"a": 1}, {"a": 1}),
    (None, {"a": None}, {}),
    ({"a": 1}, 5, 5),
    ({"a": 1}, [], []),
    ({"a": True}, {"a": 1}, {"a": 1}),
    ({"~/": 1}, {"~/": 2}, {"~/": 2}),
]


@pytest.mark.parametrize(("target", "patch", "result"), RFC7396 + OURS)
def test_merge_patch_table(target: JSON, patch: JSON, result: JSON) -> None:
    before_target, before_patch = copy.deepcopy(target), copy.deepcopy(patch)
    assert merge_patch(target, patch) == result
    assert target == before_target and patch == before_patch


DIFFS: list[tuple[JSONObject, JSONObject, JSONObject]] = [
    ({}, {}, {}),
    ({"a": 1}, {"a": 1}, {}),
    ({"a": 1}, {"a": 1.0}, {}),
    ({"a": 1}, {"a": True}, {"a": True}),
    ({"a": 1}, {}, {"a": None}),
    ({}, {"a": 1}, {"a": 1}),
    ({"a": 1}, {"a": 2}, {"a": 2}),
    ({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}}, {"a": {"c": 3}}),
    ({"a": {"b": 1}}, {"a": {}}, {"a": {"b": None}}),
    ({"a": {}}, {"a": {}}, {}),
    ({"a": 1}, {"a": {}}, {"a": {}}),
    ({"a": {"b": 1}}, {"a": 5}, {"a": 5}),
    ({"a": 5}, {"a": {"b": 1}}, {"a": {"b": 1}}),
    ({"a": [1, 2]}, {"a": [1]}, {"a": [1]}),
    ({"a": [1, 2]}, {"a": [1.0, 2]}, {}),
    ({"x": 1, "y": {"z": 1}}, {"y": {"z": 1}, "w": 0}, {"x": None, "w": 0}),
]


@pytest.mark.parametrize(("old", "new", "patch"), DIFFS)
def test_diff_merge_patch_table(old: JSONObject, new: JSONObject, patch: JSONObject) -> None:
    assert diff_merge_patch(old, new) == patch
    assert json_equal(merge_patch(old, patch), new)


EQUALITY: list[tuple[JSON, JSON, bool]] = [
    (1, 1.0, True),
    (0, -0.0, True),
    (1, 1, True),
    (2.5, 2.5, True),
    (True, 1, False),
    (1, True, False),
    (False, 0, False),
    (0.0, False, False),
    (True, True, True),
    (True, False, False),
    (None, None, True),
    (None, {}, False),
    (None, 0, False),
    ("1", 1, False),
    ("a", "a", True),
    ([], {}, False),
    ([1], [1.0], True),
    ([1, 2], [2, 1], False),
    ([1], [1, 1], False),
    ([True], [1], False),
    ({"a": 1}, {"a": 1.0}, True),
    ({"a": 1}, {"a": 1, "b": 2}, False),
    ({"a": {"b": [1, {"c": 0}]}}, {"a": {"b": [1.0, {"c": 0.0}]}}, True),
    ({"a": {"b": [1, {"c": 0}]}}, {"a": {"b": [1.0, {"c": False}]}}, False),
]


@pytest.mark.parametrize(("a", "b", "equal"), EQUALITY)
def test_json_equal_table(a: JSON, b: JSON, equal: bool) -> None:
    assert json_equal(a, b) is equal
    assert json_equal(b, a) is equal


# A tiny domain, so that equal and nearly equal pairs (1 and 1.0, 0 and False) are common.
_tiny = st.recursive(
    st.sampled_from([0, 1, 1.0, 0.0, True, False, None, "a", "1", ""]),
    lambda inner: (
        st.lists(inner, max_size=2) | st.dictionaries(st.sampled_from("ab"), inner, max_size=2)
    ),
    max_leaves=4,
)


@given(_tiny, _tiny)
def test_json_equal_agrees_with_an_independent_oracle(a: JSON, b: JSON) -> None:
    assert json_equal(a, b) is _same(a, b)
    assert json_equal(b, a) is _same(a, b)
    assert json_equal(a, copy.deepcopy(a))


non_null_objects = objects(non_null_scalars)


@given(non_null_objects, non_null_objects)
def test_diff_then_merge_gives_the_new_value(a: JSONObject, b: JSONObject) -> None:
    before_a, before_b = copy.deepcopy(a), copy.deepcopy(b)
    assert json_equal(merge_patch(a, diff_merge_patch(a, b)), b)
    assert a == before_a and b == before_b


@given(non_null_objects)
def test_diff_with_itself_is_empty(a: JSONObject) -> None:
    assert diff_merge_patch(a, a) == {}
    assert diff_merge_patch(a, copy.deepcopy(a)) == {}


@given(values(), values())
def test_merge_patch_is_idempotent(target: JSON, patch: JSON) -> None:
    once = merge_patch(target, patch)
    assert merge_patch(once, patch) == once


@given(objects())
def test_empty_patch_is_identity(target: JSONObject) -> None:
    assert merge_patch(target, {}) == target


@given(values(), values())
def test_merge_patch_never_mutates_and_never_aliases_the_patch(target: JSON, patch: JSON) -> None:
    before_target, before_patch = copy.deepcopy(target), copy.deepcopy(patch)
    result = merge_patch(target, patch)
    assert target == before_target and patch == before_patch
    _scramble(result)
    assert patch == before_patch


@given(objects(), objects(scalars))
def test_merged_keys_follow_the_patch(target: JSONObject, patch: JSONObject) -> None:
    result = merge_patch(target, patch)
    for key, value in patch.items():
        if value is None:
            assert key not in result
        else:
            assert key in result
    for key in set(target) - set(patch):
        assert result[key] == target[key]


@given(values())
def test_json_equal_is_reflexive(value: JSON) -> None:
    assert json_equal(value, copy.deepcopy(value))


def _scramble(value: JSON) -> None:
    """Mutate every container in place (to detect aliasing)."""
    if isinstance(value, dict):
        for child in value.values():
            _scramble(child)
        value["\x00scrambled"] = True
    elif isinstance(value, list):
        for child in value:
            _scramble(child)
        value.append("\x00scrambled")
