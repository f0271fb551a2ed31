"""Stopping background tasks (journal readers, maintenance loops, indexers) for good."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)

# How long a task gets to end after each cancellation before it is cancelled again.
_RECANCEL_SECONDS = 0.2


async def stop_task(task: asyncio.Task[Any] | None, deadline_seconds: float = 10.0) -> bool:
    """Cancel ``task`` and wait until it has ended; False if it outlived the deadline.

    Why more than once: a cancellation can be lost. Seen with MongoDB gone: the store's
    maintenance loop, cancelled in pymongo's server selection, carried on, took the
    selection timeout for an ordinary failure, logged it and retried, and the service never
    stopped. (The likely mechanism: Python 3.11's ``asyncio.wait_for``, which that selection
    waits in, returns normally when a cancellation arrives just as its inner wait completes;
    a cancelled selection usually does end at once.) A new cancellation lands at the loop's
    next await. A task still running at the deadline is left behind (logged), so shutdown
    goes on.
    """
    if task is None:
        return True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_seconds
    while not task.done():
        left = deadline - loop.time()
        if left <= 0:
            name = task.get_name()
            log.error("%s did not stop within %.0f s; leaving it", name, deadline_seconds)
            return False
        task.cancel()
        await asyncio.wait({task}, timeout=min(_RECANCEL_SECONDS, left))
    if not task.cancelled() and task.exception() is not None:
        log.error("%s had failed", task.get_name(), exc_info=task.exception())
    return True
