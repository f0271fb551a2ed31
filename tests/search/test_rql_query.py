from __future__ import annotations

from dataclasses import replace

import pytest

from search.rql import SearchQuery, SortKey, build_query, page, parse_filter, parse_namespaces
from twin_service.errors import RqlInvalid

DOCS = [
    {"twinId": f"ns{i % 2}:t{i}", "namespace": f"ns{i % 2}", "attributes": {"n": i % 3}}
    for i in range(10)
]


def test_defaults() -> None:
    query = build_query(None, None, None)
    assert query == SearchQuery(None, (SortKey(("twinId",)),), 25, None, None)
    assert build_query(" ", "", None).filter is None
    assert parse_namespaces("") is parse_namespaces(" , ") is None


def test_build() -> None:
    namespaces = parse_namespaces("ns0, ns1,ns0")
    query = build_query("eq(attributes/n,1)", "size(3),sort(-attributes/n)", namespaces)
    assert query.filter == parse_filter("eq(attributes/n,1)")
    assert query.sort == (SortKey(("attributes", "n"), True), SortKey(("twinId",)))
    assert (query.size, query.namespaces) == (3, ("ns0", "ns1"))


@pytest.mark.parametrize(
    "option", ["size(0)", "size(201)", "size(-1)", "cursor(abc)", "cursor(e30)"]
)
def test_invalid_options(option: str) -> None:
    with pytest.raises(RqlInvalid):
        build_query(None, option, None)


def test_size_bounds_come_from_the_caller() -> None:
    assert build_query(None, None, None, default_size=7).size == 7
    with pytest.raises(RqlInvalid):
        build_query(None, "size(11)", None, max_size=10)


def test_paging_with_cursor() -> None:
    query = build_query(None, "size(4),sort(-attributes/n)", None)
    seen: list[str] = []
    while True:
        docs, cursor = page(DOCS, query)
        seen += [d["twinId"] for d in docs]
        if cursor is None:
            break
        query = build_query(None, f"size(4),sort(-attributes/n),cursor({cursor})", None)
    assert len(seen) == 10 == len(set(seen))


def test_cursor_is_bound_to_filter_sort_and_namespaces() -> None:
    query = build_query("exists(attributes)", "size(2)", None)
    _, cursor = page(DOCS, query)
    assert cursor is not None
    build_query("exists(attributes)", f"size(5),cursor({cursor})", None)
    for filter, option, namespaces in [
        ("exists(attributes/n)", f"cursor({cursor})", None),
        ("exists(attributes)", f"sort(-twinId),cursor({cursor})", None),
        ("exists(attributes)", f"cursor({cursor})", ("ns0",)),
    ]:
        with pytest.raises(RqlInvalid, match="cursor"):
            build_query(filter, option, namespaces)
    with pytest.raises(RqlInvalid):
        replace(query, cursor=cursor[:-3])
