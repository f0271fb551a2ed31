"""``apply_change``: revisions, section versions, per-leaf metadata, limits and the event."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.twin.strategies import non_null_scalars, objects
from twin_service.errors import (
    BadRequest,
    InvalidJson,
    LimitExceeded,
    PayloadTooLarge,
    TwinServiceError,
)
from twin_service.twin.delta import leaf_paths
from twin_service.twin.document import (
    SECTIONS,
    STAMPED,
    Tombstone,
    Twin,
    Written,
    apply_change,
    deletion_event,
    document_from_storage,
    now_iso,
    tombstone_of,
)
from twin_service.twin.jsonvalue import Limits, dumps
from twin_service.twin.patch import json_equal, merge_patch
from twin_service.types import JSONObject

TWIN_ID = "org.acme:pump-1"
T1, T2, T3 = "2024-01-01T00:00:00.000Z", "2024-01-01T00:00:01.000Z", "2024-01-01T00:00:02.000Z"
S1 = {"modified": T1, "revision": 1}
S2 = {"modified": T2, "revision": 2}
LIMITS = Limits()


def change(
    old: Twin | None,
    values: JSONObject,
    written: Written | None = None,
    *,
    timestamp: str = T2,
    limits: Limits = LIMITS,
    **extra: Any,
) -> tuple[Twin, Any]:
    return apply_change(
        old,
        twin_id=TWIN_ID,
        namespace="org.acme",
        values=values,
        written=written if written is not None else {name: set() for name in values},
        timestamp=timestamp,
        origin="tester",
        limits=limits,
        **extra,
    )


BASE_VALUES: JSONObject = {
    "attributes": {"x": 1},
    "desired": {"a": 1, "b": {"c": 2}},
    "reported": {"a": 1},
    "live": {"t": 0},
}


@pytest.fixture
def base() -> Twin:
    twin, _ = change(None, copy.deepcopy(BASE_VALUES), timestamp=T1)
    return twin


def test_creation(base: Twin) -> None:
    assert base.revision == 1
    assert base.desired_version == 1 and base.reported_version == 1
    assert base.created == base.modified == T1
    assert base.twin_id == TWIN_ID and base.namespace == "org.acme"
    assert base.metadata == {
        "desired": {"a": S1, "b": {"c": S1}},
        "reported": {"a": S1},
        "live": {"t": S1},
    }
    assert base.connection["status"] == "unknown"


BASE_META: JSONObject = {
    "desired": {"a": S1, "b": {"c": S1}},
    "reported": {"a": S1},
    "live": {"t": S1},
}

# (values, written, desiredVersion, reportedVersion, metadata) after one change of the base twin.
CHANGES: list[tuple[JSONObject, Written | None, int, int, JSONObject]] = [
    ({}, {}, 1, 1, BASE_META),
    ({"desired": {"a": 1, "b": {"c": 2}}}, None, 1, 1, BASE_META),
    (
        {"desired": {"a": 1, "b": {"c": 2}}},
        {"desired": None},
        1,
        1,
        {**BASE_META, "desired": {"a": S2, "b": {"c": S2}}},
    ),
    (
        {"desired": {"a": 1, "b": {"c": 2}}},
        {"desired": {()}},
        1,
        1,
        {**BASE_META, "desired": {"a": S2, "b": {"c": S2}}},
    ),
    (
        {"desired": {"a": 1, "b": {"c": 2}}},
        {"desired": {("a",)}},
        1,
        1,
        {**BASE_META, "desired": {"a": S2, "b": {"c": S1}}},
    ),
    (
        {"desired": {"a": 1, "b": {"c": 2}}},
        {"desired": {("b",)}},
        1,
        1,
        {**BASE_META, "desired": {"a": S1, "b": {"c": S2}}},
    ),
    ({"desired": {"a": 1, "b": {"c": 2}}}, {"desired": {("zz",)}}, 1, 1, BASE_META),
    (
        {"desired": {"a": 2, "b": {"c": 2}}},
        None,
        2,
        1,
        {**BASE_META, "desired": {"a": S2, "b": {"c": S1}}},
    ),
    ({"desired": {"a": 1.0, "b": {"c": 2}}}, None, 1, 1, BASE_META),
    (
        {"desired": {"a": True, "b": {"c": 2}}},
        None,
        2,
        1,
        {**BASE_META, "desired": {"a": S2, "b": {"c": S1}}},
    ),
    (
        {"desired": {"a": "1", "b": {"c": 2}}},
        None,
        2,
        1,
        {**BASE_META, "desired": {"a": S2, "b": {"c": S1}}},
    ),
    (
        {"desired": {"a": [1], "b": {"c": 2}}},
        None,
        2,
        1,
        {**BASE_META, "desired": {"a": S2, "b": {"c": S1}}},
    ),
    ({"desired": {"a": 1}}, None, 2, 1, {**BASE_META, "desired": {"a": S1}}),
    ({"desired": {}}, None, 2, 1, {"reported": {"a": S1}, "live": {"t": S1}}),
    (
        {"desired": {"a": 1, "b": {"c": 2, "d": 3}}},
        None,
        2,
        1,
        {**BASE_META, "desired": {"a": S1, "b": {"c": S1, "d": S2}}},
    ),
    ({"desired": {"a": 1, "b": {}}}, None, 2, 1, {**BASE_META, "desired": {"a": S1, "b": S2}}),
    ({"desired": {"a": 1, "b": 5}}, None, 2, 1, {**BASE_META, "desired": {"a": S1, "b": S2}}),
    (
        {"desired": {"a": {"n": 1}, "b": {"c": 2}}},
        None,
        2,
        1,
        {**BASE_META, "desired": {"a": {"n": S2}, "b": {"c": S1}}},
    ),
    ({"reported": {"a": 2}}, None, 1, 2, {**BASE_META, "reported": {"a": S2}}),
    (
        {"reported": {"a": 1, "b": {"c": 2}}},
        None,
        1,
        2,
        {**BASE_META, "reported": {"a": S1, "b": {"c": S2}}},
    ),
    ({"reported": {}}, None, 1, 2, {"desired": BASE_META["desired"], "live": {"t": S1}}),
    ({"attributes": {"x": 2}}, None, 1, 1, BASE_META),
    ({"attributes": {}}, None, 1, 1, BASE_META),
    ({"live": {"t": 1}}, None, 1, 1, {**BASE_META, "live": {"t": S2}}),
    ({"live": {"t": 0, "u": {}}}, None, 1, 1, {**BASE_META, "live": {"t": S1, "u": S2}}),
    ({"definition": "acme:pump:2"}, None, 1, 1, BASE_META),
    (
        {"desired": {"a": 3, "b": {"c": 2}}, "reported": {"a": 3}},
        None,
        2,
        2,
        {**BASE_META, "desired": {"a": S2, "b": {"c": S1}}, "reported": {"a": S2}},
    ),
]


@pytest.mark.parametrize(
    ("values", "written", "desired_version", "reported_version", "metadata"), CHANGES
)
def test_change_rules(
    base: Twin,
    values: JSONObject,
    written: Written | None,
    desired_version: int,
    reported_version: int,
    metadata: JSONObject,
) -> None:
    before = copy.deepcopy(base.to_storage())
    new, event = change(base, values, written)
    assert new.revision == 2 and event.revision == 2
    assert new.created == T1 and new.modified == T2
    assert (new.desired_version, new.reported_version) == (desired_version, reported_version)
    assert new.metadata == metadata
    assert base.to_storage() == before
    for name in SECTIONS:
        expected = values.get(name, BASE_VALUES[name])
        assert new.section(name) == expected


def test_revision_counts_every_committed_change(base: Twin) -> None:
    twin = base
    for revision in range(2, 7):
        twin, event = change(twin, {}, {})
        assert twin.revision == event.revision == revision
    assert (twin.desired_version, twin.reported_version) == (1, 1)


def test_metadata_survives_later_changes(base: Twin) -> None:
    second, _ = change(base, {"desired": {"a": 2, "b": {"c": 2}}})
    third, _ = change(second, {"reported": {"a": 2}}, timestamp=T3)
    assert third.metadata["desired"] == {"a": S2, "b": {"c": S1}}
    assert third.metadata["reported"] == {"a": {"modified": T3, "revision": 3}}


# -- limits -----------------------------------------------------------------------------------


def _size(values: JSONObject) -> int:
    return len(dumps(values).encode("utf-8"))


@pytest.mark.parametrize("slack", [0, 1, 50])
def test_size_limit_is_checked_after_the_change(base: Twin, slack: int) -> None:
    after = {**base.writable(), "attributes": {"x": 1, "blob": "é" * 100}}
    limit = _size(after)
    small_enough = Limits(max_twin_bytes=limit + slack)
    new, _ = change(base, {"attributes": after["attributes"]}, limits=small_enough)
    assert new.attributes == after["attributes"]
    too_small = Limits(max_twin_bytes=limit - 1 - slack)
    assert _size(base.writable()) <= too_small.max_twin_bytes
    with pytest.raises(PayloadTooLarge) as info:
        change(base, {"attributes": after["attributes"]}, limits=too_small)
    assert info.value.status == 413
    assert info.value.extra == {"size": limit, "limit": too_small.max_twin_bytes}


def test_size_limit_counts_sections_that_did_not_change(base: Twin) -> None:
    big, _ = change(base, {"reported": {"blob": "x" * 500}})
    limit = Limits(max_twin_bytes=_size(big.writable()) + len(',"d":1'))
    change(big, {"desired": {**big.desired, "d": 1}}, limits=limit)
    with pytest.raises(PayloadTooLarge):
        change(big, {"desired": {**big.desired, "d": "123456789"}}, limits=limit)


def test_size_limit_on_creation() -> None:
    with pytest.raises(PayloadTooLarge):
        change(None, {"desired": {"blob": "x" * 200}}, limits=Limits(max_twin_bytes=100))


INVALID_VALUES: list[tuple[JSONObject, type[TwinServiceError]]] = [
    ({"desired": [1]}, BadRequest),
    ({"desired": None}, BadRequest),
    ({"attributes": "x"}, BadRequest),
    ({"definition": 5}, BadRequest),
    ({"revision": 5}, BadRequest),
    ({"metadata": {}}, BadRequest),
    ({"unknown": {}}, BadRequest),
    ({"desired": {"": 1}}, LimitExceeded),
    ({"reported": {"a\x00": 1}}, LimitExceeded),
    ({"live": {"k" * 257: 1}}, LimitExceeded),
    ({"attributes": {"a": {"b": {"c": {"d": 1}}}}}, LimitExceeded),
    ({"desired": {"a": float("nan")}}, InvalidJson),
]


@pytest.mark.parametrize(("values", "error"), INVALID_VALUES)
def test_invalid_values_are_refused(
    base: Twin, values: JSONObject, error: type[TwinServiceError]
) -> None:
    with pytest.raises(error) as info:
        change(base, values, {}, limits=Limits(max_depth=3))
    assert info.value.status == 400


@pytest.mark.parametrize(
    ("values", "pointer"),
    [
        ({"desired": {"a": None}}, "/desired/a"),
        ({"reported": {"z": None}}, "/reported/z"),
        ({"attributes": {"a": {"b": None}}}, "/attributes/a/b"),
        ({"live": {"t": 0, "x": {"y": {"z": None}}}}, "/live/x/y/z"),
    ],
)
def test_a_null_is_never_a_stored_value(base: Twin, values: JSONObject, pointer: str) -> None:
    """Null deletes in a merge patch, and the event's ``changes`` is one: stored, it would be
    described as a deletion, and a device told it in a delta could never report it back."""
    for old in (None, base):
        with pytest.raises(BadRequest) as info:
            change(old, values)
        assert info.value.code == "twin.invalid"
        assert f"The value at {pointer} is null" in info.value.message
        assert "DELETE" in info.value.message


def test_an_array_may_hold_a_null(base: Twin) -> None:
    """A merge patch replaces an array whole, so a null in it means nothing else."""
    twin, event = change(base, {"desired": {"a": [1, None, {"c": None}]}})
    assert twin.desired == {"a": [1, None, {"c": None}]}
    assert event.changes == {"desired": {"a": [1, None, {"c": None}], "b": None}}


def test_a_null_stored_before_the_rule_does_not_block_other_writes() -> None:
    legacy = Twin(
        twin_id=TWIN_ID, namespace="org.acme", revision=1, created=T1, modified=T1,
        desired={"a": None, "b": {"c": None}},
    )  # fmt: skip
    twin, _ = change(legacy, {"desired": {"a": None, "b": {"c": None, "d": 1}}})
    assert twin.desired == {"a": None, "b": {"c": None, "d": 1}}


# -- the change event ---------------------------------------------------------------------------


def test_creation_event() -> None:
    values = {**copy.deepcopy(BASE_VALUES), "definition": "acme:pump:1", "live": {}}
    twin, event = change(None, values, timestamp=T1, lifecycle={"state": "new"})
    assert event.action == "created" and event.revision == 1 and event.timestamp == T1
    assert event.twin_id == TWIN_ID and event.origin == "tester"
    assert event.changes == {
        "definition": "acme:pump:1",
        "attributes": {"x": 1},
        "desired": {"a": 1, "b": {"c": 2}},
        "reported": {"a": 1},
        "connection": twin.connection,
        "lifecycle": {"state": "new"},
    }
    event.changes["desired"]["a"] = 99
    assert twin.desired["a"] == 1


# (values, extra keyword arguments, expected changes) after one change of the base twin.
EVENTS: list[tuple[JSONObject, JSONObject, JSONObject]] = [
    ({}, {}, {}),
    ({"desired": {"a": 1.0, "b": {"c": 2}}}, {}, {}),
    ({"desired": {"a": 2, "b": {"c": 2}}}, {}, {"desired": {"a": 2}}),
    ({"desired": {"a": 1}}, {}, {"desired": {"b": None}}),
    ({"desired": {"a": 1, "b": {}}}, {}, {"desired": {"b": {"c": None}}}),
    ({"desired": {}}, {}, {"desired": {"a": None, "b": None}}),
    ({"reported": {"a": 1, "z": [1]}}, {}, {"reported": {"z": [1]}}),
    ({"attributes": {"x": 1, "y": {"z": 1}}}, {}, {"attributes": {"y": {"z": 1}}}),
    ({"definition": "acme:pump:2"}, {}, {"definition": "acme:pump:2"}),
    (
        {"live": {"t": 0}},
        {"connection": {"status": "connected"}},
        {"connection": {"status": "connected", "since": None, "lastSeen": None}},
    ),
    ({}, {"lifecycle": {"state": "active"}}, {"lifecycle": {"state": "active"}}),
    ({}, {"private": {"token": "t"}}, {}),
]


@pytest.mark.parametrize(("values", "extra", "changes"), EVENTS)
def test_change_events(
    base: Twin, values: JSONObject, extra: JSONObject, changes: JSONObject
) -> None:
    new, event = change(base, values, **extra)
    assert event.action == "modified" and event.revision == new.revision == 2
    assert event.timestamp == T2 and event.twin_id == TWIN_ID
    assert event.changes == changes
    assert type(event).from_json(event.to_json()) == event


def test_definition_removal_event(base: Twin) -> None:
    with_definition, _ = change(base, {"definition": "acme:pump:1"})
    removed, event = change(with_definition, {"definition": None}, timestamp=T3)
    assert removed.definition is None and event.changes == {"definition": None}


def test_deletion_event(base: Twin) -> None:
    event = deletion_event(base, timestamp=T2, origin="tester")
    assert event.action == "deleted" and event.revision == 2 and event.changes == {}


def test_tombstone_of_a_deletion(base: Twin) -> None:
    reported, _ = change(base, {"reported": {"speed": 1}}, timestamp=T3)
    gone = tombstone_of(reported)
    assert gone == Tombstone(3, reported.desired_version, 2)
    assert gone.revision == deletion_event(reported, timestamp=T3, origin="t").revision


@pytest.mark.parametrize(
    ("values", "revision", "desired_version", "reported_version"),
    [
        ({}, 8, 4, 3),
        ({"desired": {"fan": 1}}, 8, 4, 3),
        ({"reported": {"fan": 1}, "attributes": {"a": 1}}, 8, 4, 3),
    ],
)
def test_a_creation_goes_on_from_the_tombstone(
    values: JSONObject, revision: int, desired_version: int, reported_version: int
) -> None:
    """Every creation counts one on each version, as without a tombstone (1, 1)."""
    twin, event = change(None, values, tombstone=Tombstone(7, 3, 2), incarnation="i2")
    assert (twin.revision, twin.desired_version, twin.reported_version) == (
        revision,
        desired_version,
        reported_version,
    )
    assert event.action == "created" and event.revision == revision
    assert twin.created == twin.modified == T2 and twin.incarnation == "i2"
    stamps = [json.dumps(stamp) for stamp in twin.metadata.values()]
    assert all(f'"revision": {revision}' in text for text in stamps)
    assert len(stamps) == len(set(values) & set(STAMPED))
    fresh, _ = change(None, values)
    assert (fresh.revision, fresh.desired_version, fresh.reported_version) == (1, 1, 1)


sections = st.fixed_dictionaries(
    {}, optional={name: objects(non_null_scalars) for name in SECTIONS}
)


@given(sections, sections)
def test_event_changes_patch_old_into_new(first: JSONObject, second: JSONObject) -> None:
    old, _ = change(None, first, timestamp=T1)
    new, event = change(old, second)
    for name in SECTIONS:
        patch = event.changes.get(name, {})
        assert json_equal(merge_patch(old.section(name), patch), new.section(name))
        assert (name in event.changes) is not json_equal(old.section(name), new.section(name))


@given(sections, sections, st.sampled_from([None, "set", "root"]))
def test_versions_and_metadata_follow_values(
    first: JSONObject, second: JSONObject, mode: str | None
) -> None:
    old, _ = change(None, first, timestamp=T1)
    choices: dict[str | None, set[tuple[str, ...]] | None] = {
        "set": set(),
        "root": {()},
        None: None,
    }
    written: Written = {name: choices[mode] for name in second}
    new, _ = change(old, second, written)
    assert new.desired_version == 1 + (not json_equal(old.desired, new.desired))
    assert new.reported_version == 1 + (not json_equal(old.reported, new.reported))
    for name in STAMPED:
        section = new.section(name)
        meta = new.metadata.get(name, {})
        leaves = leaf_paths(section) if section else {}
        old_leaves = leaf_paths(old.section(name)) if old.section(name) else {}
        meta_leaves = leaf_paths(meta, ()) if meta else {}
        assert {path[:-1] for path in meta_leaves} == set(leaves)
        for path, value in leaves.items():
            stamp = _stamp(meta, path)
            fresh = path not in old_leaves or not json_equal(old_leaves[path], value)
            if fresh or (name in second and mode != "set"):
                assert stamp == S2
            else:
                assert stamp == S1


def _stamp(meta: JSONObject, path: tuple[str, ...]) -> Any:
    node: Any = meta
    for part in path:
        node = node[part]
    return node


# -- time and storage --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("moment", "text"),
    [
        (datetime(2024, 1, 2, 3, 4, 5, 678901, UTC), "2024-01-02T03:04:05.678Z"),
        (datetime(2024, 1, 2, 3, 4, 5, 999999, UTC), "2024-01-02T03:04:05.999Z"),
        (datetime(2024, 1, 2, 3, 4, 5, 0, UTC), "2024-01-02T03:04:05.000Z"),
        (
            datetime(2024, 1, 2, 3, 4, 5, 1000, timezone(timedelta(hours=2))),
            "2024-01-02T01:04:05.001Z",
        ),
        (
            datetime(2024, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=1))),
            "2023-12-31T23:30:00.000Z",
        ),
        (datetime(5, 6, 7, 8, 9, 10, tzinfo=UTC), "0005-06-07T08:09:10.000Z"),
    ],
)
def test_now_iso_table(moment: datetime, text: str) -> None:
    assert now_iso(moment) == text


def test_now_iso_default_is_now() -> None:
    text = now_iso()
    assert len(text) == 24 and text.endswith("Z") and text[10] == "T"
    parsed = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs(datetime.now(UTC) - parsed) < timedelta(seconds=5)


def test_storage_round_trip(base: Twin) -> None:
    twin, _ = change(base, {"definition": "d"}, private={"tokens": ["a"]})
    stored = twin.to_storage()
    assert "delta" not in stored and stored["_private"] == {"tokens": ["a"]}
    assert Twin.from_storage(stored) == twin
    document = twin.to_document()
    assert document["delta"] == {"b": {"c": 2}} and "_private" not in document
    assert document["revision"] == 2 and document["desiredVersion"] == 1


@given(sections, sections)
def test_document_from_storage_is_the_twins_document(first: JSONObject, second: JSONObject) -> None:
    # What the SQLite writer indexes, decoded from the stored JSON without building the
    # twin, must be the API document the twin gives (delta included, private left out).
    old, _ = change(None, first, timestamp=T1, private={"tokens": ["a"]})
    for twin in (old, change(old, second)[0]):
        stored = json.loads(dumps(twin.to_storage()))
        assert document_from_storage(stored) == twin.to_document()
