"""Stopping a long file command (``backup``, ``restore``) where it can clean up after itself."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


@contextlib.contextmanager
def signals_stop() -> Iterator[list[int]]:
    """SIGTERM, SIGINT and SIGHUP (the terminal of an ssh session that closed), while
    inside, are recorded in the list given (the command asks it, and stops) instead of
    ending the process where it stands: killed, the command left its partial copy, as large
    as the database, for good; interrupted, a traceback."""
    caught: list[int] = []
    stops = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {sig: signal.signal(sig, lambda signum, _: caught.append(signum)) for sig in stops}
    try:
        yield caught
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
