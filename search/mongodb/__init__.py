"""The built-in search index adapted to MongoDB (and MongoDB-wire servers such as FerretDB).

Every twin document in the store's collection carries two derived fields, written by the
same compare-and-set update as the twin itself (so the index is never behind):

* ``s``: a flat array of strings, one per searchable node (like the path/value array of
  Ditto's search collection), ``"<len>:<path><typed value>"``; a multikey index on it
  answers eq, in, ranges, prefix ``like`` and ``exists``;
* ``k``: an object mapping each sortable path (reached without arrays) to its sort key as
  one order-preserving string, used by ``sort`` and keyset cursors.

Only strings are stored, encoded so that string order is the order of
:mod:`search.rql.ordering`: numbers compare exactly (no 64-bit or double rounding), and no
field name holds ``.`` or starts with ``$`` (FerretDB refuses both). RQL filters become
MongoDB filters in :mod:`search.mongodb.translate` (pure). Results are exactly those of the
reference evaluator, in the same order, with the same cursors.
"""

from __future__ import annotations

from .fields import index_fields
from .queries import count, search_page
from .translate import after_filter, filter_query, search_filter, sort_spec

__all__ = [
    "after_filter",
    "count",
    "filter_query",
    "index_fields",
    "search_filter",
    "search_page",
    "sort_spec",
]
