"""Three replicas on one MongoDB-wire server and mosquitto: change streams and device
messages cross replicas (issue 6's multi-replica guarantees for WebSocket and MQTT)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers.ferretdb import FerretDB
from tests.servers.mosquitto import Mosquitto
from tests.service_fixtures import mongodb_env
from tests.service_process import ServiceProcess
from tests.streams.test_websocket import connect, receive, subscribe
from tests.sync.helpers import device, sync_service, wait_mqtt_up


@pytest.fixture
def three(
    ferretdb_server: FerretDB, mosquitto_server: Mosquitto, tmp_path: Path
) -> Iterator[list[ServiceProcess]]:
    env = {
        **mongodb_env(ferretdb_server.url, f"live_{uuid.uuid4().hex[:12]}"),
        "TWIN_STREAM__BUS": "mqtt",
        # One shared-subscription group: each device message goes to one replica.
        "TWIN_MQTT__SHARED_GROUP": f"g{uuid.uuid4().hex[:8]}",
    }
    procs = [sync_service(tmp_path / f"r{i}", mosquitto_server.url, **env) for i in range(3)]
    yield procs
    for proc in procs:
        proc.stop()


@pytest.mark.timeout(600)
def test_subscriber_on_c_sees_writes_on_a_and_b_in_revision_order(
    three: list[ServiceProcess],
) -> None:
    a, b, c = three
    twins = [f"org.acme:x{i}" for i in range(3)]
    writes_per_twin = 12

    async def write(proc: ServiceProcess, twin: str, key: str) -> None:
        async with proc.async_client() as api:
            response = await api.put(f"/api/v1/twins/{twin}/desired/{key}", json=key)
            assert response.status_code in (201, 204), response.text

    async def run() -> dict[str, list[int]]:
        for proc in three:
            wait_mqtt_up(proc)
        seen: dict[str, list[int]] = {t: [] for t in twins}
        async with connect(c) as ws:
            await subscribe(ws, id="all", twins=twins)
            async with a.async_client() as api:
                for twin in twins:
                    assert (await api.put(f"/api/v1/twins/{twin}", json={})).status_code == 201
            # A and B write concurrently, each twin alternately from both replicas.
            await asyncio.gather(
                *(
                    write(a if i % 2 else b, twin, f"k{i}")
                    for twin in twins
                    for i in range(writes_per_twin)
                )
            )
            expected = len(twins) * (writes_per_twin + 1)
            received = 0
            while received < expected:
                message = await receive(ws, timeout=60)
                seen[message["event"]["twinId"]].append(message["event"]["revision"])
                received += 1
        return seen

    seen = asyncio.run(run())
    for twin in twins:
        assert seen[twin] == list(range(1, writes_per_twin + 2)), twin


@pytest.mark.timeout(600)
def test_device_reports_are_applied_once_across_replicas(
    three: list[ServiceProcess], mosquitto_server: Mosquitto
) -> None:
    twin = "org.acme:replicated-device"
    reports = 30
    with three[0].client() as api:
        assert api.put(f"/api/v1/twins/{twin}", json={}).status_code == 201
        before = api.get(f"/api/v1/twins/{twin}").json()

    async def run() -> None:
        for proc in three:
            wait_mqtt_up(proc)
        dev = device(mosquitto_server.url, twin)
        await dev.start()
        try:
            for i in range(reports):
                await dev.report({"counter": i}, client_token=f"t{i}")
            # A redelivered duplicate is answered but not applied again.
            again = await dev.report({"counter": 0}, client_token="t0")
            assert again.get("duplicate") is True
        finally:
            await dev.stop()

    asyncio.run(run())
    for proc in three:
        with proc.client() as api:
            doc = api.get(f"/api/v1/twins/{twin}").json()
        assert doc["reported"]["counter"] == reports - 1
        assert doc["reportedVersion"] == before["reportedVersion"] + reports
    with three[2].client() as api:
        history = api.get(f"/api/v1/twins/{twin}/history").json()["items"]
    device_events = [e for e in history if e["origin"] == "device" and "reported" in e["changes"]]
    assert len(device_events) == reports
