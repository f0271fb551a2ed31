"""Fixtures for the device-sync tests: real mosquitto brokers and the real service process."""

from __future__ import annotations

from tests.servers.fixtures import (  # re-exported as fixtures for this package
    fresh_mosquitto,
    mosquitto_factory,
    mosquitto_server,
    unique_name,
)

__all__ = ["fresh_mosquitto", "mosquitto_factory", "mosquitto_server", "unique_name"]
