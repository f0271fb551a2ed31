"""REST API of twins against the real service process (SQLite default)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

import httpx
import pytest

from tests.legacy import age_out_sqlite_journal, forget_sqlite_tombstone
from tests.service_process import READER_TOKEN, ServiceProcess
from twin_service.twin.ids import TWIN_ID_PATTERN

MERGE = {"Content-Type": "application/merge-patch+json"}
JSON_PATCH = {"Content-Type": "application/json-patch+json"}


def new_id(namespace: str = "org.acme") -> str:
    return f"{namespace}:t-{uuid.uuid4().hex[:10]}"


def put(api: httpx.Client, twin_id: str, body: dict[str, object]) -> httpx.Response:
    response = api.put(f"/api/v1/twins/{twin_id}", json=body)
    assert response.status_code in (200, 201), response.text
    return response


def test_put_creates_then_replaces(api: httpx.Client) -> None:
    twin_id = new_id()
    created = api.put(
        f"/api/v1/twins/{twin_id}",
        json={"definition": "acme:pump:1", "attributes": {"site": "a"}, "desired": {"on": True}},
    )
    assert created.status_code == 201
    assert created.headers["Location"] == f"/api/v1/twins/{twin_id}"
    assert created.headers["ETag"] == '"rev:1"'
    doc = created.json()
    assert doc["twinId"] == twin_id and doc["namespace"] == "org.acme"
    assert doc["definition"] == "acme:pump:1"
    assert doc["delta"] == {"on": True}
    assert doc["connection"]["status"] == "unknown"
    assert doc["revision"] == 1 and doc["created"] == doc["modified"]
    assert doc["created"].endswith("Z") and len(doc["created"]) == 24
    assert doc["metadata"]["desired"]["on"] == {"modified": doc["created"], "revision": 1}

    replaced = api.put(f"/api/v1/twins/{twin_id}", json={"attributes": {"site": "b"}})
    assert replaced.status_code == 200
    doc = replaced.json()
    assert doc["revision"] == 2 and doc["desired"] == {} and doc["attributes"] == {"site": "b"}
    assert "definition" not in doc
    assert doc["desiredVersion"] == 2


def test_the_location_of_a_created_twin_names_it_whatever_its_name_holds(
    api: httpx.Client,
) -> None:
    """A name may hold '%' (sent as ``%25``): the Location was the id as is, so that of
    ``org.acme:x%41`` named ``org.acme:xA``, another twin."""
    base = new_id()
    for name, sent in (("%41", "%2541"), ("%2Fdesired", "%252Fdesired"), ("!$&'()*+,;=:@", "")):
        twin_id = base + name
        created = api.put(f"/api/v1/twins/{base}{sent or name}", json={"attributes": {"n": 1}})
        assert created.status_code == 201 and created.json()["twinId"] == twin_id
        # Every other character of a name is one a path segment may hold as it is.
        assert created.headers["Location"] == f"/api/v1/twins/{base}{sent or name}"
        followed = api.get(created.headers["Location"])
        assert followed.status_code == 200 and followed.json()["twinId"] == twin_id


def test_post_generates_id_in_default_namespace(api: httpx.Client) -> None:
    response = api.post("/api/v1/twins", json={"attributes": {"a": 1}})
    assert response.status_code == 201
    twin_id = response.json()["twinId"]
    assert twin_id.startswith("default:")
    assert response.headers["Location"] == f"/api/v1/twins/{twin_id}"
    assert api.get(f"/api/v1/twins/{twin_id}").json()["attributes"] == {"a": 1}


@pytest.mark.parametrize("namespace", ["org.a:x", " ", "org..a", "1org", "org/a", "a" * 220])
def test_post_refuses_a_namespace_that_is_not_one(api: httpx.Client, namespace: str) -> None:
    """It made ``org.a:x:<uuid>`` (the caller chose part of the generated name), or
    complained about an id the client never sent."""
    response = api.post("/api/v1/twins", params={"namespace": namespace}, json={})
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"] == "twin.id.invalid"
    assert body["message"].startswith("Namespace "), body
    assert "not valid" in body["message"], body


def test_post_in_a_namespace(api: httpx.Client) -> None:
    response = api.post("/api/v1/twins", params={"namespace": "org.acme.p_1"}, json={})
    assert response.status_code == 201, response.text
    assert response.json()["namespace"] == "org.acme.p_1"
    # The longest namespace that leaves room for the generated name (as default_namespace).
    longest = api.post("/api/v1/twins", params={"namespace": "a" * 219}, json={})
    assert longest.status_code == 201, longest.text


@pytest.mark.parametrize(
    ("headers", "params", "status", "error"),
    [
        # A new twin has no current representation: If-Match is false (RFC 9110 13.1.1).
        ({"If-Match": '"rev:77"'}, {}, 412, "twin.precondition.failed"),
        ({"If-Match": "*"}, {}, 412, "twin.precondition.failed"),
        ({"If-Match": "rev:77"}, {}, 400, "request.invalid"),
        ({}, {"condition": "eq(attributes/a,1)"}, 412, "twin.condition.failed"),
        ({}, {"condition": "eq(("}, 400, "rql.syntax"),
        ({}, {"ttl": "-5"}, 400, "request.invalid"),
        ({}, {"ttl": "abc"}, 400, "request.invalid"),
    ],
)
def test_post_honours_preconditions_and_ttl_as_put_does(
    api: httpx.Client,
    headers: dict[str, str],
    params: dict[str, str],
    status: int,
    error: str,
) -> None:
    """They were ignored: every one of these created a twin (201)."""
    namespace = f"org.post{uuid.uuid4().hex[:8]}"
    response = api.post(
        "/api/v1/twins",
        params={"namespace": namespace, **params},
        headers=headers,
        json={"attributes": {"a": 1}},
    )
    assert response.status_code == status, response.text
    assert response.json()["error"] == error, response.text
    found = api.get(
        "/api/v1/search/twins", params={"namespaces": namespace, "filter": "exists(twinId)"}
    )
    assert found.status_code == 200 and found.json()["items"] == [], found.text


def test_post_with_if_none_match_and_a_ttl(api: httpx.Client) -> None:
    response = api.post(
        "/api/v1/twins",
        params={"ttl": "3600"},
        headers={"If-None-Match": "*"},
        json={"desired": {"led": "red"}},
    )
    assert response.status_code == 201, response.text
    lifecycle = response.json()["lifecycle"]["led"]
    assert lifecycle["state"] == "pending" and "expires" in lifecycle, lifecycle


def test_get_missing_is_404_with_error_body(api: httpx.Client) -> None:
    response = api.get(f"/api/v1/twins/{new_id()}")
    assert response.status_code == 404
    body = response.json()
    assert body["status"] == 404 and body["error"] == "twin.notfound"
    assert body["message"] and "description" in body


def test_get_many_and_fields(api: httpx.Client) -> None:
    a, b = new_id(), new_id()
    put(api, a, {"attributes": {"x": 1}, "desired": {"fan": {"speed": 1, "dir": "l"}}})
    put(api, b, {"attributes": {"x": 2}})
    many = api.get("/api/v1/twins", params={"ids": f"{a},{new_id()},{b}", "fields": "attributes"})
    assert many.status_code == 200
    assert many.json() == [{"attributes": {"x": 1}}, {"attributes": {"x": 2}}]
    # An id asked for twice is answered once, where it was first asked for.
    twice = api.get("/api/v1/twins", params={"ids": f"{b},{a},{b},{a}", "fields": "twinId"})
    assert twice.json() == [{"twinId": b}, {"twinId": a}]
    one = api.get(f"/api/v1/twins/{a}", params={"fields": "twinId,desired/fan/speed"})
    assert one.json() == {"twinId": a, "desired": {"fan": {"speed": 1}}}
    # Ditto's groups: a prefix with its paths in parentheses.
    grouped = api.get(f"/api/v1/twins/{a}", params={"fields": "attributes(x),desired(fan(dir))"})
    assert grouped.json() == {"attributes": {"x": 1}, "desired": {"fan": {"dir": "l"}}}
    unbalanced = api.get(f"/api/v1/twins/{a}", params={"fields": "desired(fan"})
    assert (unbalanced.status_code, unbalanced.json()["error"]) == (400, "fields.invalid")
    # The request is wrong whatever the twin: 400, not a 404 for one that is not there, nor
    # for a revision it does not have.
    for twin_id, query in ((new_id(), {}), (a, {"at": "99"}), (new_id(), {"at": "1"})):
        bad = api.get(f"/api/v1/twins/{twin_id}", params={"fields": "desired(fan", **query})
        assert (bad.status_code, bad.json()["error"]) == (400, "fields.invalid"), query


def test_delete(api: httpx.Client) -> None:
    twin_id = new_id()
    put(api, twin_id, {})
    assert api.delete(f"/api/v1/twins/{twin_id}").status_code == 204
    assert api.get(f"/api/v1/twins/{twin_id}").status_code == 404
    assert api.delete(f"/api/v1/twins/{twin_id}").status_code == 404


def test_merge_patch_and_delta(api: httpx.Client) -> None:
    twin_id = new_id()
    put(api, twin_id, {"desired": {"fan": {"speed": 3, "mode": "auto"}, "led": "red"}})
    response = api.patch(
        f"/api/v1/twins/{twin_id}",
        content=b'{"reported": {"fan": {"speed": 3.0, "mode": "eco"}, "extra": 1},'
        b' "desired": {"led": null}}',
        headers=MERGE,
    )
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["desired"] == {"fan": {"speed": 3, "mode": "auto"}}
    assert doc["delta"] == {"fan": {"mode": "auto"}}
    assert doc["revision"] == 2 and doc["desiredVersion"] == 2 and doc["reportedVersion"] == 2
    assert api.get(f"/api/v1/twins/{twin_id}/delta").json() == {"fan": {"mode": "auto"}}


def test_json_patch_with_array_operations(api: httpx.Client) -> None:
    twin_id = new_id()
    put(api, twin_id, {"attributes": {"tags": ["a", "c"]}})
    ops = [
        {"op": "add", "path": "/attributes/tags/1", "value": "b"},
        {"op": "add", "path": "/attributes/tags/-", "value": "d"},
        {"op": "test", "path": "/attributes/tags/0", "value": "a"},
        {"op": "copy", "from": "/attributes/tags", "path": "/desired/tags"},
        {"op": "remove", "path": "/desired/tags/0"},
    ]
    response = api.patch(f"/api/v1/twins/{twin_id}", json=ops, headers=JSON_PATCH)
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["attributes"]["tags"] == ["a", "b", "c", "d"]
    assert doc["desired"]["tags"] == ["b", "c", "d"]


def test_json_patch_of_the_same_value_stamps_its_metadata(api: httpx.Client) -> None:
    """docs/api.md: writing the same value again counts as a write, whatever the patch."""
    twin_id = new_id()
    put(api, twin_id, {"desired": {"a": 1, "b": 2}})
    ops = [{"op": "replace", "path": "/desired/a", "value": 1}]
    response = api.patch(f"/api/v1/twins/{twin_id}", json=ops, headers=JSON_PATCH)
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["revision"] == 2 and doc["desired"] == {"a": 1, "b": 2}
    assert doc["metadata"]["desired"]["a"]["revision"] == 2
    assert doc["metadata"]["desired"]["b"]["revision"] == 1


def test_json_patch_failure_is_atomic(api: httpx.Client) -> None:
    twin_id = new_id()
    put(api, twin_id, {"attributes": {"a": 1}})
    ops = [
        {"op": "replace", "path": "/attributes/a", "value": 2},
        {"op": "remove", "path": "/attributes/missing"},
    ]
    response = api.patch(f"/api/v1/twins/{twin_id}", json=ops, headers=JSON_PATCH)
    assert response.status_code == 400
    assert response.json()["error"] == "patch.path.notfound"
    failing_test = [{"op": "test", "path": "/attributes/a", "value": 5}]
    response = api.patch(f"/api/v1/twins/{twin_id}", json=failing_test, headers=JSON_PATCH)
    assert response.status_code == 412
    doc = api.get(f"/api/v1/twins/{twin_id}").json()
    assert doc["attributes"] == {"a": 1} and doc["revision"] == 1


PLAIN = {"Content-Type": "application/json"}


def _ops(*ops: dict[str, object]) -> bytes:
    return json.dumps(list(ops)).encode()


NULL_WRITES: list[tuple[str, str, bytes, dict[str, str], str]] = [
    ("PUT", "", b'{"desired": {"a": null, "b": 2}}', PLAIN, "/desired/a"),
    ("PUT", "/desired", b'{"a": 1, "c": {"d": null}}', PLAIN, "/desired/c/d"),
    ("PUT", "/desired/a", b"null", PLAIN, "/desired/a"),
    ("PUT", "/reported/r", b'{"s": null}', PLAIN, "/reported/r/s"),
    ("PUT", "/attributes", b'{"x": null}', PLAIN, "/attributes/x"),
    ("PUT", "/live/t", b"null", PLAIN, "/live/t"),
    # The pointer names the keys escaped (RFC 6901), as the request would give them.
    ("PUT", "/desired", b'{"a/b": {"c~d": null}}', PLAIN, "/desired/a~1b/c~0d"),
    ("PUT", "/desired/a~1b", b'{"c": null}', PLAIN, "/desired/a~1b/c"),
    ("PATCH", "", _ops({"op": "add", "path": "/reported/z", "value": None}), JSON_PATCH,
     "/reported/z"),
    ("PATCH", "", _ops({"op": "replace", "path": "/desired/a", "value": None}), JSON_PATCH,
     "/desired/a"),
    ("PATCH", "", _ops({"op": "add", "path": "/live", "value": {"q": {"r": None}}}), JSON_PATCH,
     "/live/q/r"),
    ("PATCH", "", _ops({"op": "add", "path": "/attributes/n", "value": None},
                       {"op": "copy", "from": "/attributes/n", "path": "/desired/n"}), JSON_PATCH,
     "/attributes/n"),
]  # fmt: skip


@pytest.mark.parametrize(("method", "where", "body", "headers", "pointer"), NULL_WRITES)
def test_a_write_that_would_store_a_null_is_refused(
    api: httpx.Client, method: str, where: str, body: bytes, headers: dict[str, str], pointer: str
) -> None:
    """Null deletes in a merge patch, and the ``changes`` of history and streams are one: a
    stored null would be described as a deletion, and a device given it in a delta could
    never report it back. Every way of writing one is refused, and the twin is unchanged."""
    twin_id = new_id()
    put(api, twin_id, {"desired": {"a": 1, "b": 2}, "attributes": {"m": [None]}})
    url = f"/api/v1/twins/{twin_id}"
    before = api.get(url).json()
    response = api.request(method, url + where, content=body, headers=headers)
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["error"] == "twin.invalid", error
    assert f"The value at {pointer} is null" in error["message"]
    assert "DELETE" in error["message"]
    assert api.get(url).json() == before
    assert [e["revision"] for e in api.get(f"{url}/history").json()["items"]] == [1]


def test_null_still_deletes_in_a_merge_patch(api: httpx.Client) -> None:
    twin_id = new_id()
    put(api, twin_id, {"desired": {"a": 1, "b": {"c": 2, "d": 3}}})
    url = f"/api/v1/twins/{twin_id}"
    patched = api.patch(url, content=b'{"desired": {"a": null}}', headers=MERGE)
    assert patched.status_code == 200 and patched.json()["desired"] == {"b": {"c": 2, "d": 3}}
    at_pointer = api.patch(f"{url}/desired/b/c", content=b"null", headers=MERGE)
    assert at_pointer.status_code == 204, at_pointer.text
    assert api.get(f"{url}/desired").json() == {"b": {"d": 3}}
    changes = api.get(f"{url}/history", params={"since": 3}).json()["items"][0]["changes"]
    assert changes["desired"] == {"b": {"c": None}}


def test_patch_needs_patch_media_type(api: httpx.Client) -> None:
    twin_id = new_id()
    put(api, twin_id, {})
    response = api.patch(f"/api/v1/twins/{twin_id}", json={"desired": {"a": 1}})
    assert response.status_code == 415
    assert response.json()["error"] == "request.mediatype"
    response = api.put(
        f"/api/v1/twins/{twin_id}", content=b"{}", headers={"Content-Type": "text/plain"}
    )
    assert response.status_code == 415


def test_a_method_not_allowed_is_405_naming_every_method_of_the_path(
    api: httpx.Client,
) -> None:
    twin = f"/api/v1/twins/{new_id()}"
    for method, url, allowed in [
        ("TRACE", twin, "DELETE, GET, HEAD, PATCH, PUT"),
        ("POST", twin, "DELETE, GET, HEAD, PATCH, PUT"),
        ("DELETE", "/api/v1/twins", "GET, HEAD, POST"),
        ("POST", twin + "/desired/fan", "DELETE, GET, HEAD, PATCH, PUT"),
        # The views of a twin are read-only.
        ("PUT", twin + "/delta", "GET, HEAD"),
        ("PATCH", twin + "/metadata", "GET, HEAD"),
        ("DELETE", twin + "/lifecycle/fan", "GET, HEAD"),
        ("PUT", twin + "/connection/status", "GET, HEAD"),
        ("DELETE", twin + "/history", "GET, HEAD"),
        ("POST", "/health", "GET, HEAD"),
    ]:
        response = api.request(method, url)
        assert response.status_code == 405, (method, url)
        assert response.headers["Allow"] == allowed, (method, url)
        body = response.json()
        assert body["error"] == "request.method"
        assert body["message"] == f"{method} is not allowed on {url}; it takes {allowed}."


def test_a_twin_has_no_other_sub_resources(api: httpx.Client) -> None:
    twin_id = new_id()
    put(api, twin_id, {"desired": {"a": 1}})
    for method in ("GET", "PUT", "PATCH", "DELETE"):
        for part in ("nosuch", "Desired", "revision", "nosuch/a"):
            response = api.request(
                method, f"/api/v1/twins/{twin_id}/{part}", content=b"1", headers=MERGE
            )
            assert response.status_code == 404, (method, part, response.text)
            assert response.json()["error"] == "resource.notfound"


def test_a_path_with_a_trailing_slash_is_404_never_a_redirect(api: httpx.Client) -> None:
    """Starlette redirected such paths (307, method kept) to the path without the slash: a
    DELETE of ``/twins/<id>%2F``, a twin id no twin can have, to the twin itself."""
    twin_id = new_id()
    put(api, twin_id, {"desired": {"a": 1}})
    for path in (
        f"/api/v1/twins/{twin_id}/",
        "/api/v1/twins/",
        "/api/v1/search/twins/",
        "/health/",
    ):
        for method in ("GET", "DELETE"):
            response = api.request(method, path)
            assert response.status_code == 404, (method, path, response.status_code)
            assert response.json()["error"] == "resource.notfound"
    assert api.get(f"/api/v1/twins/{twin_id}").status_code == 200


def test_an_encoded_slash_before_the_pointer_never_separates_segments(
    api: httpx.Client,
) -> None:
    """``%2F`` is part of a key only inside a pointer. Before, the route was found on the
    decoded path and the pointer read from the raw one: a DELETE of ``desired%2Ffan``
    emptied ``desired``, a PUT of ``<id>%2Fdesired`` replaced it, a PUT of
    ``desired%2Ffan/speed`` wrote ``desired/speed``."""
    twin_id = new_id()
    put(api, twin_id, {"desired": {"fan": {"speed": 3, "mode": "auto"}, "keep": 1}})
    base = f"/api/v1/twins/{twin_id}"
    bad_id = ("twin.id.invalid", 400)
    no_such = ("resource.notfound", 404)
    for path, expected in (
        (f"{base}%2F", bad_id),
        (f"{base}%2Fdesired", bad_id),
        (f"{base}%2fdesired/fan", bad_id),
        (f"{base}%2Fhistory", bad_id),
        (f"{base}/desired%2Ffan", no_such),
        (f"{base}/desired%2Ffan/speed", no_such),
        (f"/api/v1%2Ftwins/{twin_id}/desired/fan", no_such),
        (f"/api/v1%2Ftwins/{twin_id}", no_such),
        (f"/api%2Fv1/twins/{twin_id}", no_such),
    ):
        for method in ("GET", "PUT", "PATCH", "DELETE"):
            response = api.request(method, path, content=b'{"x": 1}', headers=MERGE)
            error, status = expected
            assert response.status_code == status, (method, path, response.text)
            assert response.json()["error"] == error, (method, path)
    twin = api.get(base).json()
    assert twin["desired"] == {"fan": {"speed": 3, "mode": "auto"}, "keep": 1}
    assert twin["revision"] == 1
    # Inside a pointer, it is a key's slash; a twin name may hold an escaped '%2F'.
    assert api.put(f"{base}/desired/fan%2Fspeed", json=9).status_code == 201
    assert api.get(f"{base}/desired").json()["fan/speed"] == 9
    literal = f"{twin_id}%252Fdesired"
    assert api.put(f"/api/v1/twins/{literal}", json={"desired": {"z": 1}}).status_code == 201
    assert api.get(f"/api/v1/twins/{literal}/desired").json() == {"z": 1}


def test_a_trailing_slash_in_a_pointer_names_the_empty_key_never_the_parent(
    api: httpx.Client,
) -> None:
    """``/desired/fan/`` is the key "" inside ``fan`` (RFC 6901), which no twin has: the
    slash was dropped, and a DELETE of ``/desired/fan/`` deleted ``fan``, one of
    ``/desired/`` emptied the section, a PUT of ``/desired/x/`` wrote ``x``."""
    twin_id = new_id()
    put(api, twin_id, {"desired": {"fan": {"speed": 3}, "other": 1}})
    base = f"/api/v1/twins/{twin_id}"
    for path, written in (
        (f"{base}/desired/fan/", "limits.exceeded"),  # no key may be empty
        (f"{base}/desired/", "limits.exceeded"),
        (f"{base}/desired/other/", "pointer.invalid"),  # 1 has no keys
    ):
        for method in ("GET", "DELETE"):
            response = api.request(method, path)
            assert response.status_code == 404, (method, path, response.text)
            assert response.json()["error"] == "pointer.notfound", (method, path)
        for method, headers in (("PUT", PLAIN), ("PATCH", MERGE)):
            response = api.request(method, path, content=b'{"a": 5}', headers=headers)
            assert response.status_code == 400, (method, path, response.text)
            assert response.json()["error"] == written, (method, path)
    twin = api.get(base).json()
    assert twin["desired"] == {"fan": {"speed": 3}, "other": 1} and twin["revision"] == 1


def test_sub_resources_by_pointer(api: httpx.Client) -> None:
    twin_id = new_id()
    put(api, twin_id, {"desired": {}})
    base = f"/api/v1/twins/{twin_id}"
    created = api.put(f"{base}/desired/fan/speed", json=3)
    assert created.status_code == 201 and created.json() == 3
    modified = api.put(f"{base}/desired/fan/speed", json=4)
    assert modified.status_code == 204 and modified.headers["ETag"] == '"rev:3"'
    assert api.get(f"{base}/desired/fan").json() == {"speed": 4}
    assert api.get(f"{base}/desired").json() == {"fan": {"speed": 4}}
    assert api.get(f"{base}/delta/fan/speed").json() == 4
    patched = api.patch(f"{base}/desired/fan", content=b'{"dir": "left"}', headers=MERGE)
    assert patched.status_code == 204
    assert api.get(f"{base}/desired/fan").json() == {"speed": 4, "dir": "left"}
    assert api.delete(f"{base}/desired/fan/speed").status_code == 204
    assert api.get(f"{base}/desired/fan/speed").status_code == 404
    assert api.get(f"{base}/desired/fan/speed").json()["error"] == "pointer.notfound"
    assert api.delete(f"{base}/desired/fan/speed").status_code == 404
    # Attributes, reported, live; connection and metadata views.
    assert api.put(f"{base}/attributes/site", json="plant-1").status_code == 201
    assert api.put(f"{base}/reported/temp", json=21.5).status_code == 201
    assert api.put(f"{base}/live/rpm", json=[1, 2]).status_code == 201
    assert api.get(f"{base}/live/rpm/1").json() == 2
    assert api.get(f"{base}/connection").json()["status"] == "unknown"
    meta = api.get(f"{base}/metadata/reported/temp").json()
    assert meta["revision"] == 7
    assert api.put(f"/api/v1/twins/{new_id()}/desired/a", json=1).status_code == 404


def test_pointer_escaping(api: httpx.Client) -> None:
    twin_id = new_id()
    put(api, twin_id, {})
    base = f"/api/v1/twins/{twin_id}/attributes"
    assert api.put(f"{base}/a~1b/c~0d", json=1).status_code == 201
    assert api.put(f"{base}/with%20space", json=2).status_code == 201
    assert api.put(f"{base}/pct%2Fslash", json=3).status_code == 201
    attributes = api.get(base).json()
    assert attributes == {"a/b": {"c~d": 1}, "with space": 2, "pct/slash": 3}
    assert api.get(f"{base}/a~1b/c~0d").json() == 1
    bad = api.get(f"{base}/bad~2escape")
    assert bad.status_code == 400 and bad.json()["error"] == "pointer.invalid"


def test_get_as_of_a_revision(api: httpx.Client) -> None:
    twin_id = new_id()
    url = f"/api/v1/twins/{twin_id}"
    assert api.put(url, json={"desired": {"a": 1}}).status_code == 201
    for value in (2, 3):
        assert api.patch(url, json={"desired": {"a": value}}, headers=MERGE).status_code == 200
    first = api.get(url, params={"at": 1})
    assert first.status_code == 200 and first.headers["ETag"] == '"rev:1"'
    assert (first.json()["revision"], first.json()["desired"]) == (1, {"a": 1})
    assert api.get(url, params={"at": 3}).json()["desired"] == {"a": 3}
    assert api.get(url, params={"at": 2, "fields": "desired"}).json() == {"desired": {"a": 2}}
    future = api.get(url, params={"at": 9})
    assert future.status_code == 404 and future.json()["error"] == "revision.notfound"
    # A section, a pointer or a view of it too (they answered the current revision).
    older = api.get(f"{url}/desired", params={"at": 1})
    assert older.json() == {"a": 1} and older.headers["ETag"] == '"rev:1"'
    assert api.get(f"{url}/desired/a", params={"at": 2}).json() == 2
    assert api.get(f"{url}/metadata/desired/a", params={"at": 2}).json()["revision"] == 2
    assert api.get(f"{url}/delta", params={"at": 2}).json() == {"a": 2}
    assert api.get(f"{url}/desired", params={"at": 9}).status_code == 404
    # Only ASCII decimal digits: int() read the Arabic-Indic "\u0663" as 3, "3_0" as 30.
    for bad in ("0", "-1", "x", "1.5", "", "\u0663", "3_0", " 3", "+3", "\uff13", "2 "):
        response = api.get(url, params={"at": bad})
        assert response.status_code == 400, bad
        body = response.json()
        assert body["error"] == "request.invalid" and "query/at" in body["message"], bad


def test_etags_and_preconditions(api: httpx.Client) -> None:
    twin_id = new_id()
    url = f"/api/v1/twins/{twin_id}"
    first = api.put(url, json={"desired": {"a": 1}}, headers={"If-None-Match": "*"})
    assert first.status_code == 201
    again = api.put(url, json={"desired": {"a": 2}}, headers={"If-None-Match": "*"})
    assert again.status_code == 412
    assert again.json()["error"] == "twin.precondition.failed"
    etag = first.headers["ETag"]
    assert api.get(url, headers={"If-None-Match": etag}).status_code == 304
    ok = api.patch(url, content=b'{"desired":{"a":3}}', headers={**MERGE, "If-Match": etag})
    assert ok.status_code == 200 and ok.headers["ETag"] == '"rev:2"'
    stale = api.patch(url, content=b'{"desired":{"a":4}}', headers={**MERGE, "If-Match": etag})
    assert stale.status_code == 412
    assert api.get(url, headers={"If-None-Match": etag}).status_code == 200
    assert api.delete(url, headers={"If-Match": etag}).status_code == 412
    assert api.put(f"{url}/desired/a", json=9, headers={"If-Match": '"rev:2"'}).status_code == 204
    assert api.get(url).json()["desired"] == {"a": 9}
    assert api.put(url, json={}, headers={"If-Match": "garbage"}).status_code == 400
    missing = api.put(f"/api/v1/twins/{new_id()}", json={}, headers={"If-Match": "*"})
    assert missing.status_code == 412


def test_if_match_takes_a_list_of_strong_etags(api: httpx.Client) -> None:
    """RFC 9110 13.1.1: If-Match holds when any listed tag matches strongly. A list (or the
    header on two lines) was a 400; a weak ``W/"rev:N"`` matched as if it were strong."""
    url = f"/api/v1/twins/{new_id()}"
    assert api.put(url, json={"desired": {"a": 1}}).headers["ETag"] == '"rev:1"'

    def write(value: int, *tags: str) -> httpx.Response:
        headers = [("Content-Type", MERGE["Content-Type"])] + [("If-Match", t) for t in tags]
        body = f'{{"desired":{{"a":{value}}}}}'.encode()
        return api.patch(url, content=body, headers=headers)

    listed = write(2, '"rev:7", "rev:1"')
    assert listed.status_code == 200 and listed.headers["ETag"] == '"rev:2"', listed.text
    two_lines = write(3, '"rev:9"', '"rev:2"')
    assert two_lines.status_code == 200 and two_lines.headers["ETag"] == '"rev:3"'
    # Empty list elements are allowed; a tag may hold a comma.
    spaced = write(4, ', "x,y" ,, "rev:3"')
    assert spaced.status_code == 200 and spaced.headers["ETag"] == '"rev:4"'
    missed = write(5, '"rev:1", "rev:2"')
    assert missed.status_code == 412
    assert "revision 4, If-Match asked for 1, 2" in missed.json()["message"]
    for unmatched in ('W/"rev:4"', '"rev:x"', '"rev:04"', '"elsewhere"', 'W/"rev:4", "rev:3"'):
        refused = write(5, unmatched)
        assert refused.status_code == 412, unmatched
        assert refused.json()["error"] == "twin.precondition.failed"
    assert "compares strongly" in write(5, 'W/"rev:4"').json()["message"]
    for malformed in ("rev:4", '"rev:4', '"rev:4" "rev:5"', 'w/"rev:4"', "", ", ,"):
        bad = write(5, malformed)
        assert bad.status_code == 400, malformed
        assert bad.json()["error"] == "request.invalid"
        assert "If-Match" in bad.json()["message"]
    assert api.get(url).json()["desired"] == {"a": 4}
    deleted = api.delete(url, headers={"If-Match": '"rev:1", "rev:4"'})
    assert deleted.status_code == 204


def test_if_match_on_a_missing_twin_says_it_does_not_exist(api: httpx.Client) -> None:
    """A 412 of ``If-Match: "rev:N"`` on a twin never created or deleted said "Twin is at
    revision 0" with ``"revision": 0``, a revision no twin has; it says what ``*`` says."""
    url = f"/api/v1/twins/{new_id()}"
    assert api.put(url, json={"desired": {"a": 1}}).status_code == 201
    assert api.delete(url).status_code == 204
    for target in (url, f"/api/v1/twins/{new_id()}"):
        for tag in ('"rev:1"', '"rev:0"', "*"):
            for write in (
                api.put(target, json={}, headers={"If-Match": tag}),
                api.put(f"{target}/desired/a", json=1, headers={"If-Match": tag}),
                api.delete(target, headers={"If-Match": tag}),
            ):
                assert write.status_code == 412, (target, tag)
                body = write.json()
                assert body["error"] == "twin.precondition.failed"
                assert body["message"].startswith("Twin does not exist (If-Match"), body
                assert "revision" not in body, body


def test_if_match_on_reads(api: httpx.Client) -> None:
    """RFC 9110 13.1.1: the origin server evaluates If-Match on a GET or HEAD too. It was
    ignored there (200 whatever the tag, a malformed one included); now a tag that does not
    match strongly is the 412 a write gives, a malformed one the write's 400, and it is
    evaluated before If-None-Match (section 13.2.2)."""
    url = f"/api/v1/twins/{new_id()}"
    assert api.put(url, json={"desired": {"a": 1}}).headers["ETag"] == '"rev:1"'
    api.patch(url, content=b'{"desired":{"a":2}}', headers=MERGE)
    for path in (
        url,
        f"{url}/desired",
        f"{url}/desired/a",
        f"{url}/delta",
        f"{url}?fields=desired",
    ):
        for method in ("GET", "HEAD"):
            for holds in ('"rev:2"', '"rev:9", "rev:2"', "*"):
                ok = api.request(method, path, headers={"If-Match": holds})
                assert ok.status_code == 200 and ok.headers["ETag"] == '"rev:2"', (path, holds)
            stale = api.request(method, path, headers={"If-Match": '"rev:1"'})
            assert stale.status_code == 412, (method, path)
            weak = api.request(method, path, headers={"If-Match": 'W/"rev:2"'})
            assert weak.status_code == 412, (method, path)
            bad = api.request(method, path, headers={"If-Match": "garbage"})
            assert bad.status_code == 400, (method, path)
            both = {"If-Match": '"rev:1"', "If-None-Match": '"rev:2"'}
            assert api.request(method, path, headers=both).status_code == 412, (method, path)
            both = {"If-Match": '"rev:2"', "If-None-Match": '"rev:2"'}
            assert api.request(method, path, headers=both).status_code == 304, (method, path)
        stale = api.get(path, headers={"If-Match": '"rev:1"'})
        assert stale.json()["error"] == "twin.precondition.failed"
        assert stale.json()["revision"] == 2
        assert "Twin is at revision 2, If-Match asked for 1" in stale.json()["message"]
        bad = api.get(path, headers={"If-Match": "garbage"})
        assert bad.json()["error"] == "request.invalid" and "If-Match" in bad.json()["message"]
    # ?at= answers an older revision, whose ETag the condition is about.
    old = api.get(url, params={"at": 1}, headers={"If-Match": '"rev:1"'})
    assert old.status_code == 200 and old.json()["desired"] == {"a": 1}
    assert (
        api.get(f"{url}/desired", params={"at": 1}, headers={"If-Match": '"rev:2"'}).status_code
        == 412
    )
    # The response without the condition would be a 404: the condition is not evaluated.
    assert api.get(f"{url}/desired/nosuch", headers={"If-Match": '"rev:1"'}).status_code == 404
    # A malformed header is refused whether or not the twin exists, as on writes.
    assert api.get(f"/api/v1/twins/{new_id()}", headers={"If-Match": "garbage"}).status_code == 400


def test_if_none_match_on_reads_compares_weakly_and_refuses_bad_syntax(
    api: httpx.Client,
) -> None:
    """RFC 9110 13.1.2: a weak tag matches on If-None-Match; the header on two lines is one
    list. A value that is no list of tags was ignored (200); it is now a 400 as on writes."""
    url = f"/api/v1/twins/{new_id()}"
    assert api.put(url, json={"desired": {"a": 1}}).headers["ETag"] == '"rev:1"'
    for path in (url, f"{url}/desired", f"{url}/delta"):
        assert api.get(path, headers={"If-None-Match": 'W/"rev:1"'}).status_code == 304, path
        lines = [("If-None-Match", '"rev:5"'), ("If-None-Match", '"a,b", "rev:1"')]
        assert api.get(path, headers=lines).status_code == 304, path
        assert api.get(path, headers={"If-None-Match": '"rev:5", W/"x"'}).status_code == 200
        assert api.get(path, headers={"If-None-Match": '"rev:01"'}).status_code == 200
        assert api.get(path, headers={"If-None-Match": ""}).status_code == 200, path
        bad = api.get(path, headers={"If-None-Match": "rev:1"})
        assert bad.status_code == 400 and "If-None-Match" in bad.json()["message"], path
    # On writes only '*' means something; a tag list there stays refused.
    listed = api.put(url, json={}, headers={"If-None-Match": '"rev:1"'})
    assert listed.status_code == 400 and "only supports '*'" in listed.json()["message"]


def test_sections_and_views_answer_304_to_a_matching_if_none_match(api: httpx.Client) -> None:
    """They send the twin's ETag; a GET with it gets 304, as the whole twin's does."""
    url = f"/api/v1/twins/{new_id()}"
    etag = api.put(url, json={"desired": {"a": {"b": 1}}, "attributes": {"c": 2}}).headers["ETag"]
    for part in ("desired", "desired/a/b", "attributes", "delta", "connection", "metadata"):
        first = api.get(f"{url}/{part}")
        assert first.status_code == 200 and first.headers["ETag"] == etag, part
        same = api.get(f"{url}/{part}", headers={"If-None-Match": f'"rev:9", {etag}'})
        assert same.status_code == 304 and same.headers["ETag"] == etag and not same.content
        assert api.get(f"{url}/{part}", headers={"If-None-Match": '"rev:9"'}).status_code == 200
    # A path that is not there is not found, whatever the tag.
    gone = api.get(f"{url}/desired/x", headers={"If-None-Match": etag})
    assert gone.status_code == 404
    assert api.put(f"{url}/desired/a/b", json=3).status_code == 204
    assert api.get(f"{url}/desired/a", headers={"If-None-Match": etag}).json() == {"b": 3}


def test_an_etag_of_a_deleted_twin_never_matches_a_new_one(api: httpx.Client) -> None:
    """A client holding the ETag of a deleted twin must not write over the next twin of the
    id once that reaches the same revision number: revisions go on after a delete."""
    twin_id = new_id()
    url = f"/api/v1/twins/{twin_id}"
    first = api.put(url, json={"desired": {"mode": "eco"}})
    assert first.status_code == 201 and first.headers["ETag"] == '"rev:1"'
    patched = api.patch(url, content=b'{"desired":{"mode":"boost"}}', headers=MERGE)
    assert patched.headers["ETag"] == '"rev:2"' and patched.json()["desiredVersion"] == 2
    held = patched.headers["ETag"]
    assert api.delete(url).status_code == 204
    reborn = api.put(url, json={"attributes": {"owner": "ops"}, "desired": {"fan": 1}})
    assert reborn.status_code == 201
    body = reborn.json()
    assert reborn.headers["ETag"] == '"rev:4"' and body["revision"] == 4
    assert body["desiredVersion"] == 3 and body["reportedVersion"] == 2
    assert body["desired"] == {"fan": 1} and body["created"] >= first.json()["created"]
    # The device is told the same version in the lifecycle as in the twin.
    assert body["lifecycle"]["fan"]["state"] == "pending"
    assert body["lifecycle"]["fan"]["desiredVersion"] == 3
    for tag in (held, '"rev:1"', '"rev:3"'):
        stale = api.patch(
            url, content=b'{"desired":{"mode":"off"}}', headers={**MERGE, "If-Match": tag}
        )
        assert stale.status_code == 412, tag
    assert api.get(url, headers={"If-None-Match": held}).status_code == 200
    # The earlier twin's revisions stay readable; its deletion is no twin at all.
    assert api.get(url, params={"at": 2}).json()["desired"] == {"mode": "boost"}
    deletion = api.get(url, params={"at": 3})
    assert deletion.status_code == 404 and deletion.json()["error"] == "revision.notfound"
    current = api.patch(
        url, content=b'{"desired":{"mode":"off"}}', headers={**MERGE, "If-Match": '"rev:4"'}
    )
    assert current.status_code == 200 and current.json()["revision"] == 5
    history = api.get(f"{url}/history", params={"since": 4}).json()["items"]
    assert [(e["revision"], e["action"]) for e in history] == [(4, "created"), (5, "modified")]
    # One story across the two twins: a client that saw revision 2 learns of the delete.
    history = api.get(f"{url}/history", params={"since": 3}).json()["items"]
    assert [(e["revision"], e["action"]) for e in history] == [
        (3, "deleted"),
        (4, "created"),
        (5, "modified"),
    ]
    assert len(api.get(f"{url}/history").json()["items"]) == 5


def pages_of_history(api: httpx.Client, url: str, **params: int) -> list[httpx.Response]:
    """Every page of a twin's history, following ``nextSince``."""
    pages = [api.get(f"{url}/history", params=params)]
    while "nextSince" in pages[-1].json():
        assert len(pages) < 100, "history pages never ended"
        pages.append(
            api.get(f"{url}/history", params={**params, "since": pages[-1].json()["nextSince"]})
        )
    assert all(page.status_code == 200 for page in pages)
    return pages


def test_history_comes_a_page_at_a_time(api: httpx.Client) -> None:
    twin_id = new_id()
    url = f"/api/v1/twins/{twin_id}"
    put(api, twin_id, {})
    for n in range(249):
        assert api.put(f"{url}/reported/n", json=n).is_success
    first = api.get(f"{url}/history").json()
    assert [e["revision"] for e in first["items"]] == list(range(1, 101))
    assert first["nextSince"] == 101
    pages = pages_of_history(api, url, limit=60)
    assert [len(page.json()["items"]) for page in pages] == [60, 60, 60, 60, 10]
    revisions = [e["revision"] for page in pages for e in page.json()["items"]]
    assert revisions == list(range(1, 251))
    # The last page has no nextSince, even when it is full.
    assert [len(page.json()["items"]) for page in pages_of_history(api, url, limit=125)] == [
        125,
        125,
    ]
    whole = api.get(f"{url}/history", params={"limit": 1000, "since": 11, "until": 20}).json()
    assert [e["revision"] for e in whole["items"]] == list(range(11, 21))
    assert "nextSince" not in whole
    for limit in (0, 1001, -1):
        refused = api.get(f"{url}/history", params={"limit": limit})
        assert refused.status_code == 400, refused.text


def test_a_history_page_stops_at_a_megabyte(api: httpx.Client) -> None:
    """1,000 revisions of a 60 KB twin were one 60 MB response."""
    twin_id = new_id()
    url = f"/api/v1/twins/{twin_id}"
    for n in range(40):
        assert put(api, twin_id, {"desired": {"blob": f"{n:02}" + "x" * 50_000}}).is_success
    pages = pages_of_history(api, url, limit=1000)
    sizes = [len(page.content) for page in pages]
    # Each page ends with the event that takes it past 1 MiB: 21 of about 50 KB.
    assert [len(page.json()["items"]) for page in pages] == [21, 19]
    assert max(sizes) < (1 << 20) + 60_000
    blobs = [e["changes"]["desired"]["blob"][:2] for p in pages for e in p.json()["items"]]
    assert blobs == [f"{n:02}" for n in range(40)]


def test_history_of_an_id_that_never_had_a_twin_is_404(api: httpx.Client) -> None:
    response = api.get(f"/api/v1/twins/{new_id()}/history")
    assert response.status_code == 404
    assert response.json()["error"] == "twin.notfound"


def test_history_of_a_deleted_twin_that_aged_out_is_410(
    service_factory: Callable[..., ServiceProcess],
) -> None:
    service = service_factory()
    twin_id = new_id()
    url = f"/api/v1/twins/{twin_id}"
    with service.client() as api:
        put(api, twin_id, {"desired": {"a": 1}})
        assert api.delete(url).status_code == 204
        assert [e["revision"] for e in api.get(f"{url}/history").json()["items"]] == [1, 2]
        age_out_sqlite_journal(service.data_dir / "twins.sqlite3", twin_id)
        response = api.get(f"{url}/history")
    assert response.status_code == 410
    assert response.json()["error"] == "history.expired"
    assert response.json()["deletedRevision"] == 2


def test_history_of_a_deleted_twin_past_its_end_is_an_empty_page(api: httpx.Client) -> None:
    """Polling for what came after the deletion, or a range before the first event, was
    410 "no longer retained" while the whole history was retained."""
    twin_id = new_id()
    url = f"/api/v1/twins/{twin_id}"
    put(api, twin_id, {"desired": {"a": 1}})
    assert api.put(f"{url}/desired/a", json=2).is_success
    assert api.delete(url).status_code == 204
    assert [e["revision"] for e in api.get(f"{url}/history").json()["items"]] == [1, 2, 3]
    for params in ({"since": 4}, {"since": 2, "until": 1}, {"until": 0}, {"since": 9}):
        page = api.get(f"{url}/history", params=params)
        assert page.status_code == 200, (params, page.text)
        assert page.json() == {"items": []}, params


def test_history_of_a_range_that_aged_out_is_410(
    service_factory: Callable[..., ServiceProcess],
) -> None:
    """A range wholly before the oldest retained event was an empty 200 page, as if the
    twin had not changed then; only a range reaching the retained events was 410."""
    service = service_factory(env={"TWIN_STREAM__JOURNAL_MAX_PER_TWIN": "2"})
    twin_id = new_id()
    url = f"/api/v1/twins/{twin_id}"
    with service.client() as api:
        put(api, twin_id, {})
        for n in range(130):  # pruning runs every 64 revisions
            assert api.put(f"{url}/desired/n", json=n).is_success
        retained = [e["revision"] for e in api.get(f"{url}/history").json()["items"]]
        oldest = retained[0]
        assert oldest > 10 and retained[-1] == 131, retained
        for params in ({"since": 1, "until": 10}, {"since": 1}, {"since": oldest - 1}):
            gone = api.get(f"{url}/history", params=params)
            assert gone.status_code == 410, (params, gone.text)
            assert gone.json()["error"] == "history.expired"
            assert gone.json()["oldestRevision"] == oldest, params
        assert api.get(f"{url}/history", params={"since": oldest}).status_code == 200
        # The same answer for the twin at a pruned revision (it had no oldestRevision).
        gone = api.get(url, params={"at": oldest - 1})
        assert gone.status_code == 410, gone.text
        assert gone.json()["error"] == "history.expired"
        assert gone.json()["oldestRevision"] == oldest
        past = api.get(f"{url}/history", params={"since": 132})
        assert past.status_code == 200 and past.json() == {"items": []}


def test_history_of_a_twin_created_again_before_tombstones_starts_at_its_creation(
    service_factory: Callable[..., ServiceProcess],
) -> None:
    """In a database from before tombstones, the next twin of an id started again at
    revision 1: its history does not mix in the revisions of the deleted twin."""
    service = service_factory()
    with service.client() as api:
        _history_of_a_legacy_recreation(service, api)


def _history_of_a_legacy_recreation(service: ServiceProcess, api: httpx.Client) -> None:
    twin_id = new_id()
    url = f"/api/v1/twins/{twin_id}"
    put(api, twin_id, {"desired": {"a": 1}})
    api.put(f"{url}/desired/a", json=2).raise_for_status()
    assert api.delete(url).status_code == 204
    forget_sqlite_tombstone(service.data_dir / "twins.sqlite3", twin_id)
    assert put(api, twin_id, {"desired": {"b": 1}}).json()["revision"] == 1
    api.put(f"{url}/desired/b", json=2).raise_for_status()
    for since in (0, 1):
        history = api.get(f"{url}/history", params={"since": since}).json()["items"]
        assert [(e["revision"], e["action"]) for e in history] == [(1, "created"), (2, "modified")]
    pages = [page.json()["items"] for page in pages_of_history(api, url, limit=1)]
    assert [[(e["revision"], e["action"]) for e in page] for page in pages] == [
        [(1, "created")],
        [(2, "modified")],
    ]
    assert api.get(f"{url}/history", params={"since": 3}).json()["items"] == []


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "json.invalid"),
        (b'{"desired": {"a": 1, "a": 2}}', 400, "json.invalid"),
        (b'{"desired": {"a": NaN}}', 400, "json.invalid"),
        (b'{"desired": {"a": Infinity}}', 400, "json.invalid"),
        (b'{"desired": {"a": 1e999}}', 400, "json.invalid"),
        (b'{"desired": {"a": "\xff\xfe"}}', 400, "json.invalid"),
        (b"", 400, "json.invalid"),
        (b"[1, 2]", 400, "twin.invalid"),
        (b'{"desired": []}', 400, "twin.invalid"),
        (b'{"desired": {"": 1}}', 400, "limits.exceeded"),
        (b'{"desired": {"a\\u0001": 1}}', 400, "limits.exceeded"),
        (b'{"desired": {"' + b"k" * 300 + b'": 1}}', 400, "limits.exceeded"),
        (b'{"desired": ' + b'{"a":' * 20 + b"1" + b"}" * 20 + b"}", 400, "limits.exceeded"),
        (b'{"unknown": 1}', 400, "twin.invalid"),
        (b'{"definition": 5}', 400, "twin.invalid"),
        (b'{"twinId": "other:id"}', 400, "twin.invalid"),
        (b'{"live": {"blob": "' + b"x" * 70_000 + b'"}}', 413, "twin.toolarge"),
        (b'{"live": {"blob": "' + b"x" * 1_100_000 + b'"}}', 413, "request.toolarge"),
    ],
)
def test_bad_input_is_refused_and_twin_unchanged(
    api: httpx.Client, body: bytes, status: int, code: str
) -> None:
    twin_id = new_id()
    put(api, twin_id, {"desired": {"keep": 1}})
    response = api.put(
        f"/api/v1/twins/{twin_id}", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == status, response.text
    assert response.json()["error"] == code
    doc = api.get(f"/api/v1/twins/{twin_id}").json()
    assert doc["desired"] == {"keep": 1} and doc["revision"] == 1


@pytest.mark.parametrize(
    ("headers", "body", "code", "message"),
    [
        (MERGE, {"foo": 1}, "twin.invalid", "Unknown field(s): foo."),
        (JSON_PATCH, [{"op": "add", "path": "/foo", "value": 1}], "twin.invalid",
         "Unknown field(s): foo."),
        (MERGE, {"revision": 3}, "twin.readonly", "Field(s) revision cannot be written."),
        (JSON_PATCH, [{"op": "add", "path": "/delta", "value": {}}], "twin.readonly",
         "Field(s) delta cannot be written."),
    ],
)  # fmt: skip
def test_a_patch_of_an_unknown_field_is_invalid_as_a_put_of_one_is(
    api: httpx.Client, headers: dict[str, str], body: object, code: str, message: str
) -> None:
    """A PUT of ``{"foo": 1}`` was 400 twin.invalid but a PATCH of it twin.readonly, the
    code of the fields the service maintains (docs/errors.md)."""
    twin_id = new_id()
    put(api, twin_id, {"desired": {"keep": 1}})
    response = api.patch(f"/api/v1/twins/{twin_id}", json=body, headers=headers)
    assert response.status_code == 400, response.text
    assert (response.json()["error"], response.json()["message"]) == (code, message)
    assert api.get(f"/api/v1/twins/{twin_id}").json()["revision"] == 1


_DEEP = b"[" * 600 + b"]" * 600  # 1.2 kB; the JSON decoder reads it (it stops near 1,000)


@pytest.mark.parametrize(
    ("method", "suffix", "content_type", "body"),
    [
        ("PATCH", "", "application/merge-patch+json", b'{"desired": {"a": ' + _DEEP + b"}}"),
        ("PATCH", "", "application/json-patch+json",
         b'[{"op": "add", "path": "/desired/a", "value": ' + _DEEP + b"}]"),
        ("PUT", "/desired/a", "application/json", _DEEP),
        ("PATCH", "/desired", "application/merge-patch+json", b'{"a": ' + _DEEP + b"}"),
    ],
)  # fmt: skip
def test_values_nested_hundreds_deep_are_refused_before_any_work(
    api: httpx.Client, method: str, suffix: str, content_type: str, body: bytes
) -> None:
    """Copying a merge patch's array recursed past Python's limit (a 500) before the depth
    limit was checked on the result; such values are refused as they are decoded."""
    twin_id = new_id()
    put(api, twin_id, {"desired": {"keep": 1}})
    response = api.request(
        method,
        f"/api/v1/twins/{twin_id}{suffix}",
        content=body,
        headers={"Content-Type": content_type},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "limits.exceeded"
    assert "nested deeper than 128 levels" in response.json()["message"]
    doc = api.get(f"/api/v1/twins/{twin_id}").json()
    assert doc["desired"] == {"keep": 1} and doc["revision"] == 1


@pytest.mark.parametrize("tokens", [129, 3000])
@pytest.mark.parametrize(
    ("method", "content_type", "body"),
    [
        ("PUT", "application/json", b"{}"),
        ("PATCH", "application/merge-patch+json", b"{}"),
        ("PATCH", "application/merge-patch+json", b"null"),
        ("DELETE", None, None),
    ],
)
def test_a_pointer_deeper_than_the_limit_is_refused(
    api: httpx.Client, tokens: int, method: str, content_type: str | None, body: bytes | None
) -> None:
    """Making each missing parent recursed once per token: a 500 at 3,000 tokens. A merge
    ``null`` there, with nothing to delete, skipped the limit (204 and a new revision), and
    a DELETE was 404: every write past 128 tokens is 400 limits.exceeded (docs/errors.md)."""
    twin_id = new_id()
    put(api, twin_id, {"desired": {"keep": 1}})
    response = api.request(
        method,
        f"/api/v1/twins/{twin_id}/desired" + "/keep" * tokens,
        content=body,
        headers={"Content-Type": content_type} if content_type else {},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "limits.exceeded"
    assert response.json()["limit"] == 128
    assert api.get(f"/api/v1/twins/{twin_id}").json()["revision"] == 1


def test_small_patch_making_twin_too_large_is_413(api: httpx.Client) -> None:
    twin_id = new_id()
    put(api, twin_id, {"live": {"a": "x" * 40_000}})
    response = api.patch(
        f"/api/v1/twins/{twin_id}",
        content=b'{"live": {"b": "' + b"y" * 30_000 + b'"}}',
        headers=MERGE,
    )
    assert response.status_code == 413
    body = response.json()
    assert body["limit"] == 65536 and body["size"] > 65536
    assert api.get(f"/api/v1/twins/{twin_id}").json()["revision"] == 1


def test_a_json_patch_that_doubles_the_twin_is_refused_at_the_limit(api: httpx.Client) -> None:
    """Each copy doubled the array, and the size was checked only after the last operation:
    25 copies of a 4 kB array (a body under 2 kB) would have built 130 GB on the event loop
    before the final replace made the twin small again. The limit holds after every
    operation, so the patch stops at the fifth copy; one not refused would never finish."""
    twin_id = new_id()
    put(api, twin_id, {"desired": {"v": list(range(1000))}})
    ops: list[dict[str, object]] = [
        {"op": "copy", "from": "/desired/v", "path": "/desired/v/-"} for _ in range(25)
    ]
    ops.append({"op": "replace", "path": "/desired/v", "value": 1})
    response = api.patch(f"/api/v1/twins/{twin_id}", json=ops, headers=JSON_PATCH)
    assert response.status_code == 413, response.text
    body = response.json()
    assert body["error"] == "twin.toolarge"
    assert body["limit"] == 65536 and 65536 < body["size"] <= 2 * 65536, body
    doc = api.get(f"/api/v1/twins/{twin_id}").json()
    assert doc["desired"] == {"v": list(range(1000))} and doc["revision"] == 1


def test_a_json_patch_of_more_than_1000_operations_is_refused(api: httpx.Client) -> None:
    """1,000 are allowed (limits.max_patch_operations), one more is refused, twin unchanged."""
    twin_id = new_id()
    put(api, twin_id, {"desired": {"n": 0}})
    op = {"op": "test", "path": "/desired/n", "value": 0}
    url = f"/api/v1/twins/{twin_id}"
    assert api.patch(url, json=[op] * 1000, headers=JSON_PATCH).status_code == 200
    response = api.patch(url, json=[op] * 1001, headers=JSON_PATCH)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "limits.exceeded" and response.json()["limit"] == 1000
    assert api.get(url).json()["desired"] == {"n": 0}


@pytest.mark.parametrize(
    "twin_id",
    [
        "noseparator",
        "org.acme:with/slash",
        "1bad.ns:x",
        "org..acme:x",
        "org.acme:",
        "a:" + "x" * 300,
    ],
)
def test_invalid_twin_ids(api: httpx.Client, twin_id: str) -> None:
    response = api.put(f"/api/v1/twins/{twin_id}", json={})
    # A '/' makes the rest a sub-resource of the twin, and no twin has one of that name.
    expected = (404, "resource.notfound") if "/" in twin_id else (400, "twin.id.invalid")
    assert (response.status_code, response.json()["error"]) == expected


def test_authentication_and_roles(service: ServiceProcess) -> None:
    twin_id = new_id()
    with service.client(token="") as anonymous:
        response = anonymous.get(f"/api/v1/twins/{twin_id}")
        assert response.status_code == 401 and response.json()["error"] == "auth.required"
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert anonymous.get("/health").status_code == 200
    with service.client(token="wrong-token-wrong-token") as wrong:
        assert wrong.get(f"/api/v1/twins/{twin_id}").status_code == 401
    with service.client(token=READER_TOKEN) as reader:
        denied = reader.put(f"/api/v1/twins/{twin_id}", json={})
        assert denied.status_code == 403 and denied.json()["error"] == "auth.forbidden"
        assert reader.get(f"/api/v1/twins/{twin_id}").status_code == 404


def test_namespace_restricted_token(service: ServiceProcess) -> None:
    from tests.service_process import ACME_TOKEN

    with service.client(token=ACME_TOKEN) as acme:
        assert acme.put(f"/api/v1/twins/{new_id('org.acme')}", json={}).status_code == 201
        assert acme.put(f"/api/v1/twins/{new_id('org.other')}", json={}).status_code == 403


def test_metrics_are_the_readiness_figures(service: ServiceProcess) -> None:
    """Prometheus scrapes /metrics without a token; its figures are /ready's."""
    with service.client() as api:
        for _ in range(3):
            twin_id = f"org.metrics:t{uuid.uuid4().hex[:8]}"
            assert api.put(f"/api/v1/twins/{twin_id}", json={}).is_success
    with service.client(token="") as anonymous:
        response = anonymous.get("/metrics")
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        committed = anonymous.get("/ready").json()["checks"]["store"]["writes"]["committed"]
    assert committed >= 3  # the shared service takes other tests' writes too
    values = dict(
        line.rsplit(" ", 1) for line in response.text.splitlines() if not line.startswith("#")
    )
    assert int(values["twin_service_store_writes_committed_total"]) <= committed
    assert int(values["twin_service_store_writes_committed_total"]) >= 3
    assert values['twin_service_check_up{check="store"}'] == "1"
    assert values["twin_service_starting"] == "0"


def _request_counts(client: httpx.Client) -> dict[str, float]:
    text = client.get("/metrics").text
    return {
        key: float(value)
        for key, value in (line.rsplit(" ", 1) for line in text.splitlines() if line[0] != "#")
        if key.startswith("twin_service_http_request")
    }


def test_metrics_count_requests_by_route_and_status(service: ServiceProcess) -> None:
    """Requests served ahead of FastAPI (whole-twin GET) and through it are counted under
    the same route template; an unknown path under ``unmatched``, not its own path."""
    twin_id = f"org.metrics:r{uuid.uuid4().hex[:8]}"
    twin = "/api/v1/twins/{twin_id}"
    with service.client(token="") as anonymous, service.client() as api:
        before = _request_counts(anonymous)
        assert api.put(f"/api/v1/twins/{twin_id}", json={}).status_code == 201
        for _ in range(2):
            assert api.get(f"/api/v1/twins/{twin_id}").status_code == 200
        assert api.get("/api/v1/twins/org.metrics:nobody").status_code == 404
        assert api.get(f"/api/v1/twins/{twin_id}/desired").status_code == 200
        assert api.get(f"/api/v1/nothing/{twin_id}").status_code == 404
        after = _request_counts(anonymous)

    def more(key: str) -> float:
        return after.get(key, 0) - before.get(key, 0)

    total = "twin_service_http_requests_total"
    assert more(f'{total}{{method="PUT",route="{twin}",status="201"}}') == 1
    assert more(f'{total}{{method="GET",route="{twin}",status="200"}}') == 2
    assert more(f'{total}{{method="GET",route="{twin}",status="404"}}') == 1
    section = "/api/v1/twins/{twin_id}/{section}"
    assert more(f'{total}{{method="GET",route="{section}",status="200"}}') == 1
    assert more(f'{total}{{method="GET",route="unmatched",status="404"}}') == 1
    assert not any(twin_id in key for key in after)
    count = 'twin_service_http_request_duration_seconds_count{method="GET",route="%s"}'
    assert more(count % twin) == 3
    assert more(count % "/metrics") == 1  # the first scrape; the second ends after its body


def test_health_ready_and_openapi(service: ServiceProcess) -> None:
    with service.client(token="") as client:
        assert client.get("/health").json()["status"] == "ok"
        ready = client.get("/ready")
        assert ready.status_code == 200 and ready.json()["checks"]["store"]["status"] == "up"
        only_store = client.get("/ready", params={"require": "store"})
        assert only_store.status_code == 200
        assert only_store.json()["checks"].keys() == ready.json()["checks"].keys()
        unknown = client.get("/ready", params={"require": "store,elastic"})
        assert unknown.status_code == 400, unknown.text
        assert unknown.json()["error"] == "request.invalid"
        assert "elastic" in unknown.json()["message"]
        spec = client.get("/openapi.json").json()
        put_twin = spec["paths"]["/api/v1/twins/{twin_id}"]["put"]
        assert {"201", "400", "401", "403", "412", "413", "415"} <= set(put_twin["responses"])
        (if_none_match,) = [p for p in put_twin["parameters"] if p["name"] == "If-None-Match"]
        assert if_none_match["schema"]["enum"] == ["*"]  # the only value a write takes
        get_twin = spec["paths"]["/api/v1/twins/{twin_id}"]["get"]
        assert {(p["in"], p["name"]) for p in get_twin["parameters"]} == {
            ("path", "twin_id"),
            ("query", "fields"),
            ("query", "at"),
            ("header", "If-Match"),
            ("header", "If-None-Match"),
        }
        assert "412" in get_twin["responses"]
        # With fields, a twin is only the selected parts: documented as such.
        ok = get_twin["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok["anyOf"] == [
            {"$ref": "#/components/schemas/TwinDocument"},
            {"$ref": "#/components/schemas/TwinSelection"},
        ]
        schemas = spec["components"]["schemas"]
        assert "required" not in schemas["TwinSelection"]
        # Written out beside TwinDocument: the two must name the same properties.
        assert schemas["TwinSelection"]["properties"].keys() == (
            schemas["TwinDocument"]["properties"].keys()
        )
        (twin_id,) = [p for p in get_twin["parameters"] if p["name"] == "twin_id"]
        assert twin_id["schema"]["pattern"] == TWIN_ID_PATTERN
        assert twin_id["schema"]["maxLength"] == 256
        # The token is one security scheme for every operation, not a header parameter.
        assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        assert spec["security"] == [{"bearer": []}]
        # Invalid parameters are answered 400 in the one error body, never 422; and every
        # operation of the API can meet an unavailable store (503, with Retry-After), and
        # every write a twin that changes too fast (409 twin.contention).
        operations = [
            (method, path, op)
            for path, item in spec["paths"].items()
            for method, op in item.items()
            if path.startswith("/api/v1/")
        ]
        assert len(operations) > 15
        for method, path, op in operations:
            responses = op["responses"]
            assert "422" not in responses, (method, path)
            assert "Retry-After" in responses["503"]["headers"], (method, path)
            if method in ("put", "patch", "delete") and path.startswith("/api/v1/twins/"):
                assert "409" in responses, (method, path)
        assert "HTTPValidationError" not in schemas
        assert spec["paths"]["/health"]["get"]["security"] == []
        assert not [
            p
            for path in spec["paths"].values()
            for op in path.values()
            for p in op.get("parameters", [])
            if p["name"].lower() == "authorization"
        ]
        assert client.get("/docs").status_code == 200


#: One past the largest sequence number or revision a store holds (SQLite INTEGER, BSON
#: int64): it used to reach the store's query, a 500.
TOO_BIG = str(2**63)


@pytest.mark.parametrize(
    ("path", "params", "headers"),
    [
        ("/api/v1/twins/org.big:t/history", {"since": TOO_BIG}, {}),
        ("/api/v1/twins/org.big:t/history", {"until": TOO_BIG}, {}),
        ("/api/v1/twins/org.big:t", {"at": TOO_BIG}, {}),
        ("/api/v1/stream/twins", {"since": TOO_BIG}, {}),
        ("/api/v1/stream/twins", {}, {"Last-Event-ID": TOO_BIG}),
        # A digit to str.isdigit, not to int().
        ("/api/v1/stream/twins", {}, {"Last-Event-ID": b"\xb2"}),
        # More digits than int() converts (4,300): waitFor was a 500.
        ("/api/v1/search/twins", {"waitFor": "9" * 5000}, {}),
        ("/api/v1/stream/twins", {}, {"Last-Event-ID": "9" * 5000}),
    ],
)
def test_sequence_numbers_no_store_can_hold_are_a_400(
    service: ServiceProcess,
    path: str,
    params: dict[str, str],
    headers: dict[str, str | bytes],
) -> None:
    with service.client() as api:
        assert api.put("/api/v1/twins/org.big:t", json={}).is_success
        response = api.get(path, params=params, headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "request.invalid"


@pytest.mark.parametrize(
    ("path", "query"),
    [
        # Starlette decodes the escapes with replacement characters: these searched for
        # U+FFFD and answered 200, and fields= selected a member no twin has.
        ("/api/v1/search/twins", 'filter=eq(attributes/site,"%FF")'),
        ("/api/v1/search/twins/count", 'filter=eq(attributes/site,"%C3")'),
        ("/api/v1/twins/org.q:t", "fields=desired/%FF"),  # the hot route
        ("/api/v1/twins/org.q:t/desired", "fields=a%E2%82"),  # a cut sequence
        ("/api/v1/stream/twins", "namespaces=org.q%80"),
    ],
)
def test_a_query_whose_escapes_are_not_utf8_is_a_400(
    service: ServiceProcess, path: str, query: str
) -> None:
    with service.client() as api:
        assert api.put("/api/v1/twins/org.q:t", json={"attributes": {"site": "\ufffd"}}).is_success
        response = api.get(f"{path}?{query}")
        assert response.status_code == 400, response.text
        assert response.json()["message"] == "The query string is not valid percent-encoded UTF-8."
        # Escapes of UTF-8 still decode (U+00E9, then U+FFFD itself).
        for site in ("%C3%A9", "%EF%BF%BD"):
            found = api.get(f'/api/v1/search/twins/count?filter=eq(attributes/site,"{site}")')
            assert found.status_code == 200, found.text
        assert found.json() == {"count": 1}


@pytest.mark.parametrize("revision", [b"\xb2", b"9" * 5000])
def test_an_etag_with_digits_int_refuses_is_not_ours(
    service: ServiceProcess, revision: bytes
) -> None:
    """``²`` is a digit to ``str.isdigit`` but not to ``int``, and ``int`` refuses more
    than 4,300 digits: If-Match and If-None-Match with such a ``"rev:N"`` were a 500."""
    tag = b'"rev:' + revision + b'"'
    merge = {"Content-Type": "application/merge-patch+json"}
    twin = "/api/v1/twins/org.big:etag"
    with service.client() as api:
        put = api.put(twin, json={})
        assert put.is_success
        write = api.patch(twin, json={"desired": {"a": 1}}, headers={"If-Match": tag, **merge})
        delete = api.delete(twin, headers={"If-Match": tag})
        read = api.get(twin, headers={"If-None-Match": tag})
        assert api.get(twin).json()["revision"] == put.json()["revision"]
    # Well-formed tags that this service never sends: they match nothing (RFC 9110 13.1.1).
    for refused in (write, delete):
        assert refused.status_code == 412, refused.text
        assert "no strong ETag of this service" in refused.json()["message"]
    assert read.status_code == 200, read.text
