"""The MQTT event bus between service processes, on a real broker."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from connectivity.credentials import CredentialStore
from connectivity.mqtt_client import MqttClient
from connectivity.options import MqttOptions
from tests.servers.mosquitto import Mosquitto
from tests.service_process import ServiceProcess
from twin_service.streams.bus import MqttBus


def _options(broker: Mosquitto, client_id: str) -> MqttOptions:
    return MqttOptions(url=broker.url, client_id=client_id, persistent_session=False)


async def _connected(*buses: MqttBus) -> None:
    for _ in range(100):
        if all(bus.describe()["status"] == "up" for bus in buses):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the buses did not connect")


def test_notices_of_one_turn_are_coalesced_into_the_highest(mosquitto_server: Mosquitto) -> None:
    """Writes finished in one turn of the loop (one group commit) send one notice, of the
    highest sequence; the next turn's writes send another. None is lost at the end."""

    async def run() -> tuple[list[int], list[int]]:
        a = MqttBus(_options(mosquitto_server, "bus-test-a"))
        b = MqttBus(_options(mosquitto_server, "bus-test-b"))
        local: list[int] = []
        remote: list[int] = []
        await a.start(local.append)
        await b.start(remote.append)
        try:
            await _connected(a, b)
            await asyncio.sleep(0.2)  # both subscriptions active
            for seq in range(1, 101):
                await a.announce(seq)
            await asyncio.sleep(0.2)
            for seq in range(101, 151):
                await a.announce(seq)
            for _ in range(100):
                if remote and remote[-1] == 150:
                    break
                await asyncio.sleep(0.05)
            # Sent by b after the broker passed a's last notice on: an echo of a's own
            # notices would reach a before this one.
            await b.announce(151)
            for _ in range(100):
                if local and local[-1] == 151:
                    break
                await asyncio.sleep(0.05)
        finally:
            await a.stop()
            await b.stop()
        return local, remote

    local, remote = asyncio.run(run())
    # The announcing process hears every sequence at once (its own hub is poked directly),
    # and not again from the broker (MQTT 5 No Local: an echo per group commit cost CPU
    # for nothing); the other's notice it hears from the broker.
    assert local == list(range(1, 152))
    assert remote == [100, 150, 151]


def test_malformed_notices_are_ignored_with_a_warning(
    mosquitto_server: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    """Anyone who may publish on the internal topic can send anything there: each bad
    notice is one warning (a deeply nested one raised RecursionError in the handler)."""
    bad = [b"", b"not json", b"[1]", b'{"seq": "x"}', b"{}", b"[" * 5000 + b"]" * 5000]

    async def run() -> list[int]:
        bus = MqttBus(_options(mosquitto_server, "bus-test-bad"))
        sender = MqttBus(_options(mosquitto_server, "bus-test-good"))
        raw = MqttClient(MqttOptions(url=mosquitto_server.url, client_id="bus-test-raw"))
        heard: list[int] = []
        await bus.start(heard.append)
        await sender.start(lambda _seq: None)
        await raw.start()
        try:
            await _connected(bus, sender)
            await raw.wait_connected(10)
            await asyncio.sleep(0.2)  # the subscription is active
            for payload in bad:
                await raw.publish(MqttBus.TOPIC, payload)
            await sender.announce(7)  # after the bad ones: when it arrives, they have
            for _ in range(100):
                if heard:
                    break
                await asyncio.sleep(0.05)
        finally:
            await raw.stop()
            await sender.stop()
            await bus.stop()
        return heard

    with caplog.at_level(logging.WARNING):
        assert asyncio.run(run()) == [7]
    warnings = [r for r in caplog.records if "malformed bus notice" in r.getMessage()]
    assert len(warnings) == 2 * len(bad), caplog.text  # both buses hear them
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_the_bus_logs_in_as_the_service_on_a_broker_with_passwords(
    mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path
) -> None:
    """The documented production setup: mosquitto with the password file and ACL that
    ``devices export-mosquitto`` writes, the service's password in its settings (not in
    the URL). The bus connected anonymously, was refused, and /ready stayed 503."""
    passwords, acl = tmp_path / "passwd", tmp_path / "acl"
    CredentialStore(tmp_path / "devices.json").write_mosquitto_files(
        passwords, acl, "twin-service", "twins/{twinId}", service_password="svc-secret"
    )
    broker = mosquitto_factory(password_file=passwords, acl_file=acl)
    svc = ServiceProcess(
        tmp_path / "svc",
        env={
            "TWIN_MQTT__ENABLED": "true",
            "TWIN_MQTT_URL": f"mqtt://127.0.0.1:{broker.port}",
            "TWIN_MQTT__SERVICE_PASSWORD": "svc-secret",
        },
    ).start()
    try:
        deadline = time.monotonic() + 15
        while True:
            ready = httpx.get(f"{svc.url}/ready", timeout=5)
            if ready.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        checks = ready.json()["checks"]
        assert ready.status_code == 200, (checks, svc.log_tail())
        assert (checks["bus"]["kind"], checks["bus"]["status"]) == ("mqtt", "up"), checks
        assert checks["mqtt"]["status"] == "up", checks
        assert "Not authorized" not in svc.log_tail()
    finally:
        svc.stop()
