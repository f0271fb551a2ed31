"""Bulk requests of the indexer and how to read their answers. Pure.

Every operation carries ``version=seq, version_type=external``: Elasticsearch keeps the
highest version it has seen per id (deletes included, for ``gc_deletes``), so indexing the
same twin twice, out of order or from several replicas at once never goes back in time.

A twin whose document cannot be indexed (too large for a bulk request, or refused by the
engine) is deleted from the index at its version instead: a search must never find a twin
by values it no longer has.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
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
    """Overload, a server failure, or the index refusing every write for now (a write
    block, closed, an alias with no write index): try again later with backoff."""
    NO_INDEX = "no_index"
    """The index (its alias) is gone: create it again, then retry."""
    REJECTED = "rejected"
    """The document itself is refused (e.g. too large): retrying cannot help. Its old
    document is deleted instead (the change stays pending until that delete is done)."""


@dataclass(frozen=True)
class Operation:
    """One change as encoded bulk lines; ``refusal`` says why its document is not sent
    (the lines then delete the twin's old document)."""

    change: Change
    lines: tuple[str, ...]
    refusal: str | None = None

    @property
    def size(self) -> int:
        """Bytes in a bulk body (UTF-8, a newline per line)."""
        return sum(len(line.encode()) + 1 for line in self.lines)


def _dumps(value: Any) -> str:
    # The stdlib C encoder without a ``default`` hook is several times faster on these.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _meta(index: str, change: Change) -> dict[str, Any]:
    return {
        "_index": index,
        "_id": change.twin_id,
        "version": change.seq,
        "version_type": "external",
    }


def delete_operation(index: str, change: Change, refusal: str | None = None) -> Operation:
    """Delete the twin at ``change.seq`` (its deletion, or the refusal of its document)."""
    return Operation(change, (_dumps({"delete": _meta(index, change)}),), refusal)


def encode(index: str, change: Change, max_bytes: int) -> Operation:
    """The bulk lines writing ``change`` to ``index``; a document of more than
    ``max_bytes`` becomes the deletion of the old one, with the reason.

    Identical entries (the elements of an array that repeat a value) are sent once: they
    match the same queries and give no sort value, and under a long path each copy
    repeated the path (a 64 KB twin became a 112 MB document).
    """
    if change.doc is None:
        return delete_operation(index, change)
    doc = to_es_document(change.doc, change.seq)
    entries = list({tuple(entry.items()): entry for entry in doc["leaves"]}.values())
    # Characters are a lower bound of UTF-8 bytes: a huge document is refused before it is
    # encoded at all, so one twin never costs more memory than the limit.
    if sum(len(e["p"]) + len(e.get("s", "")) for e in entries) > max_bytes:
        return delete_operation(index, change, _too_large(f"more than {max_bytes}", max_bytes))
    doc["leaves"] = entries
    operation = Operation(change, (_dumps({"index": _meta(index, change)}), _dumps(doc)))
    if operation.size > max_bytes:
        return delete_operation(index, change, _too_large(str(operation.size), max_bytes))
    return operation


def _too_large(size: str, max_bytes: int) -> str:
    return (
        f"its index document is {size} bytes, over elasticsearch.bulk_max_bytes "
        f"({max_bytes}); long paths above many distinct values make it so"
    )


def bulk_operations(index: str, changes: Sequence[Change]) -> list[dict[str, Any]]:
    """The ``operations`` of one ``_bulk`` request writing ``changes`` to ``index`` (as
    objects, for reading; the indexer sends :func:`encode`'s lines)."""
    return [json.loads(line) for change in changes for line in encode(index, change, 2**62).lines]


def batches(operations: Iterator[Operation], max_bytes: int) -> Iterator[list[Operation]]:
    """``operations`` in consecutive groups of at most ``max_bytes`` of bulk body each
    (a single operation may fill a group alone)."""
    batch: list[Operation] = []
    size = 0
    for operation in operations:
        if batch and size + operation.size > max_bytes:
            yield batch
            batch, size = [], 0
        batch.append(operation)
        size += operation.size
    if batch:
        yield batch


#: Errors of a bulk item that refuse the index, not the document: an operator's write
#: block, a closed index. Retried: dropping the change would leave the index stale for good.
_INDEX_ERRORS = frozenset({"cluster_block_exception", "index_closed_exception"})
#: The same, reported as an illegal argument: the alias has no write index, or is on
#: several indexes with none for writes.
_ALIAS_REASONS = ("no write index is defined", "has more than one ind")


def item_outcome(item: dict[str, Any], alias: str | None = None) -> Outcome:
    """The outcome of one entry of a ``_bulk`` answer's ``items``; ``alias``: the alias
    the request wrote through.

    An item answered by an index named like that alias means the alias is gone: the engine
    ignores ``require_alias`` for a delete with an external version, auto-creates a plain
    index under the name and answers 404 there. That index holds nothing of ours and takes
    no twin document (it is not an alias): the index must be made again.
    """
    ((action, result),) = item.items()
    status = int(result.get("status", 500))
    error = result.get("error") or {}
    kind, reason = error.get("type"), str(error.get("reason", ""))
    if kind == "index_not_found_exception" or (alias is not None and result.get("_index") == alias):
        return Outcome.NO_INDEX
    if status < 300 or status == 409 or (action == "delete" and status == 404):
        return Outcome.DONE
    if status in (404, 429) or status >= 500 or kind in _INDEX_ERRORS:
        return Outcome.RETRY
    if kind == "illegal_argument_exception" and any(r in reason for r in _ALIAS_REASONS):
        return Outcome.RETRY
    return Outcome.REJECTED


def item_reason(item: dict[str, Any]) -> str:
    """What a ``_bulk`` answer's item says went wrong, for a log line (shortened: the
    engine quotes whole field values)."""
    ((_, result),) = item.items()
    error = result.get("error") or {}
    text = f"status {result.get('status')}"
    while isinstance(error, dict) and error:
        text += f", {error.get('type', 'error')}: {_short(str(error.get('reason', '')))}"
        error = error.get("caused_by")
    return text


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
