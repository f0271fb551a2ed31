"""While the store is out of reach: no device message is lost or stuck, no delta left wrong."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from tests.servers.ferretdb import FerretDB
from tests.servers.mosquitto import Mosquitto
from tests.service_fixtures import mongodb_env
from tests.service_process import ServiceProcess
from tests.sync.helpers import (
    QUIET,
    publisher,
    put_twin_once_up,
    retained_delta,
    send_reliably,
    sync_service,
    until_twin,
    wait_mqtt_up,
)


def _service(
    ferretdb: FerretDB, mosquitto: Mosquitto, tmp_path: Path, database: str
) -> ServiceProcess:
    """A service on ``ferretdb`` and ``mosquitto`` whose writes fail fast (in 0.2 s) while
    the store is down."""
    env = mongodb_env(ferretdb.url, database)
    env["TWIN_MONGODB__SERVER_SELECTION_TIMEOUT_MS"] = "200"
    return sync_service(tmp_path / "svc", mosquitto.url, **env, **QUIET)


async def test_reports_sent_during_a_long_store_outage_are_applied_when_it_is_back(
    fresh_ferretdb: FerretDB, fresh_mosquitto: Mosquitto, tmp_path: Path, unique_name: str
) -> None:
    """The handlers used to give up on a message after about 16 s of failed writes and leave
    it unacknowledged. The broker sends such a message again only on a new session, so
    the report stayed stuck after the store came back."""
    proc = _service(fresh_ferretdb, fresh_mosquitto, tmp_path, unique_name)
    device = None
    try:
        twin = "org.acme:outage"
        start = put_twin_once_up(proc, twin, reported={"n": 0})
        device = await publisher(fresh_mosquitto.url, f"{unique_name}-dev")
        topic = f"twins/{twin}/reported/update"
        fresh_ferretdb.stop()
        for n in range(1, 4):
            await send_reliably(device, topic, {"state": {"n": n}, "clientToken": f"t{n}"})
        await asyncio.sleep(22)  # longer than the handlers used to retry
        await fresh_ferretdb.astart()
        async with proc.async_client() as api:
            doc = await until_twin(api, twin, lambda d: d["reported"]["n"] == 3, 30)
        assert doc["reportedVersion"] == start["reportedVersion"] + 3  # each applied once
    finally:
        if device is not None:
            await device.stop()
        proc.stop()


async def test_deltas_are_put_right_when_the_store_is_back_after_a_reconnection(
    fresh_ferretdb: FerretDB, fresh_mosquitto: Mosquitto, tmp_path: Path, unique_name: str
) -> None:
    """After each connection the service republishes the deltas and corrects those the
    broker holds wrongly. With the store down at that moment it used to give up at once,
    and the broker's wrong delta stayed until the next reconnection."""
    proc = _service(fresh_ferretdb, fresh_mosquitto, tmp_path, unique_name)
    try:
        twin = "org.acme:lost-delta"
        put_twin_once_up(proc, twin, desired={"n": 1})
        deadline = time.monotonic() + 15
        while await retained_delta(fresh_mosquitto.url, twin) is None:
            assert time.monotonic() < deadline, "the delta was never published"
        fresh_ferretdb.stop()
        # The broker loses the delta (a restart without persistence does that), and the
        # service connects again while its store is down.
        wiper = await publisher(fresh_mosquitto.url, f"{unique_name}-wiper")
        await wiper.publish(f"twins/{twin}/delta", b"", retain=True)
        await wiper.stop()
        await fresh_mosquitto.arestart()
        wait_mqtt_up(proc, timeout=30)
        await asyncio.sleep(2)  # its pass after connecting has met the store down
        assert await retained_delta(fresh_mosquitto.url, twin) is None
        await fresh_ferretdb.astart()
        deadline = time.monotonic() + 30
        while (delta := await retained_delta(fresh_mosquitto.url, twin)) is None:
            assert time.monotonic() < deadline, "the lost delta was never published again"
        assert delta["state"] == {"n": 1}
    finally:
        proc.stop()


async def _websocket_close_code(proc: ServiceProcess) -> int | None:
    url = proc.url.replace("http://", "ws://") + "/api/v1/ws"
    async with websockets.connect(url) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    return closed.value.rcvd.code if closed.value.rcvd else None


async def test_a_service_started_while_the_store_is_down_starts_when_it_answers(
    fresh_ferretdb: FerretDB, fresh_mosquitto: Mosquitto, tmp_path: Path, unique_name: str
) -> None:
    """A replica (re)started during a store outage used to exit at once ("cannot start"),
    and Kubernetes restarts a container that keeps exiting later and later, long after the
    store is back. It now waits, alive and answering 503 service.starting, and starts as
    soon as the store answers; the reports its devices sent meanwhile wait at the broker
    and are applied then."""
    proc = _service(fresh_ferretdb, fresh_mosquitto, tmp_path, unique_name)
    device = None
    try:
        twin = "org.acme:late-store"
        start = put_twin_once_up(proc, twin, reported={"n": 0})
        proc.stop()
        fresh_ferretdb.stop()
        device = await publisher(fresh_mosquitto.url, f"{unique_name}-dev")
        for n in range(1, 4):  # to the stopped service's persistent session
            await send_reliably(
                device, f"twins/{twin}/reported/update", {"state": {"n": n}, "clientToken": f"t{n}"}
            )
        proc.start()  # returns once /health answers
        async with proc.async_client() as api:
            ready = await api.get("/ready?require=store")
            assert ready.status_code == 503, ready.text
            assert ready.json()["status"] == "starting"
            assert "cannot open MongoDB" in ready.json()["checks"]["store"]["error"]
            refused = await api.get(f"/api/v1/twins/{twin}")
            assert refused.status_code == 503
            assert refused.json()["error"] == "service.starting"
            assert await _websocket_close_code(proc) == 1013  # try again later
            await asyncio.sleep(2)  # an attempt or two more meet the store down
            assert (await api.get("/ready")).json()["status"] == "starting"
            await fresh_ferretdb.astart()
            doc = await until_twin(api, twin, lambda d: d.get("reported", {}).get("n") == 3, 45)
            assert doc["reportedVersion"] == start["reportedVersion"] + 3  # each applied once
            assert (await api.get("/ready?require=store")).status_code == 200
        assert "the twin store answers: the service has started" in proc.log_tail()
    finally:
        if device is not None:
            await device.stop()
        proc.stop()
