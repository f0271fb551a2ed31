"""The desired lifecycle through the REST API: pending, applied, expired (TTL), searchable."""

from __future__ import annotations

import time
import uuid

import httpx

MERGE = {"Content-Type": "application/merge-patch+json"}


def test_pending_applied_expired_and_search(api: httpx.Client) -> None:
    twin = f"org.acme:lc-{uuid.uuid4().hex[:8]}"
    doc = api.put(f"/api/v1/twins/{twin}", json={"desired": {"fan": {"speed": 3}}}).json()
    assert doc["lifecycle"]["fan/speed"]["state"] == "pending"
    assert doc["lifecycle"]["fan/speed"]["desiredVersion"] == 1
    response = api.put(f"/api/v1/twins/{twin}/desired/led", params={"ttl": 0.3}, json="blue")
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
    for _ in range(100):
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
