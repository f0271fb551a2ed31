"""Devices after a restore from a backup (docs/backup.md): what the lost database left on
the broker is corrected, and the next desired values outrank every one devices saw."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.servers.mosquitto import Mosquitto
from tests.store.test_backup import backup
from tests.store.test_restore import restore
from tests.sync.helpers import patch_desired, put_twin, sync_service, wait_mqtt_up
from tests.sync.test_delivery import retire
from tests.sync.test_delta_sync import _retained_delta


@pytest.mark.parametrize("retired_first", [False, True], ids=["service", "retire-first"])
async def test_after_a_restore_devices_get_newer_deltas_and_none_of_lost_twins(
    tmp_path: Path, fresh_mosquitto: Mosquitto, unique_name: str, retired_first: bool
) -> None:
    # A broker of its own: the restore clears every delta no twin of it has.
    url = fresh_mosquitto.url
    kept, born = f"org.acme:{unique_name}-kept", f"org.acme:{unique_name}-born"
    data, copy = tmp_path / "svc", tmp_path / "backup.sqlite3"
    svc = sync_service(data, url, client_id="svc-old")
    try:
        wait_mqtt_up(svc)
        with svc.client() as api:
            put_twin(api, kept, desired={"v": 0})
            done = backup(str(copy), "--data-dir", str(data))
            assert done.returncode == 0, done.stderr
            for n in range(1, 6):  # desired values a device applied, then lost
                lost = patch_desired(api, kept, {"v": n})
            put_twin(api, born, desired={"valve": "open"})
        async with asyncio.timeout(20):
            while await _retained_delta(url, born) is None:
                await asyncio.sleep(0.2)
            while json.loads(await _retained_delta(url, kept) or b"{}").get("state") != {"v": 5}:
                await asyncio.sleep(0.2)
    finally:
        svc.stop()

    restore(copy, data)
    if retired_first:
        # Scaling down before the service's first start: retire writes (it handles the
        # session's queued reports), yet leaves announcing the restore to the service.
        done = retire(data, "svc-old", {"TWIN_MQTT_URL": url})
        assert done.returncode == 0, done.stdout + done.stderr
    svc = sync_service(data, url)
    try:
        wait_mqtt_up(svc)
        # The twin created after the backup does not exist: neither does its delta.
        async with asyncio.timeout(20):
            while await _retained_delta(url, born) is not None:
                await asyncio.sleep(0.2)
        # The restored twin's delta is back, newer than any the device applied.
        async with asyncio.timeout(20):
            while (restored := json.loads(await _retained_delta(url, kept) or b"{}")).get(
                "state"
            ) != {"v": 0}:
                await asyncio.sleep(0.2)
        assert restored["desiredVersion"] > lost["desiredVersion"], (restored, lost)
        with svc.client() as api:
            patch_desired(api, kept, {"v": 6})
        async with asyncio.timeout(20):
            while (delta := json.loads(await _retained_delta(url, kept) or b"{}")).get("state") != {
                "v": 6
            }:
                await asyncio.sleep(0.2)
        assert delta["desiredVersion"] > restored["desiredVersion"]
    finally:
        svc.stop()
    log = svc.log_path.read_text(errors="replace")
    assert f"the restored database does not have: {born}" in log, log
    assert log.count("restored from a backup") == 1, log
    assert "Traceback" not in log, log
