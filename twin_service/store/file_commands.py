"""What the SQLite file commands (``backup``, ``restore``) share: the database the settings
name, making a file durable, and stopping where the command can clean up after itself."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Iterator
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
