"""Where the service's own log lines go: stderr, at the level of the setting ``log_level``.

uvicorn configures its own loggers only. Without this, the service's loggers fell through
to Python's last-resort handler: warnings and errors as bare messages, and nothing below,
whatever ``log_level`` said.
"""

from __future__ import annotations

import logging

FORMAT = "%(levelname)s %(name)s: %(message)s"
#: The packages whose loggers are the service's (libraries keep Python's defaults).
PACKAGES = ("twin_service", "connectivity", "search")


def configure(level: str) -> None:
    """Send the service's log lines at ``level`` and above to stderr (idempotent)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
