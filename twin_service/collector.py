"""The garbage collector's settings for processes that hold many twins."""

from __future__ import annotations

import gc


def tune_gc(thresholds: tuple[int, int, int]) -> None:
    """Keep full garbage collections out of the request path.

    Used by ``serve`` and by the SQLite writer process (which keeps the documents it last
    indexed). Twins are trees of dicts, and the caches hold thousands of them: a full (oldest
    generation) collection walks them all, about 150 ms at 10,000 cached twins. With
    CPython's default thresholds one ran every few seconds under writes, and it was the p99 of
    PATCH (and a fifth of its CPU). JSON trees hold no reference cycles, so reference counting
    frees them either way; the collector is only needed for the rare cycles elsewhere, and
    the young generations still catch those. Everything alive at the call (in ``serve``,
    the modules, routes and schemas of the built app) is frozen out of every later
    collection.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*thresholds)
