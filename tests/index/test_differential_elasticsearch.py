"""The differential suite against Elasticsearch: same ids, same order, same counts, same pages.

Each hypothesis example loads its twins with the next external version (re-indexing kept
twins, deleting the others with a version too) and refreshes, so it also checks that
versioned writes and deletes replace earlier state. Example counts are modest: every example
costs a few round trips to a real node.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from search.elasticsearch import Change, Outcome
from search.rql import Filter, SearchQuery, parse_filter, parse_options
from tests.index.helpers import es_settings, index_name
from tests.search.differential import SearchBackend, check_backend, queries, twins
from tests.servers.search_engine import SearchEngine
from twin_service.index.elasticsearch import ElasticsearchIndex
from twin_service.store.base import TwinStore
from twin_service.types import JSONObject

pytestmark = pytest.mark.server("elasticsearch")


class ElasticsearchBackend:
    """The Elasticsearch index of the service, written through its bulk path."""

    def __init__(self, index: ElasticsearchIndex) -> None:
        self.index = index
        self.version = 0
        self.loaded: set[str] = set()

    async def load(self, docs: Sequence[JSONObject]) -> None:
        self.version += 1
        keep = {doc["twinId"] for doc in docs}
        changes = [Change(doc["twinId"], self.version, doc) for doc in docs]
        changes += [Change(i, self.version, None) for i in sorted(self.loaded - keep)]
        outcomes = await self.index.write(changes)
        assert all(o is Outcome.DONE for o in outcomes)
        self.loaded = keep
        await self.index.client.indices.refresh(index=self.index.alias)

    async def search(self, query: SearchQuery) -> tuple[list[str], str | None]:
        return await self.index.search_ids(query)

    async def count(self, filter: Filter | None, namespaces: Sequence[str] | None) -> int:
        query = SearchQuery(filter, namespaces=None if namespaces is None else tuple(namespaces))
        return await self.index.count(query)


@pytest.fixture
async def backend(search_engine: SearchEngine, tmp_path: Path) -> AsyncIterator[SearchBackend]:
    settings_ = es_settings(search_engine, tmp_path, index_name("diff"))
    # Only the bulk and query paths are used: no store, no indexer loop.
    index = ElasticsearchIndex(settings_, cast(TwinStore, None), run_indexer=False)
    await index.start()
    try:
        yield ElasticsearchBackend(index)
    finally:
        await index.client.indices.delete(index=f"{index.alias}-*")
        await index.stop()


def relaxed(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )


@relaxed(60)
@given(docs=twins(), query=queries())
async def test_pages_and_counts_match_the_evaluator(
    backend: SearchBackend, docs: list[JSONObject], query: SearchQuery
) -> None:
    await backend.load(docs)
    await check_backend(backend, docs, query)


@relaxed(25)
@given(before=twins(), after=twins(), query=queries())
async def test_reindexing_replaces_earlier_documents(
    backend: SearchBackend, before: list[JSONObject], after: list[JSONObject], query: SearchQuery
) -> None:
    await backend.load(before)
    await backend.load(after)
    await check_backend(backend, after, query)


@relaxed(20)
@given(docs=twins(min_size=8, max_size=20), query=queries(), size=st.integers(1, 3))
async def test_small_pages_cover_everything_once(
    backend: SearchBackend, docs: list[JSONObject], query: SearchQuery, size: int
) -> None:
    await backend.load(docs)
    await check_backend(backend, docs, SearchQuery(query.filter, query.sort, size))


async def test_negative_zero_is_zero(backend: SearchBackend) -> None:
    """-0.0 equals 0 and ties with it: Elasticsearch's doubles put it below 0, so eq(x,0)
    missed it, lt(x,0) took it, and paging by x skipped nz:a (its cursor's 0 came back
    from the -0.0 of nz:z as 0, which is after -0.0)."""
    docs: list[JSONObject] = [
        {"twinId": f"org.a:nz{name}", "namespace": "org.a", "attributes": {"x": value}}
        for name, value in [("a", 0), ("z", -0.0), ("b", 1), ("c", 0.0), ("d", -1)]
    ]
    await backend.load(docs)
    for rql in ("eq(attributes/x,0)", "eq(attributes/x,-0.0)", "lt(attributes/x,0)"):
        for size in (1, 5):
            for sort in ("+attributes/x", "-attributes/x"):
                query = SearchQuery(
                    parse_filter(rql), parse_options(f"sort({sort})").sort or (), size
                )
                await check_backend(backend, docs, query)
    for rql in (
        "gt(attributes/x,-0.0)",
        "ge(attributes/x,0)",
        "le(attributes/x,-0.0)",
        "in(attributes/x,-0.0)",
    ):
        await check_backend(backend, docs, SearchQuery(parse_filter(rql), size=1))
    sort = parse_options("sort(+attributes/x)").sort or ()
    await check_backend(backend, docs, SearchQuery(None, sort, 1))


async def test_ilike_ignores_case_in_every_script(backend: SearchBackend) -> None:
    """ilike on Elasticsearch used Lucene's case_insensitive, which folds ASCII only:
    ilike(x,"É") missed "é", "CAFÉ" missed "Café" (and Greek, Cyrillic, Deseret alike)."""
    values = ["É", "é", "Café", "CAFÉ", "ΣΑΣ", "σας", "Яблоко", "яБЛОКО", "\U00010400x"]
    values += ["\U00010428X", "İ", "ı", "i", "I", "ſ", "S", "\u212a", "k", "a*b", "A*B"]
    docs: list[JSONObject] = [
        {"twinId": f"org.a:u{i:02d}", "namespace": "org.a", "attributes": {"x": value}}
        for i, value in enumerate(values)
    ]
    await backend.load(docs)
    patterns = [*values, "*É", "caf?", "C*", "σ*", "*Σ", "я*", "\U00010428*", "?X", "A\\*B"]
    for pattern in patterns:
        for rql in (
            f"ilike(attributes/x,{json.dumps(pattern)})",
            f"like(attributes/x,{json.dumps(pattern)})",
        ):
            await check_backend(backend, docs, SearchQuery(parse_filter(rql), size=25))


async def test_ilike_of_the_empty_pattern_is_the_empty_string(backend: SearchBackend) -> None:
    """ilike(x,"") matched no twin on Elasticsearch (an empty wildcard value matches
    nothing there), and not(ilike(x,"")) took the twins whose x is "". like(x,"") was
    right: a pattern without wildcards is an eq."""
    docs: list[JSONObject] = [
        {"twinId": f"org.a:e{i}", "namespace": "org.a", "attributes": {"x": value}}
        for i, value in enumerate(["", "a", " ", 0, None, []])
    ]
    await backend.load(docs)
    for rql in ('ilike(attributes/x,"")', 'not(ilike(attributes/x,""))', 'like(attributes/x,"")'):
        await check_backend(backend, docs, SearchQuery(parse_filter(rql), size=25))


async def test_terms_too_long_to_index_match_nothing(backend: SearchBackend) -> None:
    """A path, namespace or sort path over Lucene's 32,766 bytes per term got a 400
    rql.invalid carrying Elasticsearch's "Term is longer than maximum indexable length"
    (even ``namespaces=org.a,<40,000 chars>``, refusing a legitimate search), where the
    evaluator and the built-in index find no such twin."""
    docs: list[JSONObject] = [
        {"twinId": f"org.a:t{i}", "namespace": "org.a", "attributes": {"x": i}} for i in range(3)
    ]
    await backend.load(docs)
    long = "k" * 33_000
    for rql in (
        f"exists(attributes/{long})",
        f"eq(attributes/{long},1)",
        f"not(exists(attributes/{'€' * 11_000}))",
        f"or(eq(attributes/x,1),in(attributes/{long},1,2))",
    ):
        await check_backend(backend, docs, SearchQuery(parse_filter(rql), size=2))
    for namespaces in (("n" * 40_000,), ("org.a", "n" * 40_000)):
        await check_backend(backend, docs, SearchQuery(None, size=2, namespaces=namespaces))
    for sort in (f"sort(+attributes/{long})", f"sort(-attributes/{long},+attributes/x)"):
        query = SearchQuery(None, parse_options(sort).sort or (), 2)
        await check_backend(backend, docs, query)
