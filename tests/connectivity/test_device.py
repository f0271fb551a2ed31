"""DeviceClient against a tiny fake service: a real plain-paho peer on a real mosquitto."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from connectivity.credentials import mqtt_username
from connectivity.device import DeviceClient, DeviceConfig
from connectivity.errors import (
    ConnectRefused,
    MqttUnavailable,
    NotConnected,
    PacketTooLarge,
    RequestRejected,
)
from tests.connectivity.helpers import eventually
from tests.servers.mosquitto import Mosquitto, write_password_file
from tests.servers.process import free_port


class FakeService:
    """Answers get and reported/update for every twin; remembers status and live values."""

    def __init__(self, port: int, prefix: str) -> None:
        self.prefix = prefix
        self.status: dict[str, str] = {}
        self.live: list[Any] = []
        self.revision = 0
        self.gets = 0
        #: Reports received, by clientToken.
        self.attempts: Counter[str] = Counter()
        #: Answers to the next gets, in turn: the delta messages to publish first (None: a
        #: cleared one), then the answer's body; the canned twin when none is left.
        self.scripted_gets: list[tuple[list[dict[str, Any] | None], dict[str, Any]]] = []
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
            self.gets += 1
            if self.scripted_gets:
                deltas, answer = self.scripted_gets.pop(0)
                for delta in deltas:
                    self.send_delta(twin, delta)
                self._reply(twin, "get/accepted", {**answer, "clientToken": body["clientToken"]})
                return
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

    def send_delta(self, twin: str, body: dict[str, Any] | None) -> None:
        """Publish a retained delta; None: a cleared one (empty payload)."""
        payload = b"" if body is None else json.dumps(body)
        self.client.publish(f"{self.prefix}/{twin}/delta", payload, qos=1, retain=True)

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
    # The twin's delta, from the get answer: no retained delta came (this fake publishes none).
    delta = await asyncio.wait_for(dev.deltas.get(), 10)
    assert delta == {"state": {"speed": 3}, "desiredVersion": 1}

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


async def test_a_delta_withdrawn_after_the_get_was_read_is_not_handed_to_the_app(
    mosquitto_server: Mosquitto, service: FakeService, unique_name: str
) -> None:
    """The service read the twin for the device's get (delta {x: 1}), then an operator
    reverted desired and the cleared delta, published on the service's other connection,
    reached the device before the answer. A cleared delta carries no desiredVersion, so the
    answer's {x: 1} was handed to the app though withdrawn; the device now fetches again."""
    twin = "org.acme:pump-3"
    service.send_delta(twin, {"state": {"x": 1}, "desiredVersion": 2})
    twin_doc = {"desired": {"x": 1}, "reported": {"x": 0}, "reportedVersion": 1}
    service.scripted_gets = [
        ([None], {**twin_doc, "delta": {"x": 1}, "desiredVersion": 2}),
        ([], {**twin_doc, "desired": {"x": 0}, "delta": {}, "desiredVersion": 3}),
    ]
    async with _device(mosquitto_server, unique_name, twin_id=twin) as dev:
        await eventually(lambda: dev.twin is not None and service.gets >= 1)
        await asyncio.sleep(0.5)  # a second get, if one is sent, answered
        handed = [dev.deltas.get_nowait() for _ in range(dev.deltas.qsize())]
        assert handed == []
        assert dev.twin is not None and dev.twin["desiredVersion"] == 3
        assert service.gets == 2


@asynccontextmanager
async def _device(
    mosquitto_server: Mosquitto, prefix: str, **config: Any
) -> AsyncIterator[DeviceClient]:
    """A started device on ``prefix``, stopped after."""
    config.setdefault("twin_id", "org.acme:pump-2")
    dev = DeviceClient(
        DeviceConfig(
            url=mosquitto_server.url,
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


async def test_a_client_token_over_64_bytes_is_refused_before_anything_is_sent(
    mosquitto_server: Mosquitto, service: FakeService, unique_name: str
) -> None:
    """The service rejects such a token without echoing it: no answer would match, and
    the device sent it again every request_timeout until retry_for, then a bare timeout."""
    async with _device(mosquitto_server, unique_name, retry_for=0, request_timeout=2) as dev:
        with pytest.raises(ValueError, match="64"):
            await dev.report({"speed": 1}, client_token="é" * 40)  # 40 characters, 80 bytes
        accepted = await dev.report({"speed": 1}, client_token="é" * 32)  # 64 bytes: taken
        assert accepted["clientToken"] == "é" * 32
    assert set(service.attempts) == {"é" * 32}


@pytest.mark.parametrize("protocol", [5, 4])
async def test_a_report_over_the_brokers_packet_limit_is_refused_unsent(
    mosquitto_factory: Callable[..., Mosquitto], unique_name: str, protocol: int
) -> None:
    """The shipped brokers close the connection of a device that sends over 2 MiB. paho
    kept the message and sent it again at every reconnection: the device was disconnected
    for good. MQTT 5: the broker's Maximum Packet Size (CONNACK) is the limit; 3.1.1: the
    device's max_packet_size (2 MiB, the shipped brokers' limit, by default)."""
    limit = 100_000 if protocol == 5 else 2 * 1024 * 1024
    broker = mosquitto_factory(extra_config=[f"max_packet_size {limit}"])
    assert broker.port is not None
    service = FakeService(broker.port, unique_name)
    try:
        async with _device(
            broker, unique_name, protocol=protocol, retry_for=2, request_timeout=2
        ) as dev:
            with pytest.raises(PacketTooLarge) as info:
                await dev.report({"blob": "x" * (limit + 1000)}, client_token="tok-big")
            assert info.value.status == 413 and info.value.code == "mqtt.packet.toolarge"
            assert str(limit) in info.value.message
            accepted = await dev.report({"speed": 1}, client_token="tok-small")
            assert accepted["clientToken"] == "tok-small"
            assert dev.mqtt.health().reconnect_count == 0
        assert set(service.attempts) == {"tok-small"}
    finally:
        service.close()


async def test_a_request_given_up_is_not_sent_again_at_the_next_connection(
    mosquitto_factory: Callable[..., Mosquitto], unique_name: str
) -> None:
    """A broker that closes the connection for a packet and announces no limit (MQTT 3.1.1),
    a device told no limit: the report fails. Given up, it is out of paho's queue, which
    otherwise sent it again at every reconnection, and the next report gets through."""
    broker = mosquitto_factory(extra_config=["max_packet_size 100000"])
    assert broker.port is not None
    service = FakeService(broker.port, unique_name)
    try:
        async with _device(
            broker,
            unique_name,
            protocol=4,
            max_packet_size=None,
            retry_for=3,
            request_timeout=1,
            reconnect_min_delay=0.1,
        ) as dev:
            with pytest.raises((MqttUnavailable, TimeoutError)):
                await dev.report({"blob": "x" * 200_000}, client_token="tok-big")
            accepted = await dev.report({"speed": 1}, client_token="tok-small")
            assert accepted["clientToken"] == "tok-small"
        assert set(service.attempts) == {"tok-small"}
    finally:
        service.close()


def _paho_threads(client_id: str) -> list[str]:
    name = f"paho-mqtt-client-{client_id}"
    return [t.name for t in threading.enumerate() if t.name == name]


async def test_a_failed_start_leaves_no_client_behind(
    mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path, unique_name: str
) -> None:
    """A refused or timed-out start() left paho's thread connecting for good; with the right
    password, the leaked client later took the client id from the next one, in turns."""
    twin = "org.acme:pump-9"
    passwords = write_password_file(tmp_path / "passwd", {mqtt_username(twin): "right"})
    broker = mosquitto_factory(password_file=passwords)

    def device(url: str, password: str) -> DeviceClient:
        return DeviceClient(
            DeviceConfig(
                url=url,
                twin_id=twin,
                password=password,
                topic_prefix=f"{unique_name}/{{twinId}}",
                client_id=unique_name,
            )
        )

    for _ in range(3):
        with pytest.raises(ConnectRefused):
            await device(broker.url, "wrong").start(timeout=10)
        assert _paho_threads(unique_name) == []
    with pytest.raises(NotConnected):
        await device(f"mqtt://127.0.0.1:{free_port()}", "right").start(timeout=0.5)
    assert _paho_threads(unique_name) == []

    dev = device(broker.url, "right")
    await dev.start()
    try:
        assert len(_paho_threads(unique_name)) == 1
    finally:
        await dev.stop()


async def test_credentials_changed_under_a_running_device_are_what_report_raises(
    mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path, unique_name: str
) -> None:
    """The broker refuses the device's password after a rotation: report() sent it again as
    if the connection were only lost and raised NotConnected after retry_for; health()
    read "disconnected: Unspecified error"."""
    twin = "org.acme:pump-8"
    passwords = tmp_path / "passwd"
    write_password_file(passwords, {mqtt_username(twin): "old"})
    broker = mosquitto_factory(password_file=passwords)
    dev = DeviceClient(
        DeviceConfig(
            url=broker.url,
            twin_id=twin,
            password="old",
            topic_prefix=f"{unique_name}/{{twinId}}",
            client_id=unique_name,
            retry_for=20,
            reconnect_min_delay=0.1,
        )
    )
    await dev.start()
    try:
        passwords.unlink()
        write_password_file(passwords, {mqtt_username(twin): "new"})
        await broker.arestart()
        await eventually(lambda: "CONNACK refused" in (dev.mqtt.health().last_error or ""))
        with pytest.raises(ConnectRefused):
            await dev.report({"speed": 1}, client_token="tok-refused")
        health = dev.mqtt.health()
        assert health.last_error is not None and "refused" in health.last_error, health
    finally:
        await dev.stop()


async def test_a_report_is_sent_as_compact_utf8_and_nan_is_refused_unsent(
    mosquitto_server: Mosquitto, service: FakeService, unique_name: str
) -> None:
    """json.dumps' defaults escaped every non-ASCII character: 30 KB of emoji in UTF-8 went
    out as 90 KB and was refused over a 64 KiB limit. NaN went out as ``NaN``, not JSON."""
    async with _device(mosquitto_server, unique_name, max_packet_size=64 * 1024) as dev:
        emoji = "\N{GRINNING FACE}" * 7_500  # 30,000 bytes of UTF-8
        accepted = await dev.report({"note": emoji}, client_token="tok-emoji")
        assert accepted["clientToken"] == "tok-emoji"
        with pytest.raises(ValueError, match="JSON"):
            await dev.report({"speed": float("nan")}, client_token="tok-nan")
    assert set(service.attempts) == {"tok-emoji"}


async def test_stop_ends_a_waiting_report_with_not_connected(
    mosquitto_server: Mosquitto, service: FakeService, unique_name: str
) -> None:
    """A report waiting for its answer raised CancelledError at stop(), which an app that
    catches the library's errors took for its own task being cancelled."""
    async with _device(mosquitto_server, unique_name, request_timeout=30) as dev:
        report = asyncio.create_task(dev.report({"mute": 100}, client_token="tok-wait"))
        await eventually(lambda: service.attempts["tok-wait"] == 1)
        await dev.stop()
        with pytest.raises(NotConnected, match="stopped"):
            await asyncio.wait_for(report, 5)


async def test_stop_ends_a_start_still_connecting(unique_name: str) -> None:
    """start() against a broker that is not there went on for its whole timeout after stop()."""
    dev = DeviceClient(
        DeviceConfig(
            url=f"mqtt://127.0.0.1:{free_port()}",
            twin_id="org.acme:pump-3",
            password="unused",
            client_id=unique_name,
        )
    )
    start = asyncio.create_task(dev.start(timeout=30))
    await asyncio.sleep(0.5)
    await dev.stop()
    with pytest.raises(NotConnected, match="stopped"):
        await asyncio.wait_for(start, 5)
    assert _paho_threads(unique_name) == []


async def test_requests_of_a_client_not_started_or_whose_start_failed_raise_at_once(
    unique_name: str,
) -> None:
    """After start() raised NotConnected (nothing listening), or before any start(), report()
    and get() took the client for one that lost its connection and sent again for retry_for
    (30 s) before NotConnected; after stop() they raised at once."""
    dev = DeviceClient(
        DeviceConfig(
            url=f"mqtt://127.0.0.1:{free_port()}",
            twin_id="org.acme:pump-4",
            password="unused",
            client_id=unique_name,
        )
    )
    # Well under retry_for: the old behaviour ends in a TimeoutError here.
    with pytest.raises(NotConnected, match="not started"):
        await asyncio.wait_for(dev.get(), 5)
    with pytest.raises(NotConnected):
        await dev.start(timeout=0.5)
    with pytest.raises(NotConnected, match=r"start\(\) failed"):
        await asyncio.wait_for(dev.report({"speed": 1}), 5)
    with pytest.raises(NotConnected, match=r"start\(\) failed"):
        await asyncio.wait_for(dev.get(), 5)
    await dev.stop()
    with pytest.raises(NotConnected, match="stopped"):
        await asyncio.wait_for(dev.report({"speed": 1}), 5)


async def test_a_client_started_again_after_stop_works_as_a_new_one(
    mosquitto_server: Mosquitto, service: FakeService, unique_name: str
) -> None:
    """Started again, it fetched the twin twice per connection (its connect listener added
    again) and its reports were no longer sent again (still marked stopped)."""
    async with _device(
        mosquitto_server, unique_name, request_timeout=0.5, retry_min_delay=0.05
    ) as dev:
        await eventually(lambda: service.gets == 1)
        await dev.stop()
        await dev.start()
        accepted = await dev.report({"mute": 1}, client_token="tok-again")
        assert accepted["clientToken"] == "tok-again"
        assert service.attempts["tok-again"] == 2
        await asyncio.sleep(0.3)
        assert service.gets == 2


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"retry_min_delay": 0}, "retry_min_delay"),
        ({"retry_min_delay": 5, "retry_max_delay": 1}, "retry_max_delay"),
        ({"retry_for": -1}, "retry_for"),
    ],
)
def test_retry_settings_that_cannot_work_are_refused(
    setting: dict[str, float], message: str
) -> None:
    """retry_min_delay=0 sent a request again in a busy loop, at 100% CPU, while the broker
    was away."""
    with pytest.raises(ValueError, match=message):
        DeviceConfig(url="mqtt://127.0.0.1:1", twin_id="org.acme:p", password="x", **setting)
