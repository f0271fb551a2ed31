"""DeviceClient against a tiny fake service: a real plain-paho peer on a real mosquitto."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from connectivity.device import DeviceClient, DeviceConfig
from connectivity.errors import RequestRejected
from tests.connectivity.helpers import eventually
from tests.servers.mosquitto import Mosquitto


class FakeService:
    """Answers get and reported/update for every twin; remembers status and live values."""

    def __init__(self, port: int, prefix: str) -> None:
        self.prefix = prefix
        self.status: dict[str, str] = {}
        self.live: list[Any] = []
        self.revision = 0
        #: Reports received, by clientToken.
        self.attempts: Counter[str] = Counter()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        for suffix in ("reported/update", "get", "status", "live/update"):
            self.client.subscribe(f"{prefix}/+/{suffix}", 1)
        self.client.loop_start()

    def _reply(self, twin: str, suffix: str, body: dict[str, Any]) -> None:
        self.client.publish(f"{self.prefix}/{twin}/{suffix}", json.dumps(body), qos=1)

    def _on_message(self, _c: paho.Client, _u: Any, m: paho.MQTTMessage) -> None:
        _, twin, *rest = m.topic.split("/")
        suffix = "/".join(rest)
        if suffix == "status":
            self.status[twin] = m.payload.decode()
            return
        body = json.loads(m.payload)
        if suffix == "live/update":
            self.live.append(body)
            return
        if suffix == "get":
            self._reply(
                twin,
                "get/accepted",
                {
                    "desired": {"speed": 3},
                    "reported": {},
                    "delta": {"speed": 3},
                    "desiredVersion": 1,
                    "reportedVersion": 0,
                    "clientToken": body["clientToken"],
                },
            )
            return
        token = body["clientToken"]
        self.attempts[token] += 1
        state = body["state"]
        if self.attempts[token] <= state.get("mute", 0):
            return  # as if the answer were lost
        if self.attempts[token] <= state.get("busy", 0):
            self._reply(
                twin,
                "reported/update/rejected",
                {"clientToken": token, "code": 409, "error": "twin.contention", "message": "busy"},
            )
        elif "bad" in state:
            self._reply(
                twin,
                "reported/update/rejected",
                {
                    "clientToken": body["clientToken"],
                    "code": 400,
                    "error": "patch.invalid",
                    "message": "bad value",
                },
            )
        else:
            self.revision += 1
            self._reply(
                twin,
                "reported/update/accepted",
                {
                    "clientToken": body["clientToken"],
                    "revision": self.revision,
                    "reportedVersion": self.revision,
                },
            )

    def send_delta(self, twin: str, body: dict[str, Any]) -> None:
        self.client.publish(f"{self.prefix}/{twin}/delta", json.dumps(body), qos=1, retain=True)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def service(mosquitto_server: Mosquitto, unique_name: str) -> Iterator[FakeService]:
    assert mosquitto_server.port is not None
    svc = FakeService(mosquitto_server.port, unique_name)
    yield svc
    svc.close()


async def test_device_basics(
    mosquitto_server: Mosquitto, service: FakeService, unique_name: str
) -> None:
    twin = "org.acme:pump-1"
    dev = DeviceClient(
        DeviceConfig(
            url=mosquitto_server.url,
            twin_id=twin,
            password="unused",
            topic_prefix=f"{unique_name}/{{twinId}}",
            client_id=f"{unique_name}-dev",
        )
    )
    await dev.start()
    await eventually(lambda: service.status.get(twin) == "online")
    await eventually(lambda: dev.twin is not None)
    assert dev.twin is not None and dev.twin["desiredVersion"] == 1

    accepted = await dev.report({"speed": 3}, desired_version=1, client_token="tok-1")
    assert accepted == {"clientToken": "tok-1", "revision": 1, "reportedVersion": 1}
    with pytest.raises(RequestRejected) as info:
        await dev.report({"bad": True})
    assert info.value.code == "patch.invalid"

    service.send_delta(twin, {"state": {"speed": 4}, "desiredVersion": 2})
    delta = await asyncio.wait_for(dev.deltas.get(), 10)
    assert delta == {"state": {"speed": 4}, "desiredVersion": 2}

    await dev.update_live({"rpm": 1200})
    await eventually(lambda: service.live == [{"rpm": 1200}])

    await dev.stop()
    await eventually(lambda: service.status.get(twin) == "offline")
    service.send_delta(twin, {"state": {}, "desiredVersion": 2})  # clear the retained delta


@asynccontextmanager
async def _device(
    mosquitto_server: Mosquitto, prefix: str, **config: Any
) -> AsyncIterator[DeviceClient]:
    """A started device on ``prefix``, stopped after."""
    dev = DeviceClient(
        DeviceConfig(
            url=mosquitto_server.url,
            twin_id="org.acme:pump-2",
            password="unused",
            topic_prefix=f"{prefix}/{{twinId}}",
            client_id=f"{prefix}-dev",
            **config,
        )
    )
    await dev.start()
    try:
        yield dev
    finally:
        await dev.stop()


async def test_report_sent_again_while_the_twin_is_busy(
    mosquitto_server: Mosquitto, service: FakeService, unique_name: str
) -> None:
    async with _device(mosquitto_server, unique_name, retry_min_delay=0.05) as dev:
        accepted = await dev.report({"busy": 2}, client_token="tok-busy")
        assert accepted["clientToken"] == "tok-busy"
        assert service.attempts["tok-busy"] == 3  # two twin.contention answers, then accepted

        # A rejection of the report itself gets the same answer every time: sent once.
        with pytest.raises(RequestRejected) as info:
            await dev.report({"bad": True}, client_token="tok-bad")
        assert info.value.code == "patch.invalid"
        assert service.attempts["tok-bad"] == 1


async def test_report_gives_up_on_a_busy_twin_after_retry_for(
    mosquitto_server: Mosquitto, service: FakeService, unique_name: str
) -> None:
    async with _device(mosquitto_server, unique_name, retry_for=1.0, retry_min_delay=0.1) as dev:
        with pytest.raises(RequestRejected) as info:
            await dev.report({"busy": 1000}, client_token="tok-forever")
        assert info.value.code == "twin.contention"
        assert 2 <= service.attempts["tok-forever"] <= 10


async def test_report_without_an_answer_is_sent_again(
    mosquitto_server: Mosquitto, service: FakeService, unique_name: str
) -> None:
    async with _device(
        mosquitto_server, unique_name, request_timeout=0.5, retry_min_delay=0.05
    ) as dev:
        accepted = await dev.report({"mute": 1}, client_token="tok-lost")
        assert accepted["clientToken"] == "tok-lost"
        assert service.attempts["tok-lost"] == 2


async def test_report_sent_again_until_the_service_subscribes(
    mosquitto_server: Mosquitto, unique_name: str
) -> None:
    """MQTT 5: the broker drops a report no one subscribed to (the service's subscription is
    not back yet after a broker restart) and says so; the device sends it again."""
    assert mosquitto_server.port is not None
    async with _device(
        mosquitto_server, unique_name, retry_min_delay=0.1, request_timeout=30
    ) as dev:
        report = asyncio.create_task(dev.report({"speed": 1}, client_token="tok-early"))
        await asyncio.sleep(0.5)
        assert not report.done()
        late = FakeService(mosquitto_server.port, unique_name)
        try:
            accepted = await asyncio.wait_for(report, 10)
            assert accepted["clientToken"] == "tok-early"
            assert late.attempts["tok-early"] == 1  # the earlier ones went nowhere
        finally:
            late.close()
