"""The built-in search index in SQLite.

The twin store calls :func:`index_twin` / :func:`unindex_twin` inside its own write
transaction (after executing :data:`SCHEMA` once), and :func:`search_ids` / :func:`count`
to answer searches. Results are exactly those of the reference evaluator in
:mod:`search.rql`, in the same order, with the same cursors.
"""

from __future__ import annotations

from .queries import count, index_twin, register_functions, search_ids, unindex_twin
from .rows import leaves
from .schema import SCHEMA, TABLES, VERSION

__all__ = [
    "SCHEMA",
    "TABLES",
    "VERSION",
    "count",
    "index_twin",
    "leaves",
    "register_functions",
    "search_ids",
    "unindex_twin",
]
