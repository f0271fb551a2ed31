"""Change streams while the store is out of reach: /ready says so, and the subscribers get
every change made before and after, once."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import websockets
from websockets.asyncio.client import ClientConnection

from tests.servers.ferretdb import FerretDB
from tests.service_fixtures import mongodb_env
from tests.service_process import ADMIN_TOKEN, ServiceProcess

Factory = Callable[..., ServiceProcess]


def _service(ferretdb: FerretDB, factory: Factory, tmp_path: Path, database: str) -> ServiceProcess:
    """A service on ``ferretdb`` whose store calls fail fast (0.3 s) while it is down."""
    env = mongodb_env(ferretdb.url, database)
    env["TWIN_MONGODB__SERVER_SELECTION_TIMEOUT_MS"] = "300"
    env["TWIN_LOG_LEVEL"] = "info"
    return factory(tmp_path / "svc", env=env)


async def _write(proc: ServiceProcess, twin: str, count: int) -> None:
    async with proc.async_client() as api:
        for n in range(count):
            response = await api.put(f"/api/v1/twins/{twin}", json={"desired": {"n": n}})
            assert response.is_success, response.text


def _websocket(proc: ServiceProcess) -> websockets.connect:
    url = proc.url.replace("http://", "ws://") + "/api/v1/ws"
    return websockets.connect(url, additional_headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})


async def _receive(ws: ClientConnection) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 15))
    return message


async def _streams(api: httpx.AsyncClient) -> dict[str, Any]:
    check: dict[str, Any] = (await api.get("/ready")).json()["checks"]["streams"]
    return check


async def _until(
    api: httpx.AsyncClient, predicate: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while not predicate(check := await _streams(api)):
        assert time.monotonic() < deadline, check
        await asyncio.sleep(0.1)
    return check


async def test_the_streams_check_is_down_while_the_journal_cannot_be_read(
    fresh_ferretdb: FerretDB,
    service_factory: Factory,
    tmp_path: Path,
    unique_name: str,
) -> None:
    proc = _service(fresh_ferretdb, service_factory, tmp_path, unique_name)
    twin = "org.acme:watched"
    async with _websocket(proc) as ws:
        await ws.send(json.dumps({"type": "subscribe", "id": "s", "twins": [twin]}))
        while (await _receive(ws))["type"] != "subscribed":
            pass
        async with proc.async_client() as api:
            check = await _streams(api)
            assert check["status"] == "up" and check["subscriptions"] == 1, check
            assert (await api.put(f"/api/v1/twins/{twin}", json={"desired": {"n": 1}})).is_success
            fresh_ferretdb.kill()
            down = await _until(api, lambda c: c["status"] == "down")
            assert "error" in down, down
            await fresh_ferretdb.astart()
            await _until(api, lambda c: c["status"] == "up")
            patch = await api.patch(
                f"/api/v1/twins/{twin}",
                json={"desired": {"n": 2}},
                headers={"Content-Type": "application/merge-patch+json"},
            )
            assert patch.status_code == 200, patch.text
        revisions: list[int] = []
        while len(revisions) < 2:
            message = await _receive(ws)
            if message["type"] == "event":
                revisions.append(message["event"]["revision"])
        assert revisions == [1, 2]
    log = proc.log_tail(400)
    assert log.count("event hub cannot read the journal") == 1, log
    assert "event hub reads the journal again" in log, log


async def test_a_resume_the_store_cannot_answer_is_refused_and_can_be_tried_again(
    fresh_ferretdb: FerretDB,
    service_factory: Factory,
    tmp_path: Path,
    unique_name: str,
) -> None:
    """The subscription of a resume whose journal check failed stayed filed: it held its
    events for good, and subscribing again under its id was refused as a duplicate."""
    proc = _service(fresh_ferretdb, service_factory, tmp_path, unique_name)
    twin = "org.acme:resumed"
    await _write(proc, twin, 3)
    subscribe = {"type": "subscribe", "id": "s", "twins": [twin], "since": 0}
    async with _websocket(proc) as ws:
        fresh_ferretdb.kill()
        await ws.send(json.dumps(subscribe))
        refused = await _receive(ws)
        while refused["type"] == "welcome":
            refused = await _receive(ws)
        assert refused["type"] == "error" and refused["status"] == 503, refused
        await fresh_ferretdb.astart()
        # The store's client finds the server again at its next check (up to half a second
        # apart), so a resume sent at once may still be refused as a 503; a client tries
        # again. A duplicate id would be another error, and fails here.
        deadline = time.monotonic() + 30
        while True:
            await ws.send(json.dumps(subscribe))
            answer = await _receive(ws)
            if answer["type"] != "error" or answer["status"] != 503:
                break
            assert time.monotonic() < deadline, answer
            await asyncio.sleep(0.2)
        answers = [answer] + [await _receive(ws) for _ in range(3)]
    assert answers[0]["type"] == "subscribed", answers
    assert [a["event"]["revision"] for a in answers[1:]] == [1, 2, 3], answers


async def test_a_server_sent_events_resume_the_store_cannot_answer_is_a_503(
    fresh_ferretdb: FerretDB,
    service_factory: Factory,
    tmp_path: Path,
    unique_name: str,
) -> None:
    """It was a 200 whose stream was cut at once (and a traceback in the log); an
    EventSource waits out a 503's Retry-After before it tries again."""
    proc = _service(fresh_ferretdb, service_factory, tmp_path, unique_name)
    twin = "org.acme:sse"
    await _write(proc, twin, 2)
    async with proc.async_client() as api:
        fresh_ferretdb.kill()
        refused = await api.get("/api/v1/stream/twins", headers={"Last-Event-ID": "0"})
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"] == "service.unavailable"
        assert refused.headers["retry-after"] == "1"
        await fresh_ferretdb.astart()
        headers = {"Last-Event-ID": "0"}
        ids: list[int] = []
        deadline = time.monotonic() + 30
        while not ids:
            # As an EventSource does: a 503 (the store's client has not found the server
            # again yet) is tried again after its Retry-After.
            async with api.stream("GET", "/api/v1/stream/twins", headers=headers) as stream:
                if stream.status_code == 503 and time.monotonic() < deadline:
                    await asyncio.sleep(float(stream.headers["retry-after"]))
                    continue
                assert stream.status_code == 200
                async for line in stream.aiter_lines():
                    if line.startswith("id: "):
                        ids.append(int(line[4:]))
                    if len(ids) == 2:
                        break
    assert ids == sorted(ids) and len(set(ids)) == 2
    assert "Traceback" not in proc.log_tail(400)
