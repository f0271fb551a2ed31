"""A write the store committed without confirming it in time still reaches the device."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx

from tests.servers.ferretdb import FerretDB
from tests.servers.mosquitto import Mosquitto
from tests.service_fixtures import mongodb_env
from tests.sync.helpers import QUIET, retained_delta, sync_service, wait_mqtt_up

#: Attributes enough that FerretDB takes longer over the twin's update than the write bound
#: (0.8 of the gap timeout below): the service answers 503 while the update goes on.
BIG = {f"k{i:04d}": i for i in range(4500)}


def _twin(api: httpx.Client, twin: str) -> Any:
    response = api.get(f"/api/v1/twins/{twin}")
    return response.json() if response.status_code == 200 else None


def _committed_in_doubt(api: httpx.Client, twin: str) -> int:
    """PATCH desired ``x`` of ``twin`` until a write answers 503 and commits all the same;
    returns its value."""
    for x in range(1, 40):
        response = api.patch(
            f"/api/v1/twins/{twin}",
            content=json.dumps({"desired": {"x": x}}),
            headers={"Content-Type": "application/merge-patch+json"},
        )
        if response.status_code == 200:
            continue
        assert response.status_code == 503, response.text
        assert "may or may not have been committed" in response.text
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            doc = _twin(api, twin)
            if doc is not None and doc["desired"]["x"] == x:
                return x
            time.sleep(0.2)
    raise AssertionError("no write answered 503 and committed")


async def test_a_desired_change_committed_but_not_confirmed_reaches_theretained_delta(
    ferretdb_server: FerretDB, mosquitto_server: Mosquitto, tmp_path: Path, unique_name: str
) -> None:
    """The delta was published only after a confirmed write: one that answered 503 ("may or
    may not have been committed") and committed left the retained delta stale (or missing)
    until the service's next MQTT connection, so the device never applied it."""
    env = mongodb_env(ferretdb_server.url, unique_name)
    env["TWIN_MONGODB__GAP_TIMEOUT_SECONDS"] = "0.15"
    env["TWIN_MONGODB__OPERATION_TIMEOUT_MS"] = "20000"
    proc = sync_service(tmp_path / "svc", mosquitto_server.url, **env, **QUIET)
    twin = f"org.doubt:{unique_name}"
    try:
        wait_mqtt_up(proc)
        with proc.client() as api:
            api.timeout = httpx.Timeout(60)
            deadline = time.monotonic() + 60
            while _twin(api, twin) is None:  # the creation may be in doubt too
                assert time.monotonic() < deadline, "the twin was never created"
                api.put(f"/api/v1/twins/{twin}", json={"desired": {"x": 0}, "attributes": BIG})
                time.sleep(1)
            x = _committed_in_doubt(api, twin)
            deadline = time.monotonic() + 45
            while True:
                doc = _twin(api, twin)
                want = {"state": doc["delta"], "desiredVersion": doc["desiredVersion"]}
                retained = await retained_delta(mosquitto_server.url, twin)
                if retained == want:
                    break
                assert time.monotonic() < deadline, f"retained {retained}, twin has {want}"
                time.sleep(0.5)
            assert retained["state"]["x"] == x
    finally:
        proc.stop()
