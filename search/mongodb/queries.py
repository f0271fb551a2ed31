"""Running searches and counts on a collection whose documents carry the index fields."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection

from search.rql.ast import Filter
from search.rql.ordering import sort_keys
from search.rql.query import SearchQuery
from twin_service.types import JSONObject

from .translate import after_filter, search_filter, sort_spec

Raw = dict[str, Any]


async def search_page(
    collection: AsyncCollection[dict[str, Any]],
    query: SearchQuery,
    document: Callable[[Raw], JSONObject],
    projection: Mapping[str, Any] | None = None,
) -> tuple[list[Raw], str | None]:
    """One page of raw documents in order, and the cursor of the next page (None at the end).

    ``document`` turns a raw document into the twin document the sort keys are read from
    (the cursor must carry exactly the keys the evaluator would compute).
    """
    where = search_filter(query.filter, query.namespaces)
    after = after_filter(query)
    if after is not None:
        where = {"$and": [where, after]}
    found = collection.find(where, projection).sort(sort_spec(query.sort)).limit(query.size + 1)
    rows = [row async for row in found]
    page = rows[: query.size]
    if len(rows) <= query.size:
        return page, None
    return page, query.next_cursor(sort_keys(document(page[-1]), query.sort))


async def count(
    collection: AsyncCollection[dict[str, Any]],
    filter: Filter | None,
    namespaces: tuple[str, ...] | list[str] | None,
) -> int:
    """How many live twins match ``filter`` within ``namespaces``."""
    return await collection.count_documents(search_filter(filter, namespaces))
