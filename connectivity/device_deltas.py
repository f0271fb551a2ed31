"""Which delta a device app is handed after a (re)connection: pure rules, no I/O.

A persistent session replays the deltas it queued while the device was away, oldest first,
and may end with a cleared one (empty payload): the service has withdrawn them all. The
``get`` the device sends on connecting says what the twin's delta is now, so
:class:`connectivity.device.DeviceClient` holds what arrives until it answers, then hands the
app at most one delta: :func:`delta_after_get`. A cleared message carries no desiredVersion,
so when one is held and the answer has a delta, which came first is unknown: the device fetches
the twin once more (:func:`fetch_again`), and that answer decides.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: A delta message's body (``{"state": {...}, "desiredVersion": n}``), or None for a cleared one.
DeltaMessage = dict[str, Any] | None


def older(delta: dict[str, Any], than: dict[str, Any]) -> bool:
    """Whether ``delta`` is for an older desired version than ``than`` (a delta or a ``get``
    answer: both carry ``desiredVersion``)."""
    version, current = delta.get("desiredVersion"), than.get("desiredVersion")
    return isinstance(version, int) and isinstance(current, int) and version < current


def delta_of(twin: dict[str, Any]) -> dict[str, Any] | None:
    """The delta message a ``get`` answer stands for; None when the twin has no delta."""
    state = twin.get("delta")
    if not isinstance(state, dict) or not state:
        return None
    return {"state": state, "desiredVersion": twin.get("desiredVersion")}


def delta_after_get(held: Sequence[DeltaMessage], twin: dict[str, Any] | None) -> DeltaMessage:
    """The one delta to hand the app once the connection's ``get`` answered ``twin`` (None:
    it failed), given the delta messages ``held`` since the connection began, in arrival order.

    The answer outdates every message published before the service read the twin: the replayed
    queue, the retained delta. Only messages for a newer desired version are surely later (the
    service publishes deltas on another connection than its answers, so one may overtake the
    answer), and so is whatever arrives after the first of them, a cleared one included. With
    no answer, the last message held is the newest word.
    """
    if twin is None:
        return held[-1] if held else None
    current = delta_of(twin)
    later = False
    for message in held:
        later = later or (message is not None and older(twin, message))
        if later:
            current = message
    return current


def fetch_again(held: Sequence[DeltaMessage], twin: dict[str, Any] | None) -> bool:
    """Whether the ``get`` answer ``twin`` cannot decide the delta, given the messages ``held``.

    It cannot when it has a delta and a cleared message is held that no newer delta came
    before: the service may have read the twin for the answer, then withdrawn its delta (an
    operator reverted desired) and published the cleared message on its own connection, which
    overtook the answer; handing the answer's delta would hand a withdrawn one, and nothing
    would withdraw it later. A ``get`` sent now is read after the commit of every cleared
    message held, so its answer decides (once: a fetch per cleared delta racing it would be
    unbounded; if it fails, the last message held decides, as with no answer).
    """
    current = delta_of(twin) if twin is not None else None
    return current is not None and None in held and delta_after_get(held, twin) == current
