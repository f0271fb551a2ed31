"""Pytest fixtures for real servers. Load with ``pytest_plugins = ["tests.servers.fixtures"]``.

Session-scoped servers are shared: tests must use their own topics, client ids and database
names (`unique_name`). Tests that restart, kill or reconfigure a server take a fresh one
(`fresh_mosquitto`, `mosquitto_factory`, `fresh_ferretdb`); both servers start in well under
a second.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.servers import ferretdb as ferretdb_module
from tests.servers import mosquitto as mosquitto_module
from tests.servers.ferretdb import FerretDB
from tests.servers.mosquitto import Mosquitto
from tests.servers.process import started_then_stopped
from tests.servers.require import require_server

__all__ = [
    "ferretdb_server",
    "fresh_ferretdb",
    "fresh_mosquitto",
    "mosquitto_factory",
    "mosquitto_server",
    "unique_name",
]


def _mosquitto_binary() -> Path:
    binary = mosquitto_module.find_binary()
    if binary is None:
        require_server("mosquitto", mosquitto_module.INSTALL_HINT)
    return binary


def _ferretdb_binary() -> Path:
    binary = ferretdb_module.ensure_binary()
    if binary is None:
        require_server("ferretdb", ferretdb_module.BUILD_HINT)
    return binary


@pytest.fixture(scope="session")
def mosquitto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One broker for the whole session. Do not stop or restart it."""
    yield from started_then_stopped(
        Mosquitto(tmp_path_factory.mktemp("mosquitto"), binary=_mosquitto_binary())
    )


@pytest.fixture
def mosquitto_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., Mosquitto]]:
    """Start brokers with custom options (keyword arguments of `kind`, `Mosquitto` unless
    given); all stopped after."""
    binary = _mosquitto_binary()
    brokers: list[Mosquitto] = []

    def make(kind: type[Mosquitto] = Mosquitto, **options: Any) -> Mosquitto:
        options.setdefault("binary", binary)
        broker = kind(tmp_path_factory.mktemp("mosquitto"), **options)
        brokers.append(broker)
        return broker.start()

    try:
        yield make
    finally:
        for broker in brokers:
            broker.stop()


@pytest.fixture
def fresh_mosquitto(mosquitto_factory: Callable[..., Mosquitto]) -> Mosquitto:
    """A broker of this test's own, free to restart or kill."""
    return mosquitto_factory()


@pytest.fixture(scope="session")
def ferretdb_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FerretDB]:
    """One FerretDB for the whole session. Do not stop or restart it."""
    yield from started_then_stopped(
        FerretDB(tmp_path_factory.mktemp("ferretdb"), binary=_ferretdb_binary())
    )


@pytest.fixture
def fresh_ferretdb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FerretDB]:
    """A FerretDB of this test's own, with empty data, free to restart or kill."""
    yield from started_then_stopped(
        FerretDB(tmp_path_factory.mktemp("ferretdb"), binary=_ferretdb_binary())
    )


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> str:
    """A short name unique to this test, safe for MQTT topics, client ids and database names."""
    stem = re.sub(r"[^A-Za-z0-9]+", "_", request.node.name)[:40].strip("_")
    return f"t_{stem}_{uuid.uuid4().hex[:8]}"
