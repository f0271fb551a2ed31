"""Table tests of the pure RQL to query DSL translation (no Elasticsearch needed)."""

from __future__ import annotations

from typing import Any

import pytest

from search.elasticsearch import (
    Change,
    Outcome,
    bulk_operations,
    filter_query,
    item_outcome,
    keys_from_hit,
    search_after,
    search_query,
    sort_clause,
    to_es_document,
)
from search.elasticsearch.translate import searchable, wildcard_pattern
from search.rql import SearchQuery, SortKey, parse_filter, parse_options
from search.rql.ordering import Key
from twin_service.errors import RqlInvalid


def leaf(path: str, *conditions: dict[str, Any]) -> dict[str, Any]:
    return {
        "nested": {
            "path": "leaves",
            "query": {"bool": {"filter": [{"term": {"leaves.p": path}}, *conditions]}},
        }
    }


T = {n: {"term": {"leaves.t": n}} for n in range(6)}

CASES: list[tuple[str, dict[str, Any]]] = [
    ("eq(attributes/a,null)", leaf("attributes/a", T[0])),
    ("eq(attributes/a,true)", leaf("attributes/a", T[1], {"term": {"leaves.n": 1.0}})),
    ("eq(attributes/a,1)", leaf("attributes/a", T[2], {"term": {"leaves.n": 1.0}})),
    ('eq(attributes/a,"x")', leaf("attributes/a", T[3], {"term": {"leaves.s": "x"}})),
    ('eq("attributes/a~1b",1)', leaf("attributes/a~1b", T[2], {"term": {"leaves.n": 1.0}})),
    (
        "ne(desired/a,1)",
        {
            "bool": {
                "filter": [leaf("desired/a")],
                "must_not": [leaf("desired/a", T[2], {"term": {"leaves.n": 1.0}})],
            }
        },
    ),
    ("ge(reported/t,2.5)", leaf("reported/t", T[2], {"range": {"leaves.n": {"gte": 2.5}}})),
    ('lt(twinId,"b")', leaf("twinId", T[3], {"range": {"leaves.s": {"lt": "b"}}})),
    ("gt(attributes/on,false)", leaf("attributes/on", T[1], {"range": {"leaves.n": {"gt": 0.0}}})),
    (
        'in(attributes/a,1,"x",null,2)',
        leaf(
            "attributes/a",
            {
                "bool": {
                    "should": [
                        T[0],
                        {"bool": {"filter": [T[2], {"terms": {"leaves.n": [1.0, 2.0]}}]}},
                        {"bool": {"filter": [T[3], {"terms": {"leaves.s": ["x"]}}]}},
                    ],
                    "minimum_should_match": 1,
                }
            },
        ),
    ),
    ('like(attributes/a,"ab")', leaf("attributes/a", T[3], {"term": {"leaves.s": "ab"}})),
    (
        'like(attributes/a,"a\\\\*b*")',
        leaf("attributes/a", T[3], {"wildcard": {"leaves.s": {"value": "a\\*b*"}}}),
    ),
    (
        # Folded pattern against the folded string (f), or s where no f was needed.
        'ilike(attributes/a,"ÉA*")',
        leaf(
            "attributes/a",
            T[3],
            {
                "bool": {
                    "should": [
                        {"wildcard": {"leaves.f": {"value": "éa*"}}},
                        {
                            "bool": {
                                "filter": [{"wildcard": {"leaves.s": {"value": "éa*"}}}],
                                "must_not": [{"exists": {"field": "leaves.f"}}],
                            }
                        },
                    ],
                    "minimum_should_match": 1,
                }
            },
        ),
    ),
    ("exists(delta)", leaf("delta")),
    (
        "and(exists(delta),not(exists(live)))",
        {"bool": {"filter": [leaf("delta"), {"bool": {"must_not": [leaf("live")]}}]}},
    ),
    (
        "or(exists(delta),exists(live))",
        {"bool": {"should": [leaf("delta"), leaf("live")], "minimum_should_match": 1}},
    ),
]


@pytest.mark.parametrize(("rql", "expected"), CASES, ids=[c[0] for c in CASES])
def test_filters(rql: str, expected: dict[str, Any]) -> None:
    assert filter_query(parse_filter(rql)) == expected


def test_namespaces_and_match_all() -> None:
    assert search_query(None, None) == {"match_all": {}}
    assert search_query(None, ["a"]) == {"terms": {"namespace": ["a"]}}
    both = search_query(parse_filter("exists(delta)"), ["a", "b"])
    assert both == {"bool": {"filter": [leaf("delta"), {"terms": {"namespace": ["a", "b"]}}]}}


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [("a*", "a*"), ("?b", "?b"), ("a\\*", "a\\*"), ("\\\\x", "\\\\x"), ("é?", "é?")],
)
def test_wildcards(pattern: str, expected: str) -> None:
    assert wildcard_pattern(pattern) == expected


def test_bad_pattern_is_refused() -> None:
    with pytest.raises(RqlInvalid):
        wildcard_pattern("a\\b")


def test_sort_has_three_nested_entries_per_path_and_twin_id_last() -> None:
    sort = SearchQuery(sort=parse_options("sort(-attributes/a)").sort or ()).sort
    clause = sort_clause(sort)
    assert [next(iter(c)) for c in clause] == ["leaves.t", "leaves.n", "leaves.s", "twinId"]
    t = clause[0]["leaves.t"]
    assert t["order"] == "desc" and t["missing"] == -1
    assert t["nested"]["filter"]["bool"]["filter"] == [
        {"term": {"leaves.p": "attributes/a"}},
        {"term": {"leaves.a": False}},
    ]
    assert clause[3] == {"twinId": {"order": "asc"}}


KEYS: list[tuple[Key, list[Any]]] = [
    ((-1, None), [-1, 0.0, ""]),
    ((0, None), [0, 0.0, ""]),
    ((1, 1), [1, 1.0, ""]),
    ((2, 2.5), [2, 2.5, ""]),
    ((2, 3), [2, 3.0, ""]),
    ((3, "é"), [3, 0.0, "é"]),
    ((4, None), [4, 0.0, ""]),
    ((5, None), [5, 0.0, ""]),
]


@pytest.mark.parametrize(("key", "values"), KEYS)
def test_search_after_round_trips_evaluator_keys(key: Key, values: list[Any]) -> None:
    sort = (SortKey(("attributes", "a")), SortKey(("twinId",)))
    after = search_after(sort, [key, (3, "org.a:t1")])
    assert after == [*values, "org.a:t1"]
    assert keys_from_hit(sort, after) == [key, (3, "org.a:t1")]


def test_documents_carry_every_leaf_once_typed() -> None:
    doc = {
        "twinId": "org.a:t",
        "namespace": "org.a",
        "attributes": {"a": [1, "x"], "b": True, "c": None, "e": {}},
    }
    es = to_es_document(doc, 7)
    assert es["twinId"] == "org.a:t" and es["seq"] == 7
    leaves = {(e["p"], e["t"], e.get("n"), e.get("s"), e["a"]) for e in es["leaves"]}
    assert leaves == {
        ("twinId", 3, None, "org.a:t", False),
        ("namespace", 3, None, "org.a", False),
        ("attributes", 5, None, None, False),
        ("attributes/a", 4, None, None, False),
        ("attributes/a", 2, 1.0, None, True),
        ("attributes/a", 3, None, "x", True),
        ("attributes/b", 1, 1.0, None, False),
        ("attributes/c", 0, None, None, False),
    }


def test_bulk_operations_use_external_versions() -> None:
    ops = bulk_operations(
        "twins", [Change("a", 5, {"twinId": "a", "namespace": "n"}), Change("b", 6, None)]
    )
    assert ops[0] == {
        "index": {"_index": "twins", "_id": "a", "version": 5, "version_type": "external"}
    }
    assert ops[1]["seq"] == 5
    assert ops[2] == {
        "delete": {"_index": "twins", "_id": "b", "version": 6, "version_type": "external"}
    }


NO_WRITE_INDEX = (
    "no write index is defined for alias [twins]. The write index may be explicitly disabled "
    "using is_write_index=false or the alias points to multiple indices without one being "
    "designated as a write index"
)


def _refused(status: int, kind: str, reason: str) -> dict[str, Any]:
    return {"index": {"status": status, "error": {"type": kind, "reason": reason}}}


@pytest.mark.parametrize(
    ("item", "outcome"),
    [
        ({"index": {"status": 201}}, Outcome.DONE),
        ({"index": {"status": 409}}, Outcome.DONE),
        ({"delete": {"status": 404}}, Outcome.DONE),
        ({"index": {"status": 404}}, Outcome.RETRY),
        ({"index": {"status": 400}}, Outcome.REJECTED),
        ({"index": {"status": 429}}, Outcome.RETRY),
        ({"index": {"status": 503}}, Outcome.RETRY),
        # Refused for the index's sake, not the document's: an operator's write block,
        # a closed index, an alias with no write index.
        (
            _refused(403, "cluster_block_exception", "index [t] blocked by: [FORBIDDEN/8]"),
            Outcome.RETRY,
        ),
        (_refused(400, "index_closed_exception", "closed"), Outcome.RETRY),
        (_refused(400, "illegal_argument_exception", NO_WRITE_INDEX), Outcome.RETRY),
        (
            _refused(
                400, "illegal_argument_exception", "Document contains at least one immense term"
            ),
            Outcome.REJECTED,
        ),
        (_refused(400, "document_parsing_exception", "failed to parse"), Outcome.REJECTED),
    ],
)
def test_bulk_item_outcomes(item: dict[str, Any], outcome: Outcome) -> None:
    assert item_outcome(item) is outcome


@pytest.mark.parametrize(
    ("item", "outcome"),
    [
        ({"delete": {"_index": "twins-v2", "status": 404}}, Outcome.DONE),
        ({"delete": {"_index": "twins-v2-1700000000000", "status": 200}}, Outcome.DONE),
        # The alias gone, a versioned delete made the engine auto-create a plain "twins".
        ({"delete": {"_index": "twins", "status": 404}}, Outcome.NO_INDEX),
        ({"delete": {"_index": "twins", "status": 409}}, Outcome.NO_INDEX),
    ],
)
def test_bulk_items_through_an_alias(item: dict[str, Any], outcome: Outcome) -> None:
    assert item_outcome(item, "twins") is outcome


def test_negative_zero_is_indexed_and_queried_as_zero() -> None:
    doc = to_es_document({"twinId": "a:b", "attributes": {"x": -0.0}}, 1)
    (entry,) = [e for e in doc["leaves"] if e["p"] == "attributes/x"]
    assert str(entry["n"]) == "0.0"
    query = filter_query(parse_filter("eq(attributes/x,-0.0)"))
    assert '"leaves.n": 0.0' in str(query).replace("'", '"')


def test_documents_carry_folded_strings_where_they_differ() -> None:
    doc = to_es_document({"twinId": "a:b", "attributes": {"x": "Café", "y": "café"}}, 1)
    by_path = {e["p"]: e for e in doc["leaves"]}
    assert by_path["attributes/x"]["f"] == "café"
    assert "f" not in by_path["attributes/y"] and "f" not in by_path["twinId"]


def test_values_too_long_to_index_are_never_sent_as_terms() -> None:
    smile = "\U0001f600"
    assert searchable(smile * 4095) and not searchable(smile * 4096)
    assert searchable("a" * 8191) and not searchable("a" * 8192)
    for rql in (f'eq(attributes/a,"{smile * 4096}")', f'like(attributes/a,"*{"a" * 8192}")'):
        assert '"match_none"' in str(filter_query(parse_filter(rql))).replace("'", '"')
    bound = "b" * 8000 + smile * 1000
    cut = str(filter_query(parse_filter(f'gt(attributes/a,"{bound}")')))
    assert bound[:8096] in cut and bound[:8097] not in cut
