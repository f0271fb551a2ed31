"""The service's answers keep to the embedded broker's packet size limit.

A twin within ``limits.max_twin_bytes`` can still have a ``get/accepted`` larger than the
broker takes: it carries desired twice (as itself and as the delta) and the lifecycle, which
the limit does not count. The embedded broker closes the connection of a client that sends
a packet over its limit, and paho sent the queued answer again after every reconnection:
the service's connection went down for every device, for good.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from connectivity.errors import RequestRejected
from tests.servers.mosquitto import Mosquitto
from tests.servers.process import free_port
from tests.sync.helpers import (
    RawDevice,
    add_device,
    device,
    embedded_service,
    patch_desired,
    put_twin,
    sync_service,
    until,
    wait_mqtt_up,
)

#: 2,000 leaves of 500 characters: about 1 MB of desired, within a 1 MiB twin. Its get
#: answer (desired, delta, lifecycle) is over 2.1 MB, the broker's limit being 2 MiB.
BIG_DESIRED = {f"k{i:04}": "x" * 500 for i in range(2000)}


async def test_an_answer_over_the_packet_limit_is_a_413_and_harms_no_other_device(
    tmp_path: Path,
) -> None:
    data = tmp_path / "svc"
    big, small = "org.acme:big", "org.acme:small"
    passwords = {twin: add_device(data, twin) for twin in (big, small)}
    port = free_port()
    proc = embedded_service(
        data,
        port,
        TWIN_LIMITS__MAX_TWIN_BYTES=str(1024 * 1024),
        TWIN_LIMITS__MAX_REQUEST_BYTES=str(4 * 1024 * 1024),
    )
    url = f"mqtt://127.0.0.1:{port}"
    try:
        wait_mqtt_up(proc)
        with proc.client() as api:
            put_twin(api, big, desired=BIG_DESIRED)
            put_twin(api, small, desired={"x": 1})
        other = device(url, small, password=passwords[small], protocol=4, retry_for=0)
        await other.start()
        dev = device(url, big, password=passwords[big], protocol=4, retry_for=0)
        await dev.start()
        try:

            async def get_refused() -> dict[str, object]:
                with pytest.raises(RequestRejected) as rejected:
                    await dev.get(timeout=10)
                return rejected.value.body

            async def reports() -> None:
                for i in range(5):
                    accepted = await other.report({"x": i}, timeout=5)
                    assert accepted["reportedVersion"] >= 1

            # The service's connection stays: another device is served meanwhile.
            body, _ = await asyncio.gather(get_refused(), reports())
            assert (body["code"], body["error"]) == (413, "twin.toolarge"), body
            assert "packet size limit" in str(body["message"]), body
            async with proc.async_client() as api:
                doc = (await api.get(f"/api/v1/twins/{small}")).json()
                assert doc["reported"] == {"x": 4}
                mqtt = (await api.get("/ready")).json()["checks"]["mqtt"]
            assert (mqtt["status"], mqtt["reconnects"]) == ("up", 0), mqtt
        finally:
            await dev.stop()
            await other.stop()
        log = proc.log_path.read_text(errors="replace")
        assert "a packet of" not in log, proc.log_tail()
    finally:
        proc.stop()


def test_the_big_twin_is_within_the_twin_limit() -> None:
    """The premise: the twin itself is accepted, only its answer is too large."""
    size = len(httpx.Request("PUT", "http://x", json={"desired": BIG_DESIRED}).content)
    assert 1_000_000 < size < 1024 * 1024


async def test_a_delta_over_an_mqtt5_brokers_limit_clears_the_retained_one(
    mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path
) -> None:
    """An MQTT 5 broker announcing a Maximum Packet Size below the twin's size: the delta
    cannot go out, and the retained one, older, must not stay for devices to apply."""
    broker = mosquitto_factory(extra_config=["max_packet_size 20000"])
    proc = sync_service(tmp_path / "svc", broker.url, TWIN_MQTT__LASTSEEN_COALESCE_SECONDS="600")
    twin = "org.acme:bigdelta"
    try:
        wait_mqtt_up(proc)
        with proc.client() as api:
            put_twin(api, twin, desired={"a": 1})
        async with RawDevice(broker.url, twin) as dev:
            assert (await dev.reply("delta"))["state"] == {"a": 1}
            with proc.client() as api:
                patch_desired(api, twin, {"blob": "x" * 30_000})
            topic = f"{dev.base}/delta"
            await until(lambda: any(m.topic == topic and not m.payload for m in dev.inbox.messages))
            answer = await dev.call("get", {"clientToken": "g"}, "rejected")
            assert (answer["code"], answer["error"], answer["clientToken"]) == (
                413,
                "twin.toolarge",
                "g",
            ), answer
            accepted = await dev.call(
                "reported/update", {"state": {"a": 1}, "clientToken": "r"}, "accepted"
            )
            assert accepted["clientToken"] == "r"
        async with proc.async_client() as api:
            mqtt = (await api.get("/ready")).json()["checks"]["mqtt"]
        assert (mqtt["status"], mqtt["reconnects"]) == ("up", 0), mqtt
    finally:
        proc.stop()


async def test_the_largest_twin_limit_connects_to_an_mqtt5_broker(
    mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path
) -> None:
    """Twice a ``limits.max_twin_bytes`` of 128 MiB or more is past MQTT's largest packet
    (268435455 bytes), which paho refused to announce: the start failed with a traceback.
    The service announces MQTT's largest instead."""
    broker = mosquitto_factory()
    proc = sync_service(tmp_path / "svc", broker.url, TWIN_LIMITS__MAX_TWIN_BYTES=str(2**28))
    try:
        wait_mqtt_up(proc)
    finally:
        proc.stop()
