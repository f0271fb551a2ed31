"""Desired values expire on time whichever process wrote their time to live, once.

The sweeper used to learn due times only from its own process's commits and from its
start-up scan: a twin written with ``?ttl=`` through a process that then stopped stayed
``pending`` past its expiry on every other process until one of them restarted or wrote it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from tests.service_fixtures import mongodb_env
from tests.service_process import ServiceProcess


@pytest.fixture(params=["sqlite", "mongodb"])
def pair(
    request: pytest.FixtureRequest,
    service_factory: Callable[..., ServiceProcess],
    tmp_path: Path,
    unique_name: str,
) -> tuple[ServiceProcess, ServiceProcess]:
    """Two service processes on one store."""
    if request.param == "sqlite":
        data = tmp_path / "shared"  # one SQLite file for both
        return service_factory(data), service_factory(data)
    env = mongodb_env(request.getfixturevalue("ferretdb_server").url, unique_name)
    return service_factory(env=env), service_factory(env=env)


def _expiries(api: httpx.Client, twin: str, key: str, wait: float) -> list[dict[str, str]]:
    """The system changes of ``twin`` once ``key`` expired (within ``wait`` seconds)."""
    deadline = time.monotonic() + wait
    while (entry := api.get(f"{twin}/lifecycle").json()[key])["state"] != "expired":
        assert time.monotonic() < deadline, f"never expired: {entry}"
        time.sleep(0.1)
    history = api.get(f"{twin}/history").json()["items"]
    return [item for item in history if item["origin"] == "system"]


def test_an_expiry_set_through_a_stopped_process_is_committed_by_another(
    pair: tuple[ServiceProcess, ServiceProcess],
) -> None:
    first, second = pair
    twin = "/api/v1/twins/org.acme:ttl-elsewhere"
    with first.client() as api:
        # The first process knows a later expiry of the twin: the earlier one set through
        # the second process must not wait for it.
        put = api.put(twin, params={"ttl": 600}, json={"desired": {"late": 1}})
        assert put.status_code == 201, put.text
    with second.client() as api:
        put = api.put(f"{twin}/desired/led", params={"ttl": 2}, json="blue")
        assert put.status_code == 201, put.text
        expires = api.get(f"{twin}/lifecycle").json()["led"]["expires"]
    second.stop()
    with first.client() as api:
        expiries = _expiries(api, twin, "led", 15)  # 2 s to live, and the first one's poll
    assert len(expiries) == 1, expiries
    late = datetime.fromisoformat(expiries[0]["timestamp"]) - datetime.fromisoformat(expires)
    assert 0 <= late.total_seconds() < 5, (expires, expiries[0]["timestamp"])


def test_an_expiry_both_processes_know_is_committed_once(
    pair: tuple[ServiceProcess, ServiceProcess],
) -> None:
    first, second = pair
    twin = "/api/v1/twins/org.acme:ttl-both"
    with first.client() as api:
        put = api.put(twin, params={"ttl": 2}, json={"desired": {"led": "blue"}})
        assert put.status_code == 201, put.text
    time.sleep(1.5)  # the second process has read the journal by now
    with second.client() as api:
        expiries = _expiries(api, twin, "led", 15)
    time.sleep(1.5)  # a second expiry, if any, has landed too
    with first.client() as api:
        history = api.get(f"{twin}/history").json()["items"]
    assert [item for item in history if item["origin"] == "system"] == expiries
    assert len(expiries) == 1, history
