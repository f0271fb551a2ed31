"""Several service replicas on one MongoDB-wire server (FerretDB), clients spread over them.

The WebSocket and MQTT guarantees across replicas are in test_replicas_live.py.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers.ferretdb import FerretDB
from tests.service_fixtures import mongodb_env
from tests.service_process import ServiceProcess

MERGE = {"Content-Type": "application/merge-patch+json"}

Replicas = Callable[[int], list[ServiceProcess]]


@pytest.fixture
def replicas(ferretdb_server: FerretDB, tmp_path: Path) -> Iterator[Replicas]:
    """``start(n)``: n service processes sharing one fresh database."""
    env = mongodb_env(ferretdb_server.url, f"multi_{uuid.uuid4().hex[:12]}")
    started: list[ServiceProcess] = []

    def start(count: int) -> list[ServiceProcess]:
        procs = [ServiceProcess(tmp_path / f"r{len(started) + i}", env=env) for i in range(count)]
        for proc in procs:
            started.append(proc.start())
        return procs

    yield start
    for proc in started:
        proc.stop()


async def _patch(client: httpx.AsyncClient, twin_id: str, key: str) -> int:
    response = await client.patch(
        f"/api/v1/twins/{twin_id}", json={"desired": {key: key}}, headers=MERGE
    )
    return response.status_code


# FerretDB answers every round trip in milliseconds and 300 writers contend for one twin: on a
# busy 2-core machine this takes minutes (it is a correctness test, not a benchmark).
@pytest.mark.timeout(1500)
def test_300_concurrent_patches_over_three_replicas_lose_nothing(replicas: Replicas) -> None:
    procs = replicas(3)
    twin_id = "org.acme:multi-300"
    with procs[0].client() as api:
        assert api.put(f"/api/v1/twins/{twin_id}", json={}).status_code == 201
    keys = [f"k{i:03d}" for i in range(300)]

    async def run() -> list[int]:
        limits = httpx.Limits(max_connections=100)
        clients = [proc.async_client(limits=limits) for proc in procs]
        for client in clients:
            client.timeout = httpx.Timeout(1200)
        try:
            return list(
                await asyncio.gather(
                    *(_patch(clients[i % 3], twin_id, key) for i, key in enumerate(keys))
                )
            )
        finally:
            for client in clients:
                await client.aclose()

    assert asyncio.run(run()) == [200] * 300
    for proc in procs:
        with proc.client() as api:
            doc = api.get(f"/api/v1/twins/{twin_id}").json()
        assert doc["revision"] == 301
        assert doc["desired"] == {key: key for key in keys}


def test_killing_a_replica_mid_load_loses_no_acknowledged_write(replicas: Replicas) -> None:
    procs = replicas(3)
    twin_ids = [f"org.acme:kill-{i}" for i in range(5)]
    with procs[0].client() as api:
        for twin_id in twin_ids:
            assert api.put(f"/api/v1/twins/{twin_id}", json={}).status_code == 201
    acknowledged: dict[str, set[str]] = {twin_id: set() for twin_id in twin_ids}

    async def writer(proc: ServiceProcess, name: str, stop: asyncio.Event) -> None:
        async with proc.async_client() as client:
            i = 0
            while not stop.is_set():
                twin_id = twin_ids[i % len(twin_ids)]
                key = f"{name}-{i}"
                i += 1
                try:
                    status = await _patch(client, twin_id, key)
                except httpx.HTTPError:
                    if proc.proc is not None and proc.proc.poll() is not None:
                        return  # the replica is gone
                    continue
                if status == 200:
                    acknowledged[twin_id].add(key)

    async def run() -> None:
        stop = asyncio.Event()
        tasks = [
            asyncio.create_task(writer(proc, f"w{p}{j}", stop))
            for p, proc in enumerate(procs)
            for j in range(4)
        ]
        await asyncio.sleep(3.0)
        procs[1].stop(signal.SIGKILL)
        await asyncio.sleep(3.0)
        stop.set()
        await asyncio.gather(*tasks)

    asyncio.run(run())
    assert sum(len(keys) for keys in acknowledged.values()) > 10
    with procs[2].client() as api:
        for twin_id, keys in acknowledged.items():
            doc = api.get(f"/api/v1/twins/{twin_id}").json()
            assert keys <= set(doc["desired"]), twin_id
            # Every committed change is a revision; only acknowledged or in-flight ones exist.
            assert doc["revision"] >= len(keys) + 1
