"""``twin-service restore BACKUP``: a backup put in place of the SQLite store, checked first.

By hand (docs/backup.md) a restore goes wrong without a word: copied under a running
service, the database is replaced beneath its open connections, which go on reading and
writing the old file, now unlinked, so every write acknowledged from then on is lost; a
``-wal`` left beside the copy is not the copy's; a damaged backup, or another application's
file, is found only when the service refuses to start, the old database already gone.

This command checks a copy of the backup (a twin store; ``PRAGMA quick_check``), takes the
store's lock so nothing has it open (the service, a ``backup``, an ``index rebuild``, a
``sqlite3`` shell: each holds a shared lock while it has the database open), keeps the
database it replaces under another name, and puts the copy in place with one rename. A copy
not made by ``twin-service backup`` (a ``cp`` of a stopped database) is stamped as a backup,
so the service's first start on it raises its numbers as after any restore
(:mod:`twin_service.store.restore`).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import itertools
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twin_service.store.file_commands import (
    signals_stop,
    sqlite_database,
    stoppable,
    sync,
    twins_and_last_seq,
)
from twin_service.store.own_files import (
    SQLITE_COMPANIONS,
    beside,
    create_private,
    one_of,
    sqlite_files,
)
from twin_service.store.restore import stamp_backup
from twin_service.store.sqlite_file_check import (
    integrity_problem,
    is_twin_store,
    some_names,
    table_names,
)


class RestoreError(Exception):
    """The backup was not put in place; the message says why, in one line."""


class RestoreRefused(RestoreError):
    """The operator named a backup that can never be restored this way (a usage mistake)."""


class RestoreInterrupted(RestoreError):
    """Stopped (SIGTERM, SIGINT, SIGHUP) before the rename; nothing changed."""


@dataclass(frozen=True)
class Restored:
    database: Path
    twins: int
    last_seq: int
    #: Where the database it replaced is kept, or None when there was none.
    kept: Path | None


#: SQLite's lock bytes (https://sqlite.org/lockingv3.html, os_unix.c): every connection with
#: the database open in WAL mode holds a read lock on one byte of this range, and one in
#: rollback mode while it reads; a write lock on all of it is SQLite's own EXCLUSIVE lock.
_SHARED_FIRST = 0x40000000 + 2
_SHARED_SIZE = 510

_COPY_CHUNK = 1 << 20


def restore_sqlite(
    backup: Path,
    database: Path,
    *,
    stopped: Callable[[], bool] = lambda: False,
    now: Callable[[], float] = time.time,
) -> Restored:
    """Put a checked copy of ``backup`` in place of ``database`` (which may not exist).
    ``stopped()`` is asked while the copy is made and checked: once true, the copy is
    removed, nothing else has changed, and :class:`RestoreInterrupted` is raised."""
    partial = database.with_name(f".{database.name}.restoring-{os.getpid()}")
    try:
        _refuse_the_store_itself(backup, database)
        if not backup.is_file():
            what = "is not a regular file" if backup.exists() else "does not exist"
            raise RestoreError(f"the backup {backup} {what}")
        wal = beside(backup, "-wal")
        if wal.is_file() and wal.stat().st_size > 0:
            raise RestoreError(
                f"{wal} lies beside the backup, with commits the file alone does not hold: "
                "restore a copy made by `twin-service backup`, or open the backup once with "
                "sqlite3 to fold them in"
            )
        with _locked(database):  # refused now, not after copying a large file
            pass
        database.parent.mkdir(parents=True, exist_ok=True)
        with _alone_in(database.parent):
            partial.unlink(missing_ok=True)  # of an earlier process with this pid
            create_private(partial)
            _copy(backup, partial, stopped)
            twins, last_seq = _check(backup, partial, stopped)
            stamp_backup(partial, last_seq, backup.stat().st_mtime)
            sync(partial)
            if stopped():
                raise RestoreInterrupted(f"the restore of {backup} was interrupted")
            with _locked(database):
                kept = _keep(database, now())
                os.replace(partial, database)
            sync(database.parent)
    except sqlite3.Error as exc:
        if stopped():  # the check ended on its progress handler's word
            raise RestoreInterrupted(f"the restore of {backup} was interrupted") from None
        raise RestoreError(f"cannot restore {backup}: {exc}") from None
    except OSError as exc:
        # The file named: the one at fault is seldom the backup (a data directory that is
        # not writable, a database whose mode forbids writing).
        where = f"{exc.filename}: " if exc.filename else ""
        raise RestoreError(f"cannot restore {backup}: {where}{exc.strerror or exc}") from None
    finally:
        for leftover in (
            partial,
            *(beside(partial, s) for s in ("-journal", "-wal")),
        ):
            with contextlib.suppress(OSError):
                leftover.unlink(missing_ok=True)
    return Restored(database, twins, last_seq, kept)


def _refuse_the_store_itself(backup: Path, database: Path) -> None:
    found = one_of(backup, sqlite_files(database))
    if found is not None:
        raise RestoreRefused(
            f"{backup} is the twin store itself ({found}); name a backup file "
            "(`twin-service backup` writes one)"
        )


def _copy(backup: Path, target: Path, stopped: Callable[[], bool]) -> None:
    # A file copy, not SQLite's: opening the backup could change it (a hot journal is
    # rolled back), and the backup stays as it was, whatever follows.
    with backup.open("rb") as source, target.open("r+b") as copy:
        while chunk := source.read(_COPY_CHUNK):
            if stopped():
                raise RestoreInterrupted(f"the restore of {backup} was interrupted")
            copy.write(chunk)


def _check(backup: Path, copy: Path, stopped: Callable[[], bool]) -> tuple[int, int]:
    """The copy's twins and last event's seq, once it proved a twin store that passes
    ``PRAGMA quick_check``."""
    with stoppable(str(copy), stopped) as conn:
        tables = table_names(conn)
        if not is_twin_store(conn, tables):
            held = f"its tables: {some_names(tables)}" if tables else "it has no tables"
            raise RestoreRefused(f"{backup} is not a backup of a twin store ({held})")
        problem = integrity_problem(conn)
        if problem is not None:
            raise RestoreError(
                f"{backup} fails its check (PRAGMA quick_check: {problem}); "
                "restore an intact backup"
            )
        return twins_and_last_seq(conn)


@contextlib.contextmanager
def _locked(database: Path) -> Iterator[None]:
    """SQLite's EXCLUSIVE lock on ``database`` (if there is one), held while inside: raises
    :class:`RestoreError` when anything has it open. A process that opens it meanwhile
    waits, then finds the database it opened is no longer the store: start the service
    after the restore, not during it."""
    try:
        fd = os.open(database, os.O_RDWR)
    except FileNotFoundError:
        yield
        return
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, _SHARED_SIZE, _SHARED_FIRST)
        except OSError:
            raise RestoreError(
                f"{database} is in use (the service, or another command, has it open): "
                "stop it, then restore"
            ) from None
        yield
    finally:
        os.close(fd)  # and with it the lock


def _keep(database: Path, now: float) -> Path | None:
    """Rename ``database`` and the files SQLite keeps beside it (a ``-wal`` may hold its
    newest commits) to one new name, which SQLite opens as that database; None when there
    is none of them. Its companions never stay beside the restored copy: they are not its.
    Nor do those of a database that was removed: SQLite replayed such a ``-wal`` onto the
    copy. The name is one no file has, for any of them: a second restore within the second
    took the first one's name, and its rename replaced the database the first had kept."""
    if not any(os.path.lexists(beside(database, suffix)) for suffix in SQLITE_COMPANIONS):
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    for n in itertools.count(1):
        kept = database.with_name(f"{database.name}.replaced-{stamp}" + (f"-{n}" if n > 1 else ""))
        if not any(os.path.lexists(beside(kept, suffix)) for suffix in SQLITE_COMPANIONS):
            break
    for suffix in SQLITE_COMPANIONS:
        with contextlib.suppress(FileNotFoundError):
            os.rename(beside(database, suffix), beside(kept, suffix))
    return kept


@contextlib.contextmanager
def _alone_in(directory: Path) -> Iterator[None]:
    """Hold ``directory`` for this restore alone (an advisory lock on it): two restores at
    once into one data directory each took the other's database for the one to keep, or
    put their copy over the other's."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RestoreError(f"another restore into {directory} is running") from None
        yield
    finally:
        os.close(fd)  # and with it the lock


# -- command line ----------------------------------------------------------------------


def add_subcommands(subparsers: Any) -> None:
    """Add ``restore`` to the ``twin-service`` sub-command parsers."""
    parser = subparsers.add_parser(
        "restore",
        help="put a backup in place of the SQLite twin store (with the service stopped)",
    )
    parser.add_argument("backup", type=Path, help="the backup file (`twin-service backup`)")
    parser.add_argument("--config", type=Path, help="TOML settings file")
    parser.add_argument("--data-dir", type=Path, help="directory of the database")
    parser.set_defaults(handler=run_restore)


def run_restore(args: argparse.Namespace) -> int:
    """0 when the backup is in place, 2 on bad settings, another store or a backup that is
    no twin store's, 1 when it was not put in place, 128 + the signal's number when
    SIGTERM, SIGINT or SIGHUP stopped it."""
    database = sqlite_database(
        args,
        "restore puts back a backup of the SQLite store; restore MongoDB with its own tools "
        "(mongorestore, or snapshots of its volumes)",
    )
    if database is None:
        return 2
    try:
        with signals_stop() as caught:
            done = restore_sqlite(args.backup, database, stopped=lambda: bool(caught))
    except RestoreInterrupted:
        name = signal.Signals(caught[0]).name
        print(
            f"twin-service: the restore was interrupted ({name}); nothing changed", file=sys.stderr
        )
        return 128 + caught[0]
    except RestoreRefused as exc:
        print(f"twin-service: {exc}", file=sys.stderr)
        return 2
    except RestoreError as exc:
        print(f"twin-service: {exc}", file=sys.stderr)
        return 1
    print(
        f"restored {done.twins:,} twins (journal up to seq {done.last_seq:,}) from "
        f"{args.backup} to {done.database}"
    )
    if done.kept is not None and done.kept.exists():
        print(f"the database it replaced is kept as {done.kept}: remove it when no longer needed")
    elif done.kept is not None:
        print(
            f"the files SQLite kept beside a database that was not there are kept as "
            f"{done.kept}-*: remove them when no longer needed"
        )
    return 0
