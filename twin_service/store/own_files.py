"""Whether a path an operator command is told to write names one of the service's own files.

``backup DEST`` and ``devices export-mosquitto`` replace the file they are named: named the
twin store (or the credentials, the admin token...), they destroyed it, under a running
service too. Paths are compared resolved, so ``./data/x``, ``data/../data/x`` or a symlink,
to the file or to its directory, cannot slip past.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

#: The files SQLite keeps beside a database; writing any of them under a running service
#: corrupts the database as surely as writing the database itself.
SQLITE_COMPANIONS = ("", "-wal", "-shm", "-journal")


def sqlite_files(database: Path) -> list[Path]:
    """``database`` and the files SQLite keeps beside it: beside its name, and beside the
    file its symlink names (SQLite keeps the ``-wal`` beside the file it resolved)."""
    resolved = database.resolve()
    named = [database.with_name(database.name + suffix) for suffix in SQLITE_COMPANIONS]
    return named + [resolved.with_name(resolved.name + suffix) for suffix in SQLITE_COMPANIONS]


def one_of(path: Path, files: Iterable[Path]) -> Path | None:
    """The first of ``files`` that writing ``path`` would replace, or None."""
    targets = _names(path)
    return next((file for file in files if targets & _names(file)), None)


def _names(path: Path) -> set[Path]:
    # The name in its resolved directory (what a rename replaces: a symlink itself) and the
    # file it resolves to (what an open for writing replaces).
    return {path.parent.resolve() / path.name, path.resolve()}
