"""Differential testing of search backends against the reference evaluator.

A backend under test implements :class:`SearchBackend`; a pytest fixture supplies it and the
shared test in ``test_differential_sqlite.py`` (copy it for another backend, or parametrize
the fixture) checks that every page, every "more pages" signal and every count equals what
:func:`search.rql.page` computes in memory. Twins and queries are drawn from a small
vocabulary of keys and values so that queries match, tie, collide across types and reach
through arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Protocol

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from search.rql import (
    And,
    Compare,
    Exists,
    Filter,
    In,
    Like,
    Not,
    Or,
    Path,
    SearchQuery,
    SortKey,
    Value,
    page,
    selected,
)
from search.rql.paths import lookup
from twin_service.twin.delta import compute_delta
from twin_service.types import JSONObject


class SearchBackend(Protocol):
    """What a search index must offer to be checked against the reference evaluator."""

    async def load(self, docs: Sequence[JSONObject]) -> None:
        """Make the index hold exactly ``docs`` (re-indexing or removing earlier twins)."""

    async def search(self, query: SearchQuery) -> tuple[list[str], str | None]:
        """One page of twin ids and the next cursor."""

    async def count(self, filter: Filter | None, namespaces: Sequence[str] | None) -> int:
        """Number of matching twins."""


# --- vocabulary -------------------------------------------------------------------------------

KEYS = ["a", "b", "c/d"]
SCALARS: list[Value] = [
    *(None, True, False, 0, -0.0, 1, 1.0, -2, 2.5),
    *(
        "",
        "a",
        "ab",
        "aB",
        "b*",
        "Ab",
        "é",
        "É",
        "CAFÉ",
        "Café",
        "ΣΑ",
        "σα",
        "Яб",
        "яБ",
        "\U00010400",
    ),
]
PATTERNS = ["a*", "*b", "a?", "?", "*", "", "a", "b\\*", "A*", "*B*", "\\?*", "é", "É"]
PATTERNS += ["café", "*É", "σ?", "Я*", "*б", "\U00010428"]
PATHS: list[Path] = [
    ("twinId",),
    ("namespace",),
    ("definition",),
    ("revision",),
    ("connection", "status"),
    ("connection", "lastSeen"),
    ("attributes",),
    ("delta",),
    ("lifecycle",),
    *[(root, key) for root in ("attributes", "desired", "delta") for key in KEYS],
    *[("attributes", k1, k2) for k1 in KEYS for k2 in KEYS[:2]],
    ("reported", "a", "a", "a"),
    ("lifecycle", "c/d", "a"),
]

scalars = st.sampled_from(SCALARS)


def json_values(depth: int = 3) -> st.SearchStrategy[Any]:
    """Nested JSON over the shared keys: scalars, arrays, (empty) objects."""
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)
        ),
        max_leaves=6,
    )


objects = st.dictionaries(st.sampled_from(KEYS), scalars | json_values(), max_size=3)


@st.composite
def twins(draw: st.DrawFn, min_size: int = 3, max_size: int = 12) -> list[JSONObject]:
    """Twin documents with unique ids in two namespaces."""
    count = draw(st.integers(min_size, max_size))
    docs = []
    for i in range(count):
        namespace = draw(st.sampled_from(["org.a", "org.b"]))
        doc: JSONObject = {
            "twinId": f"{namespace}:t{i:02d}",
            "namespace": namespace,
            "revision": draw(st.sampled_from([1, 2, 2.0, 3])),
            "created": "2026-11-27T06:00:00.000Z",
            "modified": draw(st.sampled_from(["2026-11-27T06:01:00.123Z", "2026-11-28"])),
            "connection": {
                "status": draw(st.sampled_from(["online", "offline", "unknown"])),
                "since": "2026-11-27T06:00:00.000Z",
                "lastSeen": draw(st.sampled_from([None, "2026-11-27T06:00:00.000Z"])),
            },
            "metadata": {"a": 1},
        }
        if draw(st.booleans()):
            doc["definition"] = draw(st.sampled_from(["acme:pump:1", "acme:fan:1"]))
        for root in ("attributes", "desired", "reported", "lifecycle"):
            if draw(st.integers(0, 3)):
                doc[root] = draw(objects)
        # As in every stored twin: the SQLite index answers delta values from desired's rows.
        if draw(st.integers(0, 3)):
            doc["delta"] = compute_delta(doc.get("desired", {}), doc.get("reported", {}))
        docs.append(doc)
    return docs


# --- queries ----------------------------------------------------------------------------------

_FREE_KEYS = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1)


def _any_paths() -> st.SearchStrategy[Path]:
    roots = st.sampled_from(["attributes", "desired", "reported", "live", "delta", "lifecycle"])
    free = st.tuples(roots, st.lists(_FREE_KEYS, max_size=3)).map(lambda p: (p[0], *p[1]))
    return st.sampled_from(PATHS) | free


def _any_values() -> st.SearchStrategy[Value]:
    return (
        scalars
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)))
    )


def atoms(vocabulary: bool = False) -> st.SearchStrategy[Filter]:
    """Single conditions; with ``vocabulary`` only over the shared paths and values."""
    paths = st.sampled_from(PATHS) if vocabulary else _any_paths()
    values = scalars if vocabulary else _any_values()
    pieces = st.sampled_from(["a", "*", "?", "\\*", "\\?", "\\\\", "é", " ", "/"])
    patterns = st.sampled_from(PATTERNS)
    if not vocabulary:
        patterns |= st.lists(pieces, max_size=5).map("".join)
    comparable = values.filter(lambda v: v is not None)
    return st.one_of(
        st.builds(Compare, st.sampled_from(["eq", "ne"]), paths, values),
        st.builds(Compare, st.sampled_from(["gt", "ge", "lt", "le"]), paths, comparable),
        st.builds(In, paths, st.lists(values, min_size=1, max_size=3).map(tuple)),
        st.builds(Like, paths, patterns, st.booleans()),
        st.builds(Exists, paths),
    )


def filters(vocabulary: bool = False) -> st.SearchStrategy[Filter]:
    """Filter ASTs; with ``vocabulary`` only over the shared paths and values."""
    return st.recursive(
        atoms(vocabulary),
        lambda inner: (
            st.builds(And, st.lists(inner, min_size=1, max_size=3).map(tuple))
            | st.builds(Or, st.lists(inner, min_size=1, max_size=3).map(tuple))
            | st.builds(Not, inner)
        ),
        max_leaves=5,
    )


sorts = st.lists(st.builds(SortKey, st.sampled_from(PATHS), st.booleans()), max_size=3).map(tuple)
namespaces = (
    st.none()
    | st.none()
    | st.none()
    | st.lists(st.sampled_from(["org.a", "org.b", "org.c"]), max_size=2).map(tuple)
)


@st.composite
def queries(draw: st.DrawFn) -> SearchQuery:
    """A first-page query over the shared vocabulary."""
    return SearchQuery(
        filter=draw(st.one_of(st.none(), *[filters(vocabulary=True)] * 4)),
        sort=draw(sorts),
        size=draw(st.integers(1, 5)),
        namespaces=draw(namespaces),
    )


# --- the check --------------------------------------------------------------------------------


async def check_backend(
    backend: SearchBackend, docs: Sequence[JSONObject], query: SearchQuery
) -> None:
    """Assert that ``backend`` (already loaded with ``docs``) pages and counts like the oracle."""
    expected_all = [d["twinId"] for d in docs if selected(d, query.filter, query.namespaces)]
    assert await backend.count(query.filter, query.namespaces) == len(expected_all)
    oracle_query, backend_query = query, query
    seen: list[str] = []
    for _ in range(len(docs) + 2):
        expected_docs, oracle_cursor = page(docs, oracle_query)
        ids, cursor = await backend.search(backend_query)
        assert ids == [d["twinId"] for d in expected_docs]
        assert (cursor is None) == (oracle_cursor is None)
        seen.extend(ids)
        if cursor is None or oracle_cursor is None:
            break
        oracle_query = replace(query, cursor=oracle_cursor)
        backend_query = replace(query, cursor=cursor)
    assert sorted(seen) == sorted(expected_all)
    assert len(set(seen)) == len(seen)


# --- the suite --------------------------------------------------------------------------------

RELAXED = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


class DifferentialSuite:
    """The differential tests of an index backend.

    Subclass it as ``Test...`` in a module that provides a ``backend`` fixture yielding a
    :class:`SearchBackend` (empty or not: every test loads its own twins).
    """

    @RELAXED
    @given(docs=twins(), query=queries())
    async def test_pages_and_counts_match_the_evaluator(
        self, backend: SearchBackend, docs: list[JSONObject], query: SearchQuery
    ) -> None:
        await backend.load(docs)
        await check_backend(backend, docs, query)

    @RELAXED
    @given(before=twins(), after=twins(), query=queries())
    async def test_reindexing_replaces_earlier_rows(
        self,
        backend: SearchBackend,
        before: list[JSONObject],
        after: list[JSONObject],
        query: SearchQuery,
    ) -> None:
        await backend.load(before)
        await backend.load(after)
        await check_backend(backend, after, query)

    @settings(
        max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(docs=twins(), query=queries(), data=st.data())
    async def test_conjunctions_match_the_evaluator(
        self,
        backend: SearchBackend,
        docs: list[JSONObject],
        query: SearchQuery,
        data: st.DataObject,
    ) -> None:
        # An ``and`` of plain conditions is planned on its own (SQLite intersects the
        # selective ones): rarer among the recursive filters above, so tried here directly,
        # with equalities on values the twins hold, so that each condition matches some.
        held = [
            (path, node)
            for doc in docs
            for path in PATHS
            for found, node in [lookup(doc, path)]
            if found and not isinstance(node, (dict, list))
        ]
        condition = atoms(vocabulary=True)
        if held:
            condition |= st.sampled_from(held).map(lambda pv: Compare("eq", pv[0], pv[1]))
        conditions = data.draw(st.lists(condition, min_size=2, max_size=4))
        await backend.load(docs)
        await check_backend(backend, docs, replace(query, filter=And(tuple(conditions))))

    @settings(
        max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(docs=twins(min_size=8, max_size=20), query=queries(), size=st.integers(1, 3))
    async def test_small_pages_cover_everything_once(
        self, backend: SearchBackend, docs: list[JSONObject], query: SearchQuery, size: int
    ) -> None:
        await backend.load(docs)
        await check_backend(backend, docs, SearchQuery(query.filter, query.sort, size))

    async def test_in_keeps_true_and_1_apart(self, backend: SearchBackend) -> None:
        """``in(p, true, 1)`` matches both values: Python takes ``True == 1``, and a
        translation that dropped "duplicate" values by Python equality lost one of them
        (found by the MongoDB run of this suite)."""
        docs: list[JSONObject] = [
            {
                "twinId": f"org.a:t{i:02d}",
                "namespace": "org.a",
                "revision": 1,
                "created": "2026-11-27T06:00:00.000Z",
                "modified": "2026-11-27T06:00:00.000Z",
                "desired": {"a": value},
                "delta": {"a": value},
            }
            for i, value in enumerate([True, 1, 1.0, "1", False, 0])
        ]
        await backend.load(docs)
        for values in [(True, 1), (1, True), (1.0, True, 1), (False, 0)]:
            query = SearchQuery(In(("delta", "a"), values), (SortKey(("twinId",)),), 25)
            await check_backend(backend, docs, query)
