"""SIGHUPs that arrive before the service can act on them.

SIGHUP reloads the tokens file (api.app), but its handler is set by the service's lifespan,
a second or so into a start; until then the signal's default action ended the process
without a word, and a reloader firing right after a restart (a Secret updated) took the
service down. From the start of the command line, a SIGHUP is only noted; the lifespan asks
whether one came once its handler is set, and reloads then (the signal may have been sent
for a revocation).
"""

from __future__ import annotations

import signal
from types import FrameType

_arrived = False


def _note(signum: int, frame: FrameType | None) -> None:
    global _arrived
    _arrived = True


def hold() -> None:
    """Note SIGHUPs instead of ending the process (main thread only)."""
    signal.signal(signal.SIGHUP, _note)


def release() -> None:
    """SIGHUP's default action again (a command that does not serve), taken now for one
    that arrived while held."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    if arrived():
        signal.raise_signal(signal.SIGHUP)


def arrived() -> bool:
    """Whether a SIGHUP was noted since :func:`hold`; forgets it."""
    global _arrived
    came, _arrived = _arrived, False
    return came
