from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import pytest
from differential import twins
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from search import sqlite as index
from search.rql import build_query, page, parse_filter
from search.sqlite.rows import diff_rows
from search.sqlite.translate import filter_sql
from twin_service.errors import RqlInvalid
from twin_service.twin.delta import compute_delta
from twin_service.twin.patch import merge_patch


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
        "desired": {"x": 1},
        "reported": {"x": 1 if i % 4 else 2},
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
#: Two selective conditions or more: an intersection of value-index lookups.
INTERSECTED = [
    "and(eq(attributes/model,'m1'),in(attributes/loc/lat,1,2),gt(revision,3))",
    "and(like(attributes/model,'m1*'),in(attributes/tags,'a',1,true),not(exists(delta)))",
]


@pytest.mark.parametrize("text", PLANNED + INTERSECTED)
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
    assert ("INTERSECT" in plan) == (text in INTERSECTED), plan


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


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    pair=twins(min_size=2, max_size=2),
    shared=st.sampled_from(["none", "attributes", "all", "merged", "patched"]),
)
def test_reindexing_with_the_previous_document_gives_the_same_rows(
    conn: sqlite3.Connection, pair: list[dict[str, object]], shared: str
) -> None:
    """The incremental path (``previous`` given) leaves exactly the rows of a fresh index."""
    old, new = pair
    new = {**new, "twinId": old["twinId"], "namespace": old["namespace"]}
    if shared == "attributes" and "attributes" in old:
        new["attributes"] = old["attributes"]  # an untouched section, shared by identity
    elif shared == "all":
        new = {**old, "revision": 99}
    elif shared in ("merged", "patched"):
        # Sections that keep some of their keys (shared by identity) and change others, the
        # shape of a merge patch: the row diff must walk into them key by key.
        for section in ("attributes", "desired", "reported", "live", "delta"):
            before, after = old.get(section), new.get(section)
            if isinstance(before, dict) and isinstance(after, dict):
                new[section] = (
                    {**before, **after} if shared == "merged" else merge_patch(before, after)
                )
    conn.execute("DELETE FROM search_leaf")
    index.index_twin(conn, old)
    index.index_twin(conn, new, previous=old)
    incremental = sorted(conn.execute("SELECT path, seq, t, v, a FROM search_leaf"), key=repr)
    conn.execute("DELETE FROM search_leaf")
    index.index_twin(conn, new)
    fresh = sorted(conn.execute("SELECT path, seq, t, v, a FROM search_leaf"), key=repr)
    assert incremental == fresh


def test_an_in_place_change_of_a_row_the_index_lost_writes_the_row(
    conn: sqlite3.Connection,
) -> None:
    """A changed value is an UPDATE of its row; if the index did not hold that row after all,
    the row is written anyway (and not silently dropped)."""
    old = doc(3)
    new = {**old, "revision": 4, "attributes": {**old["attributes"], "model": "changed"}}  # type: ignore[dict-item]
    index.index_twin(conn, old)
    conn.execute("DELETE FROM search_leaf WHERE path = 'attributes/model'")
    index.index_twin(conn, new, previous=old)
    rows = {p: v for p, v in conn.execute("SELECT path, v FROM search_leaf WHERE seq = 0")}
    assert rows["attributes/model"] == "changed"
    assert rows["revision"] == 4


def pending(twin_id: str, speed: object, reported: object) -> dict[str, object]:
    """A twin whose desired fan speed the device has not applied (unless it reported it)."""
    doc: dict[str, object] = {
        "twinId": twin_id,
        "namespace": "org.acme",
        "revision": 2,
        "desired": {"fan": {"speed": speed}, "mode": "eco"},
        "reported": {"fan": {"speed": reported}, "mode": "eco"},
    }
    doc["delta"] = compute_delta(doc["desired"], doc["reported"])  # type: ignore[arg-type]
    return doc


def test_delta_rows_keep_type_and_presence_but_no_value(conn: sqlite3.Connection) -> None:
    index.index_twin(conn, pending("org.acme:a", 3, 1))
    rows = set(conn.execute("SELECT path, t, v, a FROM search_leaf WHERE path LIKE 'delta%'"))
    assert rows == {
        ("delta", 5, None, 0),
        ("delta/fan", 5, None, 0),
        ("delta/fan/speed", 2, None, 0),
    }


def test_a_new_value_still_pending_changes_no_delta_row() -> None:
    """The point of value-less delta rows: a desired write the device has not applied yet
    moves desired's row in the value index, not a second copy of it under delta."""
    changes = diff_rows(pending("org.acme:a", 3, 1), pending("org.acme:a", 7, 1))
    touched = [row[0] for row in [*changes.rows, *changes.updated]] + changes.subtrees
    assert touched == ["desired/fan/speed"]
    assert changes.removed == []
    # Entering or leaving the delta, or changing type there, still writes its rows.
    applied = diff_rows(pending("org.acme:a", 3, 1), pending("org.acme:a", 3, 3))
    assert applied.subtrees == ["delta/fan"]  # the subtree that left, and the row of delta
    assert applied.removed == [("delta", 0)]
    retyped = diff_rows(pending("org.acme:a", 3, 1), pending("org.acme:a", "3", 1))
    assert ("delta/fan/speed", 0, 3, None, 0) in retyped.updated


@pytest.mark.parametrize(
    ("text", "sort", "expected"),
    [
        ("eq(delta/fan/speed,3)", "sort(+twinId)", ["org.acme:a"]),
        ("ge(delta/fan/speed,3)", "sort(+twinId)", ["org.acme:a", "org.acme:c"]),
        ("in(delta/fan/speed,1,5)", "sort(+twinId)", ["org.acme:c"]),
        ("ne(delta/fan/speed,3)", "sort(+twinId)", ["org.acme:c"]),
        ("ilike(delta/mode,'E*')", "sort(+twinId)", []),
        ("exists(delta/fan/speed)", "sort(-delta/fan/speed)", ["org.acme:c", "org.acme:a"]),
        (
            "exists(desired)",
            "sort(+delta/fan/speed,+twinId)",
            ["org.acme:b", "org.acme:a", "org.acme:c"],
        ),
    ],
)
def test_delta_values_are_answered_from_desired(
    conn: sqlite3.Connection, text: str, sort: str, expected: list[str]
) -> None:
    """b has applied its desired 3, so 3 is no delta value of b. An index written when delta
    rows still held values answers the same (the values are never read)."""
    docs = [pending("org.acme:a", 3, 1), pending("org.acme:b", 3, 3), pending("org.acme:c", 5, 1)]
    for d in docs:
        index.index_twin(conn, d)
    query = build_query(text, sort, None)
    assert index.search_ids(conn, query)[0] == expected
    assert [d["twinId"] for d in page(docs, query)[0]] == expected
    conn.execute("UPDATE search_leaf SET v = 99 WHERE path LIKE 'delta%'")
    assert index.search_ids(conn, query)[0] == expected


def test_a_like_prefix_ending_before_the_surrogates_matches(conn: sqlite3.Connection) -> None:
    """The range a like prefix gives ends at the prefix's last character plus one: after
    U+D7FF that was U+D800, a surrogate SQLite cannot take (a 500)."""
    values = ["a\ud7ff", "a\ud7ffz", "a\ud7ff\U0010ffff", "a\ue000", "a\ud7fe", "b"]
    docs = [
        {"twinId": f"org.acme:s{i}", "namespace": "org.acme", "attributes": {"s": v}}
        for i, v in enumerate(values)
    ]
    with conn:
        for d in docs:
            index.index_twin(conn, d)
    for pattern in ("a\ud7ff*", "a\ud7ff?", "\ud7ff*", "a\ud7ff\U0010ffff*"):
        query = build_query(f'like(attributes/s,"{pattern}")', "size(200)", None)
        ids, _ = index.search_ids(conn, query)
        assert ids == [d["twinId"] for d in page(docs, query)[0]], pattern
    assert index.count(conn, parse_filter('like(attributes/s,"a\ud7ff*")'), None) == 3


def test_a_query_binding_more_values_than_sqlite_takes_is_a_bad_request(
    conn: sqlite3.Connection,
) -> None:
    """Several in lists within the parser's bounds can bind more values than SQLite takes
    in one statement: a 400 saying so, not SQLite's "too many SQL variables" (a 503)."""
    with conn:
        index.index_twin(conn, doc(1))
    conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 100)
    values = ",".join(str(i) for i in range(60))
    too_many = f"or(in(revision,{values}),in(attributes/model,{values}))"
    with pytest.raises(RqlInvalid, match=r"binds 1\d\d values .* at most 100 in one query"):
        index.count(conn, parse_filter(too_many), None)
    with pytest.raises(RqlInvalid, match="at most 100 in one query"):
        index.search_ids(conn, build_query(too_many, None, None))
    within = f"or(in(revision,{values}),eq(attributes/model,'m1'))"
    assert index.count(conn, parse_filter(within), ["org.acme"]) == 1
