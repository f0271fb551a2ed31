"""RFC 6902 JSON Patch (atomic, typed errors) and RFC 6901 JSON Pointer."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.twin.strategies import keys, objects, values
from twin_service.errors import (
    InvalidJson,
    InvalidPatch,
    InvalidPointer,
    LimitExceeded,
    NotFound,
    PayloadTooLarge,
    PreconditionFailed,
    TwinServiceError,
)
from twin_service.twin.jsonvalue import Limits, dumps_bytes, loads_strict
from twin_service.twin.patch import (
    apply_json_patch,
    get_at,
    has_at,
    join_pointer,
    json_equal,
    remove_at,
    set_at,
    split_pointer,
)
from twin_service.types import JSON

Op = dict[str, Any]

# RFC 6902 appendix A (the examples that succeed), as (document, patch, result).
RFC6902_OK: list[tuple[JSON, list[Op], JSON]] = [
    ({"foo": "bar"}, [{"op": "add", "path": "/baz", "value": "qux"}], {"baz": "qux", "foo": "bar"}),
    (
        {"foo": ["bar", "baz"]},
        [{"op": "add", "path": "/foo/1", "value": "qux"}],
        {"foo": ["bar", "qux", "baz"]},
    ),
    ({"baz": "qux", "foo": "bar"}, [{"op": "remove", "path": "/baz"}], {"foo": "bar"}),
    ({"foo": ["bar", "qux", "baz"]}, [{"op": "remove", "path": "/foo/1"}], {"foo": ["bar", "baz"]}),
    (
        {"baz": "qux", "foo": "bar"},
        [{"op": "replace", "path": "/baz", "value": "boo"}],
        {"baz": "boo", "foo": "bar"},
    ),
    (
        {"foo": {"bar": "baz", "waldo": "fred"}, "qux": {"corge": "grault"}},
        [{"op": "move", "from": "/foo/waldo", "path": "/qux/thud"}],
        {"foo": {"bar": "baz"}, "qux": {"corge": "grault", "thud": "fred"}},
    ),
    (
        {"foo": ["all", "grass", "cows", "eat"]},
        [{"op": "move", "from": "/foo/1", "path": "/foo/3"}],
        {"foo": ["all", "cows", "eat", "grass"]},
    ),
    (
        {"baz": "qux", "foo": ["a", 2, "c"]},
        [
            {"op": "test", "path": "/baz", "value": "qux"},
            {"op": "test", "path": "/foo/1", "value": 2},
        ],
        {"baz": "qux", "foo": ["a", 2, "c"]},
    ),
    (
        {"foo": "bar"},
        [{"op": "add", "path": "/child", "value": {"grandchild": {}}}],
        {"foo": "bar", "child": {"grandchild": {}}},
    ),
    (
        {"foo": "bar"},
        [{"op": "add", "path": "/baz", "value": "qux", "xyz": 123}],
        {"foo": "bar", "baz": "qux"},
    ),
    ({"/": 9, "~1": 10}, [{"op": "test", "path": "/~01", "value": 10}], {"/": 9, "~1": 10}),
    (
        {"foo": ["bar"]},
        [{"op": "add", "path": "/foo/-", "value": ["abc", "def"]}],
        {"foo": ["bar", ["abc", "def"]]},
    ),
]

OURS_OK: list[tuple[JSON, list[Op], JSON]] = [
    ({"a": 1}, [], {"a": 1}),
    ({"a": 1}, [{"op": "add", "path": "", "value": [1]}], [1]),
    ({"a": 1}, [{"op": "replace", "path": "", "value": {"b": 2}}], {"b": 2}),
    ({"a": 1}, [{"op": "add", "path": "/a", "value": 2}], {"a": 2}),
    ({"a": 1}, [{"op": "add", "path": "/", "value": 2}], {"a": 1, "": 2}),
    ({"a": 1}, [{"op": "add", "path": "/-", "value": 2}], {"a": 1, "-": 2}),
    ({"a": 1}, [{"op": "add", "path": "/a~1b", "value": 2}], {"a": 1, "a/b": 2}),
    ({"a": 1}, [{"op": "add", "path": "/~0", "value": 2}], {"a": 1, "~": 2}),
    ([1, 2], [{"op": "add", "path": "/2", "value": 3}], [1, 2, 3]),
    ([1, 2], [{"op": "add", "path": "/0", "value": 0}], [0, 1, 2]),
    ([1, 2], [{"op": "add", "path": "/-", "value": 3}], [1, 2, 3]),
    ([], [{"op": "add", "path": "/-", "value": 1}], [1]),
    ([1, 2], [{"op": "remove", "path": "/1"}], [1]),
    ([1, 2], [{"op": "replace", "path": "/0", "value": 9}], [9, 2]),
    ({"a": [[1], [2]]}, [{"op": "add", "path": "/a/1/0", "value": 0}], {"a": [[1], [0, 2]]}),
    ({"a": [{"b": 1}]}, [{"op": "remove", "path": "/a/0/b"}], {"a": [{}]}),
    ({"a": {"b": 1}}, [{"op": "copy", "from": "/a", "path": "/c"}], {"a": {"b": 1}, "c": {"b": 1}}),
    ({"a": [1, 2]}, [{"op": "copy", "from": "/a/0", "path": "/a/-"}], {"a": [1, 2, 1]}),
    ({"a": 1}, [{"op": "copy", "from": "", "path": "/b"}], {"a": 1, "b": {"a": 1}}),
    ({"a": 1, "b": 2}, [{"op": "move", "from": "/a", "path": "/b"}], {"b": 1}),
    ({"a": 1}, [{"op": "move", "from": "/a", "path": "/a"}], {"a": 1}),
    # In an array too (removed, then added where it was): it was inserted a second time.
    ([1, 2], [{"op": "move", "from": "/0", "path": "/0"}], [1, 2]),
    ({"a": [[1], 2, 3]}, [{"op": "move", "from": "/a/1", "path": "/a/1"}], {"a": [[1], 2, 3]}),
    ([[1], 2], [{"op": "move", "from": "/0", "path": "/0"}], [[1], 2]),
    ({"a": {"b": {"c": 1}}}, [{"op": "move", "from": "/a/b", "path": "/a"}], {"a": {"c": 1}}),
    ([1, 2, 3], [{"op": "move", "from": "/0", "path": "/-"}], [2, 3, 1]),
    ({"a": 1}, [{"op": "test", "path": "/a", "value": 1.0}], {"a": 1}),
    (
        {"a": [1, {"b": 2}]},
        [{"op": "test", "path": "/a", "value": [1.0, {"b": 2}]}],
        {"a": [1, {"b": 2}]},
    ),
    ({"a": None}, [{"op": "test", "path": "/a", "value": None}], {"a": None}),
    ({"a": 1}, [{"op": "test", "path": "", "value": {"a": 1}}], {"a": 1}),
    (
        {"a": 1},
        [
            {"op": "add", "path": "/b", "value": {}},
            {"op": "add", "path": "/b/c", "value": [1]},
            {"op": "test", "path": "/b/c/0", "value": 1},
            {"op": "remove", "path": "/a"},
        ],
        {"b": {"c": [1]}},
    ),
]


@pytest.mark.parametrize(("doc", "ops", "result"), RFC6902_OK + OURS_OK)
def test_json_patch_table(doc: JSON, ops: list[Op], result: JSON) -> None:
    before_doc, before_ops = copy.deepcopy(doc), copy.deepcopy(ops)
    assert apply_json_patch(doc, ops) == result
    assert doc == before_doc and ops == before_ops


# Failing patches: (document, patch, error class, error code).
FAILING: list[tuple[JSON, JSON, type[TwinServiceError], str]] = [
    # RFC 6902 A.9, A.12, A.15
    (
        {"baz": "qux"},
        [{"op": "test", "path": "/baz", "value": "bar"}],
        PreconditionFailed,
        "patch.test.failed",
    ),
    (
        {"foo": "bar"},
        [{"op": "add", "path": "/baz/bat", "value": "qux"}],
        InvalidPatch,
        "patch.path.notfound",
    ),
    (
        {"/": 9, "~1": 10},
        [{"op": "test", "path": "/~01", "value": "10"}],
        PreconditionFailed,
        "patch.test.failed",
    ),
    (
        {"a": 1},
        [{"op": "test", "path": "/a", "value": True}],
        PreconditionFailed,
        "patch.test.failed",
    ),
    (
        {"a": 0},
        [{"op": "test", "path": "/a", "value": False}],
        PreconditionFailed,
        "patch.test.failed",
    ),
    (
        {"a": [1, 2]},
        [{"op": "test", "path": "/a", "value": [2, 1]}],
        PreconditionFailed,
        "patch.test.failed",
    ),
    ({"a": 1}, [{"op": "test", "path": "/b", "value": None}], InvalidPatch, "patch.path.notfound"),
    ({"a": 1}, [{"op": "remove", "path": "/b"}], InvalidPatch, "patch.path.notfound"),
    ({"a": 1}, [{"op": "remove", "path": ""}], InvalidPatch, "pointer.invalid"),
    ({"a": 1}, [{"op": "replace", "path": "/b", "value": 1}], InvalidPatch, "patch.path.notfound"),
    ([1], [{"op": "replace", "path": "/1", "value": 1}], InvalidPatch, "patch.path.notfound"),
    ([1], [{"op": "replace", "path": "/-", "value": 1}], InvalidPatch, "patch.path.notfound"),
    ([1], [{"op": "remove", "path": "/-"}], InvalidPatch, "patch.path.notfound"),
    ([1], [{"op": "add", "path": "/2", "value": 1}], InvalidPatch, "patch.path.notfound"),
    ([1, 2], [{"op": "add", "path": "/01", "value": 1}], InvalidPatch, "patch.path.notfound"),
    ([1, 2], [{"op": "remove", "path": "/01"}], InvalidPatch, "patch.path.notfound"),
    ([1, 2], [{"op": "remove", "path": "/-1"}], InvalidPatch, "patch.path.notfound"),
    ([1, 2], [{"op": "remove", "path": "/+1"}], InvalidPatch, "patch.path.notfound"),
    ([1, 2], [{"op": "remove", "path": "/1.0"}], InvalidPatch, "patch.path.notfound"),
    ([1, 2], [{"op": "remove", "path": "/²"}], InvalidPatch, "patch.path.notfound"),
    (
        [1, 2],
        [{"op": "add", "path": "/" + "9" * 5000, "value": 1}],
        InvalidPatch,
        "patch.path.notfound",
    ),
    ([1, 2], [{"op": "remove", "path": "/" + "9" * 5000}], InvalidPatch, "patch.path.notfound"),
    ([1, 2], [{"op": "remove", "path": "/١"}], InvalidPatch, "patch.path.notfound"),
    ([1, 2], [{"op": "add", "path": "/a", "value": 1}], InvalidPatch, "patch.path.notfound"),
    ({"a": 1}, [{"op": "add", "path": "/a/b", "value": 1}], InvalidPatch, "patch.invalid"),
    ({"a": "s"}, [{"op": "add", "path": "/a/0", "value": 1}], InvalidPatch, "patch.invalid"),
    (
        {"a": {"b": 1}},
        [{"op": "move", "from": "/a", "path": "/a/b/c"}],
        InvalidPatch,
        "patch.invalid",
    ),
    (
        {"a": {"b": 1}},
        [{"op": "move", "from": "/a", "path": "/a/c"}],
        InvalidPatch,
        "patch.invalid",
    ),
    ({"a": 1}, [{"op": "move", "from": "/x", "path": "/b"}], InvalidPatch, "patch.path.notfound"),
    ({"a": 1}, [{"op": "copy", "from": "/x", "path": "/b"}], InvalidPatch, "patch.path.notfound"),
    ({"a": 1}, [{"op": "copy", "path": "/b"}], InvalidPatch, "patch.invalid"),
    ({"a": 1}, [{"op": "add", "path": "/b"}], InvalidPatch, "patch.invalid"),
    ({"a": 1}, [{"op": "replace", "path": "/a"}], InvalidPatch, "patch.invalid"),
    ({"a": 1}, [{"op": "test", "path": "/a"}], InvalidPatch, "patch.invalid"),
    ({"a": 1}, [{"op": "add", "value": 1}], InvalidPatch, "patch.invalid"),
    ({"a": 1}, [{"op": "add", "path": 5, "value": 1}], InvalidPatch, "patch.invalid"),
    ({"a": 1}, [{"op": "frobnicate", "path": "/a"}], InvalidPatch, "patch.invalid"),
    ({"a": 1}, [{"op": "ADD", "path": "/b", "value": 1}], InvalidPatch, "patch.invalid"),
    ({"a": 1}, [{"path": "/a", "value": 1}], InvalidPatch, "patch.invalid"),
    ({"a": 1}, [{"op": 1, "path": "/a"}], InvalidPatch, "patch.invalid"),
    ({"a": 1}, ["add"], InvalidPatch, "patch.invalid"),
    ({"a": 1}, [None], InvalidPatch, "patch.invalid"),
    ({"a": 1}, {"op": "add", "path": "/b", "value": 1}, InvalidPatch, "patch.invalid"),
    ({"a": 1}, None, InvalidPatch, "patch.invalid"),
    ({"a": 1}, [{"op": "add", "path": "b", "value": 1}], InvalidPatch, "pointer.invalid"),
    ({"a": 1}, [{"op": "add", "path": "/~2", "value": 1}], InvalidPatch, "pointer.invalid"),
    ({"a": 1}, [{"op": "add", "path": "/a~", "value": 1}], InvalidPatch, "pointer.invalid"),
    ({"a": 1}, [{"op": "move", "from": "a", "path": "/b"}], InvalidPatch, "pointer.invalid"),
    # atomicity: earlier operations must not leak when a later one fails
    (
        {"a": 1},
        [
            {"op": "add", "path": "/b", "value": 2},
            {"op": "remove", "path": "/a"},
            {"op": "remove", "path": "/z"},
        ],
        InvalidPatch,
        "patch.path.notfound",
    ),
    (
        {"a": [1]},
        [{"op": "add", "path": "/a/-", "value": 2}, {"op": "test", "path": "/a/1", "value": 3}],
        PreconditionFailed,
        "patch.test.failed",
    ),
]


@pytest.mark.parametrize(("doc", "ops", "error", "code"), FAILING)
def test_failing_json_patch_table(
    doc: JSON, ops: JSON, error: type[TwinServiceError], code: str
) -> None:
    before = copy.deepcopy(doc)
    with pytest.raises(error) as info:
        apply_json_patch(doc, ops)
    assert type(info.value) is error
    assert info.value.code == code
    assert doc == before


def test_failing_operation_index_is_reported() -> None:
    ops = [{"op": "add", "path": "/b", "value": 1}, {"op": "remove", "path": "/z"}]
    with pytest.raises(InvalidPatch) as info:
        apply_json_patch({}, ops)
    assert "Operation 1" in info.value.message


def test_rfc6902_a13_duplicate_member_is_invalid_json() -> None:
    with pytest.raises(InvalidJson):
        loads_strict('[{"op": "add", "path": "/baz", "value": "qux", "op": "remove"}]')


POINTERS: list[tuple[str, list[str]]] = [
    ("", []),
    ("/", [""]),
    ("//", ["", ""]),
    ("/a", ["a"]),
    ("/a/b", ["a", "b"]),
    ("/a~1b", ["a/b"]),
    ("/~0", ["~"]),
    ("/~01", ["~1"]),
    ("/~10", ["/0"]),
    ("/~0~1", ["~/"]),
    ("/ ", [" "]),
    ("/é", ["é"]),
    ("/0/-", ["0", "-"]),
]


@pytest.mark.parametrize(("pointer", "parts"), POINTERS)
def test_pointer_table(pointer: str, parts: list[str]) -> None:
    assert split_pointer(pointer) == parts
    assert join_pointer(parts) == pointer


@pytest.mark.parametrize("pointer", ["a", "a/b", "/~", "/~2", "/a~b", "/~a"])
def test_invalid_pointers(pointer: str) -> None:
    with pytest.raises(InvalidPointer):
        split_pointer(pointer)


@given(st.lists(st.text(max_size=5), max_size=5))
def test_pointer_round_trip(parts: list[str]) -> None:
    assert split_pointer(join_pointer(parts)) == parts


RFC6901_DOC: JSON = {
    "foo": ["bar", "baz"],
    "": 0,
    "a/b": 1,
    "c%d": 2,
    "e^f": 3,
    "g|h": 4,
    "i\\j": 5,
    'k"l': 6,
    " ": 7,
    "m~n": 8,
}
RFC6901_ROWS: list[tuple[str, JSON]] = [
    ("", RFC6901_DOC),
    ("/foo", ["bar", "baz"]),
    ("/foo/0", "bar"),
    ("/", 0),
    ("/a~1b", 1),
    ("/c%d", 2),
    ("/e^f", 3),
    ("/g|h", 4),
    ("/i\\j", 5),
    ('/k"l', 6),
    ("/ ", 7),
    ("/m~0n", 8),
]


@pytest.mark.parametrize(("pointer", "value"), RFC6901_ROWS)
def test_rfc6901_examples(pointer: str, value: JSON) -> None:
    assert get_at(RFC6901_DOC, split_pointer(pointer)) == value


@pytest.mark.parametrize(
    "pointer",
    ["/foo/2", "/foo/-", "/foo/01", "/foo/x", "/bar", "/foo/0/x", "/ /x", "/foo/" + "9" * 5000],
)
def test_get_at_missing(pointer: str) -> None:
    with pytest.raises(NotFound) as info:
        get_at(RFC6901_DOC, split_pointer(pointer))
    assert info.value.code == "pointer.notfound"
    assert not has_at(RFC6901_DOC, split_pointer(pointer))


@pytest.mark.parametrize(("pointer", "value"), RFC6901_ROWS)
def test_has_at_what_get_at_finds(pointer: str, value: JSON) -> None:
    assert has_at(RFC6901_DOC, split_pointer(pointer))


SET_ROWS: list[tuple[JSON, list[str], JSON, JSON]] = [
    ({}, [], 1, 1),
    ({}, ["a", "b", "c"], 1, {"a": {"b": {"c": 1}}}),
    (None, ["a"], 1, {"a": 1}),
    ({"a": None}, ["a", "b"], 1, {"a": {"b": 1}}),
    ({"a": {"x": 0}}, ["a", "b"], 1, {"a": {"x": 0, "b": 1}}),
    ({"a": [1, 2]}, ["a", "1"], 9, {"a": [1, 9]}),
    ({"a": [1, 2]}, ["a", "-"], 3, {"a": [1, 2, 3]}),
    ({"a": [{}]}, ["a", "0", "b"], 1, {"a": [{"b": 1}]}),
]


@pytest.mark.parametrize(("doc", "parts", "value", "result"), SET_ROWS)
def test_set_at_table(doc: JSON, parts: list[str], value: JSON, result: JSON) -> None:
    before = copy.deepcopy(doc)
    assert set_at(doc, parts, value) == result
    assert doc == before


@pytest.mark.parametrize(
    ("doc", "parts", "error"),
    [
        ({"a": 1}, ["a", "b"], InvalidPointer),
        ({"a": "s"}, ["a", "b"], InvalidPointer),
        ({"a": [1]}, ["a", "1"], NotFound),
        ({"a": [1]}, ["a", "x"], NotFound),
        ({"a": [1]}, ["a", "²"], NotFound),
        ({"a": [1]}, ["a", "9" * 5000], NotFound),  # more digits than int() takes
        ({"a": [1]}, ["a", "-", "b"], NotFound),
    ],
)
def test_set_at_errors(doc: JSON, parts: list[str], error: type[TwinServiceError]) -> None:
    with pytest.raises(error):
        set_at(doc, parts, 1)


@pytest.mark.parametrize(
    ("doc", "parts", "result"),
    [
        ({"a": 1, "b": 2}, ["a"], {"b": 2}),
        ({"a": {"b": 1, "c": 2}}, ["a", "b"], {"a": {"c": 2}}),
        ([1, 2, 3], ["1"], [1, 3]),
        ({"a": [{"b": 1}]}, ["a", "0", "b"], {"a": [{}]}),
    ],
)
def test_remove_at_table(doc: JSON, parts: list[str], result: JSON) -> None:
    before = copy.deepcopy(doc)
    assert remove_at(doc, parts) == result
    assert doc == before


# Random operations over a small path space; every outcome must be typed and atomic.
paths = st.lists(keys | st.sampled_from(["0", "1", "-", "01"]), max_size=3).map(join_pointer)
operations = st.one_of(
    st.builds(lambda p, v: {"op": "add", "path": p, "value": v}, paths, values()),
    st.builds(lambda p: {"op": "remove", "path": p}, paths),
    st.builds(lambda p, v: {"op": "replace", "path": p, "value": v}, paths, values()),
    st.builds(lambda f, p: {"op": "move", "from": f, "path": p}, paths, paths),
    st.builds(lambda f, p: {"op": "copy", "from": f, "path": p}, paths, paths),
    st.builds(lambda p, v: {"op": "test", "path": p, "value": v}, paths, values()),
)
documents = values() | objects()


@given(documents, st.lists(operations, max_size=5))
def test_random_patches_are_typed_and_never_mutate(doc: JSON, ops: list[Op]) -> None:
    before = copy.deepcopy(doc)
    try:
        result = apply_json_patch(doc, ops)
    except (InvalidPatch, PreconditionFailed):
        assert doc == before
        return
    assert doc == before
    if isinstance(result, dict | list):
        _scramble(result)
        assert doc == before


@given(documents, st.lists(operations, max_size=3), st.lists(operations, max_size=3))
def test_patches_compose(doc: JSON, first: list[Op], second: list[Op]) -> None:
    try:
        middle = apply_json_patch(doc, first)
        expected = apply_json_patch(middle, second)
    except (InvalidPatch, PreconditionFailed):
        return
    assert apply_json_patch(doc, first + second) == expected


@given(documents, st.lists(operations, max_size=4))
def test_failing_last_operation_rolls_back_everything(doc: JSON, ops: list[Op]) -> None:
    before = copy.deepcopy(doc)
    failing = {"op": "test", "path": "", "value": "\x00never"}
    with pytest.raises((InvalidPatch, PreconditionFailed)):
        apply_json_patch(doc, [*ops, failing])
    assert doc == before


@given(objects(), keys, values())
def test_add_then_test_then_remove(doc: dict[str, Any], key: str, value: JSON) -> None:
    pointer = join_pointer([key])
    added = apply_json_patch(doc, [{"op": "add", "path": pointer, "value": value}])
    assert json_equal(get_at(added, [key]), value)
    apply_json_patch(added, [{"op": "test", "path": pointer, "value": value}])
    removed = apply_json_patch(added, [{"op": "remove", "path": pointer}])
    assert removed == {k: v for k, v in doc.items() if k != key}


@given(objects(), keys, keys)
def test_copy_and_move(doc: dict[str, Any], source: str, target: str) -> None:
    doc = {**doc, source: {"payload": [1, 2]}}
    src, dst = join_pointer([source]), join_pointer([target])
    copied = apply_json_patch(doc, [{"op": "copy", "from": src, "path": dst}])
    assert copied[target] == copied[source] == {"payload": [1, 2]}
    moved = apply_json_patch(doc, [{"op": "move", "from": src, "path": dst}])
    assert moved[target] == {"payload": [1, 2]}
    assert (source in moved) is (source == target)


_WRITE_NOTHING = ("remove", "test")
_BIG = {"v": list(range(1000))}  # 3,890 bytes of JSON


def _doubling(op: str, k: int) -> list[Op]:
    """``k`` operations (pairs for a move) each doubling the size of ``/v`` (it holds
    itself as its last element), then a replace that makes the document small again."""
    doubling: list[Op] = (
        [{"op": "copy", "from": "/v", "path": "/v/-"}]
        if op == "copy"
        else [
            {"op": "copy", "from": "/v", "path": "/w"},
            {"op": "move", "from": "/w", "path": "/v/-"},
        ]
    )
    return [*(doubling * k), {"op": "replace", "path": "/v", "value": 1}]


@pytest.mark.parametrize("op", ["copy", "move"])
def test_a_patch_that_doubles_the_document_is_refused_at_the_limit(op: str) -> None:
    """The size was checked only after the last operation: 60 doublings would have built
    2**60 copies (never finishing) before the replace made the document small again. The
    limit holds after every operation, so the work stops near the limit."""
    doc = copy.deepcopy(_BIG)
    with pytest.raises(PayloadTooLarge) as info:
        apply_json_patch(doc, _doubling(op, 60), Limits(max_twin_bytes=64 * 1024))
    assert info.value.code == "twin.toolarge"
    assert info.value.extra["limit"] == 64 * 1024
    assert 64 * 1024 < info.value.extra["size"] <= 2 * 64 * 1024 + 16
    assert "The twin would be" in info.value.message
    assert doc == _BIG


def test_a_patch_under_the_limit_is_unaffected() -> None:
    """Three doublings of a 3.9 kB array stay under 64 kB; the result is the unlimited one."""
    ops = _doubling("copy", 3)[:-1]
    limited = apply_json_patch(_BIG, ops, Limits(max_twin_bytes=64 * 1024))
    assert limited == apply_json_patch(_BIG, ops)
    assert 8 * 3890 < len(dumps_bytes(limited)) < 64 * 1024


def test_a_patch_may_replace_a_large_value_any_number_of_times() -> None:
    """Removals are not subtracted from the running bound: the exact size is measured when
    the bound passes the limit, so rewriting a large value stays allowed."""
    blob = "x" * 30_000
    ops = [{"op": "replace", "path": "/b", "value": blob + str(i)} for i in range(10)]
    result = apply_json_patch({"b": blob}, ops, Limits(max_twin_bytes=64 * 1024))
    assert result == {"b": blob + "9"}


def test_a_patch_of_more_operations_than_the_limit_is_refused_before_any() -> None:
    """Each operation may cost up to the twin's size: their number is bounded too."""
    ops: list[Op] = [{"op": "test", "path": "", "value": {}}] * 4
    assert apply_json_patch({}, ops, Limits(max_patch_operations=4)) == {}
    with pytest.raises(LimitExceeded) as info:
        apply_json_patch({}, [*ops, {"op": "nonsense"}], Limits(max_patch_operations=4))
    assert info.value.code == "limits.exceeded" and info.value.extra == {"limit": 4}
    assert info.value.message == "The JSON Patch has 5 operations; the limit is 4."


def test_a_copy_shares_its_value_and_the_input_shares_nothing() -> None:
    """A copy deep-copied its value: a 1 MiB patch of copies of a 26 kB array took a
    minute in Python. Values are never changed in place, so the copy shares it: the work
    of an operation is then the measuring of its value, in C."""
    doc: JSON = {"v": list(range(5500)), "w": 1}
    before = copy.deepcopy(doc)
    ops = [{"op": "copy", "from": "/v", "path": "/w"}, {"op": "add", "path": "/x", "value": [0]}]
    result = apply_json_patch(doc, ops, Limits(max_twin_bytes=64 * 1024))
    assert isinstance(result, dict) and isinstance(doc, dict)
    assert result["w"] is result["v"] and result["w"] is not doc["v"]
    assert result == {**before, "w": before["v"], "x": [0]}
    assert result["x"] is not ops[1]["value"]  # what comes from the request is copied
    _scramble(result)
    assert doc == before


@given(documents, st.lists(operations, max_size=5), st.integers(0, 300))
def test_a_patch_is_refused_exactly_when_a_write_passes_the_limit(
    doc: JSON, ops: list[Op], limit: int
) -> None:
    """Refused (413, input unchanged) if and only if the document after some operation that
    writes is over the limit; otherwise the result is that of the unlimited patch."""
    before = copy.deepcopy(doc)
    over = False
    middle = doc
    try:
        for op in ops:
            middle = apply_json_patch(middle, [op])
            if op["op"] not in _WRITE_NOTHING and len(dumps_bytes(middle)) > limit:
                over = True
                break
        expected = apply_json_patch(doc, ops)
    except (InvalidPatch, PreconditionFailed):
        return
    if over:
        with pytest.raises(PayloadTooLarge):
            apply_json_patch(doc, ops, Limits(max_twin_bytes=limit))
    else:
        assert apply_json_patch(doc, ops, Limits(max_twin_bytes=limit)) == expected
    assert doc == before


def _scramble(value: JSON) -> None:
    if isinstance(value, dict):
        for child in list(value.values()):
            _scramble(child)
        value["\x00scrambled"] = True
    elif isinstance(value, list):
        for child in list(value):
            _scramble(child)
        value.append("\x00scrambled")
