"""RQL search over HTTP against the real service process (SQLite, built-in index).

Every test works in its own random namespace and passes ``namespaces=`` so that twins made
by other tests in the same service never show up.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from search.rql.ast import SortKey
from search.rql.cursor import fingerprint
from search.rql.ordering import normalize_sort
from tests.service_process import ACME_TOKEN, READER_TOKEN, TOKENS, ServiceProcess

MERGE = {"Content-Type": "application/merge-patch+json"}
SEARCH = "/api/v1/search/twins"
COUNT = "/api/v1/search/twins/count"


@pytest.fixture
def ns() -> str:
    return f"org.t{uuid.uuid4().hex[:12]}"


def put(api: httpx.Client, twin_id: str, body: dict[str, Any]) -> dict[str, Any]:
    response = api.put(f"/api/v1/twins/{twin_id}", json=body)
    assert response.status_code in (200, 201), response.text
    doc: dict[str, Any] = response.json()
    return doc


def search(api: httpx.Client, ns: str, filter: str | None = None, **params: str) -> httpx.Response:
    query = {"namespaces": ns, **params}
    if filter is not None:
        query["filter"] = filter
    return api.get(SEARCH, params=query)


def names(response: httpx.Response) -> list[str]:
    """The name part of every twin id in a search result, in order."""
    assert response.status_code == 200, response.text
    return [item["twinId"].split(":", 1)[1] for item in response.json()["items"]]


def all_pages(api: httpx.Client, ns: str, filter: str | None, option: str) -> list[str]:
    out: list[str] = []
    cursor = None
    while True:
        full = option if cursor is None else f"{option},cursor({cursor})"
        response = search(api, ns, filter, option=full)
        out += names(response)
        cursor = response.json().get("cursor")
        if cursor is None:
            return out


def error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["error"] == code
    assert body["message"] and "description" in body
    return body


# -- operators ---------------------------------------------------------------------------------

OPERATOR_TWINS: dict[str, dict[str, Any]] = {
    "t1": {
        "definition": "acme:pump:1",
        "attributes": {
            "site": "plant1",
            "model": "P-100",
            "serial": 1001,
            "active": True,
            "tags": ["red", "big"],
            "loc": {"lat": 1.5},
            # A twin holds no null member (null deletes in a merge patch): one in an array.
            "note": [None],
            "a b": "sp",
            "x/y": 1,
        },
        "desired": {"fan": {"speed": 3}},
        "reported": {"fan": {"speed": 3}, "temp": 20.5},
        "live": {"rpm": 1200},
    },
    "t2": {
        "attributes": {
            "site": "plant2",
            "model": "p-200",
            "serial": 1002,
            "active": False,
            "tags": ["blue"],
            "loc": {},
        },
        "desired": {"fan": {"speed": 4}},
        "reported": {"fan": {"speed": 2}, "temp": 30},
        "live": {"rpm": [100, 2000]},
    },
    "t3": {
        "attributes": {"site": "Plant1", "model": "X*1", "serial": "1003", "tags": []},
        "reported": {"temp": "hot"},
    },
    "t4": {},
    "t5": {"attributes": {"model": "XY1"}},
}
ALL = ["t1", "t2", "t3", "t4", "t5"]

OPERATOR_CASES: list[tuple[str, list[str]]] = [
    # eq: typed, 1 == 1.0, arrays match on any element, null only equals null
    ('eq(attributes/site,"plant1")', ["t1"]),
    ("eq(attributes/serial,1001)", ["t1"]),
    ("eq(attributes/serial,1001.0)", ["t1"]),
    ('eq(attributes/serial,"1003")', ["t3"]),
    ("eq(attributes/serial,1003)", []),
    ("eq(attributes/active,true)", ["t1"]),
    ("eq(attributes/active,false)", ["t2"]),
    ("eq(attributes/note,null)", ["t1"]),
    ('eq(attributes/tags,"big")', ["t1"]),
    ("eq(desired/fan/speed,4)", ["t2"]),
    ("eq(reported/fan/speed,2)", ["t2"]),
    ("eq(live/rpm,2000)", ["t2"]),
    # ne: only twins that have the property; an array holding the value never matches
    ('ne(attributes/site,"plant1")', ["t2", "t3"]),
    ('ne(attributes/tags,"red")', ["t2", "t3"]),
    ("ne(attributes/note,null)", []),
    ("ne(desired/fan/speed,3)", ["t2"]),
    # ranges: only within one type
    ("gt(attributes/serial,1001)", ["t2"]),
    ("ge(attributes/serial,1001)", ["t1", "t2"]),
    ("lt(reported/temp,25)", ["t1"]),
    ("le(reported/temp,30)", ["t1", "t2"]),
    ('gt(reported/temp,"a")', ["t3"]),
    ("gt(live/rpm,1500)", ["t2"]),
    ("lt(live/rpm,150)", ["t2"]),
    ("ge(attributes/active,true)", ["t1"]),
    ("lt(attributes/active,true)", ["t2"]),
    ('lt(attributes/site,"p")', ["t3"]),
    # in
    ('in(attributes/model,"P-100","X*1")', ["t1", "t3"]),
    ('in(attributes/serial,1002,"1003")', ["t2", "t3"]),
    ('in(attributes/tags,"blue","nothing")', ["t2"]),
    ("in(attributes/note,null,1)", ["t1"]),
    # like / ilike: anchored, * and ?, escapes, strings only
    ('like(attributes/model,"P-*")', ["t1"]),
    ('like(attributes/model,"?-?00")', ["t1", "t2"]),
    ('like(attributes/model,"X*1")', ["t3", "t5"]),
    ('like(attributes/model,"X\\\\*1")', ["t3"]),
    ('like(attributes/model,"P-1")', []),
    ('like(attributes/serial,"1*")', ["t3"]),
    ('like(attributes/tags,"b*")', ["t1", "t2"]),
    ('ilike(attributes/site,"PLANT1")', ["t1", "t3"]),
    ('ilike(attributes/model,"p-*")', ["t1", "t2"]),
    # exists: empty objects are absent, null and empty arrays are present
    ("exists(attributes/loc)", ["t1"]),
    ("exists(attributes/loc/lat)", ["t1"]),
    ("exists(attributes/tags)", ["t1", "t2", "t3"]),
    ("exists(attributes/note)", ["t1"]),
    ("exists(attributes)", ["t1", "t2", "t3", "t5"]),
    ("exists(desired)", ["t1", "t2"]),
    ("exists(reported/temp)", ["t1", "t2", "t3"]),
    ("exists(live)", ["t1", "t2"]),
    # delta and lifecycle roots
    ("exists(delta)", ["t2"]),
    ("exists(delta/fan/speed)", ["t2"]),
    ("eq(delta/fan/speed,4)", ["t2"]),
    ("eq(delta/fan/speed,3)", []),
    # every desired write keeps the lifecycle: t2's pending fan speed is the only entry
    ("exists(lifecycle)", ["t2"]),
    ("not(exists(lifecycle))", ["t1", "t3", "t4", "t5"]),
    ('eq(lifecycle/fan~1speed/state,"pending")', ["t2"]),
    ("eq(lifecycle/fan~1speed/desiredVersion,1)", ["t2"]),
    # and / or / not
    ('and(eq(attributes/site,"plant1"),gt(reported/temp,10))', ["t1"]),
    ('and(eq(attributes/site,"plant1"),gt(reported/temp,25))', []),
    ('or(eq(attributes/site,"plant2"),eq(attributes/model,"X*1"))', ["t2", "t3"]),
    ('not(eq(attributes/site,"plant1"))', ["t2", "t3", "t4", "t5"]),
    ("not(exists(attributes))", ["t4"]),
    ('and(exists(attributes/model),not(like(attributes/model,"X*")))', ["t1", "t2"]),
    ("or(and(eq(attributes/active,true),exists(attributes/loc)),exists(delta))", ["t1", "t2"]),
    # properties with quotes and JSON-pointer escapes
    ('eq("attributes/a b","sp")', ["t1"]),
    ("eq(attributes/x~1y,1)", ["t1"]),
    # whitespace around tokens and single quotes
    (" and( eq( attributes/site , 'plant1' ) , exists( delta ) ) ", []),
    # fixed properties
    ("eq(definition,'acme:pump:1')", ["t1"]),
    ("exists(definition)", ["t1"]),
    ("eq(revision,2)", ["t2"]),
    ("gt(revision,1)", ["t2"]),
    ("le(revision,1)", ["t1", "t3", "t4", "t5"]),
    ('eq(connection/status,"unknown")', ALL),
    ('ne(connection/status,"unknown")', []),
    ('in(connection/status,"connected","disconnected")', []),
    ("eq(connection/lastSeen,null)", ALL),
    ("exists(connection/since)", ALL),
]


@pytest.fixture(scope="module")
def operator_ns(service: ServiceProcess) -> str:
    ns = f"org.t{uuid.uuid4().hex[:12]}"
    with service.client() as api:
        for name, body in OPERATOR_TWINS.items():
            put(api, f"{ns}:{name}", body)
        # t2 at revision 2 (same content): revision is searchable.
        put(api, f"{ns}:t2", OPERATOR_TWINS["t2"])
    return ns


@pytest.mark.parametrize(("filter", "expected"), OPERATOR_CASES)
def test_operator(api: httpx.Client, operator_ns: str, filter: str, expected: list[str]) -> None:
    assert names(search(api, operator_ns, filter)) == expected
    count = api.get(COUNT, params={"filter": filter, "namespaces": operator_ns})
    assert count.status_code == 200 and count.json() == {"count": len(expected)}


def test_twin_id_namespace_created_modified(api: httpx.Client, operator_ns: str) -> None:
    ns = operator_ns
    assert names(search(api, ns, f'eq(twinId,"{ns}:t3")')) == ["t3"]
    assert names(search(api, ns, f'like(twinId,"{ns}:t?")')) == ALL
    assert names(search(api, ns, f'in(twinId,"{ns}:t5","{ns}:t1","{ns}:zz")')) == ["t1", "t5"]
    assert names(search(api, ns, f'eq(namespace,"{ns}")')) == ALL
    assert names(search(api, ns, 'eq(namespace,"org.other")')) == []
    docs = {name: api.get(f"/api/v1/twins/{ns}:{name}").json() for name in ALL}
    t2 = docs["t2"]
    assert names(search(api, ns, f'eq(created,"{docs["t1"]["created"]}")')) == [
        n for n in ALL if docs[n]["created"] == docs["t1"]["created"]
    ]
    assert names(search(api, ns, f'ge(modified,"{t2["modified"]}")')) == [
        n for n in ALL if docs[n]["modified"] >= t2["modified"]
    ]
    assert "t2" in names(search(api, ns, f'ge(modified,"{t2["created"]}")'))
    assert names(search(api, ns, 'lt(created,"2000-01-01T00:00:00.000Z")')) == []
    assert names(search(api, ns, 'like(created,"20*Z")')) == ALL
    assert names(search(api, ns, "gt(created,0)")) == []  # a number never equals a string


def test_no_filter_lists_the_namespace(api: httpx.Client, operator_ns: str) -> None:
    assert names(search(api, operator_ns)) == ALL
    assert names(search(api, operator_ns, "")) == ALL
    count = api.get(COUNT, params={"namespaces": operator_ns})
    assert count.json() == {"count": len(ALL)}


def test_results_are_full_documents_and_fields_select(api: httpx.Client, operator_ns: str) -> None:
    filter = 'eq(attributes/site,"plant1")'
    item = search(api, operator_ns, filter).json()["items"][0]
    stored = api.get(f"/api/v1/twins/{operator_ns}:t1").json()
    assert item == stored
    selected = search(api, operator_ns, filter, fields="twinId,attributes/loc,desired/fan/speed")
    assert selected.json()["items"] == [
        {
            "twinId": f"{operator_ns}:t1",
            "attributes": {"loc": {"lat": 1.5}},
            "desired": {"fan": {"speed": 3}},
        }
    ]
    bad = search(api, operator_ns, filter, fields="attributes//x")
    error(bad, 400, "fields.invalid")


# -- sorting -----------------------------------------------------------------------------------

SORT_TWINS: dict[str, dict[str, Any]] = {
    "a": {"g": 1, "n": 5},
    "b": {"g": 1, "n": 7},
    "c": {"g": 1},
    "d": {"g": 2, "n": 1},
    "e": {"n": 3},
    "f": {"g": "x", "n": 2},
    "g": {"g": 1.0, "n": 7},
    "h": {},  # no null: a twin holds none as a member (docs/api.md)
    "i": {"g": [1]},
    "j": {"g": {"k": 1}},
    "k": {"g": {}, "n": 3},
    "l": {"g": True},
}


@pytest.fixture(scope="module")
def sort_ns(service: ServiceProcess) -> str:
    ns = f"org.t{uuid.uuid4().hex[:12]}"
    with service.client() as api:
        for name, attributes in SORT_TWINS.items():
            put(api, f"{ns}:{name}", {"attributes": attributes})
    return ns


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        # missing (and {}) < null < boolean < number < string < array < object; ties by twinId
        ("sort(+attributes/g)", "ehklabcgdfij"),
        ("sort(attributes/g)", "ehklabcgdfij"),
        # descending reverses the whole key: missing last; ties still by +twinId
        ("sort(-attributes/g)", "jifdabcglehk"),
        # several keys; a descending second key puts missing values last within a tie
        ("sort(+attributes/g,-attributes/n)", "ekhlbgacdfij"),
        ("sort(-attributes/n,+attributes/g)", "bgaekfdhlcij"),
        ("sort(+attributes/n,-twinId)", "ljihcdfkeagb"),
        ("sort(-twinId)", "lkjihgfedcba"),
        ("sort(+twinId)", "abcdefghijkl"),
        ("", "abcdefghijkl"),
    ],
)
def test_sort(api: httpx.Client, sort_ns: str, option: str, expected: str) -> None:
    assert "".join(names(search(api, sort_ns, option=option))) == expected
    # The same order page by page, whatever the page size.
    for size in (1, 5):
        paged = all_pages(
            api, sort_ns, None, f"{option},size({size})" if option else f"size({size})"
        )
        assert "".join(paged) == expected


def test_sort_with_filter_and_size(api: httpx.Client, sort_ns: str) -> None:
    response = search(api, sort_ns, "exists(attributes/n)", option="sort(-attributes/n),size(3)")
    assert names(response) == ["b", "g", "a"]
    assert "cursor" in response.json()
    rest = search(
        api,
        sort_ns,
        "exists(attributes/n)",
        option=f"sort(-attributes/n),size(10),cursor({response.json()['cursor']})",
    )
    assert names(rest) == ["e", "k", "f", "d"]
    assert "cursor" not in rest.json()
    # A page that ends exactly at the last match has no cursor.
    exact = search(api, sort_ns, "exists(attributes/n)", option="size(7)")
    assert len(names(exact)) == 7 and "cursor" not in exact.json()


# -- paging across writes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option",
    ["size(7)", "sort(+attributes/rank),size(7)", "sort(-attributes/rank,-live/x),size(4)"],
)
def test_cursor_paging_is_stable_across_writes(api: httpx.Client, ns: str, option: str) -> None:
    original = [f"r{i:02d}" for i in range(30)]
    for i, name in enumerate(original):
        put(api, f"{ns}:{name}", {"attributes": {"rank": i * 10, "kind": "k"}})
    filter = 'eq(attributes/kind,"k")'
    seen: list[str] = []
    cursor = None
    added: list[str] = []
    for round_no in range(100):
        full = option if cursor is None else f"{option},cursor({cursor})"
        response = search(api, ns, filter, option=full)
        seen += names(response)
        cursor = response.json().get("cursor")
        if cursor is None:
            break
        # Between pages: write every twin, on both sides of the cursor, without touching the
        # sort keys or the filter; add a twin that sorts at the very end and one at the start.
        for name in original:
            patch = api.patch(
                f"/api/v1/twins/{ns}:{name}",
                json={"desired": {"round": round_no}, "reported": {"seen": len(seen)}},
                headers=MERGE,
            )
            assert patch.status_code == 200, patch.text
        late = f"z{round_no:02d}"
        early = f"a{round_no:02d}"
        put(api, f"{ns}:{late}", {"attributes": {"rank": 10_000 + round_no, "kind": "k"}})
        put(api, f"{ns}:{early}", {"attributes": {"rank": -1 - round_no, "kind": "k"}})
        added += [late, early]
    assert len(seen) == len(set(seen)), "a twin was returned twice"
    assert set(original) <= set(seen), "a twin was skipped"
    if "-attributes/rank" in option:
        # Descending: the twins sorting "late" (high rank) are behind the cursor, "early" ahead.
        assert not any(name.startswith("z") for name in seen)
        assert {n for n in added if n.startswith("a")} <= set(seen)
    else:
        assert not any(name.startswith("a") for name in seen)
        assert {n for n in added if n.startswith("z")} <= set(seen)


def test_deleted_twin_after_cursor_is_not_returned(api: httpx.Client, ns: str) -> None:
    for i in range(6):
        put(api, f"{ns}:d{i}", {"attributes": {"i": i}})
    first = search(api, ns, option="size(3)")
    assert names(first) == ["d0", "d1", "d2"]
    assert api.delete(f"/api/v1/twins/{ns}:d1").status_code == 204
    assert api.delete(f"/api/v1/twins/{ns}:d4").status_code == 204
    rest = search(api, ns, option=f"size(3),cursor({first.json()['cursor']})")
    assert names(rest) == ["d3", "d5"]
    assert "cursor" not in rest.json()


# -- namespaces and tokens -------------------------------------------------------------------


def test_namespaces_parameter(api: httpx.Client) -> None:
    ns1, ns2 = f"org.t{uuid.uuid4().hex[:12]}", f"org.t{uuid.uuid4().hex[:12]}"
    marker = uuid.uuid4().hex
    for ns in (ns1, ns2):
        put(api, f"{ns}:m", {"attributes": {"marker": marker}})
    filter = f'eq(attributes/marker,"{marker}")'
    both = api.get(SEARCH, params={"filter": filter, "namespaces": f"{ns2}, {ns1}"})
    assert [i["twinId"] for i in both.json()["items"]] == sorted([f"{ns1}:m", f"{ns2}:m"])
    assert [i["twinId"] for i in search(api, ns1, filter).json()["items"]] == [f"{ns1}:m"]
    everywhere = api.get(SEARCH, params={"filter": filter})
    assert len(everywhere.json()["items"]) == 2
    assert api.get(COUNT, params={"filter": filter}).json() == {"count": 2}
    assert api.get(COUNT, params={"filter": filter, "namespaces": ns2}).json() == {"count": 1}
    assert search(api, "org.nothing.here", filter).json() == {"items": []}
    # Blank is "not given", sent in a query string or in a form (where it was "none" and
    # "all" respectively).
    for blank in ("", " "):
        query = {"filter": filter, "namespaces": blank}
        assert len(api.get(SEARCH, params=query).json()["items"]) == 2
        assert len(api.post(SEARCH, data=query).json()["items"]) == 2
        assert api.get(COUNT, params=query).json() == {"count": 2}
        assert api.post(COUNT, data=query).json() == {"count": 2}


def test_namespace_restricted_token_sees_only_its_namespaces(
    service: ServiceProcess, api: httpx.Client, ns: str
) -> None:
    marker = uuid.uuid4().hex
    acme_id = f"org.acme:s-{marker[:10]}"
    put(api, acme_id, {"attributes": {"marker": marker}})
    put(api, f"{ns}:other", {"attributes": {"marker": marker}})
    filter = f'eq(attributes/marker,"{marker}")'
    with service.client(token=ACME_TOKEN) as acme:
        for method in ("get", "post"):
            send = acme.get if method == "get" else acme.post
            kwargs: dict[str, Any] = {"params" if method == "get" else "data": {"filter": filter}}
            response = send(SEARCH, **kwargs)
            assert [i["twinId"] for i in response.json()["items"]] == [acme_id], method
        # Asking for a namespace the token may not read gives nothing, not an error.
        assert search(acme, ns, filter).json() == {"items": []}
        mixed = search(acme, f"{ns},org.acme", filter)
        assert [i["twinId"] for i in mixed.json()["items"]] == [acme_id]
        assert acme.get(COUNT, params={"filter": filter}).json() == {"count": 1}
        assert acme.get(COUNT, params={"filter": filter, "namespaces": ns}).json() == {"count": 0}
        assert acme.get(SEARCH, params={"filter": f'eq(namespace,"{ns}")'}).json() == {"items": []}
        # A bad waitFor is refused for every token, whatever it may read.
        for wait_for in ("abc", "-1", "9" * 18):
            for route in (SEARCH, COUNT):
                bad = acme.get(route, params={"namespaces": ns, "waitFor": wait_for})
                error(bad, 400, "request.invalid")
    with service.client(token=READER_TOKEN) as reader:
        assert reader.get(COUNT, params={"filter": filter}).json() == {"count": 2}
    with service.client(token="") as anonymous:
        error(anonymous.get(SEARCH, params={"filter": filter}), 401, "auth.required")


def test_a_token_of_the_empty_namespace_finds_its_twins(
    service_factory: Callable[..., ServiceProcess],
) -> None:
    """Twin ids may have an empty namespace (``:x``, as in Ditto), and a token may be given
    it: such a token read ``:x`` but searched nothing, its namespaces having been joined
    with commas and the blank entry then read as "not given"."""
    empty, both = "empty-namespace-token-0123", "empty-and-acme-token-01234"
    tokens = [
        *TOKENS,
        {"name": "empty", "token": empty, "role": "read", "namespaces": [""]},
        {"name": "both", "token": both, "role": "read", "namespaces": ["", "org.acme"]},
    ]
    proc = service_factory(env={"TWIN_AUTH__TOKENS": json.dumps(tokens)})
    with proc.client() as api:
        put(api, ":x", {})
        put(api, "org.acme:y", {})
        put(api, "org.other:z", {})
    with proc.client(token=empty) as reader:
        assert reader.get("/api/v1/twins/:x").status_code == 200
        assert [i["twinId"] for i in reader.get(SEARCH).json()["items"]] == [":x"]
        assert reader.post(COUNT).json() == {"count": 1}
        assert search(reader, "org.acme").json() == {"items": []}
    with proc.client(token=both) as reader:
        assert [i["twinId"] for i in reader.get(SEARCH).json()["items"]] == [":x", "org.acme:y"]
        assert [i["twinId"] for i in search(reader, "org.acme").json()["items"]] == ["org.acme:y"]


def test_restricted_token_pages_with_its_own_cursor(
    service: ServiceProcess, api: httpx.Client
) -> None:
    marker = uuid.uuid4().hex
    ids = sorted(f"org.acme:p-{marker[:8]}-{i}" for i in range(5))
    for twin_id in ids:
        put(api, twin_id, {"attributes": {"marker": marker}})
    filter = f'eq(attributes/marker,"{marker}")'
    with service.client(token=ACME_TOKEN) as acme:
        first = acme.get(SEARCH, params={"filter": filter, "option": "size(2)"}).json()
        cursor = first["cursor"]
        second = acme.get(
            SEARCH, params={"filter": filter, "option": f"size(2),cursor({cursor})"}
        ).json()
        assert [i["twinId"] for i in first["items"] + second["items"]] == ids[:4]
    # The admin's query (no namespace restriction) is another query: the cursor is refused.
    foreign = api.get(SEARCH, params={"filter": filter, "option": f"size(2),cursor({cursor})"})
    error(foreign, 400, "rql.invalid")


# -- POST form -----------------------------------------------------------------------------------


def test_post_form_search_with_long_query(api: httpx.Client, ns: str) -> None:
    for i in range(5):
        put(api, f"{ns}:f{i}", {"attributes": {"serial": f"SN-{i:06d}"}})
    wanted = [f'"SN-{i:06d}"' for i in range(3, 4000)]
    filter = f"in(attributes/serial,{','.join(wanted)})"
    assert len(filter) > 40_000
    response = api.post(
        SEARCH,
        data={
            "filter": filter,
            "option": "sort(-attributes/serial),size(1)",
            "namespaces": ns,
            "fields": "twinId",
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["items"] == [{"twinId": f"{ns}:f4"}]
    rest = api.post(
        SEARCH,
        data={
            "filter": filter,
            "option": f"sort(-attributes/serial),size(1),cursor({body['cursor']})",
            "namespaces": ns,
            "fields": "twinId",
        },
    )
    assert rest.json() == {"items": [{"twinId": f"{ns}:f3"}]}
    bad = api.post(SEARCH, data={"filter": "eq(attributes/serial", "namespaces": ns})
    assert error(bad, 400, "rql.syntax")["position"] == 20


# -- errors --------------------------------------------------------------------------------------

OPERATORS_EXPECTED = "an operator (eq, ne, gt, ge, lt, le, in, like, ilike, exists, and, or, not)"
VALUE_EXPECTED = "a value (number, string, true, false or null)"
LOW_SURROGATE = "a \\u escape of a low surrogate (DC00-DFFF) after a high surrogate"


@pytest.mark.parametrize(
    ("filter", "position", "expected"),
    [
        ("foo(attributes/a,1)", 0, OPERATORS_EXPECTED),
        ("eq(attributes/a 1)", 16, "','"),
        ("eq(attributes/a,)", 16, VALUE_EXPECTED),
        ("eq(attributes/a,tru)", 16, VALUE_EXPECTED),
        ("eq(attributes/a,1) x", 19, "end of input"),
        ('eq(attributes/site,"a"', 22, "',' or ')'"),
        ('eq(attributes/a,"abc', 20, 'closing "'),
        ("and(eq(attributes/a,1),)", 23, OPERATORS_EXPECTED),
        ("in(attributes/a,1,)", 18, VALUE_EXPECTED),
        ("not(eq(attributes/a,1),eq(attributes/b,2))", 22, "')'"),
        (
            'eq(attributes/a,"x\\q")',
            19,
            "an escape (\\\\ \\\" \\' \\/ \\b \\f \\n \\r \\t \\uXXXX)",
        ),
        ('eq(attributes/a,"\\u12")', 19, "4 hex digits after \\u"),
        # Surrogates: a pair is one character (as in JSON); a lone one is refused.
        ('eq(attributes/a,"\\ud800")', 23, LOW_SURROGATE),
        ('eq(attributes/a,"\\ud800\\u0041")', 23, LOW_SURROGATE),
        (
            'eq(attributes/a,"\\ude00")',
            17,
            "a high surrogate escape (D800-DBFF) before a low surrogate",
        ),
    ],
)
def test_syntax_errors(
    api: httpx.Client, ns: str, filter: str, position: int, expected: str
) -> None:
    body = error(search(api, ns, filter), 400, "rql.syntax")
    assert body["position"] == position and body["expected"] == expected
    assert f"position {position}" in body["message"]
    count = api.get(COUNT, params={"filter": filter, "namespaces": ns})
    assert error(count, 400, "rql.syntax")["position"] == position


@pytest.mark.parametrize(
    ("option", "position", "expected"),
    [
        ("sort(+attributes/a", 18, "')'"),
        ("size(x)", 5, VALUE_EXPECTED),
        ("sort(attributes/a),size(1),bogus(1)", 27, "an option (sort, size or cursor)"),
        ("size(1) size(2)", 8, "','"),
    ],
)
def test_option_syntax_errors(
    api: httpx.Client, ns: str, option: str, position: int, expected: str
) -> None:
    body = error(search(api, ns, option=option), 400, "rql.syntax")
    assert body["position"] == position and body["expected"] == expected


#: A cursor whose JSON nests 3,000 arrays deep: decoding it used to raise RecursionError (500).
_DEEP_CURSOR = base64.urlsafe_b64encode(b"[" * 3000 + b"]" * 3000).decode().rstrip("=")


@pytest.mark.parametrize(
    ("filter", "option", "fragment"),
    [
        ("eq(foo/bar,1)", "", "unknown property 'foo/bar'"),
        ("exists(metadata)", "", "unknown property"),
        ("eq(connection,1)", "", "unknown property"),
        ("exists(attributes//a)", "", "empty key"),
        ("eq(attributes/a~2,1)", "", "invalid escape '~2'"),
        ("gt(attributes/a,null)", "", "cannot compare with null"),
        ("like(attributes/a,1)", "", "needs a string pattern"),
        ('like(attributes/a,"a\\\\x")', "", "invalid escape in like pattern"),
        ("eq(attributes/a,1e999)", "", "number out of range"),
        ("eq(attributes/a,-1" + "0" * 400 + ")", "", "number out of range"),
        (None, "size(201)", "size must be between 1 and 200, got 201"),
        (None, "size(0)", "size must be between 1 and 200"),
        (None, "size(1.5)", "size must be an integer"),
        (None, "size(3),size(4)", "given twice"),
        (None, "sort(+foo)", "unknown property 'foo'"),
        (None, "cursor(not-a-cursor!)", "malformed cursor"),
        (None, f"cursor({_DEEP_CURSOR})", "malformed cursor"),
        ("not(" * 100 + "exists(attributes/a)" + ")" * 100, "", "nests deeper than 24"),
        ("or(" + ",".join(["exists(attributes/a)"] * 600) + ")", "", "more than 256 conditions"),
        # 201 sort paths were a 503 on SQLite (too many FROM clause terms, max 200), 32 on
        # FerretDB (at most 32 sort fields, twinId included).
        (None, "sort(" + ",".join(f"+attributes/k{i}" for i in range(201)) + ")", "more than 16"),
        (None, "sort(" + ",".join(["+attributes/k"] * 17) + ")", "sort has more than 16 keys"),
    ],
)
def test_invalid_queries(
    api: httpx.Client, ns: str, filter: str | None, option: str, fragment: str
) -> None:
    body = error(search(api, ns, filter, option=option), 400, "rql.invalid")
    assert fragment in body["message"]


def test_the_most_sort_keys_and_repeated_namespaces(api: httpx.Client, ns: str) -> None:
    """16 sort keys are taken; a namespace listed 50,000 times is one namespace (SQLite
    refused to bind so many values), and more than 65,536 distinct ones are refused."""
    put(api, f"{ns}:a", {"attributes": {"k0": 2}})
    put(api, f"{ns}:b", {"attributes": {"k0": 1}})
    widest = "sort(" + ",".join(f"+attributes/k{i}" for i in range(16)) + ")"
    assert names(search(api, ns, option=widest)) == ["b", "a"]
    repeated = api.post(SEARCH, data={"namespaces": ",".join([ns] * 50_000)})
    assert sorted(names(repeated)) == ["a", "b"]
    many = ",".join([ns, *(f"org.n{i}" for i in range(65_536))])
    body = error(api.post(SEARCH, data={"namespaces": many}), 400, "rql.invalid")
    assert "more than 65536 namespaces" in body["message"]


def test_unicode_escapes_and_numbers_beyond_64_bits(api: httpx.Client, ns: str) -> None:
    put(api, f"{ns}:u", {"attributes": {"emoji": "pump \U0001f600", "big": 2**64, "huge": 1e300}})
    assert names(search(api, ns, 'eq(attributes/emoji,"pump \\ud83d\\ude00")')) == ["u"]
    assert names(search(api, ns, 'eq(attributes/emoji,"pump \U0001f600")')) == ["u"]
    assert names(search(api, ns, 'like(attributes/emoji,"pump ?")')) == ["u"]
    assert names(search(api, ns, "eq(attributes/big,18446744073709551616)")) == ["u"]
    assert names(search(api, ns, "gt(attributes/big,9223372036854775807)")) == ["u"]
    assert names(search(api, ns, "gt(attributes/huge,99999999999999999999)")) == ["u"]
    assert names(search(api, ns, "in(attributes/huge,99999999999999999999,1)")) == []
    assert names(search(api, ns, "lt(attributes/big,-99999999999999999999)")) == []


@pytest.mark.parametrize("key", [[2, 10**400], [2, 1e308 * 10], [3, "\ud800"]])
def test_forged_cursor_is_refused(api: httpx.Client, ns: str, key: list[Any]) -> None:
    sort = normalize_sort((SortKey(("attributes", "i")),))
    fp = fingerprint(None, sort, (ns,))
    token = base64.urlsafe_b64encode(json.dumps({"f": fp, "k": [key, [3, "x"]]}).encode())
    cursor = token.decode().rstrip("=")
    response = search(api, ns, option=f"sort(+attributes/i),cursor({cursor})")
    assert "malformed cursor" in error(response, 400, "rql.invalid")["message"]


def test_size_200_is_allowed(api: httpx.Client, ns: str) -> None:
    assert search(api, ns, option="size(200)").json() == {"items": []}


def test_cursor_must_be_reused_with_the_same_query(api: httpx.Client, ns: str) -> None:
    for i in range(4):
        put(api, f"{ns}:c{i}", {"attributes": {"i": i}})
    filter = "exists(attributes/i)"
    first = search(api, ns, filter, option="sort(-attributes/i),size(2)")
    cursor = first.json()["cursor"]
    ok = search(api, ns, filter, option=f"size(2),sort(-attributes/i),cursor({cursor})")
    assert names(ok) == ["c1", "c0"]
    # Canonically equal filters are the same query (spacing, quotes).
    same = search(
        api, ns, " exists( attributes/i ) ", option=f"sort(-attributes/i),cursor({cursor})"
    )
    assert names(same) == ["c1", "c0"]
    # The size may change between pages.
    assert names(
        search(api, ns, filter, option=f"sort(-attributes/i),size(1),cursor({cursor})")
    ) == ["c1"]
    for other_filter, other_option, other_ns in [
        ("exists(attributes)", f"sort(-attributes/i),cursor({cursor})", ns),
        (filter, f"sort(+attributes/i),cursor({cursor})", ns),
        (filter, f"cursor({cursor})", ns),
        (filter, f"sort(-attributes/i),cursor({cursor})", f"{ns},org.acme"),
    ]:
        body = error(search(api, other_ns, other_filter, option=other_option), 400, "rql.invalid")
        assert "cursor" in body["message"]


# -- consistency ---------------------------------------------------------------------------------


def test_index_reflects_every_acknowledged_write_immediately(api: httpx.Client, ns: str) -> None:
    twin_id = f"{ns}:live"
    for i in range(60):
        put(api, twin_id, {"attributes": {"v": i}, "desired": {"v": i}})
        assert names(search(api, ns, f"eq(attributes/v,{i})")) == ["live"]
        assert names(search(api, ns, f"eq(attributes/v,{i - 1})")) == []
        patched = api.patch(f"/api/v1/twins/{twin_id}", json={"reported": {"v": i}}, headers=MERGE)
        assert patched.status_code == 200
        assert names(search(api, ns, "exists(delta)")) == []
        assert api.put(f"/api/v1/twins/{twin_id}/desired/v", json=i + 1).status_code == 204
        assert names(search(api, ns, f"eq(delta/v,{i + 1})")) == ["live"]
        assert api.get(COUNT, params={"filter": "exists(delta)", "namespaces": ns}).json() == {
            "count": 1
        }
    assert api.delete(f"/api/v1/twins/{twin_id}").status_code == 204
    assert names(search(api, ns)) == []


def test_index_reflects_concurrent_writes_immediately(service: ServiceProcess, ns: str) -> None:
    async def worker(client: httpx.AsyncClient, w: int) -> None:
        for i in range(25):
            twin_id = f"{ns}:w{w}"
            response = await client.put(
                f"/api/v1/twins/{twin_id}", json={"attributes": {"w": w, "i": i}}
            )
            assert response.status_code in (200, 201), response.text
            found = await client.get(
                SEARCH,
                params={
                    "filter": f"and(eq(attributes/w,{w}),eq(attributes/i,{i}))",
                    "namespaces": ns,
                    "fields": "twinId",
                },
            )
            assert found.json() == {"items": [{"twinId": twin_id}]}

    async def main() -> None:
        async with service.async_client() as client:
            await asyncio.gather(*(worker(client, w) for w in range(8)))
            count = await client.get(
                COUNT, params={"filter": "eq(attributes/i,24)", "namespaces": ns}
            )
            assert count.json() == {"count": 8}

    asyncio.run(main())


def test_a_like_prefix_ending_before_the_surrogates(api: httpx.Client, ns: str) -> None:
    """U+D7FF is the last character before the surrogates: a like prefix ending in it gave
    the SQLite store a range ending at U+D800, which it cannot take (a 500)."""
    for name, value in (("a", "\ud7ff"), ("b", "\ud7ffz"), ("c", "\ue000")):
        put(api, f"{ns}:{name}", {"attributes": {"s": value}})
    assert names(search(api, ns, 'like(attributes/s,"\\ud7ff*")')) == ["a", "b"]
    assert names(search(api, ns, 'like(attributes/s,"\ud7ff?")')) == ["b"]
    count = api.get(COUNT, params={"filter": 'like(attributes/s,"\ud7ff*")', "namespaces": ns})
    assert count.json() == {"count": 2}
