from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import pytest

from search import sqlite as index
from search.rql import build_query, page, parse_filter
from search.sqlite.translate import filter_sql


@pytest.fixture
def conn() -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(":memory:")
    for statement in index.SCHEMA * 2:  # idempotent
        conn.execute(statement)
    yield conn
    conn.close()


def doc(i: int) -> dict[str, object]:
    return {
        "twinId": f"org.acme:t{i:03d}",
        "namespace": "org.acme",
        "revision": i,
        "attributes": {"model": f"m{i % 10}", "tags": ["a", f"t{i}"], "loc": {"lat": i / 7}},
        "delta": {"x": 1} if i % 4 == 0 else {},
    }


PLANNED = [
    "eq(attributes/model,'m1')",
    "in(attributes/model,'m1','m2')",
    "gt(revision,5)",
    "like(attributes/model,'m1*')",
    "exists(attributes/loc/lat)",
    "exists(delta)",
    "and(eq(attributes/model,'m1'),gt(revision,3),exists(delta))",
]


@pytest.mark.parametrize("text", PLANNED)
def test_queries_use_the_value_index(conn: sqlite3.Connection, text: str) -> None:
    with conn:
        for i in range(50):
            index.index_twin(conn, doc(i))
    index.register_functions(conn)
    sql, params = filter_sql(parse_filter(text))
    plan = " | ".join(
        row[3]
        for row in conn.execute(
            f"EXPLAIN QUERY PLAN SELECT t.tid FROM search_twin t WHERE {sql}", params
        )
    )
    assert "USING COVERING INDEX search_leaf_value (path=?" in plan
    assert "SCAN t" not in plan and "SCAN search_leaf" not in plan


def test_index_unindex_and_cursor_tokens_equal_the_evaluator(conn: sqlite3.Connection) -> None:
    docs = [doc(i) for i in range(30)]
    with conn:
        for d in docs:
            index.index_twin(conn, d)
        index.index_twin(conn, {**docs[0], "attributes": {"model": "changed"}})
        index.unindex_twin(conn, docs[1]["twinId"])  # type: ignore[arg-type]
        index.unindex_twin(conn, "nope:missing")
    docs[0] = {**docs[0], "attributes": {"model": "changed"}}
    del docs[1]
    query = build_query("exists(attributes/model)", "sort(-attributes/loc/lat),size(7)", None)
    while True:
        ids, cursor = index.search_ids(conn, query)
        expected, expected_cursor = page(docs, query)
        assert ids == [d["twinId"] for d in expected]
        assert cursor == expected_cursor
        if cursor is None:
            break
        query = build_query(
            "exists(attributes/model)", f"sort(-attributes/loc/lat),size(7),cursor({cursor})", None
        )
    assert index.count(conn, parse_filter("eq(attributes/model,'changed')"), None) == 1
    assert index.count(conn, None, ["org.acme"]) == 29
    assert index.count(conn, None, []) == 0
