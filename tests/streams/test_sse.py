"""Server-Sent Events with Last-Event-ID resume, against the real service."""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import httpx

from tests.service_process import ServiceProcess


def read_events(response: httpx.Response, count: int) -> list[dict[str, Any]]:
    """Parse ``count`` SSE events (id, event, data) from a streaming response."""
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    for line in response.iter_lines():
        if line.startswith(":"):
            continue
        if not line:
            if current:
                events.append(current)
                current = {}
                if len(events) == count:
                    return events
            continue
        name, _, value = line.partition(": ")
        current[name] = json.loads(value) if name == "data" else value
    return events


def test_sse_stream_and_last_event_id_resume(service: ServiceProcess) -> None:
    ns = f"org.sse{uuid.uuid4().hex[:8]}"
    params = {"filter": "exists(desired/mode)", "fields": "desired", "namespaces": ns}
    with service.client() as api:
        api.put(f"/api/v1/twins/{ns}:a", json={})

        def write_later() -> None:
            with service.client() as writer:
                writer.put(f"/api/v1/twins/{ns}:a/desired/mode", json="eco")
                writer.put(f"/api/v1/twins/{ns}:b", json={"desired": {"mode": "max"}})
                writer.put(f"/api/v1/twins/{ns}:c", json={"desired": {"other": 1}})
                writer.delete(f"/api/v1/twins/{ns}:a/desired/mode")

        timer = threading.Timer(0.5, write_later)
        timer.start()
        with api.stream("GET", "/api/v1/stream/twins", params=params, timeout=30) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = read_events(response, 4)
        timer.join()
        assert events[0]["event"] == "subscribed"
        first, second, third = events[1:]
        assert first["event"] == "event" and first["data"]["twin"] == {"desired": {"mode": "eco"}}
        assert second["data"]["event"]["twinId"] == f"{ns}:b"
        assert third["event"] == "left" and third["data"]["event"]["twinId"] == f"{ns}:a"
        assert int(first["id"]) < int(second["id"]) < int(third["id"])
        # Resume after the first event: the next two come again, nothing before them.
        headers = {"Last-Event-ID": first["id"]}
        with api.stream(
            "GET", "/api/v1/stream/twins", params=params, headers=headers, timeout=30
        ) as response:
            replayed = read_events(response, 3)
        assert [e["id"] for e in replayed[1:]] == [second["id"], third["id"]]
        bad = api.get("/api/v1/stream/twins", headers={"Last-Event-ID": "abc"})
        assert bad.status_code == 400
        bad_rql = api.get("/api/v1/stream/twins", params={"filter": "eq(attributes/a"})
        assert bad_rql.status_code == 400 and bad_rql.json()["error"] == "rql.syntax"
    with service.client(token="") as anonymous:
        assert anonymous.get("/api/v1/stream/twins").status_code == 401
