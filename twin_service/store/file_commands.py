"""What the SQLite file commands (``backup``, ``restore``) share: the database the settings
name, making a file durable, stopping where the command can clean up after itself, and
what a checked copy holds."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sqlite3
import sys
from collections.abc import Callable, Iterator
from pathlib import Path


def sqlite_database(args: argparse.Namespace, elsewhere: str) -> Path | None:
    """The SQLite database of the settings ``args`` give (``--config``, ``--data-dir``);
    None, after saying why on stderr, when they are invalid or name another store
    (``elsewhere`` says what to do then): the command exits with status 2."""
    from twin_service.settings import settings_for_command

    settings = settings_for_command(args.config, data_dir=args.data_dir)
    if settings is None:
        return None
    if settings.store != "sqlite":
        print(f"twin-service: {elsewhere}", file=sys.stderr)
        return None
    return settings.data_dir / settings.sqlite.file_name


def sync(path: Path) -> None:
    """fsync ``path``, a file or a directory (a rename is durable once its directory is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


#: SQLite virtual machine instructions between two questions whether to stop.
_PROGRESS_STEPS = 10_000


@contextlib.contextmanager
def stoppable(
    database: str, stopped: Callable[[], bool], *, uri: bool = False
) -> Iterator[sqlite3.Connection]:
    """A connection to ``database`` (a URI with ``uri``) whose statement in progress ends
    (:class:`sqlite3.OperationalError`, "interrupted") once ``stopped()``: Python runs
    signal handlers between its own instructions, so a SIGTERM during a statement of
    minutes (VACUUM INTO, quick_check of a large database) is handled only there."""
    conn = sqlite3.connect(database, uri=uri)
    try:
        conn.set_progress_handler(lambda: int(stopped()), _PROGRESS_STEPS)
        yield conn
    finally:
        conn.close()


def twins_and_last_seq(conn: sqlite3.Connection) -> tuple[int, int]:
    """How many twins a twin store holds, and its last event's seq (0 with none)."""
    (twins,) = conn.execute("SELECT count(*) FROM twins").fetchone()
    (last_seq,) = conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()
    return int(twins), int(last_seq)
