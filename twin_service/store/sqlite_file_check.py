"""What the SQLite writer checks of the database file it is given before it writes to it.

The writer's opening transaction creates the schema and, on a restored backup, rewrites
every twin (docs/backup.md): given a damaged backup, the service went on serving reads and
writes on a malformed database; given another application's database, it started empty and
wrote its tables into that file. These checks only read, on a connection of their own
without the store's pragmas (which turn the file to WAL mode), so a refused file is left
exactly as it was.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from twin_service.store.restore import BACKUP_TIME_KEY


class UnusableDatabase(sqlite3.DatabaseError):
    """The file is a database the store must not write to; the message says why, in one
    line. A :class:`sqlite3.DatabaseError`: the store reports it as it reports a file that
    is not a database at all."""


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
    """
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
