"""Fixtures that start the real service."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.service_process import ServiceProcess


def mongodb_env(url: str, database: str) -> dict[str, str]:
    """The settings of a service on the MongoDB store."""
    return {
        "TWIN_STORE": "mongodb",
        "TWIN_MONGODB_URL": url,
        "TWIN_MONGODB__DATABASE": database,
    }


@pytest.fixture(scope="module", params=["sqlite", "mongodb"])
def service(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    """One service per test module and store: the embedded defaults (SQLite, built-in
    search), then the MongoDB store on the session's FerretDB (a database per module)."""
    env: dict[str, str] = {}
    if request.param == "mongodb":
        server = request.getfixturevalue("ferretdb_server")
        stem = re.sub(r"[^A-Za-z0-9]+", "_", request.module.__name__.rsplit(".", 1)[-1])[:40]
        env = mongodb_env(server.url, f"svc_{stem}_{uuid.uuid4().hex[:8]}")
    proc = ServiceProcess(tmp_path_factory.mktemp("svc"), env=env).start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def api(service: ServiceProcess) -> Iterator[httpx.Client]:
    with service.client() as client:
        yield client


@pytest.fixture
def service_factory(tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """Start extra service processes (sharing ``data_dir`` if given); all stopped after."""
    started: list[ServiceProcess] = []

    def start(data_dir: Path | None = None, **kwargs: object) -> ServiceProcess:
        proc = ServiceProcess(data_dir or tmp_path / f"svc{len(started)}", **kwargs)  # type: ignore[arg-type]
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()
