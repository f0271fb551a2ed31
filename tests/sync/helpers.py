"""Helpers for the device-sync tests: a service wired to a broker, devices, polling."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from connectivity.cli import cmd_add
from connectivity.device import DeviceClient, DeviceConfig
from connectivity.errors import MqttUnavailable
from connectivity.mqtt_client import MqttClient
from connectivity.options import MqttOptions
from connectivity.retained import read_retained
from tests.service_process import ServiceProcess
from twin_service.settings import Settings

#: No lastSeen write after a twin's first message: revisions count reports only.
QUIET = {"TWIN_MQTT__LASTSEEN_COALESCE_SECONDS": "100000"}


def sync_service(
    data_dir: Path, broker_url: str, client_id: str | None = None, **env: str
) -> ServiceProcess:
    """A started service process connected to ``broker_url`` (MQTT enabled).

    Each service gets its own shared-subscription group unless told otherwise: on a broker
    shared by many tests, the persistent session of a stopped service would otherwise keep
    receiving its share of the group's messages.
    """
    settings = {
        "TWIN_MQTT__SHARED_GROUP": f"g{uuid.uuid4().hex[:8]}",
        "TWIN_MQTT__ENABLED": "true",
        "TWIN_MQTT_URL": broker_url,
        "TWIN_MQTT__CLIENT_ID": client_id or f"svc-{uuid.uuid4().hex[:8]}",
        "TWIN_MQTT__LASTSEEN_COALESCE_SECONDS": "0",
        **env,
    }
    return ServiceProcess(data_dir, env=settings).start()


def add_device(data_dir: Path, twin_id: str) -> str:
    """Register a device of ``twin_id`` in ``data_dir`` (made if missing) as the CLI does;
    return its password."""
    data_dir.mkdir(parents=True, exist_ok=True)
    out = io.StringIO()
    assert cmd_add(argparse.Namespace(twin_id=twin_id), Settings(data_dir=data_dir), out) == 0
    return next(
        line.split()[1] for line in out.getvalue().splitlines() if line.startswith("password:")
    )


def embedded_env(port: int, **env: str) -> dict[str, str]:
    """The settings of a service with MQTT on its embedded broker, listening on ``port``."""
    return {"TWIN_MQTT__ENABLED": "true", "TWIN_MQTT__EMBEDDED_PORT": str(port), **env}


def embedded_service(data_dir: Path, port: int, **env: str) -> ServiceProcess:
    """A started service process whose embedded broker listens on ``port``."""
    return ServiceProcess(data_dir, env=embedded_env(port, **env)).start()


def wait_mqtt_up(proc: ServiceProcess, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = httpx.get(f"{proc.url}/ready", timeout=5).json()
        if body["checks"].get("mqtt", {}).get("status") == "up":
            return
        time.sleep(0.05)
    raise AssertionError(f"MQTT never up: {body}\n{proc.log_tail()}")


def put_twin_once_up(proc: ServiceProcess, twin_id: str, **sections: Any) -> dict[str, Any]:
    """Wait for the service's MQTT connection, then create the twin ``twin_id``."""
    wait_mqtt_up(proc)
    with proc.client() as api:
        return put_twin(api, twin_id, **sections)


def put_twin(api: httpx.Client, twin_id: str, **sections: Any) -> dict[str, Any]:
    response = api.put(f"/api/v1/twins/{twin_id}", json=sections)
    assert response.status_code in (200, 201), response.text
    body: dict[str, Any] = response.json()
    return body


def get_twin(api: httpx.Client, twin_id: str) -> dict[str, Any]:
    response = api.get(f"/api/v1/twins/{twin_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def patch_desired(api: httpx.Client, twin_id: str, patch: dict[str, Any]) -> dict[str, Any]:
    response = api.patch(
        f"/api/v1/twins/{twin_id}",
        content=json.dumps({"desired": patch}),
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def device(url: str, twin_id: str, **kw: Any) -> DeviceClient:
    return DeviceClient(
        DeviceConfig(url=url, twin_id=twin_id, password=kw.pop("password", "x"), **kw)
    )


async def until(predicate: Callable[[], bool], timeout: float = 15) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


async def until_twin(
    api: httpx.AsyncClient,
    twin_id: str,
    predicate: Callable[[dict[str, Any]], bool],
    timeout: float = 15,
) -> dict[str, Any]:
    """Poll the twin until ``predicate`` holds; return it. An answer other than the twin (a
    503 while the store comes back) is polled past, not given to ``predicate``."""
    doc: dict[str, Any] = {}
    try:
        async with asyncio.timeout(timeout):
            while True:
                response = await api.get(f"/api/v1/twins/{twin_id}")
                doc = response.json()
                if response.status_code == 200 and predicate(doc):
                    return doc
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"twin never matched; last: {doc}") from None


class RawDevice:
    """A device speaking raw MQTT: publishes bytes, collects everything under its twin."""

    def __init__(self, url: str, twin_id: str, **options: Any) -> None:
        from connectivity.mqtt_client import MqttClient
        from connectivity.options import MqttOptions
        from tests.connectivity.helpers import Collector

        self.twin_id = twin_id
        self.base = f"twins/{twin_id}"
        self.inbox = Collector()
        options.setdefault("persistent_session", False)
        self.client = MqttClient(
            MqttOptions(url=url, client_id=f"raw-{uuid.uuid4().hex[:8]}", **options)
        )

    async def __aenter__(self) -> RawDevice:
        await self.client.start()
        await self.client.wait_connected(10)
        await self.client.subscribe(f"{self.base}/#", 1, self.inbox)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.stop(grace=0)

    async def send(self, suffix: str, payload: bytes | dict[str, Any], **kw: Any) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        await self.client.publish(f"{self.base}/{suffix}", data, **kw)

    async def reply(self, topic_suffix: str, index: int = 0, timeout: float = 10) -> Any:
        """The ``index``-th message received on ``<base>/<topic_suffix>``, decoded."""
        topic = f"{self.base}/{topic_suffix}"
        async with asyncio.timeout(timeout):
            while True:
                found = [m for m in self.inbox.messages if m.topic == topic]
                if len(found) > index:
                    return json.loads(found[index].payload)
                await asyncio.sleep(0.01)

    async def call(self, suffix: str, payload: bytes | dict[str, Any], outcome: str) -> Any:
        """Send a request and wait for the next answer on ``<suffix>/<outcome>``."""
        topic = f"{self.base}/{suffix}/{outcome}"
        seen = len([m for m in self.inbox.messages if m.topic == topic])
        await self.send(suffix, payload)
        return await self.reply(f"{suffix}/{outcome}", seen)


async def send_reliably(
    client: MqttClient, topic: str, body: dict[str, Any], timeout: float = 5.0
) -> None:
    """Publish with QoS 1 until the broker acknowledged it with a subscriber to take it (same
    clientToken on every try), as connectivity.device's callers do."""
    while True:
        try:
            await client.publish(
                topic, json.dumps(body).encode(), qos=1, timeout=timeout, require_subscriber=True
            )
            return
        except MqttUnavailable:  # not connected, no PUBACK in time, or no subscriber
            await asyncio.sleep(0.1)


async def send_counter(client: MqttClient, twin_id: str, counts: range, token_prefix: str) -> None:
    """Report ``counter`` as each of ``counts`` in turn, reliably (clientToken
    ``<token_prefix><count>``)."""
    for i in counts:
        body = {"state": {"counter": i}, "clientToken": f"{token_prefix}{i}"}
        await send_reliably(client, f"twins/{twin_id}/reported/update", body)


async def publisher(url: str, client_id: str) -> MqttClient:
    """A plain client of the broker that reconnects fast (a device's, an observer's)."""
    client = MqttClient(
        MqttOptions(url=url, client_id=client_id, reconnect_min_delay=0.1, reconnect_max_delay=0.5)
    )
    await client.start()
    await client.wait_connected(10)
    return client


async def retained_delta(url: str, twin_id: str) -> Any:
    """The delta the broker at ``url`` retains for ``twin_id``, decoded; None for none."""
    held = await read_retained(
        MqttOptions(url=url, client_id=f"probe-{time.monotonic_ns()}"),
        f"twins/{twin_id}/delta",
        quiet_seconds=0.3,
    )
    payload = held.get(f"twins/{twin_id}/delta")
    return json.loads(payload) if payload else None
