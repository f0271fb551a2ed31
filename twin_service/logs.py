"""Where log lines go: stderr, formatted ``LEVEL logger: message``.

uvicorn configures its own loggers only. Without this, every other logger fell through to
Python's last-resort handler (warnings and errors as bare messages, and nothing below,
whatever ``log_level`` said) or, for libraries that install a NullHandler, nowhere.
"""

from __future__ import annotations

import logging

FORMAT = "%(levelname)s %(name)s: %(message)s"
#: The packages whose loggers are the service's: they follow ``log_level``.
PACKAGES = ("twin_service", "connectivity", "search")
#: Names the handler on the root logger, so that configuring again replaces it.
_HANDLER_NAME = "twin_service.logs"
#: Libraries whose warnings repeat a failure the service reports in its own line: below
#: ``debug`` only their errors show. The Elasticsearch client warns at each retry of each
#: request (two lines per attempt, three attempts): with the engine down, 63 of the 66
#: lines a replica logged in 30 s, each readiness probe and indexer retry adding 7.
QUIET_WARNINGS = ("elastic_transport",)


class _OneLine(logging.Formatter):
    """A library's record in one line: its exception's type and message, not its traceback.

    elasticsearch warns with a traceback at each retry; the service says what failed in its
    own line, and an operator reads a traceback as a crash.
    """

    def format(self, record: logging.LogRecord) -> str:
        exc = record.exc_info[1] if record.exc_info else None
        bare = {**record.__dict__, "exc_info": None, "exc_text": None, "stack_info": None}
        line = super().format(logging.makeLogRecord(bare))
        return f"{line} ({type(exc).__name__}: {exc})" if exc is not None else line


def configure(level: str) -> None:
    """Send the service's log lines at ``level`` and above to stderr, and the libraries'
    (amqtt, transitions, paho, elasticsearch, pymongo...) at ``level`` and WARNING at least
    (ERROR for :data:`QUIET_WARNINGS`), INFO at ``debug``, tracebacks included only then
    (idempotent)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
    # The libraries' loggers reach this through the root logger (uvicorn's do not: they do
    # not propagate). Their INFO and DEBUG lines describe their own workings (amqtt: every
    # connection and packet) and would bury the service's; at debug, asked for to find a
    # fault, INFO lets their connections and requests show, still without the per-packet
    # traces. transitions says at INFO each callback of each amqtt session's state changes:
    # WARNING always, as amqtt's own broker command sets it.
    logging.getLogger("transitions").setLevel(logging.WARNING)
    wanted = logging.getLevelNamesMapping()[level.upper()]
    debug = wanted <= logging.DEBUG
    for name in QUIET_WARNINGS:
        logging.getLogger(name).setLevel(logging.NOTSET if debug else logging.ERROR)
    libraries = logging.StreamHandler()
    libraries.setFormatter(logging.Formatter(FORMAT) if debug else _OneLine(FORMAT))
    libraries.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if h.get_name() != _HANDLER_NAME] + [libraries]
    root.setLevel(logging.INFO if debug else max(wanted, logging.WARNING))
