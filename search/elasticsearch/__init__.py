"""The Elasticsearch search index: mapping, documents and RQL translation. Pure, no I/O.

The I/O adapter (client, indexer loop, waiting) is :mod:`twin_service.index.elasticsearch`.
"""

from __future__ import annotations

from .bulk import (
    Change,
    Operation,
    Outcome,
    batches,
    bulk_operations,
    delete_operation,
    encode,
    item_outcome,
    item_reason,
)
from .mapping import MAPPING, MAPPING_VERSION, index_settings, max_leaves, to_es_document
from .translate import filter_query, keys_from_hit, search_after, search_query, sort_clause

__all__ = [
    "MAPPING",
    "MAPPING_VERSION",
    "Change",
    "Operation",
    "Outcome",
    "batches",
    "bulk_operations",
    "delete_operation",
    "encode",
    "filter_query",
    "index_settings",
    "item_outcome",
    "item_reason",
    "keys_from_hit",
    "max_leaves",
    "search_after",
    "search_query",
    "sort_clause",
    "to_es_document",
]
