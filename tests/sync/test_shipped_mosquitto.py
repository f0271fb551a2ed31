"""The service and its devices on deploy/mosquitto/mosquitto.conf as shipped: devices on
their listener, the service on its own, with the files ``devices export-mosquitto`` writes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from connectivity.credentials import CredentialStore, mqtt_username
from connectivity.mqtt_client import MqttClient
from connectivity.options import MqttOptions
from connectivity.topics import INBOUND, service_group
from tests.connectivity.helpers import Collector, assert_refused, eventually
from tests.servers.mosquitto import Mosquitto, ShippedMosquitto
from tests.service_process import ServiceProcess, service_env
from tests.sync.helpers import (
    QUIET,
    RawDevice,
    device,
    get_twin,
    patch_desired,
    put_twin,
    sync_service,
    until_twin,
    wait_mqtt_up,
)

TWIN, OTHER = "org.acme:shipped-1", "org.acme:shipped-2"
SERVICE_PASSWORD = "svc-secret"


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
    broker = shipped_broker(mosquitto_factory, tmp_path, creds)
    svc = sync_service(
        tmp_path / "svc", broker.service_url, TWIN_MQTT__SERVICE_PASSWORD=SERVICE_PASSWORD
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


def shipped_broker(
    mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path, creds: CredentialStore
) -> ShippedMosquitto:
    """The shipped configuration, with the files ``devices export-mosquitto`` writes for the
    devices of ``creds`` and the service password :data:`SERVICE_PASSWORD`."""
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
        service_password=SERVICE_PASSWORD,
        service_password_path=files["service_password_file"],
    )
    broker = mosquitto_factory(ShippedMosquitto, **files)
    assert isinstance(broker, ShippedMosquitto)
    return broker


def shipped_service(data_dir: Path, broker: ShippedMosquitto, **env: str) -> ServiceProcess:
    """A service on the shipped broker's service listener with the settings a deployment
    would have: the shared group is the default one unless ``env`` names another."""
    settings = {
        **QUIET,
        "TWIN_MQTT__ENABLED": "true",
        "TWIN_MQTT_URL": broker.service_url,
        "TWIN_MQTT__SERVICE_PASSWORD": SERVICE_PASSWORD,
        **env,
    }
    return ServiceProcess(data_dir, env=settings).start()


def raw_device(broker: ShippedMosquitto, twin_id: str, password: str) -> RawDevice:
    return RawDevice(broker.url, twin_id, username=mqtt_username(twin_id), password=password)


async def send_reports(dev: RawDevice, count: int, tag: str) -> None:
    """``count`` reports, each adding a key of its own, each waited for its PUBACK."""
    for i in range(count):
        await dev.send("reported/update", {"state": {f"{tag}{i}": i}, "clientToken": f"{tag}{i}"})


def accepted(dev: RawDevice) -> list[Any]:
    return [
        json.loads(m.payload)
        for m in dev.inbox.messages
        if m.topic == f"{dev.base}/reported/update/accepted"
    ]


#: Group names a device could try: the old default, and near misses of it.
GUESSABLE_GROUPS = ("twin-service", "twin_service", "twins", "service", "twin-service-0")


async def test_a_device_in_a_guessable_group_takes_no_share_of_other_devices_messages(
    mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path
) -> None:
    """mosquitto's ACL file does not refuse a SUBSCRIBE: it checks read access only when it
    delivers. A device that joined the service's shared group took its turn at every other
    device's messages, and mosquitto dropped each it could not read, after the sender's
    PUBACK: 5 reports of 10 lost with the group "twin-service" of old. The service's group
    is now derived from its broker password, which devices do not know."""
    creds = CredentialStore(tmp_path / "devices.json")
    password, attacker_password = creds.add(TWIN), creds.add(OTHER)
    broker = shipped_broker(mosquitto_factory, tmp_path, creds)
    svc = shipped_service(tmp_path / "svc", broker)
    attacker = MqttClient(
        MqttOptions(
            url=broker.url,
            client_id=mqtt_username(OTHER),
            username=mqtt_username(OTHER),
            password=attacker_password,
            session_expiry=7 * 24 * 3600,
        )
    )
    try:
        wait_mqtt_up(svc)
        with svc.client() as api:
            put_twin(api, TWIN, reported={})
        await attacker.start()
        await attacker.wait_connected(10)
        stolen = Collector()
        for group in GUESSABLE_GROUPS:
            for suffix in INBOUND:
                # Accepted: mosquitto 2.0's ACL file never sees a SUBSCRIBE.
                await attacker.subscribe(f"$share/{group}/twins/+/{suffix}", 1, stolen)
        count = 10
        async with raw_device(broker, TWIN, password) as victim:
            await send_reports(victim, count, "k")
            async with svc.async_client() as api:
                doc = await until_twin(api, TWIN, lambda d: len(d.get("reported", {})) == count)
            assert doc["reported"] == {f"k{i}": i for i in range(count)}
            await eventually(lambda: len(accepted(victim)) == count)
        assert stolen.messages == []
        # The group's name is the secret: it is nowhere the service shows.
        derived = service_group("auto", SERVICE_PASSWORD)
        with svc.client() as api:
            for path in ("/ready", "/metrics"):
                assert derived not in api.get(path).text
        assert derived not in svc.log_path.read_text()
    finally:
        await attacker.stop(grace=0)
        svc.stop()


async def test_a_replica_upgraded_from_the_old_group_handles_each_message_once(
    mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path
) -> None:
    """A replica's persistent session still holds its subscriptions of the old group
    "twin-service" when it comes back with the derived one: it leaves the old group after
    connecting, or the broker sent it each device message twice, once for each group."""
    creds = CredentialStore(tmp_path / "devices.json")
    password = creds.add(TWIN)
    broker = shipped_broker(mosquitto_factory, tmp_path, creds)
    old = shipped_service(
        tmp_path / "svc",
        broker,
        TWIN_MQTT__CLIENT_ID="replica-0",
        TWIN_MQTT__SHARED_GROUP="twin-service",
    )
    try:
        wait_mqtt_up(old)
    finally:
        old.stop()
    svc = shipped_service(tmp_path / "svc", broker, TWIN_MQTT__CLIENT_ID="replica-0")
    try:
        wait_mqtt_up(svc)
        with svc.client() as api:
            put_twin(api, TWIN, reported={})
        count = 10
        async with raw_device(broker, TWIN, password) as dev:
            await send_reports(dev, count, "k")
            # One more: once it is answered, every copy of those before it was handled (the
            # service handles one twin's messages in the order the broker sent them).
            await send_reports(dev, 1, "last")
            async with svc.async_client() as api:
                await until_twin(api, TWIN, lambda d: "last0" in d.get("reported", {}))
        check = mqtt_check(svc)
        assert (check["applied"], check["duplicates"]) == (count + 1, 0)
    finally:
        svc.stop()


def test_a_service_without_a_password_warns_that_its_group_is_guessable(
    fresh_mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """An anonymous login leaves nothing secret to derive the group from: the service uses
    "twin-service" and says, once, what to do about it."""
    svc = sync_service(tmp_path / "svc", fresh_mosquitto.url, TWIN_MQTT__SHARED_GROUP="auto")
    try:
        wait_mqtt_up(svc)
    finally:
        svc.stop()
    log = svc.log_path.read_text()
    warnings = [line for line in log.splitlines() if "guessable" in line]
    assert len(warnings) == 1, log
    assert "set mqtt.shared_group to a secret value" in warnings[0].lower()


async def test_export_mosquitto_takes_the_topic_prefix_of_the_settings(
    mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path
) -> None:
    """``devices export-mosquitto`` wrote the ACL for the built-in ``twins/{twinId}``
    whatever ``mqtt.topic_prefix`` said: a service on ``dev/{twinId}`` had every device
    topic denied. The command now reads the prefix from the settings, as the service."""
    prefix = {"TWIN_MQTT__TOPIC_PREFIX": "dev/{twinId}"}
    data_dir = tmp_path / "svc"
    creds = CredentialStore.in_data_dir(data_dir)
    password = creds.add(TWIN)
    files = {
        "password_file": tmp_path / "passwd",
        "service_password_file": tmp_path / "service.passwd",
        "acl_file": tmp_path / "acl",
    }
    export = [sys.executable, "-m", "twin_service", "--data-dir", str(data_dir), "devices"]
    export += ["export-mosquitto", "--service-user", "twin-service", "--service-password-stdin"]
    export += ["--password-file", str(files["password_file"])]
    export += ["--service-password-file", str(files["service_password_file"])]
    export += ["--acl-file", str(files["acl_file"])]
    done = subprocess.run(
        export,
        input=SERVICE_PASSWORD + "\n",
        capture_output=True,
        text=True,
        env=service_env(prefix),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    acl = files["acl_file"].read_text().splitlines()
    assert f"topic read dev/{TWIN}/#" in acl
    assert f"topic write dev/{TWIN}/reported/update" in acl
    assert not any(f"twins/{TWIN}" in line for line in acl)
    broker = mosquitto_factory(ShippedMosquitto, **files)
    assert isinstance(broker, ShippedMosquitto)
    svc = shipped_service(data_dir, broker, **prefix)
    try:
        wait_mqtt_up(svc)
        with svc.client() as api:
            put_twin(api, TWIN, reported={})
        dev = device(broker.url, TWIN, password=password, topic_prefix="dev/{twinId}")
        await dev.start()
        try:
            await dev.report({"fan": 3}, client_token="t1")
        finally:
            await dev.stop()
        with svc.client() as api:
            assert get_twin(api, TWIN)["reported"] == {"fan": 3}
    finally:
        svc.stop()
