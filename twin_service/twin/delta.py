"""The delta: every leaf of desired whose value differs from reported at the same path.

Objects are compared leaf by leaf, arrays as whole values, numbers by value. Full paths are
kept; keys present only in reported never appear. An empty object in desired holds no leaf,
so it is never in the delta: a device could not apply it (a merge patch of ``{}`` changes
nothing, RFC 7396), and search counts ``{}`` as absent (``exists(delta)``).
"""

from __future__ import annotations

import copy

from twin_service.twin.patch import json_equal
from twin_service.types import JSON, JSONObject


def compute_delta(desired: JSONObject, reported: JSONObject) -> JSONObject:
    """The part of ``desired`` that ``reported`` does not match yet."""
    delta: JSONObject = {}
    for key, want in desired.items():
        have = reported.get(key, _MISSING) if isinstance(reported, dict) else _MISSING
        if isinstance(want, dict):
            sub = compute_delta(want, have if isinstance(have, dict) else {})
            if sub:
                delta[key] = sub
        elif have is _MISSING or not json_equal(want, have):
            delta[key] = copy.deepcopy(want)
    return delta


def leaf_paths(value: JSON, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], JSON]:
    """Map of every leaf path to its value; arrays and empty objects are leaves.

    Metadata's leaves: an empty object is a value that was written. The delta and the
    lifecycle (:func:`twin_service.twin.lifecycle.leaf_keys`) leave empty objects out.
    """
    if isinstance(value, dict) and value:
        out: dict[tuple[str, ...], JSON] = {}
        for key, child in value.items():
            out.update(leaf_paths(child, (*prefix, key)))
        return out
    return {prefix: value}


class _Missing:
    pass


_MISSING = _Missing()
