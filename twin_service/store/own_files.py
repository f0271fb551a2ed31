"""The service's own files: whether a path an operator command is told to write names one
of them, and creating a database file readable by its owner only.

``backup DEST`` and ``devices export-mosquitto`` replace the file they are named: named the
twin store (or the credentials, the admin token...), they destroyed it, under a running
service too. Paths are compared resolved, so ``./data/x``, ``data/../data/x`` or a symlink,
to the file or to its directory, cannot slip past.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterable
from pathlib import Path

#: The files SQLite keeps beside a database; writing any of them under a running service
#: corrupts the database as surely as writing the database itself.
SQLITE_COMPANIONS = ("", "-wal", "-shm", "-journal")


def sqlite_files(database: Path) -> list[Path]:
    """``database`` and the files SQLite keeps beside it: beside its name, and beside the
    file its symlink names (SQLite keeps the ``-wal`` beside the file it resolved)."""
    resolved = _resolve(database)
    named = [beside(database, suffix) for suffix in SQLITE_COMPANIONS]
    return named + [beside(resolved, suffix) for suffix in SQLITE_COMPANIONS]


def beside(database: Path, suffix: str) -> Path:
    """The file SQLite keeps beside ``database`` under ``suffix`` (one of
    :data:`SQLITE_COMPANIONS`), or one named as it would."""
    return database.with_name(database.name + suffix)


def one_of(path: Path, files: Iterable[Path]) -> Path | None:
    """The first of ``files`` that writing ``path`` would replace, or None. Raises
    :class:`OSError` (``ELOOP``) for a path in a symlink loop."""
    targets = _names(path)
    return next((file for file in files if targets & _names(file)), None)


def _names(path: Path) -> set[Path]:
    # The name in its resolved directory (what a rename replaces: a symlink itself) and the
    # file it resolves to (what an open for writing replaces).
    return {_resolve(path.parent) / path.name, _resolve(path)}


def _resolve(path: Path) -> Path:
    # Python before 3.13 raises RuntimeError for a symlink loop, which callers that
    # report what they cannot write (OSError) let through as a traceback.
    try:
        return path.resolve()
    except RuntimeError:
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path)) from None


def create_private(database: Path) -> None:
    """Create ``database`` empty, readable and writable by its owner only, unless it exists.

    SQLite creates a database with mode 0644 less the umask (so usually readable by every
    local user) and gives its -wal, -shm and -journal the database's mode: a database made
    here first keeps all of them private. An empty file is a new database to SQLite, and
    ``VACUUM INTO`` accepts it as a target.
    """
    with contextlib.suppress(FileExistsError):
        os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
