"""The search index protocol the search routes use."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from twin_service.errors import SearchDisabled
from twin_service.store.base import TwinStore
from twin_service.twin.document import Twin

if TYPE_CHECKING:
    from search.rql.query import SearchQuery


class SearchIndex(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def search(self, query: SearchQuery) -> tuple[list[Twin], str | None]:
        """One page of twins and the next cursor, as the index has them now (see
        :meth:`wait_for_seq`)."""

    async def count(self, query: SearchQuery) -> int: ...

    async def wait_for_seq(self, seq: int) -> None:
        """Return once searches see every write up to ``seq`` (bounded: 503 index.timeout)."""

    async def health(self) -> dict[str, Any]:
        """``{"status": "up"|"down", ...}`` with lag figures where they exist."""


class _Passive:
    """An index with nothing to start or stop: it lives in the store, or not at all."""

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


class NoIndex(_Passive):
    """``search = "off"``: no index is kept, and the search API says so."""

    async def search(self, query: SearchQuery) -> tuple[list[Twin], str | None]:
        raise search_disabled()

    async def count(self, query: SearchQuery) -> int:
        raise search_disabled()

    async def wait_for_seq(self, seq: int) -> None:
        raise search_disabled()

    async def health(self) -> dict[str, Any]:
        return {"status": "up", "kind": "off"}


def search_disabled() -> SearchDisabled:
    """The error of every search while ``search = \"off\"``."""
    return SearchDisabled(
        "Search is turned off on this service.",
        description='The setting search is "off" (TWIN_SEARCH); set it to "builtin" or '
        '"elasticsearch" to search twins.',
    )


class BuiltinIndex(_Passive):
    """The index kept by the store in the same transaction as each write: never behind."""

    def __init__(self, store: TwinStore) -> None:
        self._store = store

    async def search(self, query: SearchQuery) -> tuple[list[Twin], str | None]:
        return await self._store.search(query)

    async def count(self, query: SearchQuery) -> int:
        return await self._store.count(query)

    async def wait_for_seq(self, seq: int) -> None:
        return None

    async def health(self) -> dict[str, Any]:
        return {"status": "up", "kind": "builtin", "lagSeconds": 0.0, "backlog": 0}
