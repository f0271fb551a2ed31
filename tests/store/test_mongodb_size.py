"""A twin whose stored form in MongoDB would be too large is refused before anything is taken
for its write (a claim on FerretDB, a sequence number): the twin stays as it was and its
next write goes through at once.

The stored form is many times the twin's JSON (a search field named by the full path of
every node), so a twin of 8 KB nested 14 deep under 250-character keys was over BSON's
16 MiB: the driver refused the update after the claim and the seq were taken, the request
answered 500 and the twin was blocked for the claim's lease."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.servers.ferretdb import FerretDB
from tests.service_fixtures import mongodb_env
from tests.service_process import ServiceProcess
from tests.store.contract import change
from tests.store_fixtures import StoreFactory, raw_database
from twin_service.errors import PayloadTooLarge
from twin_service.types import JSONObject

on_mongodb = pytest.mark.parametrize("store_factory", ["mongodb"], indirect=True)


def deep(depth: int, leaves: int) -> JSONObject:
    """``leaves`` numbers under ``depth`` levels of 250-character keys: about 15 KB of JSON
    for 14 and 1200, whose paths make 17 MB of search fields."""
    node: JSONObject = {f"k{i:03d}": 0 for i in range(leaves)}
    for level in range(depth):
        node = {chr(ord("a") + level) * 250: node}
    return node


async def claims_of(url: str, database: str, twin_id: str) -> list[dict[str, Any]]:
    async with raw_database(url, database) as db:
        return await db.claims.find({"_id": {"$regex": f"^{twin_id}@"}}).to_list()


@on_mongodb
async def test_a_twin_too_large_to_store_is_refused_before_its_write_takes_anything(
    store_factory: StoreFactory, ferretdb_server: FerretDB, unique_name: str
) -> None:
    # A gap timeout of 10 minutes: a claim or a seq left behind would keep the next write
    # (its claim's lease) and the journal's watermark (the gap) waiting far beyond the test.
    store = await store_factory(gap_timeout_seconds=600)
    twin_id = "org.acme:deep"
    first = await store.write(change(None, twin_id, {"desired": {"n": 0}}))
    current = await store.get(twin_id)
    assert current is not None
    claims_before = await claims_of(ferretdb_server.url, unique_name, twin_id)

    with pytest.raises(PayloadTooLarge) as refused:
        await store.write(change(current, twin_id, {"desired": deep(14, 1200)}))
    assert refused.value.code == "twin.toolarge"
    assert "mongodb.max_document_bytes" in refused.value.message

    assert await store.get(twin_id) == current
    assert await claims_of(ferretdb_server.url, unique_name, twin_id) == claims_before
    # Nothing was taken: the next write needs no lease to lapse, and the journal's
    # watermark reaches it with no gap to wait out.
    second = await store.write(change(current, twin_id, {"desired": {"n": 1}}))
    twin = await store.get(twin_id)
    assert twin is not None and twin.desired == {"n": 1} and twin.revision == 2
    assert await store.last_seq() >= second > first


@on_mongodb
async def test_the_default_bound_takes_twins_of_the_default_limits_not_amplified_ones(
    store_factory: StoreFactory,
) -> None:
    """Near ``limits.max_twin_bytes`` (64 KiB) in one-level leaves, about 1.6 MB stored, is
    taken; 8 KB nested 14 deep under long keys, about 7 MB stored (what kept FerretDB busy
    for seconds per write and every search scanning it after), is refused."""
    # The flat twin's commit takes FerretDB more than the fixture's bound of 1.6 s at times.
    store = await store_factory(gap_timeout_seconds=600)
    flat: JSONObject = {"desired": {f"k{i:04d}": i for i in range(5000)}}
    await store.write(change(None, "org.acme:flat", flat))
    with pytest.raises(PayloadTooLarge):
        await store.write(change(None, "org.acme:deep", {"desired": deep(14, 500)}))
    assert await store.get("org.acme:deep") is None


@on_mongodb
async def test_the_bound_is_a_setting(store_factory: StoreFactory) -> None:
    """A twin of a few hundred leaves fits the default bound, and not one of 64 KiB."""
    twin_id = "org.acme:bounded"
    values: JSONObject = {"desired": {f"k{i:03d}": i for i in range(300)}}
    roomy = await store_factory()
    await roomy.write(change(None, twin_id, values))
    tight = await store_factory(max_document_bytes=64 * 1024)
    with pytest.raises(PayloadTooLarge):
        await tight.write(change(None, twin_id + "2", values))


def test_the_service_answers_413_and_the_twin_stays_writable(
    ferretdb_server: FerretDB, service_factory: Callable[..., ServiceProcess], unique_name: str
) -> None:
    env = mongodb_env(ferretdb_server.url, unique_name)
    env["TWIN_MONGODB__GAP_TIMEOUT_SECONDS"] = "600"  # a claim left behind: a 15 min lease
    proc = service_factory(env=env)
    twin_id = "org.acme:deep"
    with proc.client() as api:
        assert api.put(f"/api/v1/twins/{twin_id}", json={"desired": {"n": 0}}).status_code == 201
        body = json.dumps({"desired": deep(14, 1200)})
        response = api.put(
            f"/api/v1/twins/{twin_id}",
            content=body,
            headers={"Content-Type": "application/json"},
            timeout=120,
        )
        assert response.status_code == 413, response.text
        error = response.json()
        assert error["error"] == "twin.toolarge"
        assert "stored form in MongoDB" in error["message"]
        twin = api.get(f"/api/v1/twins/{twin_id}").json()
        assert twin["desired"] == {"n": 0} and twin["revision"] == 1
        # The claim's lease of 15 minutes would make this time out had the claim stayed.
        assert api.put(f"/api/v1/twins/{twin_id}/desired/n", json=1).status_code == 204
        assert api.get(f"/api/v1/twins/{twin_id}").json()["desired"] == {"n": 1}
    assert "Traceback" not in proc.log_tail(100_000)
