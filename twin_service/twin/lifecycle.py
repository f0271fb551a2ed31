"""The desired lifecycle: what happened to each desired value the device had to apply.

For every leaf path of desired that has been in the delta (an empty object is no leaf),
``lifecycle`` holds one entry keyed by the path with JSON-pointer escapes and no leading
slash (``fan/speed``; a key ``a/b`` is ``a~1b``), so RQL finds it as
``lifecycle/fan~1speed/state``::

    {"state": "pending",  "since": t, "desiredVersion": n, "expires": t?}
    {"state": "applied",  "since": t, "at": t, "desiredVersion": n}
    {"state": "rejected", "since": t, "desiredVersion": n, "reason": "out of range"}
    {"state": "expired",  "since": t, "desiredVersion": n}

Transitions, computed by :func:`next_lifecycle` for each committed change:

- a leaf enters the delta (desired written, or reported drifted away) -> ``pending``;
- a desired write of a leaf still in the delta -> ``pending`` again, whatever its state and
  even with the same value (a retry by the operator), with ``expires`` when the write gave
  a time to live and without when it gave none;
- the device names the leaf (or a parent) in ``rejected`` while it is in the delta -> ``rejected``;
- reported matches desired again -> ``applied``;
- ``pending`` past ``expires`` -> ``expired`` (on the next change, or by a sweep calling
  :func:`expire_due`);
- ``rejected`` and ``expired`` stay until desired is written at that leaf (-> ``pending``) or
  the device applies it (-> ``applied``);
- a leaf that leaves desired loses its entry.

``desiredVersion`` is the desired version that last wrote the leaf's value (for a leaf
without an entry, the current one): only a desired write of the leaf moves it on, so a
refusal naming the version the device has seen reaches a value that reported drifted from.

Pure: no I/O; only the ``*_amend`` adapters read the clock.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from twin_service.twin.delta import compute_delta
from twin_service.twin.document import Twin, now_iso
from twin_service.twin.operations import Edit
from twin_service.twin.patch import json_equal
from twin_service.twin.pointer import escape_token, key_path
from twin_service.types import JSON, JSONObject

PENDING: Final = "pending"
APPLIED: Final = "applied"
REJECTED: Final = "rejected"
EXPIRED: Final = "expired"
STATES: Final = (PENDING, APPLIED, REJECTED, EXPIRED)

#: The longest time to live a write may give (100 years). Longer is no expiry a device is
#: waiting for, and past about 8,000 years the expiry time no longer fits a timestamp.
MAX_TTL_SECONDS: Final = 100 * 365 * 24 * 3600

_MISSING: Final = object()


def leaf_keys(value: JSON) -> dict[str, JSON]:
    """Every leaf below the root of ``value`` by its key (see :func:`key_path`); what
    ``{key_path(p): v for p, v in leaf_paths(value).items() if p and v != {}}`` gives,
    without building the tuples (this runs for desired, its delta and the old ones on every
    write). An empty object holds no leaf, as in the delta: an entry a twin stored for one
    (when it was a leaf) goes on the twin's next change of desired or reported."""
    out: dict[str, JSON] = {}
    if isinstance(value, dict):
        _collect_leaves(value, "", out)
    return out


def _collect_leaves(node: JSONObject, prefix: str, out: dict[str, JSON]) -> None:
    for key, child in node.items():
        key = escape_token(key)
        path = f"{prefix}/{key}" if prefix else key
        if isinstance(child, dict):
            _collect_leaves(child, path, out)
        else:
            out[path] = child


def normalize_key(text: str) -> str:
    """A device-supplied path (``fan/speed`` or ``/fan/speed``) in the key form."""
    return text[1:] if text.startswith("/") else text


def _within(key: str, parent: str) -> bool:
    """Whether ``key`` is ``parent`` or lies below it (``""`` is the root)."""
    return parent == "" or key == parent or key.startswith(parent + "/")


def _covered(key: str, rejected: Mapping[str, str]) -> str | None:
    """The reason if ``key`` or one of its parents is rejected."""
    for candidate, reason in rejected.items():
        if _within(key, candidate):
            return reason
    return None


def _newer(entry: JSON, version: int | None) -> bool:
    """Whether ``entry`` is of a desired version later than ``version`` (None: any)."""
    if version is None or not isinstance(entry, dict):
        return False
    since = entry.get("desiredVersion")
    return isinstance(since, int) and since > version


def next_lifecycle(
    lifecycle: JSONObject,
    *,
    old_desired: JSONObject,
    desired: JSONObject,
    reported: JSONObject,
    desired_version: int,
    old_reported: JSONObject | None = None,
    now: datetime,
    rejected: Mapping[str, str] | None = None,
    rejected_version: int | None = None,
    ttl_seconds: float | None = None,
    old_delta: JSONObject | None = None,
    written: Collection[str] | None = (),
) -> JSONObject:
    """The lifecycle after a change that leaves ``desired``/``reported`` as given.

    ``old_reported`` (when known) lets a leaf that was in the delta before this change become
    ``applied`` even if it has no entry yet (a twin written before lifecycles were kept).
    ``desired_version`` is the version of the new desired; ``rejected`` maps normalized keys
    (see :func:`normalize_key`) to the device's reasons, for the desired version
    ``rejected_version`` when the device named one: a leaf pending since a later version
    holds a value the device had not seen, and stays as it is.

    ``written`` holds the keys of the desired paths this change wrote, each covering the
    leaves below it (None: all of desired); a leaf whose value changed is written too. A
    written leaf still in the delta is pending again with ``ttl_seconds`` (or no expiry),
    the same value included: metadata counts it as written (see
    :func:`twin_service.twin.metadata.stamp`), and an operator sends it again to retry.
    """
    stamp = now_iso(now)
    rejected = {normalize_key(k): v for k, v in (rejected or {}).items()}
    old_leaves = leaf_keys(old_desired)
    # A write that left desired alone (a device report) shares it: walk it once.
    leaves = old_leaves if desired is old_desired else leaf_keys(desired)
    in_delta = leaf_keys(compute_delta(desired, reported)).keys()
    if old_delta is None and old_reported is not None:
        old_delta = compute_delta(old_desired, old_reported)
    was_in_delta = leaf_keys(old_delta).keys() if old_delta else set()
    expired_now = expire_due(lifecycle, now) or lifecycle
    out: JSONObject = {}
    for key in leaves:
        entry = expired_now.get(key)
        state = entry.get("state") if isinstance(entry, dict) else None
        touched = (
            written is None
            or any(_within(key, path) for path in written)
            or not json_equal(old_leaves.get(key, _MISSING), leaves[key])
        )
        # The version that wrote the leaf's value: a refusal naming it (or a later one) is
        # of this value. Only a write moves it on; the device and the clock keep it.
        kept = entry.get("desiredVersion") if isinstance(entry, dict) else None
        version = kept if isinstance(kept, int) and not touched else desired_version
        if key not in in_delta:
            if state == APPLIED or (state is None and key not in was_in_delta):
                if entry is not None:
                    out[key] = entry
                continue
            out[key] = {"state": APPLIED, "since": stamp, "at": stamp, "desiredVersion": version}
            continue
        reason = _covered(key, rejected)
        if reason is not None and _newer(entry, rejected_version):
            reason = None  # a refusal of an earlier value: this one is still to apply
        if reason is not None:
            out[key] = {
                "state": REJECTED,
                "since": stamp,
                "desiredVersion": version,
                "reason": reason,
            }
        elif touched or state is None or state == APPLIED:
            pending: JSONObject = {"state": PENDING, "since": stamp, "desiredVersion": version}
            if touched and ttl_seconds is not None:
                pending["expires"] = now_iso(now + timedelta(seconds=ttl_seconds))
            out[key] = pending
        else:
            assert entry is not None
            out[key] = entry
    return out


def expire_due(
    lifecycle: JSONObject, now: datetime, *, desired: JSONObject | None = None
) -> JSONObject | None:
    """``lifecycle`` with every overdue ``pending`` entry ``expired``; None when none is due.

    Given ``desired``, an overdue entry of no leaf of it is dropped instead: one an older
    version kept for an empty object (see :func:`leaf_keys`), which the twin's next write
    of desired or reported drops too. Expired, it was one more change about a value no
    device had to apply, and search kept finding it.
    """
    stamp = now_iso(now)
    leaves = None if desired is None else leaf_keys(desired)
    changed = False
    out: JSONObject = {}
    for key, entry in lifecycle.items():
        expires: JSON = entry.get("expires") if isinstance(entry, dict) else None
        if entry.get("state") == PENDING and isinstance(expires, str) and expires <= stamp:
            changed = True
            if leaves is not None and key not in leaves:
                continue
            out[key] = {
                "state": EXPIRED,
                "since": expires,
                "desiredVersion": entry.get("desiredVersion"),
            }
        else:
            out[key] = entry
    return out if changed else None


def next_expiry(lifecycle: JSONObject) -> str | None:
    """The earliest ``expires`` of a pending entry, for scheduling a sweep."""
    times = [
        e["expires"]
        for e in lifecycle.values()
        if isinstance(e, dict) and e.get("state") == PENDING and isinstance(e.get("expires"), str)
    ]
    return min(times) if times else None


def lifecycle_for_edit(
    twin: Twin | None,
    edit: Edit,
    now: datetime,
    *,
    rejected: Mapping[str, str] | None = None,
    rejected_version: int | None = None,
    ttl_seconds: float | None = None,
) -> JSONObject:
    """The lifecycle of the twin that ``edit`` will produce from ``twin`` (None: creation)."""
    if (
        twin is not None
        and "desired" not in edit.values
        and "reported" not in edit.values
        and not rejected
        and expire_due(twin.lifecycle, now) is None
    ):
        # The lifecycle only follows desired, reported, the device's refusals and the clock.
        return twin.lifecycle
    old_desired: JSONObject = twin.desired if twin else {}
    desired: JSONObject = edit.values.get("desired", old_desired)
    reported: JSONObject = edit.values.get("reported", twin.reported if twin else {})
    paths = edit.written.get("desired", set())
    written = None if paths is None or () in paths else {key_path(path) for path in paths}
    if twin is None:
        version = 1
    else:
        version = twin.desired_version + (0 if json_equal(old_desired, desired) else 1)
    return next_lifecycle(
        twin.lifecycle if twin else {},
        old_desired=old_desired,
        desired=desired,
        reported=reported,
        desired_version=version,
        old_reported=twin.reported if twin else {},
        old_delta=twin.delta if twin else {},
        now=now,
        rejected=rejected,
        rejected_version=rejected_version,
        ttl_seconds=ttl_seconds,
        written=written,
    )


def continue_versions(lifecycle: JSONObject, desired_version: int) -> JSONObject:
    """The lifecycle of a creation, for a twin whose desired versions go on from
    ``desired_version`` (a deleted twin's: :class:`~twin_service.twin.document.Tombstone`)
    instead of 0. Amends see a creation as a twin from nothing, whose first desired
    version is 1."""
    if not desired_version:
        return lifecycle
    return {
        key: {**entry, "desiredVersion": entry["desiredVersion"] + desired_version}
        if isinstance(entry, dict) and isinstance(entry.get("desiredVersion"), int)
        else entry
        for key, entry in lifecycle.items()
    }


def lifecycle_amend(twin: Twin | None, edit: Edit) -> dict[str, Any]:
    """An ``Amend`` for API writes: ``service.mutate(..., amend=lifecycle_amend)``."""
    return {"lifecycle": lifecycle_for_edit(twin, edit, datetime.now(UTC))}


def lifecycle_amend_ttl(ttl_seconds: float | None) -> Callable[[Twin | None, Edit], dict[str, Any]]:
    """Like :func:`lifecycle_amend`, with a time to live for the desired values written."""

    def amend(twin: Twin | None, edit: Edit) -> dict[str, Any]:
        now = datetime.now(UTC)
        return {"lifecycle": lifecycle_for_edit(twin, edit, now, ttl_seconds=ttl_seconds)}

    return amend
