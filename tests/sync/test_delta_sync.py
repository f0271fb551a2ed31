"""A device that was away gets exactly the latest delta, reports it, and the delta empties."""

from __future__ import annotations

import asyncio
import json
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from connectivity.messages import InboundMessage
from connectivity.mqtt_client import MqttClient
from connectivity.options import MqttOptions
from connectivity.sync import MqttSync
from tests.connectivity.helpers import Collector
from tests.servers.mosquitto import Mosquitto
from tests.servers.process import free_port
from tests.service_process import ADMIN_TOKEN
from tests.sync.helpers import (
    QUIET,
    RawDevice,
    add_device,
    device,
    embedded_service,
    patch_desired,
    put_twin,
    put_twin_once_up,
    sync_service,
    until,
    until_twin,
    wait_mqtt_up,
)
from twin_service.api.app import start_service
from twin_service.auth import TokenRegistry
from twin_service.settings import load_settings
from twin_service.twin.operations import replace_twin


async def _device_session(url: str, twin: str, persistent: bool, sink: Collector) -> MqttClient:
    """A raw device connection that (re)subscribes to its delta on every connection.

    Re-subscribing makes the broker send the retained delta; QoS 0 on the subscription keeps a
    persistent session from queueing every intermediate delta while the device is away.
    """
    client = MqttClient(
        MqttOptions(url=url, client_id=f"dev-{twin}", persistent_session=persistent)
    )
    topic = f"twins/{twin}/delta"

    async def resubscribe() -> None:
        await client.subscribe(topic, 0, sink)

    client.on_connect(resubscribe)
    await client.start()
    await client.wait_connected(10)
    return client


@pytest.mark.parametrize("persistent", [False, True], ids=["clean", "persistent"])
async def test_offline_device_gets_one_final_delta(
    mosquitto_server: Mosquitto, tmp_path: Path, unique_name: str, persistent: bool
) -> None:
    twin = f"org.acme:{unique_name}"
    proc = sync_service(tmp_path / "svc", mosquitto_server.url)
    try:
        wait_mqtt_up(proc)
        with proc.client() as api:
            put_twin(api, twin, desired={"fan": {"speed": 1}}, reported={"fan": {"speed": 1}})
            sink = Collector()
            client = await _device_session(mosquitto_server.url, twin, persistent, sink)
            await client.stop()
            sink.messages.clear()
            # Offline while desired changes three times.
            observer = Collector()
            watch = MqttClient(
                MqttOptions(
                    url=mosquitto_server.url, client_id=f"obs-{twin}", persistent_session=False
                )
            )
            await watch.start()
            await watch.wait_connected(10)
            await watch.subscribe(f"twins/{twin}/delta", 1, observer)
            for speed in (2, 3, 4):
                last = patch_desired(api, twin, {"fan": {"speed": speed}, "mode": f"m{speed}"})
            # Reconnect only once the service has published the final delta.
            await until(
                lambda: any(
                    _json(m) and _json(m)["desiredVersion"] == last["desiredVersion"]  # type: ignore[index]
                    for m in observer.messages
                )
            )
            client = await _device_session(mosquitto_server.url, twin, persistent, sink)
            try:
                await sink.wait_for(1)
                await _settle()
                deltas = [json.loads(m.payload) for m in sink.messages]
                assert deltas == [
                    {
                        "state": {"fan": {"speed": 4}, "mode": "m4"},
                        "desiredVersion": last["desiredVersion"],
                    }
                ]
            finally:
                await client.stop()
        # The device (library) reports what it applied, naming the desired version.
        dev = device(mosquitto_server.url, twin, client_id=f"lib-{unique_name}")
        await dev.start()
        try:
            accepted = await dev.report(
                {"fan": {"speed": 4}, "mode": "m4"}, desired_version=last["desiredVersion"]
            )
            assert accepted["revision"] > last["revision"]
            # The retained delta is cleared (empty payload) once reported matches.
            await until(lambda: observer.messages[-1].payload == b"")
        finally:
            await dev.stop()
            await watch.stop()
        async with proc.async_client() as aapi:
            doc = await until_twin(aapi, twin, lambda d: d["delta"] == {})
        assert doc["lifecycle"]["fan/speed"]["state"] == "applied"
        assert doc["lifecycle"]["mode"]["state"] == "applied"
    finally:
        proc.stop()


async def _settle() -> None:
    await asyncio.sleep(0.5)


def _json(msg: InboundMessage) -> object:
    return json.loads(msg.payload) if msg.payload else None


async def test_a_change_whose_client_left_at_once_still_reaches_the_device(
    mosquitto_server: Mosquitto, tmp_path: Path, unique_name: str
) -> None:
    """A WebSocket command sent by a client that closes right after it: the service may
    still be committing when the socket closes, and whatever it commits, the device's delta
    follows (no change without its delta)."""
    twin = f"org.acme:{unique_name}"
    proc = sync_service(tmp_path / "svc", mosquitto_server.url)
    try:
        put_twin_once_up(proc, twin, desired={"n": 0}, reported={"n": 0})
        observer = Collector()
        watch = MqttClient(
            MqttOptions(url=mosquitto_server.url, client_id=f"obs-{twin}", persistent_session=False)
        )
        await watch.start()
        try:
            await watch.wait_connected(10)
            await watch.subscribe(f"twins/{twin}/delta", 1, observer)
            url = proc.url.replace("http://", "ws://") + "/api/v1/ws"
            headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            for n in range(1, 21):
                async with websockets.connect(url, additional_headers=headers) as ws:
                    await ws.recv()  # welcome
                    command = {"type": "command", "command": "put", "twinId": twin}
                    await ws.send(json.dumps({**command, "path": "/desired/n", "value": n}))
                # Closed without waiting for the answer.
            # Every command the service received runs to its end: 20 changes after the
            # creation.
            async with proc.async_client() as api:
                doc = await until_twin(api, twin, lambda d: d["revision"] == 21)
            # The retained delta on the broker is the twin's current one.
            await until(
                lambda: any(
                    _json(m) == {"state": doc["delta"], "desiredVersion": doc["desiredVersion"]}
                    for m in observer.messages
                )
            )
        finally:
            await watch.stop()
    finally:
        proc.stop()


async def _retained_delta(url: str, twin: str, suffix: str = "delta") -> bytes | None:
    """What a device subscribing now gets on its delta topic (or another): the retained
    payload, if any."""
    async with RawDevice(url, twin) as raw:
        await asyncio.sleep(0.5)  # retained messages come right after the SUBACK
        held = [
            m.payload for m in raw.inbox.messages if m.topic.endswith(f"/{suffix}") and m.retain
        ]
    return held[-1] if held else None


async def test_a_deleted_twins_retained_status_is_cleared_with_its_delta(
    tmp_path: Path, mosquitto_server: Mosquitto, unique_name: str
) -> None:
    """The device's retained ``online`` (or its will's ``offline``) stayed on the broker
    after its twin was deleted: for good, and in the service's memory on the embedded
    broker (a fleet replacing devices grew without end)."""
    url = mosquitto_server.url
    twin = f"org.acme:{unique_name}"
    svc = sync_service(tmp_path / "svc", url)
    try:
        wait_mqtt_up(svc)
        with svc.client() as api:
            put_twin(api, twin, desired={"fan": 1})
            async with RawDevice(url, twin) as raw:
                await raw.send("status", b"online", retain=True, qos=1)
            assert await _retained_delta(url, twin, "status") == b"online"
            assert api.delete(f"/api/v1/twins/{twin}").status_code == 204
        async with asyncio.timeout(20):
            while await _retained_delta(url, twin, "status") is not None:
                await asyncio.sleep(0.2)
        assert await _retained_delta(url, twin) is None
    finally:
        svc.stop()


async def test_retained_deltas_the_twins_no_longer_have_are_corrected_on_connect(
    tmp_path: Path, mosquitto_server: Mosquitto, unique_name: str
) -> None:
    """A service killed between a commit and its publish leaves the broker holding a delta
    the twin no longer has; a device that reconnects would apply it. After connecting, the
    service compares what the broker retains with the store and publishes what is current."""
    url = mosquitto_server.url
    emptied, deleted, changed, current, foreign = (
        f"org.acme:{unique_name}-{kind}"
        for kind in ("emptied", "deleted", "changed", "current", "foreign")
    )
    data = tmp_path / "svc"
    svc = sync_service(data, url)
    try:
        wait_mqtt_up(svc)
        with svc.client() as api:
            put_twin(api, emptied, desired={"fan": 2}, reported={"fan": 2})
            put_twin(api, changed, desired={"fan": 3})
            put_twin(api, current, desired={"fan": 4})
            put_twin(api, deleted, desired={"fan": 5})
            assert api.delete(f"/api/v1/twins/{deleted}").status_code == 204
    finally:
        svc.stop()
    # What the lost publishes left: the broker's deltas are older than the store's twins.
    # (The foreign one is a twin of another deployment on this broker: not to be touched.)
    stale = {"state": {"fan": 9}, "desiredVersion": 1}
    for twin in (emptied, deleted, changed, foreign):
        async with RawDevice(url, twin) as raw:
            await raw.send("delta", stale, retain=True)
    current_payload = await _retained_delta(url, current)
    assert current_payload is not None and json.loads(current_payload)["state"] == {"fan": 4}

    svc = sync_service(data, url)
    try:
        wait_mqtt_up(svc)

        async def corrected() -> bool:
            return (
                await _retained_delta(url, emptied) is None
                and await _retained_delta(url, deleted) is None
                and await _retained_delta(url, changed) != json.dumps(stale).encode()
            )

        async with asyncio.timeout(20):
            while not await corrected():
                await asyncio.sleep(0.2)
        fresh = await _retained_delta(url, changed)
        assert fresh is not None
        assert json.loads(fresh) == {"state": {"fan": 3}, "desiredVersion": 1}
        assert await _retained_delta(url, current) == current_payload  # left as it was
        assert await _retained_delta(url, foreign) == json.dumps(stale).encode()
    finally:
        svc.stop()
    log = svc.log_path.read_text(errors="replace")
    assert "republishing deltas failed" not in log and "Traceback" not in log, log


async def test_a_twin_whose_id_has_no_topic_is_told_once_and_holds_up_nothing(
    tmp_path: Path, mosquitto_server: Mosquitto, unique_name: str
) -> None:
    """A twin name may contain '+' (URL-safe), which MQTT forbids in a topic name: that
    twin has no delta topic. Its changes must not fail a publish task on every change (the
    log filled with 'Task exception was never retrieved'), nor hold up other twins."""
    plus, plain = f"org.acme:{unique_name}+1", f"org.acme:{unique_name}"
    svc = sync_service(tmp_path / "svc", mosquitto_server.url)
    try:
        wait_mqtt_up(svc)
        with svc.client() as api:
            put_twin(api, plus, desired={"fan": 1})
            patch_desired(api, plus, {"fan": 2})
            put_twin(api, plain, desired={"fan": 3})
        async with asyncio.timeout(15):
            while await _retained_delta(mosquitto_server.url, plain) is None:
                await asyncio.sleep(0.1)
    finally:
        svc.stop()
    log = svc.log_path.read_text(errors="replace")
    assert log.count(f"twin {plus} gets no delta over MQTT") == 1, log
    assert "Traceback" not in log and "never retrieved" not in log, log


async def test_deltas_go_out_on_a_connection_of_their_own(
    tmp_path: Path, mosquitto_server: Mosquitto, unique_name: str
) -> None:
    """The connection that takes device messages also sends the replies, and under load
    hundreds of them wait for the broker's PUBACKs; a delta behind them waited too (p99
    130-430 ms at 80% of the ingest rate, docs/performance.md). On a connection of its own it
    goes out whatever that one is doing: even with it gone."""
    settings = load_settings(
        data_dir=tmp_path,
        auth={"disabled": True},
        mqtt_url=mosquitto_server.url,
        mqtt={"enabled": True, "client_id": unique_name, "shared_group": unique_name},
    )
    twin = f"test:{unique_name}"
    async with AsyncExitStack() as stack:
        ctx = await start_service(settings, TokenRegistry([], disabled=True), stack)
        sync = ctx.components["mqtt"]
        assert isinstance(sync, MqttSync) and sync.client is not None
        async with RawDevice(mosquitto_server.url, twin) as dev:
            await sync.client.stop()  # the device messages' connection, with its replies
            edit = replace_twin({"desired": {"fan": {"speed": 3}}}, twin)
            await ctx.service.mutate(twin, lambda _: edit, origin="test", may_create=True)
            delta = await dev.reply("delta")
        assert delta == {"state": {"fan": {"speed": 3}}, "desiredVersion": 1}
        assert ctx.readiness["mqtt"]()["deltaConnection"] == "up"


async def test_a_delta_cleared_while_the_device_was_away_is_not_handed_to_the_app(
    mosquitto_server: Mosquitto, tmp_path: Path, unique_name: str
) -> None:
    """Desired went x=2 and back to x=1 while the device was away: its persistent session got
    the delta {x: 2}, then the empty (cleared) one. DeviceClient dropped the empty message and
    its deltas queue held the withdrawn {x: 2}, which the documented loop applied."""
    twin = f"org.acme:{unique_name}"
    proc = sync_service(tmp_path / "svc", mosquitto_server.url)
    try:
        wait_mqtt_up(proc)
        with proc.client() as api:
            put_twin(api, twin, desired={"x": 1}, reported={"x": 1})
            dev = device(mosquitto_server.url, twin, client_id=f"lib-{unique_name}", protocol=4)
            await dev.start()
            await until(lambda: dev.twin is not None)
            await dev.stop()
            patch_desired(api, twin, {"x": 2})
            last = patch_desired(api, twin, {"x": 1})
        await asyncio.sleep(1)  # the service publishes both deltas
        dev = device(mosquitto_server.url, twin, client_id=f"lib-{unique_name}", protocol=4)
        await dev.start()
        try:
            await until(lambda: (dev.twin or {}).get("desiredVersion") == last["desiredVersion"])
            await _settle()
            queued = [dev.deltas.get_nowait() for _ in range(dev.deltas.qsize())]
            assert queued == []
        finally:
            await dev.stop()
    finally:
        proc.stop()


async def test_an_app_waiting_for_a_delta_gets_none_the_service_withdrew_while_it_was_away(
    tmp_path: Path,
) -> None:
    """The app waits in ``deltas.get()`` (the README loop) while its device is away; desired
    changes six times, then an operator writes ``reported`` to match: the twin has no delta.
    On reconnecting, the persistent session replayed the queued deltas and DeviceClient put
    each into the public queue at once, so the waiting app took the oldest, {x: base+1},
    before the cleared delta or the get's answer withdrew it (in about one reconnection of
    four), applied it and moved reported back. A delta of the connection after that still
    comes at once."""
    data = tmp_path / "svc"
    twin = f"org.acme:{tmp_path.name[-20:]}"
    password = add_device(data, twin)
    port = free_port()
    proc = embedded_service(data, port, **QUIET)
    url = f"mqtt://127.0.0.1:{port}"
    handed: list[dict[str, Any]] = []
    try:
        wait_mqtt_up(proc)
        async with proc.async_client() as api:
            assert (await api.put(f"/api/v1/twins/{twin}", json={"desired": {"x": 0}})).is_success
            dev = device(url, twin, password=password, protocol=4)

            async def app() -> None:
                while True:
                    handed.append(await dev.deltas.get())

            await dev.start()
            await until(lambda: dev.twin is not None)
            consumer = asyncio.create_task(app())
            try:
                for base in range(0, 120, 6):
                    await dev.stop()
                    for x in range(base + 1, base + 7):
                        await _merge_patch(api, twin, {"desired": {"x": x}})
                        await asyncio.sleep(0.05)
                    last = await _merge_patch(api, twin, {"reported": {"x": base + 6}})
                    await asyncio.sleep(0.2)  # the service publishes the deltas, then clears
                    handed.clear()
                    await dev.start()
                    await until(
                        lambda: (dev.twin or {}).get("revision", 0) >= last["revision"]  # noqa: B023
                    )
                    await asyncio.sleep(0.1)
                    assert handed == [], f"after reconnection {base // 6 + 1}"
                changed = await _merge_patch(api, twin, {"desired": {"x": -1}})
                await until(lambda: handed != [])
                assert handed == [{"state": {"x": -1}, "desiredVersion": changed["desiredVersion"]}]
            finally:
                consumer.cancel()
                await dev.stop()
    finally:
        proc.stop()


async def _merge_patch(api: httpx.AsyncClient, twin: str, patch: dict[str, Any]) -> dict[str, Any]:
    response = await api.patch(
        f"/api/v1/twins/{twin}",
        content=json.dumps(patch),
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body
