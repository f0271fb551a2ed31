"""Translation of API requests into changes, and the written paths that drive metadata."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from twin_service.errors import BadRequest, InvalidPatch, InvalidPointer, NotFound, TwinServiceError
from twin_service.twin.document import SECTIONS, Twin, apply_change
from twin_service.twin.jsonvalue import Limits
from twin_service.twin.metadata import written_paths
from twin_service.twin.operations import (
    Edit,
    delete_at,
    json_patch_twin,
    merge_patch_twin,
    patch_at,
    put_at,
    replace_twin,
)
from twin_service.types import JSON, JSONObject

TWIN_ID = "org.acme:pump-1"
T1, T2 = "2024-01-01T00:00:00.000Z", "2024-01-01T00:00:01.000Z"
S1 = {"modified": T1, "revision": 1}
S2 = {"modified": T2, "revision": 2}


def commit(old: Twin | None, edit: Edit, timestamp: str = T2) -> Twin:
    twin, _ = apply_change(
        old,
        twin_id=TWIN_ID,
        namespace="org.acme",
        values=edit.values,
        written=edit.written,
        timestamp=timestamp,
        origin="tester",
        limits=Limits(),
    )
    return twin


@pytest.fixture
def twin() -> Twin:
    body = {
        "definition": "acme:pump:1",
        "attributes": {"site": "a"},
        "desired": {"fan": {"speed": 1, "mode": "auto"}, "tags": ["x"]},
        "reported": {"fan": {"speed": 1}},
    }
    return commit(None, replace_twin(body, TWIN_ID), timestamp=T1)


WRITTEN: list[tuple[JSON, set[tuple[str, ...]]]] = [
    ({}, set()),
    ({"a": 1}, {("a",)}),
    ({"a": None}, {("a",)}),
    ({"a": {"b": 1, "c": None}}, {("a", "b"), ("a", "c")}),
    ({"a": {}}, set()),
    ({"a": {"b": {}}, "c": [1]}, {("c",)}),
    ({"a": [{"b": 1}]}, {("a",)}),
    (5, {()}),
    (None, {()}),
    ([], {()}),
]


@pytest.mark.parametrize(("patch", "paths"), WRITTEN)
def test_written_paths_table(patch: JSON, paths: set[tuple[str, ...]]) -> None:
    assert written_paths(patch) == paths


# -- PUT of the whole twin ------------------------------------------------------------------------

REPLACE_OK: list[tuple[JSONObject, JSONObject]] = [
    ({}, {"attributes": {}, "desired": {}, "reported": {}, "live": {}, "definition": None}),
    (
        {"desired": {"a": 1}, "definition": "d"},
        {"attributes": {}, "desired": {"a": 1}, "reported": {}, "live": {}, "definition": "d"},
    ),
    (
        {
            "twinId": TWIN_ID,
            "namespace": "other",
            "revision": 9,
            "delta": {"x": 1},
            "metadata": {},
            "created": "x",
        },
        {"attributes": {}, "desired": {}, "reported": {}, "live": {}, "definition": None},
    ),
    (
        {
            "connection": {},
            "lifecycle": {},
            "desiredVersion": 3,
            "reportedVersion": 3,
            "modified": "m",
        },
        {"attributes": {}, "desired": {}, "reported": {}, "live": {}, "definition": None},
    ),
]


@pytest.mark.parametrize(("body", "values"), REPLACE_OK)
def test_replace_twin(body: JSONObject, values: JSONObject) -> None:
    edit = replace_twin(body, TWIN_ID)
    assert edit.values == values
    assert edit.written == dict.fromkeys(SECTIONS)


@pytest.mark.parametrize(
    "body",
    [
        [],
        "x",
        None,
        {"twinId": "org.acme:other"},
        {"twinId": None},
        {"foo": 1},
        {"_private": {}},
        {"Desired": {}},
    ],
)
def test_replace_twin_refused(body: JSON) -> None:
    with pytest.raises(BadRequest) as info:
        replace_twin(body, TWIN_ID)
    assert info.value.status == 400


def test_put_back_a_get_result(twin: Twin) -> None:
    again = commit(twin, replace_twin(twin.to_document(), TWIN_ID))
    assert again.writable() == twin.writable()
    assert again.revision == 2 and again.desired_version == 1
    # PUT writes every leaf, as AWS counts a write of the same value as a write.
    assert again.metadata["desired"] == {"fan": {"speed": S2, "mode": S2}, "tags": S2}


# -- merge patch of the twin -------------------------------------------------------------------

MERGE_OK: list[tuple[JSONObject, JSONObject, JSONObject]] = [
    ({}, {}, {}),
    (
        {"desired": {"fan": {"speed": 2}}},
        {"desired": {"fan": {"speed": 2, "mode": "auto"}, "tags": ["x"]}},
        {"desired": {("fan", "speed")}},
    ),
    ({"desired": {"fan": None}}, {"desired": {"tags": ["x"]}}, {"desired": {("fan",)}}),
    ({"desired": None}, {"desired": {}}, {"desired": None}),
    (
        {"desired": {}},
        {"desired": {"fan": {"speed": 1, "mode": "auto"}, "tags": ["x"]}},
        {"desired": set()},
    ),
    ({"live": {"t": 1}}, {"live": {"t": 1}}, {"live": {("t",)}}),
    ({"definition": None}, {"definition": None}, {}),
    ({"definition": "d2"}, {"definition": "d2"}, {}),
    (
        {"attributes": {"site": None, "n": 1}},
        {"attributes": {"n": 1}},
        {"attributes": {("site",), ("n",)}},
    ),
]


@pytest.mark.parametrize(("patch", "values", "written"), MERGE_OK)
def test_merge_patch_twin(
    twin: Twin, patch: JSONObject, values: JSONObject, written: JSONObject
) -> None:
    before = copy.deepcopy(patch)
    edit = merge_patch_twin(twin, patch)
    assert edit.values == values and edit.written == written
    assert patch == before


@pytest.mark.parametrize(
    "patch",
    [
        [],
        "x",
        None,
        {"revision": 3},
        {"twinId": TWIN_ID},
        {"metadata": None},
        {"delta": {}},
        {"foo": 1},
    ],
)
def test_merge_patch_twin_refused(twin: Twin, patch: JSON) -> None:
    with pytest.raises(BadRequest):
        merge_patch_twin(twin, patch)


@pytest.mark.parametrize(
    ("patch", "code"),
    [
        ({"revision": 3}, "twin.readonly"),
        ({"foo": 1}, "twin.invalid"),
        ({"foo": 1, "delta": {}}, "twin.invalid"),
    ],
)
def test_read_only_fields_have_their_own_code(twin: Twin, patch: JSONObject, code: str) -> None:
    """An unknown field is invalid, as in a PUT (it was twin.readonly, as a read-only one)."""
    with pytest.raises(BadRequest) as info:
        merge_patch_twin(twin, patch)
    assert info.value.code == code
    ops = [{"op": "add", "path": f"/{name}", "value": value} for name, value in patch.items()]
    with pytest.raises(BadRequest) as info:
        json_patch_twin(twin, ops, Limits())
    assert info.value.code == code


def test_empty_merge_patch_keeps_metadata(twin: Twin) -> None:
    after = commit(twin, merge_patch_twin(twin, {"desired": {}, "reported": {"fan": {}}}))
    assert after.metadata == twin.metadata
    assert after.revision == 2 and after.desired_version == 1 and after.reported_version == 1


def test_merge_patch_stamps_written_leaves_only(twin: Twin) -> None:
    after = commit(
        twin,
        merge_patch_twin(
            twin, {"desired": {"fan": {"speed": 1}}, "reported": {"fan": {"mode": "auto"}}}
        ),
    )
    assert after.metadata["desired"] == {"fan": {"speed": S2, "mode": S1}, "tags": S1}
    assert after.metadata["reported"] == {"fan": {"speed": S1, "mode": S2}}
    assert after.desired_version == 1 and after.reported_version == 2
    assert after.delta == {"tags": ["x"]}


# -- JSON patch of the twin --------------------------------------------------------------------


def test_json_patch_twin(twin: Twin) -> None:
    ops = [
        {"op": "add", "path": "/desired/tags/-", "value": "y"},
        {"op": "move", "from": "/desired/fan/mode", "path": "/reported/fan/mode"},
        {"op": "remove", "path": "/definition"},
    ]
    edit = json_patch_twin(twin, ops, Limits())
    after = commit(twin, edit)
    assert after.definition is None
    assert after.desired == {"fan": {"speed": 1}, "tags": ["x", "y"]}
    assert after.reported == {"fan": {"speed": 1, "mode": "auto"}}
    assert after.metadata["desired"] == {"fan": {"speed": S1}, "tags": S2}
    assert after.metadata["reported"] == {"fan": {"speed": S1, "mode": S2}}
    assert after.desired_version == 2 and after.reported_version == 2


def _written(**sections: set[tuple[str, ...]] | None) -> dict[str, Any]:
    return {name: sections.get(name, set()) for name in SECTIONS}


JSON_PATCH_WRITTEN: list[tuple[list[JSONObject], dict[str, Any]]] = [
    ([{"op": "replace", "path": "/desired/fan/speed", "value": 1}],
     _written(desired={("fan", "speed")})),
    ([{"op": "add", "path": "/desired/fan", "value": {"speed": 1}}], _written(desired={("fan",)})),
    ([{"op": "add", "path": "/reported/new", "value": {}}], _written(reported={("new",)})),
    # Arrays are leaves: a write inside one writes the array.
    ([{"op": "add", "path": "/desired/tags/-", "value": "y"}], _written(desired={("tags",)})),
    ([{"op": "replace", "path": "/desired/tags/0", "value": "x"}], _written(desired={("tags",)})),
    ([{"op": "remove", "path": "/desired/fan/mode"}], _written()),
    ([{"op": "test", "path": "/desired/fan/speed", "value": 1}], _written()),
    ([{"op": "copy", "from": "/desired/fan", "path": "/reported/fan"}],
     _written(reported={("fan",)})),
    ([{"op": "move", "from": "/desired/fan/mode", "path": "/live/mode"}],
     _written(live={("mode",)})),
    ([{"op": "replace", "path": "/desired/fan/speed", "value": 1},
      {"op": "add", "path": "/attributes/a~1b", "value": 2}],
     _written(desired={("fan", "speed")}, attributes={("a/b",)})),
    ([{"op": "replace", "path": "/desired", "value": {"a": 1}}], _written(desired=None)),
    ([{"op": "replace", "path": "/definition", "value": "d"}], _written()),
    ([{"op": "replace", "path": "", "value": {"desired": {}}}], dict.fromkeys(SECTIONS)),
]  # fmt: skip


@pytest.mark.parametrize(("ops", "written"), JSON_PATCH_WRITTEN)
def test_json_patch_written_paths(twin: Twin, ops: list[JSONObject], written: Any) -> None:
    """What a JSON Patch writes is the path of each add, replace, copy and move (up to the
    array it goes into); a remove writes nothing."""
    assert json_patch_twin(twin, ops, Limits()).written == written


def test_json_patch_of_the_same_value_stamps_it(twin: Twin) -> None:
    """Writing the same value again counts as a write, as in a merge patch (docs/api.md)."""
    ops = [{"op": "replace", "path": "/desired/fan/speed", "value": 1}]
    after = commit(twin, json_patch_twin(twin, ops, Limits()))
    assert after.desired == twin.desired and after.revision == 2
    assert after.metadata["desired"] == {"fan": {"speed": S2, "mode": S1}, "tags": S1}
    merged = commit(twin, merge_patch_twin(twin, {"desired": {"fan": {"speed": 1}}}))
    assert merged.metadata == after.metadata


@pytest.mark.parametrize(
    ("ops", "error"),
    [
        ([{"op": "add", "path": "/revision", "value": 3}], BadRequest),
        ([{"op": "add", "path": "/metadata", "value": {}}], BadRequest),
        ([{"op": "replace", "path": "", "value": [1]}], BadRequest),
        ([{"op": "remove", "path": "/desired/nope"}], InvalidPatch),
        ({"op": "add"}, InvalidPatch),
    ],
)
def test_json_patch_twin_refused(twin: Twin, ops: Any, error: type[TwinServiceError]) -> None:
    with pytest.raises(error):
        json_patch_twin(twin, ops, Limits())


# -- edits at a pointer inside a section -----------------------------------------------------

PUT_AT: list[tuple[str, list[str], JSON, JSON, set[tuple[str, ...]] | None]] = [
    (
        "desired",
        ["fan", "speed"],
        3,
        {"fan": {"speed": 3, "mode": "auto"}, "tags": ["x"]},
        {("fan", "speed")},
    ),
    (
        "desired",
        ["new", "deep", "leaf"],
        1,
        {"fan": {"speed": 1, "mode": "auto"}, "tags": ["x"], "new": {"deep": {"leaf": 1}}},
        {("new", "deep", "leaf")},
    ),
    (
        "desired",
        ["tags", "0"],
        "z",
        {"fan": {"speed": 1, "mode": "auto"}, "tags": ["z"]},
        {("tags", "0")},
    ),
    (
        "desired",
        ["tags", "-"],
        "z",
        {"fan": {"speed": 1, "mode": "auto"}, "tags": ["x", "z"]},
        {("tags", "-")},
    ),
    ("live", [], {"t": 1}, {"t": 1}, None),
    ("attributes", ["a/b"], 1, {"site": "a", "a/b": 1}, {("a/b",)}),
]


@pytest.mark.parametrize(("section", "parts", "value", "result", "written"), PUT_AT)
def test_put_at(
    twin: Twin, section: str, parts: list[str], value: JSON, result: JSON, written: Any
) -> None:
    edit = put_at(twin, section, parts, value)
    assert edit.values == {section: result}
    assert edit.written == {section: written}


def test_put_at_creates_the_twin_and_parents() -> None:
    edit = put_at(None, "desired", ["a", "b"], 1)
    created = commit(None, edit, timestamp=T1)
    assert created.desired == {"a": {"b": 1}} and created.metadata["desired"] == {"a": {"b": S1}}


@pytest.mark.parametrize(
    ("section", "parts", "error"),
    [
        ("desired", ["fan", "speed", "x"], InvalidPointer),
        ("desired", ["tags", "5"], NotFound),
        ("desired", ["tags", "x"], NotFound),
        ("definition", ["x"], InvalidPointer),
    ],
)
def test_put_at_refused(
    twin: Twin, section: str, parts: list[str], error: type[TwinServiceError]
) -> None:
    with pytest.raises(error):
        put_at(twin, section, parts, 1)


PATCH_AT: list[tuple[list[str], JSON, JSON, set[tuple[str, ...]]]] = [
    (
        ["fan"],
        {"speed": 2},
        {"fan": {"speed": 2, "mode": "auto"}, "tags": ["x"]},
        {("fan", "speed")},
    ),
    (["fan"], {"mode": None}, {"fan": {"speed": 1}, "tags": ["x"]}, {("fan", "mode")}),
    (["fan"], {}, {"fan": {"speed": 1, "mode": "auto"}, "tags": ["x"]}, set()),
    (["fan", "speed"], 5, {"fan": {"speed": 5, "mode": "auto"}, "tags": ["x"]}, {("fan", "speed")}),
    (
        ["new", "x"],
        {"y": 1},
        {"fan": {"speed": 1, "mode": "auto"}, "tags": ["x"], "new": {"x": {"y": 1}}},
        {("new", "x", "y")},
    ),
    ([], {"tags": None}, {"fan": {"speed": 1, "mode": "auto"}}, {("tags",)}),
    # A null merge patch at a pointer deletes there, as {"fan": {"mode": null}} does above.
    (["fan", "mode"], None, {"fan": {"speed": 1}, "tags": ["x"]}, {("fan", "mode")}),
    (["nope", "x"], None, {"fan": {"speed": 1, "mode": "auto"}, "tags": ["x"]}, {("nope", "x")}),
]


@pytest.mark.parametrize(("parts", "patch", "result", "written"), PATCH_AT)
def test_patch_at(
    twin: Twin, parts: list[str], patch: JSON, result: JSON, written: set[tuple[str, ...]]
) -> None:
    edit = patch_at(twin, "desired", parts, patch)
    assert edit.values == {"desired": result}
    assert edit.written == {"desired": written}


DELETE_AT: list[tuple[str, list[str], JSONObject]] = [
    ("desired", ["fan", "mode"], {"desired": {"fan": {"speed": 1}, "tags": ["x"]}}),
    ("desired", ["tags", "0"], {"desired": {"fan": {"speed": 1, "mode": "auto"}, "tags": []}}),
    ("desired", [], {"desired": {}}),
    ("definition", [], {"definition": None}),
]


@pytest.mark.parametrize(("section", "parts", "values"), DELETE_AT)
def test_delete_at(twin: Twin, section: str, parts: list[str], values: JSONObject) -> None:
    edit = delete_at(twin, section, parts)
    assert edit.values == values
    commit(twin, edit)


@pytest.mark.parametrize("parts", [["nope"], ["fan", "nope"], ["tags", "1"], ["fan", "speed", "x"]])
def test_delete_at_missing(twin: Twin, parts: list[str]) -> None:
    with pytest.raises(NotFound):
        delete_at(twin, "desired", parts)


def test_delete_at_drops_metadata(twin: Twin) -> None:
    after = commit(twin, delete_at(twin, "desired", ["fan"]))
    assert after.metadata["desired"] == {"tags": S1}
    assert after.desired_version == 2


@pytest.mark.parametrize("write", [put_at, patch_at])
def test_a_pointer_deeper_than_any_value_is_refused_before_the_parents_are_made(
    twin: Twin, write: Any
) -> None:
    """Each missing parent was made one recursion deeper: 3,000 tokens raised RecursionError."""
    assert write(twin, "desired", ["a"] * 128, 1).values["desired"]  # the deepest allowed
    for tokens in (129, 3000):
        with pytest.raises(TwinServiceError) as refused:
            write(twin, "desired", ["a"] * tokens, 1)
        assert (refused.value.status, refused.value.code) == (400, "limits.exceeded")


@pytest.mark.parametrize(
    "write",
    [
        lambda twin, parts: patch_at(twin, "desired", parts, None),
        lambda twin, parts: delete_at(twin, "desired", parts),
    ],
    ids=["merge-null", "delete"],
)
@pytest.mark.parametrize("tokens", [129, 3000])
def test_a_pointer_deeper_than_any_value_is_refused_with_nothing_there(
    twin: Twin, write: Any, tokens: int
) -> None:
    """Where nothing is, a merge null was no change and a DELETE 404 (pointer.notfound),
    without the limit every other write of such a pointer gets (docs/errors.md)."""
    with pytest.raises(TwinServiceError) as refused:
        write(twin, ["fan"] * tokens)
    assert (refused.value.status, refused.value.code) == (400, "limits.exceeded")
