"""The one fixed Elasticsearch mapping of the twin index, and twin documents in its shape. Pure.

Every searchable node of a twin becomes one nested ``leaves`` entry, built from the same rows
as the built-in SQLite index (:func:`search.sqlite.leaves`), so any path is queryable with one
schema and a twin may change a leaf's type between writes:

* ``p``: the escaped path (:func:`search.rql.format_path`), arrays elided;
* ``t``: the rank of :mod:`search.rql.ordering` (0 null, 1 boolean, 2 number, 3 string,
  4 array, 5 object holding something); empty objects get no entry;
* ``n``: booleans (0/1) and numbers, as a double;
* ``s``: strings, as a keyword (byte order of UTF-8 is code point order, like the evaluator);
* ``f``: :func:`search.rql.patterns.fold` of the string, where it differs from it (``ilike``
  matches the folded pattern against ``f``, else ``s``);
* ``a``: true when the node was reached through an array (such entries never give a sort value).

Top level: ``twinId`` and ``namespace`` (keywords) and ``seq``, the store sequence number of
the indexed state (also the document's external version).
"""

from __future__ import annotations

from typing import Any

from search.rql.patterns import fold
from search.sqlite import leaves
from twin_service.types import JSONObject

#: Bumped when the mapping or what documents hold changes; ``twin-service index rebuild``
#: moves the alias over. The version is kept in the mapping's ``_meta``: a service finding an
#: older one adds the new fields (so its writes are taken) and asks for a rebuild.
#: 2: ``f`` (folded strings for ilike); -0.0 indexed as 0.0.
MAPPING_VERSION = 2

#: Lucene refuses terms over this many UTF-8 bytes, in documents and in queries alike.
MAX_TERM_BYTES = 32766

#: 8191 characters of at most 4 UTF-8 bytes fit in a term. Longer strings are kept in the
#: twin but are not searchable or sortable by value.
MAX_INDEXED_STRING = 8191

MAPPING: dict[str, Any] = {
    "dynamic": "strict",
    "_meta": {"version": MAPPING_VERSION},
    "_source": {"excludes": ["leaves"]},
    "properties": {
        "twinId": {"type": "keyword"},
        "namespace": {"type": "keyword"},
        "seq": {"type": "long"},
        "leaves": {
            "type": "nested",
            "dynamic": "strict",
            "properties": {
                "p": {"type": "keyword"},
                "t": {"type": "integer"},
                "n": {"type": "double"},
                "s": {"type": "keyword", "ignore_above": MAX_INDEXED_STRING},
                "f": {"type": "keyword", "ignore_above": MAX_INDEXED_STRING},
                "a": {"type": "boolean"},
            },
        },
    },
}


def index_settings(
    max_leaves: int, *, shards: int = 1, replicas: int = 1, refresh_interval: str = "1s"
) -> dict[str, Any]:
    """Settings of a new concrete index; ``max_leaves`` bounds the nested entries per twin."""
    return {
        "number_of_shards": shards,
        "number_of_replicas": replicas,
        "refresh_interval": refresh_interval,
        "mapping.nested_objects.limit": max_leaves,
        # External versions of deletes are remembered this long; a stale index operation of
        # a deleted twin arriving later than this could bring it back.
        "gc_deletes": "1h",
    }


def max_leaves(max_twin_bytes: int) -> int:
    """An upper bound of the entries of a twin of ``max_twin_bytes`` (the index's
    ``mapping.nested_objects.limit``).

    The limit counts desired, reported, attributes and live; the index also holds the delta
    (up to a copy of desired) and the lifecycle (an object of up to five values per desired
    leaf path). A desired leaf takes at least 2 bytes in an array (2 entries with its delta)
    or 6 in an object (``"a":0,``: up to 8 entries with delta and lifecycle), so a twin has
    fewer than 1.34 entries per byte; twice the bytes leaves room to spare, and the limit
    costs nothing until a document reaches it.
    """
    return 2 * max_twin_bytes + 1024


def as_double(value: Any) -> float:
    """A boolean or number as the indexed double; ``-0.0`` is ``0.0``, which it equals (as a
    double it sorts below ``0.0`` and ``term`` and ``range`` keep them apart)."""
    return float(value) + 0.0


def to_es_document(doc: JSONObject, seq: int) -> dict[str, Any]:
    """The index document of the twin document ``doc`` written at sequence number ``seq``."""
    entries: list[dict[str, Any]] = []
    for path, rank, value, in_array in leaves(doc):
        entry: dict[str, Any] = {"p": path, "t": rank, "a": bool(in_array)}
        if rank in (1, 2):
            entry["n"] = as_double(value)
        elif rank == 3:
            entry["s"] = value
            if (folded := fold(value)) != value:
                entry["f"] = folded
        entries.append(entry)
    return {
        "twinId": doc["twinId"],
        "namespace": doc.get("namespace", ""),
        "seq": seq,
        "leaves": entries,
    }
