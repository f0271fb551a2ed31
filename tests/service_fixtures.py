"""Fixtures that start the real service."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.service_process import ServiceProcess


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """One service per test module on the embedded defaults (SQLite, built-in search)."""
    proc = ServiceProcess(tmp_path_factory.mktemp("svc")).start()
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
