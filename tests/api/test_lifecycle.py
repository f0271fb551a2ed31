"""The desired lifecycle through the REST API: pending, applied, expired (TTL), searchable."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.servers.ferretdb import FerretDB
from tests.service_fixtures import mongodb_env
from tests.service_process import ServiceProcess

MERGE = {"Content-Type": "application/merge-patch+json"}


def test_pending_applied_expired_and_search(api: httpx.Client) -> None:
    twin = f"org.acme:lc-{uuid.uuid4().hex[:8]}"
    doc = api.put(f"/api/v1/twins/{twin}", json={"desired": {"fan": {"speed": 3}}}).json()
    assert doc["lifecycle"]["fan/speed"]["state"] == "pending"
    assert doc["lifecycle"]["fan/speed"]["desiredVersion"] == 1
    # 3 s: the steps before the expiry must run within it (at 0.3 s a busy machine expired
    # the key before the revision below was read).
    response = api.put(f"/api/v1/twins/{twin}/desired/led", params={"ttl": 3}, json="blue")
    assert response.status_code == 201
    led = api.get(f"/api/v1/twins/{twin}/lifecycle").json()["led"]
    assert led["state"] == "pending" and led["expires"] > led["since"]
    reported = api.patch(
        f"/api/v1/twins/{twin}", content=b'{"reported": {"fan": {"speed": 3.0}}}', headers=MERGE
    ).json()
    assert reported["lifecycle"]["fan/speed"]["state"] == "applied"
    assert reported["delta"] == {"led": "blue"}
    # The sweeper commits the expiry when it falls due, without any other write.
    revision = api.get(f"/api/v1/twins/{twin}").json()["revision"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.05)
        doc = api.get(f"/api/v1/twins/{twin}").json()
        if doc["lifecycle"]["led"]["state"] == "expired":
            break
    assert doc["lifecycle"]["led"]["state"] == "expired"
    assert doc["revision"] == revision + 1
    history = api.get(f"/api/v1/twins/{twin}/history", params={"since": revision + 1}).json()
    assert history["items"][0]["origin"] == "system"
    changes = history["items"][0]["changes"]
    assert set(changes) == {"lifecycle"}
    assert changes["lifecycle"]["led"]["state"] == "expired"
    found = api.get(
        "/api/v1/search/twins",
        params={"filter": 'eq(lifecycle/led/state,"expired")', "namespaces": "org.acme"},
    ).json()["items"]
    assert twin in [item["twinId"] for item in found]
    bad = api.put(f"/api/v1/twins/{twin}/desired/x", params={"ttl": -1}, json=1)
    assert bad.status_code == 400


def test_a_time_to_live_is_at_most_a_century(api: httpx.Client) -> None:
    """Further, the expiry time did not fit a timestamp (1e300 s: a 500, OverflowError)."""
    twin = f"org.acme:ttl-{uuid.uuid4().hex[:8]}"
    century = 100 * 365 * 24 * 3600
    for ttl in ("1e300", str(century + 1)):
        bad = api.put(f"/api/v1/twins/{twin}", params={"ttl": ttl}, json={"desired": {"x": 1}})
        assert bad.status_code == 400, bad.text
        assert "ttl" in bad.json()["message"]
    assert api.get(f"/api/v1/twins/{twin}").status_code == 404  # nothing written
    put = api.put(f"/api/v1/twins/{twin}", params={"ttl": century}, json={"desired": {"x": 1}})
    assert put.status_code == 201, put.text
    expires = put.json()["lifecycle"]["x"]["expires"]
    assert int(expires[:4]) - int(put.json()["modified"][:4]) in (99, 100)


def test_a_value_written_again_with_a_longer_ttl_expires_at_the_later_time(
    api: httpx.Client,
) -> None:
    """The sweep scheduled for the first time to live finds nothing due, and schedules the
    second (the sweeper keeps one sweep per twin, the earliest)."""
    twin = f"org.acme:lc-{uuid.uuid4().hex[:8]}"
    api.put(f"/api/v1/twins/{twin}", json={"desired": {}})
    api.put(f"/api/v1/twins/{twin}/desired/led", params={"ttl": 0.4}, json="blue")
    second = api.put(f"/api/v1/twins/{twin}/desired/led", params={"ttl": 2.0}, json="red")
    assert second.status_code == 204, second.text
    expires = api.get(f"/api/v1/twins/{twin}/lifecycle").json()["led"]["expires"]
    time.sleep(1.0)  # the first time to live is over
    assert api.get(f"/api/v1/twins/{twin}/lifecycle").json()["led"]["state"] == "pending"
    deadline = time.monotonic() + 10
    while (led := api.get(f"/api/v1/twins/{twin}/lifecycle").json()["led"])["state"] != "expired":
        assert time.monotonic() < deadline, led
        time.sleep(0.05)
    history = api.get(f"/api/v1/twins/{twin}/history", params={"since": 1}).json()["items"]
    expiry = [item for item in history if item["origin"] == "system"]
    assert len(expiry) == 1 and expiry[0]["timestamp"] >= expires, history


def test_expiry_due_while_stopped_is_committed_after_a_restart(
    service_factory: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    """The sweeper learns pending expiries at start-up from a scan of the store."""
    data = tmp_path / "expiry-restart"
    first = service_factory(data)
    url = "/api/v1/twins/org.acme:ttl-restart"
    with first.client() as api:
        created = api.put(url, json={"attributes": {"expires": "a user key, not an expiry"}})
        assert created.status_code == 201
        assert api.put(f"{url}/desired/led", params={"ttl": 1}, json="red").status_code == 201
        for i in range(30):  # twins without any expiry, which the scan may skip
            assert api.put(f"/api/v1/twins/org.acme:plain-{i}", json={}).status_code == 201
    first.stop()
    time.sleep(1.2)  # the expiry fell due while no process ran
    second = service_factory(data)
    with second.client() as api:
        for _ in range(100):
            state = api.get(f"{url}/lifecycle").json()["led"]["state"]
            if state == "expired":
                break
            time.sleep(0.05)
        assert state == "expired"
        history = api.get(f"{url}/history").json()["items"]
        assert history[-1]["origin"] == "system"


def test_an_expiry_due_while_the_store_is_down_is_committed_when_it_is_back(
    fresh_ferretdb: FerretDB, service_factory: Callable[..., ServiceProcess], unique_name: str
) -> None:
    """The sweeper used to drop an expiry the store could not take: the value stayed
    pending past its time to live until the twin's next write or the next start."""
    env = mongodb_env(fresh_ferretdb.url, unique_name)
    env["TWIN_MONGODB__SERVER_SELECTION_TIMEOUT_MS"] = "200"
    # The driver waits for a server within the operation timeout (timeoutMS) as well.
    env["TWIN_MONGODB__OPERATION_TIMEOUT_MS"] = "1000"
    proc = service_factory(env=env)
    twin = "org.acme:expiring"
    with proc.client() as api:
        assert api.put(f"/api/v1/twins/{twin}", json={}).status_code == 201
        put = api.put(f"/api/v1/twins/{twin}/desired/led", params={"ttl": 1.0}, json="blue")
        assert put.status_code == 201, put.text
        fresh_ferretdb.kill()  # at once: a graceful stop may still take the expiry's write
        time.sleep(3)  # due while the store is down: the sweeper's write fails
        assert "could not expire desired values of org.acme:expiring" in proc.log_tail(100_000)
        fresh_ferretdb.start()
        deadline = time.monotonic() + 20
        while True:
            response = api.get(f"/api/v1/twins/{twin}/lifecycle")
            if response.status_code == 200 and response.json()["led"]["state"] == "expired":
                break
            assert time.monotonic() < deadline, f"never expired: {response.text}"
            time.sleep(0.1)


def test_the_same_value_written_again_is_a_retry_with_the_new_ttl(api: httpx.Client) -> None:
    """``?ttl=`` used to be ignored when the desired value did not change: the write was
    committed and its metadata stamped, but the value kept its old expiry (or none), and an
    expired or rejected value stayed so."""
    twin = f"/api/v1/twins/org.acme:again-{uuid.uuid4().hex[:8]}"
    assert api.put(twin, params={"ttl": 2}, json={"desired": {"valve": "open"}}).status_code == 201
    again = api.put(f"{twin}/desired/valve", params={"ttl": 600}, json="open")
    assert again.status_code == 204, again.text
    valve = api.get(f"{twin}/lifecycle").json()["valve"]
    assert valve["state"] == "pending"
    first = valve["expires"]
    time.sleep(2.5)  # past the first time to live
    assert api.get(f"{twin}/lifecycle").json()["valve"] == valve
    # Without a time to live, the retry waits for the device as long as it takes.
    patched = api.patch(twin, json={"desired": {"valve": "open"}}, headers=MERGE).json()
    assert "expires" not in patched["lifecycle"]["valve"], patched["lifecycle"]
    # An expired value desired again is pending again, with the new time to live.
    api.put(f"{twin}/desired/valve", params={"ttl": 0.5}, json="open")
    deadline = time.monotonic() + 20
    while api.get(f"{twin}/lifecycle").json()["valve"]["state"] != "expired":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    retried = api.patch(
        twin, params={"ttl": 600}, json={"desired": {"valve": "open"}}, headers=MERGE
    ).json()
    assert retried["lifecycle"]["valve"]["state"] == "pending"
    assert retried["lifecycle"]["valve"]["expires"] > first
    # A value the device already applied stays applied.
    api.patch(twin, json={"reported": {"valve": "open"}}, headers=MERGE)
    applied = api.put(f"{twin}/desired/valve", params={"ttl": 5}, json="open")
    assert applied.status_code == 204
    assert api.get(f"{twin}/lifecycle").json()["valve"]["state"] == "applied"


def test_fields_select_the_entry_of_a_nested_value_by_its_escaped_key(api: httpx.Client) -> None:
    """Lifecycle keys are escaped pointers (``fan/speed``): ``fields`` split them at the
    ``/`` and never unescaped ``~1``, so no selector reached them (``{}``, in search too)."""
    ns = f"org.f{uuid.uuid4().hex[:12]}"
    twin = f"{ns}:fan"
    api.put(f"/api/v1/twins/{twin}", json={"desired": {"fan": {"speed": 3}, "a/b": 1}})
    one = api.get(f"/api/v1/twins/{twin}", params={"fields": "lifecycle/fan~1speed/state"})
    assert one.json() == {"lifecycle": {"fan/speed": {"state": "pending"}}}
    found = api.get(
        "/api/v1/search/twins",
        params={
            "filter": "exists(lifecycle/fan~1speed)",
            "fields": "twinId,lifecycle(fan~1speed/state,a~01b/state)",
            "namespaces": ns,
        },
    )
    assert found.json()["items"] == [
        {
            "twinId": twin,
            "lifecycle": {"fan/speed": {"state": "pending"}, "a~1b": {"state": "pending"}},
        }
    ]
    bad = api.get(f"/api/v1/twins/{twin}", params={"fields": "lifecycle/fan~2speed"})
    assert (bad.status_code, bad.json()["error"]) == (400, "fields.invalid")


def test_an_empty_object_in_desired_is_nothing_to_apply(api: httpx.Client) -> None:
    """Deleting the last child of a desired object leaves ``{}`` behind: it was a leaf of the
    delta and pending in the lifecycle, sent to the device, which could never clear it
    (echoing ``{}`` as a merge patch changes nothing), while search's ``exists(delta)``
    counted ``{}`` as absent."""
    ns = f"org.e{uuid.uuid4().hex[:12]}"
    twin = f"/api/v1/twins/{ns}:empty"
    api.put(twin, json={"desired": {"a": {"b": 1}}, "reported": {"a": {"b": 1}}})
    assert api.delete(f"{twin}/desired/a/b").status_code == 204
    doc = api.get(twin).json()
    assert (doc["desired"], doc["delta"]) == ({"a": {}}, {})
    assert "a" not in doc["lifecycle"]
    assert set(doc["metadata"]["desired"]["a"]) == {"modified", "revision"}  # it was written
    api.put(f"/api/v1/twins/{ns}:fresh", json={"desired": {"e": {}}})
    fresh = api.get(f"/api/v1/twins/{ns}:fresh").json()
    assert (fresh["delta"], fresh["lifecycle"]) == ({}, {})

    def count(filter: str) -> int:
        params = {"filter": filter, "namespaces": ns}
        found: int = api.get("/api/v1/search/twins/count", params=params).json()["count"]
        return found

    assert count("exists(delta)") == 0
    assert count("exists(lifecycle/a)") == count("exists(lifecycle/e)") == 0
