"""Tables and properties for the pure sync rules: lifecycle, device book, connection, payloads."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connectivity.sync_messages import (
    GetRequest,
    ReportedUpdate,
    parse_get,
    parse_reported_update,
    parse_status,
    rejection,
)
from tests.twin.strategies import objects
from twin_service.errors import BadRequest, Conflict, InvalidJson, LimitExceeded, PayloadTooLarge
from twin_service.twin.delta import compute_delta, leaf_paths
from twin_service.twin.device import DeviceBook, TokenRecord, earlier_books, next_connection
from twin_service.twin.lifecycle import (
    APPLIED,
    EXPIRED,
    PENDING,
    REJECTED,
    continue_versions,
    expire_due,
    leaf_keys,
    next_lifecycle,
)
from twin_service.twin.pointer import key_path
from twin_service.types import JSON

T0 = datetime(2030, 1, 1, tzinfo=UTC)
T1 = T0 + timedelta(seconds=10)


def step(lc, old_d, d, r, v=2, old_r=None, now=T1, rejected=None, ttl=None, rv=None):  # type: ignore[no-untyped-def]
    return next_lifecycle(
        lc,
        old_desired=old_d,
        desired=d,
        reported=r,
        desired_version=v,
        old_reported=old_r,
        now=now,
        rejected=rejected,
        rejected_version=rv,
        ttl_seconds=ttl,
    )


PEND = {"state": PENDING, "since": "2030-01-01T00:00:00.000Z", "desiredVersion": 1}

LIFECYCLE_TABLE = [
    # (name, lifecycle, old desired, desired, reported, rejected, expected state of "a")
    ("desired written -> pending", {}, {}, {"a": 1}, {}, None, PENDING),
    ("already matching -> no entry", {}, {}, {"a": 1}, {"a": 1}, None, None),
    (
        "pending, device applies -> applied",
        {"a": PEND},
        {"a": 1},
        {"a": 1},
        {"a": 1},
        None,
        APPLIED,
    ),
    ("pending, still differs -> stays", {"a": PEND}, {"a": 1}, {"a": 1}, {"a": 0}, None, PENDING),
    ("device rejects -> rejected", {"a": PEND}, {"a": 1}, {"a": 1}, {}, {"a": "no"}, REJECTED),
    ("parent rejected -> rejected", {"a": PEND}, {"a": 1}, {"a": 1}, {}, {"": "all"}, REJECTED),
    (
        "applied, drift -> pending",
        {"a": {"state": APPLIED}},
        {"a": 1},
        {"a": 1},
        {"a": 2},
        None,
        PENDING,
    ),
    ("rejected stays", {"a": {"state": REJECTED}}, {"a": 1}, {"a": 1}, {}, None, REJECTED),
    (
        "rejected, rewritten -> pending",
        {"a": {"state": REJECTED}},
        {"a": 1},
        {"a": 2},
        {},
        None,
        PENDING,
    ),
    (
        "rejected, applied later",
        {"a": {"state": REJECTED}},
        {"a": 1},
        {"a": 1},
        {"a": 1},
        None,
        APPLIED,
    ),
    ("expired stays", {"a": {"state": EXPIRED}}, {"a": 1}, {"a": 1}, {}, None, EXPIRED),
    ("leaf removed -> gone", {"a": PEND}, {"a": 1}, {}, {}, None, None),
    ("rejecting a matched leaf is ignored", {}, {"a": 1}, {"a": 1}, {"a": 1}, {"a": "x"}, None),
    # An empty object holds no leaf: nothing for the device to apply, so no entry.
    ("empty object written -> no entry", {}, {}, {"a": {}}, {}, None, None),
    ("empty object over a value -> no entry", {}, {"a": 1}, {"a": {}}, {"a": 5}, None, None),
    (
        "last child deleted -> gone",
        {"a": {"state": APPLIED}},
        {"a": {"b": 1}},
        {"a": {}},
        {"a": {"b": 1}},
        None,
        None,
    ),
    # A twin stored when {} was a leaf heals on its next change of desired or reported.
    ("stored pending empty object -> gone", {"a": PEND}, {"a": {}}, {"a": {}}, {}, None, None),
]


@pytest.mark.parametrize(
    ("lc", "old_d", "d", "r", "rejected", "expected"),
    [row[1:] for row in LIFECYCLE_TABLE],
    ids=[row[0] for row in LIFECYCLE_TABLE],
)
def test_lifecycle_table(lc, old_d, d, r, rejected, expected) -> None:  # type: ignore[no-untyped-def]
    out = step(lc, old_d, d, r, rejected=rejected)
    assert (out.get("a") or {}).get("state") == expected


def test_a_refusal_of_an_earlier_desired_version_leaves_later_values_alone() -> None:
    """The device refused version 3 of desired; "a" was written again in version 4, which
    it had not seen: it stays pending (it was marked rejected, with the old reason). "b",
    pending since version 2, was in version 3: rejected."""
    lc = {
        "a": {**PEND, "desiredVersion": 4},
        "b": {**PEND, "desiredVersion": 2},
    }
    d = {"a": "turbo", "b": 1}
    out = step(lc, d, d, {}, v=4, rejected={"a": "eco unsupported", "b": "no"}, rv=3)
    assert out["a"] == lc["a"]
    assert (out["b"]["state"], out["b"]["reason"]) == (REJECTED, "no")
    # Refusing version 4 itself, or with no version named, rejects it.
    for rv in (4, None):
        out = step(lc, d, d, {}, v=4, rejected={"a": "no"}, rv=rv)
        assert out["a"]["state"] == REJECTED


def test_untracked_leaf_that_was_in_delta_becomes_applied() -> None:
    out = step({}, {"a": 1}, {"a": 1}, {"a": 1}, old_r={})
    assert out["a"] == {
        "state": APPLIED,
        "since": "2030-01-01T00:00:10.000Z",
        "at": "2030-01-01T00:00:10.000Z",
        "desiredVersion": 2,
    }


def test_ttl_expires_pending_entries() -> None:
    out = step({}, {}, {"a": 1, "b": {"c": 2}}, {}, ttl=5, now=T0)
    assert out["a"]["expires"] == "2030-01-01T00:00:05.000Z"
    assert expire_due(out, T0 + timedelta(seconds=4)) is None
    expired = expire_due(out, T1)
    assert expired is not None
    assert {k: v["state"] for k, v in expired.items()} == {"a": EXPIRED, "b/c": EXPIRED}
    # And the next change of the twin sees them expired too.
    assert step(out, {"a": 1}, {"a": 1}, {}, now=T1)["a"]["state"] == EXPIRED


def test_an_overdue_entry_of_no_leaf_of_desired_is_dropped_not_expired() -> None:
    """An older version kept an entry for an empty object (a leaf then): at its expiry the
    sweeper marked it ``expired``, one more change about a value no device had to apply,
    and search still found it, where the twin's next write of desired would drop it."""
    due = {**PEND, "expires": "2030-01-01T00:00:05.000Z"}
    lc = {"a": due, "x~1y": due, "z": PEND}
    desired = {"a": {}, "x/y": 1, "z": 2}
    out = expire_due(lc, T1, desired=desired)
    assert out == {
        "x~1y": {"state": EXPIRED, "since": due["expires"], "desiredVersion": 1},
        "z": PEND,
    }
    # Only such an entry due: its removal is the change.
    assert expire_due({"a": due, "z": PEND}, T1, desired=desired) == {"z": PEND}
    assert expire_due({"z": PEND}, T1, desired=desired) is None


def test_a_creation_after_a_delete_continues_the_desired_versions() -> None:
    created = step({}, {}, {"a": 1, "b": {"c": 2}}, {}, v=1, now=T0)
    assert {k: v["desiredVersion"] for k, v in created.items()} == {"a": 1, "b/c": 1}
    after = continue_versions(created, 7)
    assert {k: v["desiredVersion"] for k, v in after.items()} == {"a": 8, "b/c": 8}
    assert after["a"] == {**created["a"], "desiredVersion": 8}
    assert continue_versions(created, 0) is created
    assert continue_versions({"odd": "kept"}, 3) == {"odd": "kept"}


def test_keys_are_escaped_pointers() -> None:
    assert key_path(("fan", "speed")) == "fan/speed"
    assert key_path(("a/b", "c~d")) == "a~1b/c~0d"


@given(objects(), objects(), objects())
def test_lifecycle_entries_are_exactly_the_tracked_desired_leaves(old_d, d, r) -> None:  # type: ignore[no-untyped-def]
    first = step({}, {}, old_d, {}, old_r={})
    out = step(first, old_d, d, r, old_r={})
    leaves = {key_path(p) for p, v in leaf_paths(d).items() if p and v != {}}
    in_delta = {key_path(p) for p in leaf_paths(compute_delta(d, r)) if p}
    assert set(out) <= leaves
    assert in_delta <= set(out)
    for key, entry in out.items():
        assert (
            entry["state"] in (PENDING, REJECTED, EXPIRED)
            if key in in_delta
            else entry["state"] == APPLIED
        )


# -- device book -------------------------------------------------------------------------


def test_book_round_trip_and_memory() -> None:
    book = DeviceBook()
    for i in range(5):
        book = book.after_report(f"t{i}", i, 10 + i, 20 + i, memory=3)
    assert [t.token for t in book.tokens] == ["t2", "t3", "t4"]
    assert book.applied_desired_version == 4
    again = DeviceBook.read(book.write({"other": 1}))
    assert again == book
    assert again.find("t3") == TokenRecord("t3", 13, 23)
    assert again.find("t0") is None and again.find(None) is None


@given(st.lists(st.booleans(), max_size=60), st.integers(0, 8), st.integers(1, 70))
def test_earlier_books_together_hold_every_token_committed_within_the_depth(
    reports: list[bool], memory: int, depth: int
) -> None:
    # Revision r + 1 is a report with token f"t{r}" where reports[r], another change otherwise.
    books = {0: DeviceBook()}
    for r, is_report in enumerate(reports):
        book = books[r]
        books[r + 1] = book.after_report(f"t{r}", None, r + 1, 0, memory) if is_report else book
    latest = len(reports)
    looked_at = [latest, *earlier_books(latest, memory, depth)]
    assert looked_at == sorted(set(looked_at), reverse=True) and min(looked_at) >= 0
    found = {t.token for r in looked_at for t in books[r].tokens}
    within = {
        f"t{r}" for r, is_report in enumerate(reports) if is_report and r + 1 > latest - depth
    }
    if memory:
        assert within <= found
        # One book per `memory` revisions within the depth: no more reads than needed.
        assert len(looked_at) - 1 <= -(-min(depth, latest) // memory)
    else:
        assert found == set() and looked_at == [latest]


def test_book_keeps_stored_entries_and_skips_malformed_ones() -> None:
    stored = {
        "device": {
            "tokens": [["a", 1, 1], "junk", ["b", "2", 2], ["c", 3], ["d", 4, 4]],
            "appliedDesiredVersion": 2,
        }
    }
    book = DeviceBook.read(stored)
    assert book.tokens == (TokenRecord("a", 1, 1), TokenRecord("d", 4, 4))
    assert book.find("d") == TokenRecord("d", 4, 4)
    assert book.find("b") is None and book.find("c") is None
    after = book.after_report("e", 3, 5, 5, memory=3)
    # The book keeps what it read (malformed entries age out like any other) and adds one.
    assert after.write({})["device"] == {
        "tokens": [["c", 3], ["d", 4, 4], ["e", 5, 5]],
        "appliedDesiredVersion": 3,
    }
    assert stored["device"]["tokens"][-1] == ["d", 4, 4]  # the stored book is not mutated
    assert (
        DeviceBook.read({"device": {"tokens": "x", "appliedDesiredVersion": "7"}}) == DeviceBook()
    )


@pytest.mark.parametrize(
    ("applied", "twin_version", "reported", "ok"),
    [
        (3, 5, None, True),
        (3, 5, 3, True),
        (3, 5, 5, True),
        (3, 5, 2, False),
        (3, 5, 6, False),
        (0, 0, 0, True),
    ],
)
def test_stale_rule(applied: int, twin_version: int, reported: int | None, ok: bool) -> None:
    book = DeviceBook(applied_desired_version=applied)
    if ok:
        book.check_desired_version(reported, twin_version)
    else:
        with pytest.raises(Conflict) as info:
            book.check_desired_version(reported, twin_version)
        assert info.value.code == "version.conflict"


CONNECTION_TABLE = [
    (
        {"status": "unknown", "since": "x", "lastSeen": None},
        "online",
        {"status": "online", "since": "S", "lastSeen": "S"},
    ),
    ({"status": "online", "since": "a", "lastSeen": "2030-01-01T00:00:08.000Z"}, None, None),
    (
        {"status": "online", "since": "a", "lastSeen": "2030-01-01T00:00:00.000Z"},
        None,
        {"status": "online", "since": "a", "lastSeen": "S"},
    ),
    (
        {"status": "online", "since": "a", "lastSeen": "L"},
        "offline",
        {"status": "offline", "since": "S", "lastSeen": "L"},
    ),
    ({"status": "offline", "since": "a", "lastSeen": "L"}, "offline", None),
    (
        {"status": "offline", "since": "a", "lastSeen": "L"},
        None,
        {"status": "online", "since": "S", "lastSeen": "S"},
    ),
]


@pytest.mark.parametrize(("before", "status", "after"), CONNECTION_TABLE)
def test_connection_table(before, status, after) -> None:  # type: ignore[no-untyped-def]
    out = next_connection(before, now=T1, status=status, coalesce_seconds=5)
    stamp = "2030-01-01T00:00:10.000Z"
    expected = None if after is None else {k: (stamp if v == "S" else v) for k, v in after.items()}
    assert out == expected


# -- payloads ----------------------------------------------------------------------------

GOOD = [
    (b'{"state": {"a": 1}}', ReportedUpdate({"a": 1})),
    (b'{"state": {}, "clientToken": "t", "desiredVersion": 3}', ReportedUpdate({}, "t", 3)),
    (b'{"rejected": {"/a": "no"}}', ReportedUpdate({}, rejected=(("/a", "no"),))),
]
BAD = [
    (b"", InvalidJson),
    (b"{", InvalidJson),
    (b'{"a": 1, "a": 2}', InvalidJson),
    (b'{"state": Infinity}', InvalidJson),
    (b"null", BadRequest),
    (b'{"clientToken": "t"}', BadRequest),
    (b'{"state": [], "clientToken": "t"}', BadRequest),
    (b'{"state": {}, "desiredVersion": -1}', BadRequest),
    (b'{"state": {}, "desiredVersion": true}', BadRequest),
    (b'{"state": {}, "desiredVersion": 1.5}', BadRequest),
    (b'{"state": {}, "clientToken": ""}', BadRequest),
    (b'{"state": {}, "clientToken": "' + b"x" * 65 + b'"}', BadRequest),
    (b'{"state": {}, "rejected": []}', BadRequest),
    (b'{"state": {}, "rejected": {"a": "' + b"x" * 257 + b'"}}', LimitExceeded),
    (b'{"state": {}, "version": 1}', BadRequest),
    (b"x" * 2000, PayloadTooLarge),
]


@pytest.mark.parametrize(("payload", "expected"), GOOD)
def test_parse_good_reports(payload: bytes, expected: ReportedUpdate) -> None:
    assert parse_reported_update(payload, 1024) == expected


@pytest.mark.parametrize(("payload", "error"), BAD)
def test_parse_bad_reports(payload: bytes, error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        parse_reported_update(payload, 1024)
    body = rejection(info.value, "tok")  # type: ignore[arg-type]
    assert body["clientToken"] == "tok" and body["code"] in (400, 413) and body["message"]


@pytest.mark.parametrize(
    ("rejected", "error", "message"),
    [
        ({"cfg": "r" * 256}, None, ""),
        ({"cfg": "r" * 257}, LimitExceeded, "'rejected' reason for 'cfg' is 257 characters"),
        ({"cfg": 5}, BadRequest, "'rejected' reason for 'cfg' must be a string"),
        ({f"p{i}": "r" for i in range(256)}, None, ""),
        ({f"p{i}": "r" for i in range(257)}, LimitExceeded, "'rejected' names 257 paths"),
    ],
)
def test_a_refusal_is_bounded(
    rejected: dict[str, JSON], error: type[Exception] | None, message: str
) -> None:
    """What a device's refusal can make the service write is bounded at parsing: the reason
    goes into the lifecycle entry of every leaf under its path."""
    payload = json.dumps({"state": {}, "rejected": rejected}).encode()
    if error is None:
        assert dict(parse_reported_update(payload, 10_000).rejected) == rejected
        return
    with pytest.raises(error) as info:
        parse_reported_update(payload, 10_000)
    assert type(info.value) is error and message in str(info.value)


@given(st.binary(max_size=200))
def test_parsers_never_raise_anything_untyped(payload: bytes) -> None:
    for parse in (parse_reported_update, parse_get):
        with contextlib.suppress(BadRequest, PayloadTooLarge):
            parse(payload, 100)
    assert parse_status(payload) in (None, "online", "offline")


def test_get_and_status() -> None:
    assert parse_get(b"", 10) == GetRequest()
    assert parse_get(b'{"clientToken": "g"}', 100) == GetRequest("g")
    assert [parse_status(p) for p in (b"online", b'"offline"', b"", b"bogus")] == [
        "online",
        "offline",
        None,
        None,
    ]


@given(value=objects() | st.integers() | st.text(max_size=3))
def test_leaf_keys_are_the_escaped_leaf_paths(value: JSON) -> None:
    # Empty objects are leaves of metadata (a value that was written), not of the lifecycle.
    expected = {key_path(p): v for p, v in leaf_paths(value).items() if p and v != {}}
    assert leaf_keys(value) == expected
    assert list(leaf_keys(value)) == list(expected)  # same order too
