"""Device messages while the store is out of reach: none is lost, and none stays stuck."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.servers.ferretdb import FerretDB
from tests.servers.mosquitto import Mosquitto
from tests.service_fixtures import mongodb_env
from tests.sync.helpers import put_twin, send_reliably, sync_service, until_twin, wait_mqtt_up
from tests.sync.test_delivery import QUIET, _publisher


async def test_reports_sent_during_a_long_store_outage_are_applied_when_it_is_back(
    fresh_ferretdb: FerretDB, fresh_mosquitto: Mosquitto, tmp_path: Path, unique_name: str
) -> None:
    """The handlers used to give up on a message after about 16 s of failed writes and leave
    it unacknowledged. The broker sends such a message again only on a new session, so
    reports stayed stuck after the store came back, and 100 stuck ones (mosquitto's
    max_inflight_messages) stopped all intake until the service restarted."""
    env = mongodb_env(fresh_ferretdb.url, unique_name)
    env["TWIN_MONGODB__SERVER_SELECTION_TIMEOUT_MS"] = "200"  # each failed write takes 0.2 s
    proc = sync_service(tmp_path / "svc", fresh_mosquitto.url, **env, **QUIET)
    device = None
    try:
        wait_mqtt_up(proc)
        twin = "org.acme:outage"
        with proc.client() as api:
            start = put_twin(api, twin, reported={"n": 0})
        device = await _publisher(fresh_mosquitto.url, f"{unique_name}-dev")
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
