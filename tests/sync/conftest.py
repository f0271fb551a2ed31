"""Fixtures for the device-sync tests: real mosquitto brokers and the real service process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.servers.fixtures import (  # re-exported as fixtures for this package
    fresh_mosquitto,
    mosquitto_factory,
    mosquitto_server,
    unique_name,
)
from tests.servers.mosquitto import Mosquitto
from tests.service_process import ServiceProcess
from tests.sync.helpers import sync_service, wait_mqtt_up

__all__ = ["fresh_mosquitto", "mosquitto_factory", "mosquitto_server", "unique_name"]

#: The twin size limit of ``svc``: small, so that a device's payload can exceed it.
SVC_MAX_TWIN_BYTES = 4096


@pytest.fixture(scope="module")
def svc(
    mosquitto_server: Mosquitto, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    """A service on the shared mosquitto, one per test module."""
    proc = sync_service(
        tmp_path_factory.mktemp("svc"),
        mosquitto_server.url,
        TWIN_LIMITS__MAX_TWIN_BYTES=str(SVC_MAX_TWIN_BYTES),
        # Only the first message of a test twin writes lastSeen: revisions stay predictable.
        TWIN_MQTT__LASTSEEN_COALESCE_SECONDS="600",
    )
    wait_mqtt_up(proc)
    try:
        yield proc
    finally:
        proc.stop()
