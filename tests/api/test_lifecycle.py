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
    time.sleep(0.4)
    # Expiry is evaluated when the twin is next written.
    api.put(f"/api/v1/twins/{twin}/attributes/touched", json=True)
    lifecycle = api.get(f"/api/v1/twins/{twin}/lifecycle").json()
    assert lifecycle["led"]["state"] == "expired"
    found = api.get(
        "/api/v1/search/twins",
        params={"filter": 'eq(lifecycle/led/state,"expired")', "namespaces": "org.acme"},
    ).json()["items"]
    assert twin in [item["twinId"] for item in found]
    bad = api.put(f"/api/v1/twins/{twin}/desired/x", params={"ttl": -1}, json=1)
    assert bad.status_code == 400
