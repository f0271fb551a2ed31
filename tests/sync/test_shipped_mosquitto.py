"""The service and its devices on deploy/mosquitto/mosquitto.conf as shipped: devices on
their listener, the service on its own, with the files ``devices export-mosquitto`` writes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from connectivity.credentials import CredentialStore, mqtt_username
from tests.connectivity.helpers import assert_refused
from tests.servers.mosquitto import Mosquitto, ShippedMosquitto
from tests.service_process import ServiceProcess
from tests.sync.helpers import (
    device,
    patch_desired,
    put_twin,
    sync_service,
    until_twin,
    wait_mqtt_up,
)

TWIN, OTHER = "org.acme:shipped-1", "org.acme:shipped-2"


async def test_devices_cannot_take_each_others_sessions_on_the_shipped_broker(
    mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path
) -> None:
    """mosquitto lets any client with valid credentials take over the session of a client id
    it names: a device that knew another's client id (its twin id, with connectivity.device)
    could disconnect it over and over. On the shipped device listener a client's id is its
    username; the service, which opens several connections with ids of their own, logs in on
    a listener of its own where devices cannot."""
    creds = CredentialStore(tmp_path / "devices.json")
    password, other_password = creds.add(TWIN), creds.add(OTHER)
    files = {
        "password_file": tmp_path / "passwd",
        "service_password_file": tmp_path / "service.passwd",
        "acl_file": tmp_path / "acl",
    }
    creds.write_mosquitto_files(
        files["password_file"],
        files["acl_file"],
        "twin-service",
        "twins/{twinId}",
        service_password="svc-secret",
        service_password_path=files["service_password_file"],
    )
    broker = mosquitto_factory(ShippedMosquitto, **files)
    assert isinstance(broker, ShippedMosquitto)
    svc = sync_service(
        tmp_path / "svc", broker.service_url, TWIN_MQTT__SERVICE_PASSWORD="svc-secret"
    )
    try:
        wait_mqtt_up(svc)
        with svc.client() as api:
            put_twin(api, TWIN, desired={"fan": 1})
        dev = device(broker.url, TWIN, password=password)
        await dev.start()
        try:
            assert (await dev.deltas.get())["state"] == {"fan": 1}
            # Another device, with valid credentials of its own, names dev's client id (the
            # one it asked for, and the one the shipped listener gave it) and the service's.
            service_id = svc.env["TWIN_MQTT__CLIENT_ID"]
            for client_id in (TWIN, mqtt_username(TWIN), service_id):
                intruder = device(broker.url, OTHER, password=other_password, client_id=client_id)
                await intruder.start()
                await asyncio.sleep(0.5)  # mosquitto would have closed the connection at once
                await intruder.stop()
            assert dev.mqtt.health().connected and dev.mqtt.health().reconnect_count == 0
            assert mqtt_check(svc)["reconnects"] == 0
            # The service's listener knows the service account alone.
            await assert_refused(
                broker.service_url,
                service_id,
                username=mqtt_username(OTHER),
                password=other_password,
            )
            with svc.client() as api:
                patch_desired(api, TWIN, {"fan": 2})
            delta = await dev.deltas.get()
            assert delta["state"] == {"fan": 2}
            await dev.report(delta["state"], desired_version=delta["desiredVersion"])
            async with svc.async_client() as api:
                await until_twin(
                    api, TWIN, lambda d: d["delta"] == {} and d["reported"] == {"fan": 2}
                )
            assert dev.mqtt.health().reconnect_count == 0
            assert mqtt_check(svc)["reconnects"] == 0
        finally:
            await dev.stop()
    finally:
        svc.stop()


def mqtt_check(svc: ServiceProcess) -> dict[str, Any]:
    """The MQTT part of the service's /ready."""
    with svc.client() as api:
        check: dict[str, Any] = api.get("/ready").json()["checks"]["mqtt"]
    return check
