"""Small helpers shared by the connectivity tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from connectivity.broker import EmbeddedBroker, EmbeddedBrokerConfig
from connectivity.errors import ConnectRefused
from connectivity.messages import InboundMessage
from connectivity.mqtt_client import MqttClient
from connectivity.options import MqttOptions
from tests.servers.process import free_port


async def started(url: str, client_id: str, **kw: object) -> MqttClient:
    """A started and connected MqttClient."""
    client = MqttClient(MqttOptions(url=url, client_id=client_id, **kw))  # type: ignore[arg-type]
    await client.start()
    await client.wait_connected(10)
    return client


async def assert_refused(url: str, client_id: str, **kw: object) -> None:
    """Connecting with these options must end in ConnectRefused."""
    client = MqttClient(MqttOptions(url=url, client_id=client_id, persistent_session=False, **kw))  # type: ignore[arg-type]
    await client.start()
    try:
        with pytest.raises(ConnectRefused):
            await client.wait_connected(10)
    finally:
        await client.stop(grace=0)


class Collector:
    """A handler that records messages and lets a test wait for a count."""

    def __init__(self) -> None:
        self.messages: list[InboundMessage] = []
        self._changed = asyncio.Event()

    async def __call__(self, msg: InboundMessage) -> None:
        self.messages.append(msg)
        self._changed.set()

    async def wait_for(self, count: int, timeout: float = 10) -> list[InboundMessage]:
        async with asyncio.timeout(timeout):
            while len(self.messages) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.messages


async def eventually(predicate: Callable[[], bool], timeout: float = 10) -> None:
    """Poll ``predicate`` until true."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


def bare_broker(tmp_path: Path, **limits: Any) -> EmbeddedBroker:
    """A broker with the service account only, and ``limits`` of EmbeddedBrokerConfig."""
    return EmbeddedBroker(
        EmbeddedBrokerConfig(
            service_username="service",
            service_password="svc-pw",
            credentials_path=tmp_path / "creds.json",
            port=free_port(),
            **limits,
        )
    )
