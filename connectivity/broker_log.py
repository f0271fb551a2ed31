"""The embedded broker's log: one logger name for its modules, which its documentation and
log filters use, and lines for events that come in numbers."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("connectivity.broker")


class Tally:
    """Events logged at most once a minute, with their count since the last line: what
    meets a bound (devices refused at max_devices retry, queues at max_queued keep growing)
    tends to meet it all the time. ``message`` takes the count, then the ``args`` of
    :meth:`note`."""

    every = 60.0

    def __init__(self, message: str) -> None:
        self._message = message
        self._count = 0
        self._logged_at: float | None = None

    def note(self, *args: object, count: int = 1) -> None:
        self._count += count
        now = time.monotonic()
        if self._logged_at is not None and now - self._logged_at < self.every:
            return
        log.warning(self._message, self._count, *args)
        self._count, self._logged_at = 0, now
