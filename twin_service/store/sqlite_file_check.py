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
        tables = {
            name
            for (name,) in conn.execute(
                "SELECT name FROM sqlite_master "
                "WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'"
            )
        }
        if tables and not all(_has_own_column(conn, table, tables) for table in OWN_TABLES):
            raise UnusableDatabase(
                f"it holds tables of another application ({_some(sorted(tables))}), not the "
                f"twin store's ({' and '.join(OWN_TABLES)}, with a {OWN_COLUMN} column); it "
                "is left as it is: name the twin store's file (--data-dir, sqlite.file_name) "
                "or move this one away"
            )
        if "meta" in tables and _stamped(conn):
            _quick_check(conn)


def _has_own_column(conn: sqlite3.Connection, table: str, tables: set[str]) -> bool:
    if table not in tables:
        return False
    columns = conn.execute(f"PRAGMA table_info({table})").fetchall()  # table: our constant
    return any(column[1] == OWN_COLUMN for column in columns)


def _some(names: list[str]) -> str:
    shown = ", ".join(" ".join(name.split()) for name in names[:5])  # one line, whatever names
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _stamped(conn: sqlite3.Connection) -> bool:
    row = conn.execute("SELECT 1 FROM meta WHERE key = ?", (BACKUP_TIME_KEY,)).fetchone()
    return row is not None


def _quick_check(conn: sqlite3.Connection) -> None:
    try:
        rows = conn.execute("PRAGMA quick_check(1)").fetchall()
    except sqlite3.DatabaseError as exc:  # damage the check itself trips over
        problem = str(exc)
    else:
        if rows == [("ok",)]:
            return
        problem = " ".join(str(rows[0][0]).split())  # SQLite's report spans lines
    raise UnusableDatabase(
        f"it was restored from a backup that fails its check (PRAGMA quick_check: "
        f"{problem}); it is left as it is: put an intact backup in its place (docs/backup.md)"
    )
