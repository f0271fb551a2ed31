"""``twin-service backup DEST``: a consistent copy of the SQLite store, taken while the
service runs.

Copying ``twins.sqlite3`` with ``cp`` while the service writes is not a backup: the newest
commits live in the ``-wal`` file, and a copy taken between the two is torn. This reads one
snapshot (a read transaction: the service's writer goes on, as with any reader) and writes
it, compacted, with ``VACUUM INTO`` into a file beside ``DEST``, checks the copy, makes it
durable and only then renames it to ``DEST``: a failed backup never leaves a partial file
under that name. How to restore: docs/backup.md.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Callable
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
from twin_service.store.own_files import beside, create_private, one_of, sqlite_files
from twin_service.store.restore import stamp_backup


class BackupError(Exception):
    """The backup could not be made; the message says why, in one line."""


class BackupRefused(BackupError):
    """The operator named a destination the backup must never write (a usage mistake)."""


class BackupInterrupted(BackupError):
    """Stopped (SIGTERM, SIGINT, SIGHUP) before it was written; its partial copy is removed."""


@dataclass(frozen=True)
class Backup:
    path: Path
    twins: int
    #: The newest change event in the copy: a reader resuming after it on a service
    #: restored from this copy is asked to resync (docs/api.md).
    last_seq: int
    size: int


def backup_sqlite(
    source: Path,
    dest: Path,
    *,
    overwrite: bool = False,
    stopped: Callable[[], bool] = lambda: False,
) -> Backup:
    """Copy ``source`` to ``dest``. ``stopped()`` is asked while the copy runs: once true,
    the copy ends, its partial file is removed and :class:`BackupInterrupted` is raised."""
    if not source.is_file():
        raise BackupError(f"there is no twin store at {source}")
    partial = dest.with_name(f"{_partial_prefix(dest)}{os.getpid()}")
    # Everything that touches the destination's directory raises OSError there: a name
    # the filesystem refuses, a read-only filesystem...
    try:
        _refuse_the_live_database(source, dest)
        if dest.is_dir():
            raise BackupError(f"{dest} is a directory; name the backup file")
        # --force replaces a file: renamed over a FIFO or a device node (/dev/full, as
        # root), the copy took its place.
        if dest.exists() and not dest.is_file():
            raise BackupError(f"{dest} exists and is not a regular file; name a file")
        if dest.exists() and not overwrite:
            raise _exists(dest)
        if not dest.parent.is_dir():
            raise BackupError(f"cannot write {dest}: {dest.parent} is not a directory")
        _remove_dead_partials(dest)
        partial.unlink(missing_ok=True)  # of an earlier process with this pid
        create_private(partial)
        taken = time.time()  # the snapshot is no older: a restore counts from here
        _copy_snapshot(source, partial, stopped)
        twins, last_seq = _check(partial, stopped)
        stamp_backup(partial, last_seq, taken)
        sync(partial)
        if stopped():
            raise BackupInterrupted(f"the backup to {dest} was interrupted")
        _put_in_place(partial, dest, overwrite)
        sync(dest.parent)
    except sqlite3.Error as exc:
        if stopped():  # the copy ended on its progress handler's word
            raise BackupInterrupted(f"the backup to {dest} was interrupted") from None
        raise BackupError(
            f"the backup of {source} failed: {exc}{_shm_needed(source, exc)}"
        ) from None
    except OSError as exc:
        raise BackupError(f"cannot write {dest}: {exc.strerror or exc}") from None
    finally:
        for leftover in (partial, beside(partial, "-journal")):
            with contextlib.suppress(OSError):
                leftover.unlink(missing_ok=True)
    return Backup(dest, twins, last_seq, dest.stat().st_size)


def _put_in_place(partial: Path, dest: Path, overwrite: bool) -> None:
    """Rename ``partial`` to ``dest``; without ``overwrite``, only if ``dest`` is still not
    there: two backups to one new name, both past the check at their start, each replaced
    the other's without --force. A hard link is created only where no file is; a
    filesystem without links gets the check again, just before the rename."""
    if overwrite:
        os.replace(partial, dest)
        return
    try:
        os.link(partial, dest)
    except FileExistsError:
        raise _exists(dest) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        if dest.exists():
            raise _exists(dest) from None
        os.replace(partial, dest)
    # Linked: the partial's name goes in the caller's cleanup.


def _exists(dest: Path) -> BackupError:
    return BackupError(f"{dest} exists; choose another name or pass --force")


def destination(given: str) -> Path:
    """The backup file named ``given``. A name ending in ``/`` (or ``/.``) names a
    directory, which Path forgets: ``backup newdir/`` wrote a file named newdir."""
    dest = Path(given)
    if given.endswith(("/", "/.")) and not dest.is_dir():
        raise BackupError(f"cannot write {given}: no such directory")
    return dest


def _partial_prefix(dest: Path) -> str:
    """The name of a partial copy of ``dest``, less its process id. Within the 255 bytes a
    name may have, ``-journal`` (SQLite's file beside it) included: a long destination's
    name is hashed."""
    name = dest.name
    if len(os.fsencode(name)) > 200:
        name = hashlib.sha256(os.fsencode(name)).hexdigest()[:32]
    return f".{name}.partial-"


def _remove_dead_partials(dest: Path) -> None:
    """Remove the partial copies of ``dest`` left by backups that died (SIGKILL, a power
    cut): each is as large as the database, and its process id keeps it from ever being
    reused."""
    prefix = _partial_prefix(dest)
    for entry in os.scandir(dest.parent):
        pid = entry.name.removeprefix(prefix).removesuffix("-journal")
        if entry.name.startswith(prefix) and pid.isdigit() and not _running(int(pid)):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _refuse_the_live_database(source: Path, dest: Path) -> None:
    found = one_of(dest, sqlite_files(source))
    if found is not None:
        raise BackupRefused(
            f"{dest} is the twin store itself ({found}); writing the backup there would "
            "destroy it: name another file"
        )


def _copy_snapshot(source: Path, target: Path, stopped: Callable[[], bool]) -> None:
    # Read-only: the backup never creates, changes or recovers the service's database.
    with stoppable(f"{source.resolve().as_uri()}?mode=ro", stopped, uri=True) as conn:
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("VACUUM INTO ?", (str(target),))


def _shm_needed(source: Path, exc: sqlite3.Error) -> str:
    """Why SQLite, told only to read, could not open ``source``, when the reason is its
    directory: to read a WAL database it creates the -shm beside it, which a read-only
    directory refuses ("attempt to write a readonly database", "unable to open database
    file": neither names the directory). An empty string otherwise."""
    if not (exc.sqlite_errorname or "").startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN")):
        return ""
    shm = beside(source.resolve() if source.is_symlink() else source, "-shm")
    if shm.exists() or os.access(shm.parent, os.W_OK | os.X_OK):
        return ""
    return (
        f" ({shm.parent} is not writable by this user, and SQLite must create {shm.name} "
        "there to read the database)"
    )


def _check(copy: Path, stopped: Callable[[], bool]) -> tuple[int, int]:
    with stoppable(str(copy), stopped) as conn:
        (verdict,) = conn.execute("PRAGMA quick_check").fetchone()
        if verdict != "ok":
            raise BackupError(f"the copy failed its check: {verdict}")
        return twins_and_last_seq(conn)


# -- command line ----------------------------------------------------------------------


def add_subcommands(subparsers: Any) -> None:
    """Add ``backup`` to the ``twin-service`` sub-command parsers."""
    parser = subparsers.add_parser(
        "backup", help="write a consistent copy of the SQLite twin store (while it runs)"
    )
    parser.add_argument("dest", help="the backup file to write")
    parser.add_argument("--config", type=Path, help="TOML settings file")
    parser.add_argument("--data-dir", type=Path, help="directory of the database")
    parser.add_argument("--force", action="store_true", help="replace DEST if it exists")
    parser.set_defaults(handler=run_backup)


def run_backup(args: argparse.Namespace) -> int:
    """0 when the backup is written, 2 on bad settings, another store or a destination that
    is the store itself, 1 when it failed, 128 + the signal's number when SIGTERM, SIGINT
    or SIGHUP stopped it."""
    source = sqlite_database(
        args,
        "backup copies the SQLite store; back MongoDB up with its own tools (mongodump, or "
        "snapshots of its volumes)",
    )
    if source is None:
        return 2
    try:
        with signals_stop() as caught:
            done = backup_sqlite(
                source,
                destination(args.dest),
                overwrite=args.force,
                stopped=lambda: bool(caught),
            )
    except BackupInterrupted:
        name = signal.Signals(caught[0]).name
        print(
            f"twin-service: the backup was interrupted ({name}); {args.dest} not written",
            file=sys.stderr,
        )
        return 128 + caught[0]
    except BackupRefused as exc:
        print(f"twin-service: {exc}", file=sys.stderr)
        return 2
    except BackupError as exc:
        print(f"twin-service: {exc}", file=sys.stderr)
        return 1
    print(
        f"backed up {done.twins:,} twins (journal up to seq {done.last_seq:,}) "
        f"to {done.path} ({done.size / 2**20:.1f} MiB)"
    )
    return 0
