"""Events cross processes: a write on process A reaches a WebSocket subscriber on B."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from tests.servers.mosquitto import Mosquitto
from tests.service_process import ServiceProcess
from tests.streams.test_websocket import connect, receive, subscribe


def test_write_on_a_reaches_subscriber_on_b_in_order_once(
    service_factory: Callable[..., ServiceProcess],
    mosquitto_server: Mosquitto,
    tmp_path: Path,
) -> None:
    # Polling is made slow on purpose: events must arrive through the MQTT bus notices.
    env = {
        "TWIN_MQTT_URL": mosquitto_server.url,
        "TWIN_MQTT__ENABLED": "false",
        "TWIN_STREAM__BUS": "mqtt",
        "TWIN_STREAM__POLL_INTERVAL_SECONDS": "120",
    }
    shared = tmp_path / "shared"
    a = service_factory(shared, env=env)
    b = service_factory(shared, env=env)
    twin = "org.acme:crossing"
    count = 100

    async def run() -> list[tuple[int, int]]:
        got: list[tuple[int, int]] = []
        async with connect(b) as ws, a.async_client() as api:
            await subscribe(ws, id="x", twins=[twin])
            for _ in range(100):  # both buses connected before the first write
                readiness = [(await api.get(f"{p.url}/ready")).json() for p in (a, b)]
                if all(r["checks"]["bus"]["status"] == "up" for r in readiness):
                    break
                await asyncio.sleep(0.1)
            await api.put(f"/api/v1/twins/{twin}", json={})
            for i in range(count - 1):
                await api.put(f"/api/v1/twins/{twin}/desired/i", json=i)
            while len(got) < count:
                message = await receive(ws, timeout=20)
                got.append((message["seq"], message["event"]["revision"]))
        return got

    got = asyncio.run(run())
    revisions = [r for _, r in got]
    assert revisions == list(range(1, count + 1))
    seqs = [s for s, _ in got]
    assert seqs == sorted(set(seqs))
