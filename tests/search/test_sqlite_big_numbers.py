"""The SQLite index compares numbers exactly, as the reference evaluator does: integers beyond
64 bits and doubles near them, in every operator, in sort order and across cursor pages.

At the index level against :func:`search.rql.page`, then through the real service on the
default (SQLite) store, including a database whose index an older version wrote.
"""

from __future__ import annotations

import sqlite3
import sys
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from search import sqlite as index
from search.rql import build_query, page, selected
from search.rql.printer import print_value
from tests.service_process import ServiceProcess
from twin_service.types import JSONObject

MAX = int(sys.float_info.max)

#: Numbers that tie or nearly tie as doubles, on both sides of the 64-bit limits.
NUMBERS: list[int | float] = [
    0,
    -0.0,
    1,
    2**53,
    float(2**53),
    2**53 + 1,
    2**63 - 1,
    2**63,
    float(2**63),
    2**63 + 1,
    -(2**63),
    float(-(2**63)),
    -(2**63) - 1,
    -(2**63) - 2048,
    -(2**63) - 2049,
    2**64 - 1,
    2**64,
    float(2**64),
    2**64 + 1,
    10**23,
    1e23,
    9.999999999999999e22,
    10**23 + 1,
    99999999999999991611392,  # the exact value of the double 1e23
    2**127 + 2**70,
    2**127 + 2**70 + 1,
    10**300,
    10**300 + 1,
    float(10**300),
    -(10**300) - 1,
    MAX,
    MAX - 1,
    -MAX,
    -MAX + 1,
    sys.float_info.max,
]


def docs() -> list[JSONObject]:
    out: list[JSONObject] = [
        {"twinId": f"ns:n{i:02d}", "namespace": "ns", "attributes": {"n": n}}
        for i, n in enumerate(NUMBERS)
    ]
    out.append(
        {"twinId": "ns:arr", "namespace": "ns", "attributes": {"n": [2**64 + 1, -(2**63) - 1]}}
    )
    out.append({"twinId": "ns:str", "namespace": "ns", "attributes": {"n": "1"}})
    return out


def filters() -> Iterator[str]:
    for n in NUMBERS:
        literal = print_value(n)
        for op in ("eq", "ne", "lt", "le", "gt", "ge"):
            yield f"{op}(attributes/n,{literal})"
    for i in range(0, len(NUMBERS), 3):
        yield "in(attributes/n," + ",".join(print_value(n) for n in NUMBERS[i : i + 4]) + ")"


def check(conn: sqlite3.Connection, all_docs: list[JSONObject], filter: str, option: str) -> None:
    """Every page, cursor presence and the count equal the reference evaluator's."""
    query = build_query(filter, option, None)
    expected_all = [d["twinId"] for d in all_docs if selected(d, query.filter, None)]
    assert index.count(conn, query.filter, None) == len(expected_all), filter
    oracle_query, sqlite_query = query, query
    seen: list[str] = []
    for _ in range(len(all_docs) + 2):
        expected, oracle_cursor = page(all_docs, oracle_query)
        ids, cursor = index.search_ids(conn, sqlite_query)
        assert ids == [d["twinId"] for d in expected], (filter, option)
        assert cursor == oracle_cursor, (filter, option)
        seen += ids
        if cursor is None:
            break
        oracle_query = replace(query, cursor=oracle_cursor)
        sqlite_query = replace(query, cursor=cursor)
    assert seen == [d["twinId"] for d in page(all_docs, replace(query, size=len(all_docs)))[0]], (
        filter,
        option,
    )


@pytest.fixture
def conn(tmp_path: Any) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(tmp_path / "index.db")
    with conn:
        for statement in index.SCHEMA:
            conn.execute(statement)
    yield conn
    conn.close()


def test_comparisons_sort_and_cursors_are_exact(conn: sqlite3.Connection) -> None:
    all_docs = docs()
    with conn:
        for doc in all_docs:
            index.index_twin(conn, doc)
    for filter in filters():
        check(conn, all_docs, filter, "size(50)")
    for option in ("sort(+attributes/n),size(3)", "sort(-attributes/n),size(2)"):
        check(conn, all_docs, "exists(attributes/n)", option)
        check(conn, all_docs, "ge(attributes/n,9223372036854775807)", option)


def test_rewriting_a_big_number_replaces_its_row(conn: sqlite3.Connection) -> None:
    """Both ways the index rewrites a twin: diffing against the previous document, and
    comparing with the rows it reads back (which must give back the exact values)."""
    before = {
        "twinId": "ns:a",
        "namespace": "ns",
        "attributes": {"n": 2**64, "m": 2**64, "up": 5, "down": 2**64 + 1},
    }
    after = {
        "twinId": "ns:a",
        "namespace": "ns",
        "attributes": {"n": 2**64 + 1, "m": 2**64 + 1, "up": 2**64 + 1, "down": 5},
    }
    with conn:
        index.index_twin(conn, before)
        index.index_twin(conn, after, before)
    check(conn, [after], f"eq(attributes/n,{2**64 + 1})", "")
    check(conn, [after], f"eq(attributes/m,{2**64})", "")
    check(conn, [after], f"eq(attributes/up,{2**64 + 1})", "")
    check(conn, [after], f"gt(attributes/down,{2**64})", "")
    check(conn, [after], "eq(attributes/down,5)", "")
    with conn:
        index.index_twin(conn, before)
    check(conn, [before], f"eq(attributes/n,{2**64})", "")
    check(conn, [before], f"gt(attributes/m,{2**64})", "")


def _near_a_double(f: float, step: int) -> int:
    n = int(f) + step
    return max(-MAX, min(MAX, n))


#: Numbers around doubles and the 64-bit limits, where an inexact comparison goes wrong.
numbers = st.one_of(
    st.sampled_from(NUMBERS),
    st.builds(
        _near_a_double,
        st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: abs(f) >= 2**52),
        st.integers(-3, 3),
    ),
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(-(2**70), 2**70),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    values=st.lists(st.one_of(numbers, st.lists(numbers, max_size=2)), min_size=1, max_size=8),
    bound=numbers,
    op=st.sampled_from(["eq", "ne", "lt", "le", "gt", "ge"]),
    descending=st.booleans(),
)
def test_random_numbers_compare_and_sort_like_the_evaluator(
    conn: sqlite3.Connection, values: list[Any], bound: int | float, op: str, descending: bool
) -> None:
    all_docs: list[JSONObject] = [
        {"twinId": f"ns:{i}", "namespace": "ns", "attributes": {"n": n}}
        for i, n in enumerate(values)
    ]
    with conn:
        conn.execute("DELETE FROM search_leaf")
        conn.execute("DELETE FROM search_twin")
        for doc in all_docs:
            index.index_twin(conn, doc)
    sort = f"sort({'-' if descending else '+'}attributes/n),size(2)"
    check(conn, all_docs, f"{op}(attributes/n,{print_value(bound)})", sort)
    check(
        conn,
        all_docs,
        f"in(attributes/n,{print_value(bound)},{print_value(values[0])})"
        if not isinstance(values[0], list)
        else "exists(attributes/n)",
        sort,
    )


# -- through the service ----------------------------------------------------------------------

SERVICE_NUMBERS: dict[str, int | float] = {
    "neg": -(2**63) - 1,
    "min": -(2**63),
    "big": 2**64,
    "big1": 2**64 - 1,
    "e23i": 10**23,
    "e23f": 9.999999999999999e22,
    "f53": float(2**53),
    "i53": 2**53 + 1,
}

SERVICE_CASES: list[tuple[str, list[str]]] = [
    ("lt(attributes/n,-9223372036854775808)", ["neg"]),
    ("le(attributes/n,-9223372036854775808)", ["min", "neg"]),
    ("eq(attributes/n,18446744073709551615)", ["big1"]),
    ("eq(attributes/n,18446744073709551616)", ["big"]),
    ("gt(attributes/n,18446744073709551615)", ["big", "e23f", "e23i"]),
    ("eq(attributes/n,100000000000000000000000)", ["e23i"]),
    ("eq(attributes/n,1e23)", ["e23f"]),
    ("gt(attributes/n,9007199254740992)", ["big", "big1", "e23f", "e23i", "i53"]),
    ("in(attributes/n,9007199254740993,-9223372036854775809)", ["i53", "neg"]),
    ("ne(attributes/n,18446744073709551616)", ["big1", "e23f", "e23i", "f53", "i53", "min", "neg"]),
]
SORTED = ["neg", "min", "f53", "i53", "big1", "big", "e23f", "e23i"]


def write_numbers(api: httpx.Client, ns: str) -> None:
    for name, n in SERVICE_NUMBERS.items():
        # Written as text: json= would go through httpx's encoder, not ours.
        body = '{"attributes": {"n": ' + print_value(n) + "}}"
        response = api.put(
            f"/api/v1/twins/{ns}:{name}",
            content=body,
            headers={"Content-Type": "application/json"},
        )
        assert response.status_code in (200, 201), response.text


def names(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [item["twinId"].split(":", 1)[1] for item in response.json()["items"]]


def sorted_pages(api: httpx.Client, ns: str, descending: bool) -> list[str]:
    out: list[str] = []
    cursor = None
    option = f"sort({'-' if descending else '+'}attributes/n),size(3)"
    while True:
        full = option if cursor is None else f"{option},cursor({cursor})"
        response = api.get(
            "/api/v1/search/twins",
            params={"namespaces": ns, "filter": "exists(attributes/n)", "option": full},
        )
        out += names(response)
        cursor = response.json().get("cursor")
        if cursor is None:
            return out


def check_service(api: httpx.Client, ns: str) -> None:
    for filter, expected in SERVICE_CASES:
        response = api.get("/api/v1/search/twins", params={"namespaces": ns, "filter": filter})
        assert sorted(names(response)) == expected, filter
    assert sorted_pages(api, ns, descending=False) == SORTED
    assert sorted_pages(api, ns, descending=True) == SORTED[::-1]


def test_the_service_compares_big_numbers_exactly(api: httpx.Client) -> None:
    ns = f"org.t{uuid.uuid4().hex[:12]}"
    write_numbers(api, ns)
    check_service(api, ns)


#: The index table as versions before the exact keys wrote it.
OLD_INDEX = [
    "DROP TABLE search_leaf",
    """CREATE TABLE search_leaf (
        tid INTEGER NOT NULL, path TEXT NOT NULL, seq INTEGER NOT NULL, t INTEGER NOT NULL,
        v, a INTEGER NOT NULL, PRIMARY KEY (tid, path, seq)
    ) WITHOUT ROWID""",
    "CREATE INDEX search_leaf_value ON search_leaf (path, t, v)",
    "DELETE FROM meta WHERE key = 'builtin_index_version'",
]


def test_an_index_of_an_older_version_is_rebuilt_at_start(
    service_factory: Any, tmp_path: Any
) -> None:
    data = tmp_path / "data"
    ns = "org.old"
    proc: ServiceProcess = service_factory(data)
    with proc.client() as api:
        write_numbers(api, ns)
    proc.stop()
    conn = sqlite3.connect(data / "twins.sqlite3")
    with conn:
        for statement in OLD_INDEX:
            conn.execute(statement)
    conn.close()
    proc.start()
    with proc.client() as api:
        check_service(api, ns)
