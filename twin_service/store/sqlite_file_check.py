"""What the SQLite writer checks of the database file it is given before it writes to it.

The writer's opening transaction creates the schema and, on a restored backup, rewrites
every twin (docs/backup.md): given a damaged backup, the service went on serving reads and
writes on a malformed database; given another application's database, it started empty and
wrote its tables into that file. These checks only read, on a connection of their own
without the store's pragmas (which turn the file to WAL mode), so a refused file is left
exactly as it was. Whether this user may write the files comes first, before SQLite opens
anything: it opens a database it cannot write read-only, and creates its -wal and -shm with
the database's mode, so a start that failed on a read-only file left two more behind.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

from twin_service.store.own_files import beside, sqlite_files
from twin_service.store.restore import BACKUP_TIME_KEY


class UnusableDatabase(sqlite3.DatabaseError):
    """The file is a database the store must not write to; the message says why, in one
    line. A :class:`sqlite3.DatabaseError`: the store reports it as it reports a file that
    is not a database at all."""


class NotWritable(sqlite3.OperationalError):
    """This user cannot write the database, a file SQLite keeps beside it, or the directory
    SQLite creates those in; the message names which (SQLite's own "attempt to write a
    readonly database" names none)."""


#: Tables every twin store has had since its first schema, each with the column the
#: schema's indexes name (``sqlite_writer.SCHEMA`` creates them in one transaction). One
#: name alone is no sign: ``meta`` or ``events`` are common in other applications' files.
OWN_TABLES = ("twins", "events")
OWN_COLUMN = "twin_id"


def check_database_file(path: Path, timeout: float) -> None:
    """Raise :class:`UnusableDatabase` when ``path`` is another application's database
    (tables, but not all of :data:`OWN_TABLES` with their :data:`OWN_COLUMN`: the service
    started on it and wrote its schema into it, or failed half-way, the file already
    changed) or a restored backup that fails ``PRAGMA quick_check``. A new database
    (no file, an empty one, no tables) passes.

    Only a restored backup is checked: ``quick_check`` reads every page of the file, too
    long for every start of a large database, while a backup lay on other disks, was
    copied around, and is about to be renumbered whole.

    Raises :class:`NotWritable` first, opening nothing, when :func:`check_writable` does.
    """
    check_writable(path)
    if not path.is_file() or path.stat().st_size == 0:
        return
    with contextlib.closing(sqlite3.connect(path, timeout=timeout)) as conn:
        tables = table_names(conn)
        if tables and not is_twin_store(conn, tables):
            raise UnusableDatabase(
                f"it holds tables of another application ({some_names(tables)}), not the "
                f"twin store's ({' and '.join(OWN_TABLES)}, with a {OWN_COLUMN} column); it "
                "is left as it is: name the twin store's file (--data-dir, sqlite.file_name) "
                "or move this one away"
            )
        if "meta" in tables and _stamped(conn):
            problem = integrity_problem(conn)
            if problem is not None:
                raise UnusableDatabase(
                    f"it was restored from a backup that fails its check (PRAGMA "
                    f"quick_check: {problem}); it is left as it is: put an intact backup in "
                    "its place (docs/backup.md)"
                )


def check_writable(path: Path) -> None:
    """Raise :class:`NotWritable` when this user cannot read and write ``path`` or one of the
    files SQLite keeps beside it that exist, or when SQLite must create its -wal or -shm in a
    directory this user cannot write. Root passes (os.access grants it everything)."""
    for file in sqlite_files(path):
        if file.exists() and not os.access(file, os.R_OK | os.W_OK):
            st = file.stat()
            raise NotWritable(
                f"{file} is not readable and writable by this user (mode "
                f"{st.st_mode & 0o7777:04o}, owner uid {st.st_uid}): the service writes the "
                "database and the files SQLite keeps beside it"
            )
    # SQLite keeps the -wal and -shm beside the file a symlink names.
    database = path.resolve() if path.is_symlink() else path
    missing = not all(beside(database, suffix).exists() for suffix in ("-wal", "-shm"))
    if missing and not os.access(database.parent, os.W_OK | os.X_OK):
        raise NotWritable(
            f"the directory {database.parent} is not writable by this user: SQLite creates the "
            "database's -wal and -shm files there"
        )


def table_names(conn: sqlite3.Connection) -> set[str]:
    """The tables of the database, SQLite's own left out."""
    return {
        name
        for (name,) in conn.execute(
            "SELECT name FROM sqlite_master "
            "WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'"
        )
    }


def is_twin_store(conn: sqlite3.Connection, tables: set[str]) -> bool:
    """Whether the database has every one of :data:`OWN_TABLES`, with :data:`OWN_COLUMN`."""
    return all(_has_own_column(conn, table, tables) for table in OWN_TABLES)


def _has_own_column(conn: sqlite3.Connection, table: str, tables: set[str]) -> bool:
    if table not in tables:
        return False
    columns = conn.execute(f"PRAGMA table_info({table})").fetchall()  # table: our constant
    return any(column[1] == OWN_COLUMN for column in columns)


def some_names(names: set[str]) -> str:
    """A few of ``names``, sorted, on one line (whatever the names hold)."""
    ordered = sorted(names)
    shown = ", ".join(" ".join(name.split()) for name in ordered[:5])
    return shown + (f" and {len(ordered) - 5} more" if len(ordered) > 5 else "")


def _stamped(conn: sqlite3.Connection) -> bool:
    row = conn.execute("SELECT 1 FROM meta WHERE key = ?", (BACKUP_TIME_KEY,)).fetchone()
    return row is not None


def integrity_problem(conn: sqlite3.Connection) -> str | None:
    """The first problem ``PRAGMA quick_check`` finds (it reads every page), on one line;
    None when there is none."""
    try:
        rows = conn.execute("PRAGMA quick_check(1)").fetchall()
    except sqlite3.DatabaseError as exc:  # damage the check itself trips over
        if exc.sqlite_errorname == "SQLITE_INTERRUPT":
            raise  # stopped by its caller's progress handler: no finding about the file
        return str(exc)
    if rows == [("ok",)]:
        return None
    return " ".join(str(rows[0][0]).split())  # SQLite's report spans lines
