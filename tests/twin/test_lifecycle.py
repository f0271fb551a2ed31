"""The lifecycle of a desired leaf written again: every leaf a write touched is a retry.

A write used to move a leaf to ``pending`` (and give it the write's time to live) only when
its value changed: the same value sent again with ``?ttl=`` kept the old expiry (or none),
an expired or rejected value stayed so, though the write was committed and its metadata
stamped. The rules for other changes are tabled in tests/sync/test_pure_rules.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from twin_service.twin.document import Twin
from twin_service.twin.jsonvalue import Limits
from twin_service.twin.lifecycle import (
    APPLIED,
    EXPIRED,
    PENDING,
    REJECTED,
    lifecycle_for_edit,
    next_lifecycle,
)
from twin_service.twin.operations import Edit, json_patch_twin, merge_patch_twin, replace_twin
from twin_service.types import JSONObject

T0 = datetime(2030, 1, 1, tzinfo=UTC)
T1 = T0 + timedelta(seconds=10)
S0 = "2030-01-01T00:00:00.000Z"
S1 = "2030-01-01T00:00:10.000Z"
IN_2 = "2030-01-01T00:00:12.000Z"
IN_5 = "2030-01-01T00:00:15.000Z"

BEFORE: dict[str, JSONObject | None] = {
    "none": None,
    "pending": {"state": PENDING, "since": S0, "desiredVersion": 1},
    "pending-ttl": {"state": PENDING, "since": S0, "desiredVersion": 1, "expires": IN_2},
    "applied": {"state": APPLIED, "since": S0, "at": S0, "desiredVersion": 1},
    "rejected": {"state": REJECTED, "since": S0, "desiredVersion": 1, "reason": "no"},
    "expired": {"state": EXPIRED, "since": S0, "desiredVersion": 1},
}


def _expected(before: str, matching: bool, touched: bool, ttl: float | None) -> JSONObject | None:
    entry = BEFORE[before]
    if matching:
        if before == "none" or before == "applied":
            return entry  # never in the delta, or applied already: as it was
        return {"state": APPLIED, "since": S1, "at": S1, "desiredVersion": 1}
    if touched or before in ("none", "applied"):
        pending: JSONObject = {"state": PENDING, "since": S1, "desiredVersion": 1}
        if touched and ttl is not None:
            pending["expires"] = IN_5
        return pending
    return entry  # not written: pending, rejected and expired stay


CASES = [
    (before, matching, touched, ttl)
    for before in BEFORE
    for matching in (False, True)
    for touched in (False, True)
    for ttl in (None, 5.0)
]


@pytest.mark.parametrize(
    ("before", "matching", "touched", "ttl"),
    CASES,
    ids=[
        f"{b}-{'matching' if m else 'differing'}-{'written' if t else 'untouched'}-ttl={ttl}"
        for b, m, t, ttl in CASES
    ],
)
def test_the_same_value_written_again(
    before: str, matching: bool, touched: bool, ttl: float | None
) -> None:
    lifecycle = {} if BEFORE[before] is None else {"a": BEFORE[before]}
    desired = {"a": 1}
    out = next_lifecycle(
        lifecycle,
        old_desired=desired,
        desired=desired,
        reported={"a": 1} if matching else {"a": 0},
        desired_version=1,
        now=T1,
        ttl_seconds=ttl,
        written={"a"} if touched else (),
    )
    assert out.get("a") == _expected(before, matching, touched, ttl)


@pytest.mark.parametrize(
    ("written", "touched"),
    [
        ({"b"}, {"b/c", "b/d"}),  # a path covers the leaves below it, not "bc"
        ({"b/c"}, {"b/c"}),
        ({"x"}, set()),  # not a parent of "x~1y" (the key "x/y"), a prefix of its text
        ({"x~1y"}, {"x~1y"}),  # keys are escaped pointers
        ({"zz"}, set()),  # written elsewhere (a deletion)
        (None, {"a", "b/c", "b/d", "bc", "x~1y"}),  # the whole of desired
        ((), set()),
    ],
)
def test_which_leaves_a_write_touches(written: set[str] | None, touched: set[str]) -> None:
    desired = {"a": 1, "b": {"c": 2, "d": 3}, "bc": 4, "x/y": 5}
    pending = {"state": PENDING, "since": S0, "desiredVersion": 1}
    lifecycle = {key: pending for key in ("a", "b/c", "b/d", "bc", "x~1y")}
    out = next_lifecycle(
        lifecycle,
        old_desired=desired,
        desired=desired,
        reported={},
        desired_version=1,
        now=T1,
        ttl_seconds=5,
        written=written,
    )
    assert {key for key, entry in out.items() if entry.get("expires") == IN_5} == touched
    assert {key for key, entry in out.items() if entry == pending} == set(lifecycle) - touched


def test_a_changed_value_is_written_whatever_the_paths_say() -> None:
    out = next_lifecycle(
        {},
        old_desired={"a": 1},
        desired={"a": 2},
        reported={},
        desired_version=2,
        now=T1,
        ttl_seconds=5,
    )
    assert out["a"] == {"state": PENDING, "since": S1, "desiredVersion": 2, "expires": IN_5}


def _twin() -> Twin:
    desired: JSONObject = {"led": "blue", "x/y": 1, "kept": 2}
    lifecycle = {
        "led": BEFORE["rejected"],
        "x~1y": BEFORE["expired"],
        "kept": BEFORE["rejected"],
    }
    return Twin(
        "org.acme:t",
        "org.acme",
        3,
        S0,
        S0,
        desired=desired,
        lifecycle=lifecycle,
        desired_version=1,
    )


@pytest.mark.parametrize(
    "edit",
    [
        merge_patch_twin(_twin(), {"desired": {"led": "blue", "x/y": 1}}),
        json_patch_twin(
            _twin(),
            [
                {"op": "replace", "path": "/desired/led", "value": "blue"},
                {"op": "add", "path": "/desired/x~1y", "value": 1},
            ],
            Limits(),
        ),
    ],
    ids=["merge patch", "JSON patch"],
)
def test_the_paths_of_an_edit_are_the_leaves_written(edit: Edit) -> None:
    """What metadata stamps as written is what the lifecycle takes as a retry."""
    out = lifecycle_for_edit(_twin(), edit, T1, ttl_seconds=5)
    assert out["led"] == {"state": PENDING, "since": S1, "desiredVersion": 1, "expires": IN_5}
    assert out["x~1y"] == out["led"]
    assert out["kept"] == BEFORE["rejected"]  # not written


def test_a_put_of_the_whole_twin_writes_every_desired_leaf() -> None:
    twin = _twin()
    out = lifecycle_for_edit(twin, replace_twin(twin.writable(), twin.twin_id), T1)
    assert {key: entry["state"] for key, entry in out.items()} == dict.fromkeys(
        ("led", "x~1y", "kept"), PENDING
    )


# -- the desired version an entry names -----------------------------------------------------
#
# An entry's desiredVersion is the version that last wrote the leaf's value: a device refusing
# that version (or a later one it has seen) refuses this value. Only a write of the leaf stamps
# the twin's current version; a leaf that changes state by the device's doing (applied, drift,
# refusal) or the clock keeps its entry's. Reported drifting away from an applied value used
# to stamp the current version, and a refusal naming the version the device had seen was
# dropped as "of an earlier value".

REPORTS = {
    "matching": ({"a": 1}, None),
    "drifted": ({"a": 0}, None),
    "refused": ({"a": 0}, {"a": "no"}),
}
VERSION_CASES = [
    (before, report, touched)
    for before in BEFORE
    for report in REPORTS
    for touched in (False, True)
]


@pytest.mark.parametrize(
    ("before", "report", "touched"),
    VERSION_CASES,
    ids=[f"{b}-{r}-{'written' if t else 'untouched'}" for b, r, t in VERSION_CASES],
)
def test_the_version_of_an_entry_is_the_one_that_wrote_its_value(
    before: str, report: str, touched: bool
) -> None:
    lifecycle = {} if BEFORE[before] is None else {"a": BEFORE[before]}
    reported, rejected = REPORTS[report]
    out = next_lifecycle(
        lifecycle,
        old_desired={"a": 1},
        desired={"a": 1},
        reported=reported,
        desired_version=3,
        now=T1,
        rejected=rejected,
        rejected_version=1,
        written={"a"} if touched else (),
    )
    entry = out.get("a")
    if entry is None:  # never in the delta, and not now
        assert (before, report) == ("none", "matching")
        return
    if (before, report) == ("applied", "matching"):
        assert entry == BEFORE["applied"]  # applied already, written again or not: as it was
        return
    # Entries in BEFORE hold version 1; a leaf without one gets the current version.
    assert entry["desiredVersion"] == (3 if touched or before == "none" else 1), entry
    if report == "refused" and not touched:
        assert entry["state"] == REJECTED  # refused at version 1, the one it had


def test_a_refusal_after_drift_names_the_version_the_device_has_seen() -> None:
    """The probe's sequence: x and y written in version 1 and applied, y written again
    (version 2), reported x drifts, the device refuses x naming version 1."""
    d1: JSONObject = {"x": 1, "y": 1}
    d2: JSONObject = {"x": 1, "y": 2}
    lc = next_lifecycle({}, old_desired={}, desired=d1, reported={}, desired_version=1, now=T0)
    lc = next_lifecycle(
        lc, old_desired=d1, desired=d1, reported=d1, desired_version=1, now=T0, written=()
    )
    lc = next_lifecycle(lc, old_desired=d1, desired=d2, reported=d1, desired_version=2, now=T0)
    assert lc["x"]["desiredVersion"] == 1 and lc["y"]["desiredVersion"] == 2
    drifted: JSONObject = {"x": 5, "y": 1}
    lc = next_lifecycle(
        lc, old_desired=d2, desired=d2, reported=drifted, desired_version=2, now=T1, written=()
    )
    assert lc["x"] == {"state": PENDING, "since": S1, "desiredVersion": 1}
    lc = next_lifecycle(
        lc,
        old_desired=d2,
        desired=d2,
        reported=drifted,
        desired_version=2,
        now=T1,
        rejected={"x": "no", "y": "no"},
        rejected_version=1,
        written=(),
    )
    assert lc["x"] == {"state": REJECTED, "since": S1, "desiredVersion": 1, "reason": "no"}
    assert lc["y"]["state"] == PENDING  # version 2's value, which the device had not seen
