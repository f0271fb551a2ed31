"""``condition=<RQL>`` on writes, against the real service process.

The condition is evaluated on the current twin inside the compare-and-set loop: when it does
not hold the write is refused with 412 ``twin.condition.failed`` and nothing changes.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.service_process import ServiceProcess

MERGE = {"Content-Type": "application/merge-patch+json"}
JSON_PATCH = {"Content-Type": "application/json-patch+json"}
INITIAL: dict[str, Any] = {
    "attributes": {"owner": "none", "site": "plant1", "serial": 7},
    "desired": {"fan": {"speed": 3}},
    "reported": {"fan": {"speed": 2}},
}
HOLDS = 'and(eq(attributes/site,"plant1"),exists(delta/fan/speed),lt(attributes/serial,10))'
FAILS = 'and(eq(attributes/site,"plant1"),gt(attributes/serial,10))'

Write = Callable[[httpx.Client, str, dict[str, str]], httpx.Response]


def new_twin(api: httpx.Client) -> str:
    twin_id = f"org.t{uuid.uuid4().hex[:12]}:c"
    response = api.put(f"/api/v1/twins/{twin_id}", json=INITIAL)
    assert response.status_code == 201, response.text
    return twin_id


def url(twin_id: str, rest: str = "") -> str:
    return f"/api/v1/twins/{twin_id}{rest}"


WRITES: dict[str, Write] = {
    "put twin": lambda api, t, q: api.put(url(t), params=q, json={"attributes": {"owner": "me"}}),
    "merge patch twin": lambda api, t, q: api.patch(
        url(t), params=q, content=b'{"attributes": {"owner": "me"}}', headers=MERGE
    ),
    "json patch twin": lambda api, t, q: api.patch(
        url(t),
        params=q,
        json=[{"op": "replace", "path": "/attributes/owner", "value": "me"}],
        headers=JSON_PATCH,
    ),
    "delete twin": lambda api, t, q: api.delete(url(t), params=q),
    "put section": lambda api, t, q: api.put(url(t, "/attributes"), params=q, json={"x": 1}),
    "put pointer": lambda api, t, q: api.put(url(t, "/desired/fan/speed"), params=q, json=9),
    "put new pointer": lambda api, t, q: api.put(url(t, "/live/rpm"), params=q, json=100),
    "merge patch section": lambda api, t, q: api.patch(
        url(t, "/desired"), params=q, content=b'{"led": "red"}', headers=MERGE
    ),
    "merge patch pointer": lambda api, t, q: api.patch(
        url(t, "/desired/fan"), params=q, content=b'{"speed": null}', headers=MERGE
    ),
    "delete section": lambda api, t, q: api.delete(url(t, "/reported"), params=q),
    "delete pointer": lambda api, t, q: api.delete(url(t, "/attributes/site"), params=q),
}
SUCCESS = {"delete twin": 204, "put twin": 200, "merge patch twin": 200, "json patch twin": 200}


def body_of(api: httpx.Client, twin_id: str) -> dict[str, Any]:
    response = api.get(url(twin_id))
    assert response.status_code == 200, response.text
    doc: dict[str, Any] = response.json()
    return doc


@pytest.mark.parametrize("write", WRITES)
def test_condition_that_fails_leaves_the_twin_unchanged(api: httpx.Client, write: str) -> None:
    twin_id = new_twin(api)
    before = body_of(api, twin_id)
    response = WRITES[write](api, twin_id, {"condition": FAILS})
    assert response.status_code == 412, response.text
    body = response.json()
    assert body["status"] == 412 and body["error"] == "twin.condition.failed"
    assert body_of(api, twin_id) == before


@pytest.mark.parametrize("write", WRITES)
def test_condition_that_holds_lets_the_write_through(api: httpx.Client, write: str) -> None:
    twin_id = new_twin(api)
    response = WRITES[write](api, twin_id, {"condition": HOLDS})
    assert response.status_code == SUCCESS.get(write, response.status_code), response.text
    assert response.status_code in (200, 201, 204), response.text
    after = api.get(url(twin_id))
    if write == "delete twin":
        assert after.status_code == 404
    else:
        assert after.json()["revision"] == 2


@pytest.mark.parametrize("write", WRITES)
@pytest.mark.parametrize(
    ("condition", "code", "position"),
    [
        ("eq(attributes/owner,", "rql.syntax", 20),
        ('eq(attributes/owner,"none") junk', "rql.syntax", 28),
        ("", "rql.syntax", 0),
        ("eq(owner,1)", "rql.invalid", None),
        ("gt(attributes/serial,null)", "rql.invalid", None),
    ],
)
def test_bad_condition_is_400_and_twin_unchanged(
    api: httpx.Client, write: str, condition: str, code: str, position: int | None
) -> None:
    twin_id = new_twin(api)
    before = body_of(api, twin_id)
    response = WRITES[write](api, twin_id, {"condition": condition})
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"] == code
    if position is not None:
        assert body["position"] == position
    assert body_of(api, twin_id) == before


def test_condition_on_a_missing_twin_never_holds(api: httpx.Client) -> None:
    twin_id = f"org.t{uuid.uuid4().hex[:12]}:missing"
    response = api.put(url(twin_id), params={"condition": "not(exists(attributes))"}, json={})
    assert response.status_code == 412
    assert response.json()["error"] == "twin.condition.failed"
    assert api.get(url(twin_id)).status_code == 404


def test_condition_sees_the_whole_current_twin(api: httpx.Client) -> None:
    twin_id = new_twin(api)
    ns = twin_id.split(":")[0]
    checks = [
        (f'eq(twinId,"{twin_id}")', True),
        (f'eq(namespace,"{ns}")', True),
        ('eq(connection/status,"unknown")', True),
        ("eq(delta/fan/speed,3)", True),
        ("eq(reported/fan/speed,3)", False),
        ('ne(attributes/missing,"x")', False),
        ('not(eq(attributes/missing,"x"))', True),
        ('eq(lifecycle/fan~1speed/state,"pending")', True),
        ('eq(lifecycle/fan~1speed/state,"applied")', False),
        ('like(attributes/owner,"n*e")', True),
        ('ilike(attributes/site,"PLANT?")', True),
        ("in(attributes/serial,1,7.0)", True),
        ("or(exists(live),exists(attributes/serial))", True),
    ]
    for condition, holds in checks:
        response = api.patch(
            url(twin_id), params={"condition": condition}, content=b"{}", headers=MERGE
        )
        assert response.status_code == (200 if holds else 412), (condition, response.text)
    revision = body_of(api, twin_id)["revision"]
    for guess in (revision - 1, revision + 1, revision):
        response = api.put(
            url(twin_id, "/live/n"), params={"condition": f"eq(revision,{guess})"}, json=guess
        )
        assert response.status_code == (201 if guess == revision else 412), response.text


def test_condition_with_if_match_both_must_hold(api: httpx.Client) -> None:
    twin_id = new_twin(api)
    holds = {"condition": 'eq(attributes/owner,"none")'}
    stale = api.put(
        url(twin_id, "/attributes/owner"), params=holds, json="a", headers={"If-Match": '"rev:9"'}
    )
    assert stale.status_code == 412 and stale.json()["error"] == "twin.precondition.failed"
    fails = {"condition": 'eq(attributes/owner,"other")'}
    current = api.put(
        url(twin_id, "/attributes/owner"), params=fails, json="a", headers={"If-Match": '"rev:1"'}
    )
    assert current.status_code == 412 and current.json()["error"] == "twin.condition.failed"
    ok = api.put(
        url(twin_id, "/attributes/owner"), params=holds, json="a", headers={"If-Match": '"rev:1"'}
    )
    assert ok.status_code == 204 and ok.headers["ETag"] == '"rev:2"'


def test_create_a_key_only_if_it_is_absent(api: httpx.Client) -> None:
    """What docs/api.md gives for create-only on a pointer, where ``If-None-Match: *`` is
    about the twin (which exists) rather than the key."""
    twin_id = new_twin(api)
    absent = {"condition": "not(exists(desired/mode))"}
    first = api.put(url(twin_id, "/desired/mode"), params=absent, json="eco")
    assert first.status_code == 201, first.text
    again = api.put(url(twin_id, "/desired/mode"), params=absent, json="boost")
    assert again.status_code == 412 and again.json()["error"] == "twin.condition.failed"
    star = api.put(url(twin_id, "/desired/other"), json=1, headers={"If-None-Match": "*"})
    assert star.status_code == 412 and star.json()["error"] == "twin.precondition.failed"
    assert api.get(url(twin_id, "/desired")).json() == {"fan": {"speed": 3}, "mode": "eco"}


def test_condition_on_an_url_with_encoded_characters(api: httpx.Client) -> None:
    twin_id = new_twin(api)
    condition = 'and(eq(attributes/site , "plant1"),like(attributes/owner,"n?n*"))'
    raw = httpx.QueryParams({"condition": condition})
    response = api.put(f"{url(twin_id, '/attributes/owner')}?{raw}", json="me")
    assert response.status_code == 204, response.text


@pytest.mark.parametrize("kind", ["merge patch", "put pointer", "json patch"])
def test_concurrent_conditional_writes_exactly_one_wins(
    service: ServiceProcess, api: httpx.Client, kind: str
) -> None:
    twin_id = new_twin(api)
    writers = 24

    async def claim(client: httpx.AsyncClient, me: str) -> int:
        params = {"condition": 'eq(attributes/owner,"none")'}
        if kind == "merge patch":
            body = f'{{"attributes": {{"owner": "{me}"}}}}'.encode()
            response = await client.patch(url(twin_id), params=params, content=body, headers=MERGE)
        elif kind == "put pointer":
            response = await client.put(url(twin_id, "/attributes/owner"), params=params, json=me)
        else:
            ops = [{"op": "replace", "path": "/attributes/owner", "value": me}]
            response = await client.patch(url(twin_id), params=params, json=ops, headers=JSON_PATCH)
        if response.status_code == 412:
            assert response.json()["error"] == "twin.condition.failed"
        return response.status_code

    async def main() -> list[int]:
        async with service.async_client() as client:
            return await asyncio.gather(*(claim(client, f"w{i}") for i in range(writers)))

    statuses = asyncio.run(main())
    wins = [f"w{i}" for i, status in enumerate(statuses) if status in (200, 204)]
    assert len(wins) == 1, statuses
    assert statuses.count(412) == writers - 1, statuses
    doc = body_of(api, twin_id)
    assert doc["attributes"]["owner"] == wins[0]
    assert doc["revision"] == 2
    assert api.get(url(twin_id, "/attributes/owner")).json() == wins[0]
