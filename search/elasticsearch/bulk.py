"""Bulk requests of the indexer and how to read their answers. Pure.

Every operation carries ``version=seq, version_type=external``: Elasticsearch keeps the
highest version it has seen per id (deletes included, for ``gc_deletes``), so indexing the
same twin twice, out of order or from several replicas at once never goes back in time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from twin_service.types import JSONObject

from .mapping import to_es_document


@dataclass(frozen=True)
class Change:
    """The state of one twin at store sequence number ``seq``; ``doc is None``: deleted."""

    twin_id: str
    seq: int
    doc: JSONObject | None


class Outcome(Enum):
    """What to do with a change after its bulk item answered."""

    DONE = "done"
    """Indexed, or a newer version is already there (409), or already deleted (404)."""
    RETRY = "retry"
    """Overload, a server failure or a missing index: try again later with backoff."""
    REJECTED = "rejected"
    """The document itself is refused (e.g. too many leaves): retrying cannot help."""


def bulk_operations(index: str, changes: Sequence[Change]) -> list[dict[str, Any]]:
    """The ``operations`` of one ``_bulk`` request writing ``changes`` to ``index``."""
    ops: list[dict[str, Any]] = []
    for change in changes:
        meta = {
            "_index": index,
            "_id": change.twin_id,
            "version": change.seq,
            "version_type": "external",
        }
        if change.doc is None:
            ops.append({"delete": meta})
        else:
            ops.append({"index": meta})
            ops.append(to_es_document(change.doc, change.seq))
    return ops


def item_outcome(item: dict[str, Any]) -> Outcome:
    """The outcome of one entry of a ``_bulk`` answer's ``items``."""
    ((action, result),) = item.items()
    status = int(result.get("status", 500))
    if status < 300 or status == 409 or (action == "delete" and status == 404):
        return Outcome.DONE
    # 404 on a write: the index (alias) is gone; keep the change until it is back.
    if status in (404, 429) or status >= 500:
        return Outcome.RETRY
    return Outcome.REJECTED
