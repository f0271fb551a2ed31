"""DDL of the SQLite search index; every statement is idempotent.

``search_twin`` holds one row per twin (its namespace, and a small integer key ``tid``).
``search_leaf`` holds one row per node of the searchable part of a twin:

* ``path``: the escaped path (:func:`search.rql.format_path`), arrays elided;
* ``t``: the rank of :mod:`search.rql.ordering` (0 null, 1 bool, 2 number, 3 string,
  4 array, 5 object holding something); empty objects get no row;
* ``v``: the value (booleans as 0/1, NULL for null, arrays and objects), no type affinity;
  numbers are exact only with ``x``;
* ``x``: NULL, or for an integer beyond 64 bits what tells it apart from the double in ``v``
  (:mod:`search.sqlite.numbers`);
* ``a``: 1 when the node was reached through an array (such rows never give a sort value).

Rows are clustered by twin (cheap delete and sort join); ``search_leaf_value`` answers
eq, ranges, in, prefix like and exists on any path.

:data:`VERSION` changes with what the rows hold: a store rebuilds an index of another
version (its tables dropped, :data:`SCHEMA` executed again).
"""

from __future__ import annotations

#: 2: numbers beyond 64-bit integers exact (``x``); 1 held them as doubles.
VERSION = 2

#: What :data:`SCHEMA` creates, for a rebuild to drop.
TABLES = ("search_leaf", "search_twin")

SCHEMA: list[str] = [
    """CREATE TABLE IF NOT EXISTS search_twin (
        tid INTEGER PRIMARY KEY,
        twin_id TEXT NOT NULL UNIQUE,
        namespace TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS search_twin_namespace ON search_twin (namespace, twin_id)",
    """CREATE TABLE IF NOT EXISTS search_leaf (
        tid INTEGER NOT NULL,
        path TEXT NOT NULL,
        seq INTEGER NOT NULL,
        t INTEGER NOT NULL,
        v,
        x,
        a INTEGER NOT NULL,
        PRIMARY KEY (tid, path, seq)
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS search_leaf_value ON search_leaf (path, t, v, x)",
]
