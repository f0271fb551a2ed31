"""Delivery guarantees: crash of the service, restart of the broker, two replicas."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from connectivity.messages import InboundMessage
from connectivity.mqtt_client import MqttClient
from connectivity.options import MqttOptions
from tests.connectivity.helpers import eventually
from tests.servers.mosquitto import Mosquitto
from tests.service_process import ServiceProcess, service_env
from tests.sync.helpers import (
    QUIET,
    get_twin,
    publisher,
    put_twin,
    put_twin_once_up,
    send_counter,
    send_reliably,
    sync_service,
    until_twin,
    wait_mqtt_up,
)


async def test_sigkill_during_1000_reports_applies_each_exactly_once(
    fresh_mosquitto: Mosquitto, tmp_path: Path
) -> None:
    twin = "org.acme:crashy"
    data = tmp_path / "svc"
    proc = sync_service(data, fresh_mosquitto.url, client_id="svc-crash", **QUIET)
    start = put_twin_once_up(proc, twin, reported={"counter": -1})
    device = await publisher(fresh_mosquitto.url, "dev-crashy")
    try:
        await send_counter(device, twin, range(301), "c")
        proc.kill()
        await send_counter(device, twin, range(301, 1000), "c")
        proc = sync_service(data, fresh_mosquitto.url, client_id="svc-crash", **QUIET)
        async with proc.async_client() as api:
            doc = await until_twin(api, twin, lambda d: d["reported"]["counter"] == 999, 60)
        # One revision and one reported version per update: nothing lost, nothing twice.
        assert doc["revision"] == start["revision"] + 1000
        assert doc["reportedVersion"] == start["reportedVersion"] + 1000
    finally:
        await device.stop()
        proc.stop()


@pytest.mark.parametrize("group", ["", "shared"], ids=["plain", "shared"])
async def test_broker_restart_mid_stream_loses_nothing_acknowledged(
    fresh_mosquitto: Mosquitto, tmp_path: Path, group: str
) -> None:
    """mosquitto 2.0 restores a persistent session after its restart but not its shared
    subscriptions: until the service subscribes again, a device's report has no subscriber,
    and mosquitto acknowledges and drops it (MQTT 5 reason code 0x10). The device sends it
    again on that code, and the service subscribes again first thing after connecting."""
    twin = "org.acme:restarty"
    began = datetime.now(UTC)
    proc = sync_service(
        tmp_path / "svc",
        fresh_mosquitto.url,
        client_id="svc-restart",
        TWIN_MQTT__SHARED_GROUP=group,
        **QUIET,
    )
    start = put_twin_once_up(proc, twin, reported={"counter": -1})
    device = await publisher(fresh_mosquitto.url, "dev-restarty")
    try:
        await send_counter(device, twin, range(101), "r")
        await fresh_mosquitto.arestart()
        await send_counter(device, twin, range(101, 300), "r")
        async with proc.async_client() as api:
            doc = await until_twin(api, twin, lambda d: d["reported"]["counter"] == 299, 20)
        assert doc["revision"] == start["revision"] + 300, doc
        wait_mqtt_up(proc)
        ready = httpx.get(f"{proc.url}/ready").json()["checks"]["mqtt"]
        assert ready["reconnects"] >= 1
        # The connection is back: lastError is history, and says when it happened.
        assert ready["status"] == "up" and ready["lastError"]
        at = datetime.fromisoformat(ready["lastErrorAt"].replace("Z", "+00:00"))
        assert began <= at <= datetime.now(UTC)
    finally:
        await device.stop()
        proc.stop()


async def test_two_replicas_given_one_client_id_are_told_so(
    mosquitto_server: Mosquitto, tmp_path: Path, unique_name: str
) -> None:
    """The likeliest way to deploy replicas wrong: one mqtt.client_id for all of them. They
    take the broker session from each other over and over, and each must say so in
    /ready's mqtt.lastError. A client of the service that derived its id from the shared one
    (the deltas' connection, at first) fought too, lost its connection at the same moments,
    and made it look like a broker restarting: nothing was said."""
    env = {**QUIET, "TWIN_MQTT__SHARED_GROUP": unique_name}
    replicas = [
        sync_service(tmp_path / f"r{n}", mosquitto_server.url, client_id=unique_name, **env)
        for n in range(2)
    ]
    try:

        def told(replica: ServiceProcess) -> bool:
            mqtt = httpx.get(f"{replica.url}/ready", timeout=5).json()["checks"]["mqtt"]
            return f"another client may be using client id {unique_name!r}" in str(
                mqtt.get("lastError")
            )

        await eventually(lambda: all(told(r) for r in replicas), timeout=60)
    finally:
        for replica in replicas:
            replica.stop()


async def test_two_replicas_share_the_work_and_handle_each_message_once(
    fresh_mosquitto: Mosquitto, tmp_path: Path
) -> None:
    data = tmp_path / "shared"
    env = {**QUIET, "TWIN_MQTT__SHARED_GROUP": "replicas"}
    one = sync_service(data, fresh_mosquitto.url, client_id="svc-a", **env)
    two = sync_service(data, fresh_mosquitto.url, client_id="svc-b", **env)
    twins = [f"org.acme:r{n}" for n in range(20)]
    try:
        wait_mqtt_up(one)
        wait_mqtt_up(two)
        with one.client() as api:
            starts = {t: put_twin(api, t, reported={"n": -1})["revision"] for t in twins}
        device = await publisher(fresh_mosquitto.url, "dev-many")
        try:
            for i in range(10):
                for t in twins:
                    body = {"state": {"n": i}, "clientToken": f"{t}-{i}"}
                    await send_reliably(device, f"twins/{t}/reported/update", body)
        finally:
            await device.stop()
        async with one.async_client() as api:
            for t in twins:
                doc = await until_twin(api, t, _counter_is(9), 30)
                assert doc["revision"] == starts[t] + 10
        stats = [httpx.get(f"{p.url}/ready").json()["checks"]["mqtt"] for p in (one, two)]
        assert sum(s["applied"] for s in stats) == 200
        assert all(s["applied"] > 0 for s in stats), stats
        assert sum(s["duplicates"] for s in stats) == 0
    finally:
        one.stop()
        two.stop()


async def test_a_killed_replica_applies_nothing_twice_when_its_session_resumes(
    fresh_mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """A replica killed between commits and their PUBACKs gets those reports again (DUP) when
    it comes back. The other replica went on with the devices' later reports meanwhile, past
    the last ``client_token_memory`` (32, the default here) tokens of each twin's book: 103
    of 6,000 reports were applied twice after one kill in a probe, before the journal's
    earlier books were looked at for redeliveries."""
    data, url = tmp_path / "shared", fresh_mosquitto.url
    env = {**QUIET, "TWIN_MQTT__SHARED_GROUP": "replicas"}
    replicas = [sync_service(data, url, client_id=f"svc-{n}", **env) for n in range(2)]
    twins = [f"org.acme:kill{n}" for n in range(5)]
    per_twin = 300
    device = await publisher(url, "dev-kill")
    acked = 0

    async def report(twin: str, n: int, room: asyncio.Semaphore) -> None:
        nonlocal acked
        async with room:
            body = {"state": {f"k{n}": n}, "clientToken": f"{twin}-{n}"}
            await send_reliably(device, f"twins/{twin}/reported/update", body)
            acked += 1

    try:
        for proc in replicas:
            wait_mqtt_up(proc)
        with replicas[1].client() as api:
            starts = {t: put_twin(api, t, reported={})["revision"] for t in twins}
        room = asyncio.Semaphore(50)
        stream = asyncio.gather(*(report(t, n, room) for n in range(per_twin) for t in twins))
        await eventually(lambda: acked >= 300, 60)
        replicas[0].kill()
        await eventually(lambda: acked >= 800, 60)  # the other replica went on meanwhile
        replicas[0] = sync_service(data, url, client_id="svc-0", **env)
        await asyncio.wait_for(stream, 120)
        async with replicas[1].async_client() as api:
            for twin in twins:
                doc = await until_twin(api, twin, lambda d: len(d["reported"]) == per_twin, 60)
                # One revision per report: none lost, none applied twice.
                assert doc["revision"] == starts[twin] + per_twin, twin
    finally:
        await device.stop()
        for proc in replicas:
            proc.stop()


def _counter_is(n: int) -> Callable[[dict[str, object]], bool]:
    return lambda doc: doc["reported"] == {"n": n}


_ = get_twin


async def test_retiring_a_removed_replica_hands_its_share_over(
    fresh_mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """A replica removed by scaling down leaves its session on the broker, still a member of
    the shared subscription: mosquitto queues a share of the device messages there. ``mqtt
    retire`` handles what it queued and ends it, so later messages all reach the others."""
    url = fresh_mosquitto.url
    data = tmp_path / "shared"
    env = {**QUIET, "TWIN_MQTT__SHARED_GROUP": "replicas"}
    stays = sync_service(data, url, client_id="svc-stays", **env)
    removed = sync_service(data, url, client_id="svc-removed", **env)
    twins = [f"org.acme:retire{n}" for n in range(20)]
    device = await publisher(url, "dev-retire")

    async def report_all(n: int) -> None:
        for t in twins:
            body = {"state": {"n": n}, "clientToken": f"{t}-{n}"}
            await send_reliably(device, f"twins/{t}/reported/update", body)

    def reported() -> list[object]:
        with stays.client() as api:
            return [get_twin(api, t)["reported"].get("n") for t in twins]

    try:
        wait_mqtt_up(stays)
        wait_mqtt_up(removed)
        with stays.client() as api:
            for t in twins:
                put_twin(api, t, reported={"n": -1})
        removed.stop()  # scaled down: its session stays, a member of the group
        await report_all(1)
        await asyncio.sleep(3)
        assert -1 in reported(), "mosquitto handed the removed replica no share this time"

        command = ["mqtt", "retire", "svc-removed", "--data-dir", str(data), "--quiet-seconds", "1"]
        retire = subprocess.run(
            [sys.executable, "-m", "twin_service", *command],
            capture_output=True,
            text=True,
            timeout=120,
            env=service_env(
                env | {"TWIN_MQTT_URL": url, "TWIN_MQTT__ENABLED": "true", "TWIN_LOG_LEVEL": "info"}
            ),
        )
        assert retire.returncode == 0, retire.stdout + retire.stderr
        assert "ended the MQTT session svc-removed" in retire.stdout
        # The deltas are the remaining replicas' to keep: no pass over them on the way out.
        assert "MQTT connected as svc-removed" in retire.stderr
        assert "republishing" not in retire.stderr
        assert reported() == [1] * len(twins)  # what its session held was handled

        await report_all(2)  # and nothing more is queued for it
        async with stays.async_client() as api:
            for t in twins:
                await until_twin(api, t, _counter_is(2), 15)
    finally:
        await device.stop()
        stays.stop()


def retire(data: Path, client_id: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = ["mqtt", "retire", client_id, "--data-dir", str(data), "--quiet-seconds", "1"]
    return subprocess.run(
        [sys.executable, "-m", "twin_service", *command],
        capture_output=True,
        text=True,
        timeout=120,
        env=service_env(env | {"TWIN_MQTT__ENABLED": "true"}),
    )


async def test_retiring_with_a_mistyped_data_dir_or_client_id_keeps_the_session(
    fresh_mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """A mistyped --data-dir created an empty store there, handled the session's queued
    reports against it (no such twin) and ended the session, exit 0: the reports were lost
    for the real store. Like ``index rebuild``, retire opens only a store that exists.

    A mistyped client id, one with no session on the broker, said it "ended the MQTT
    session svc-gnoe after handling 0 queued messages", exit 0, while the real session
    went on holding its reports (and the broker kept the session the retire had made)."""
    data, typo, twin = tmp_path / "data", tmp_path / "dta", "org.acme:retired"
    env = {**QUIET, "TWIN_MQTT__SHARED_GROUP": "replicas", "TWIN_MQTT_URL": fresh_mosquitto.url}
    removed = sync_service(data, fresh_mosquitto.url, client_id="svc-gone", **env)
    try:
        wait_mqtt_up(removed)
        with removed.client() as api:
            put_twin(api, twin, reported={"n": 0})
    finally:
        removed.stop()
    device = await publisher(fresh_mosquitto.url, "dev-retired")
    try:
        for n in range(1, 4):
            body = {"state": {"n": n}, "clientToken": f"n{n}"}
            await send_reliably(device, f"twins/{twin}/reported/update", body)
    finally:
        await device.stop()
    wrong = retire(typo, "svc-gone", env)
    assert wrong.returncode == 1, wrong.stdout + wrong.stderr
    assert f"there is no twin store at {typo / 'twins.sqlite3'}" in wrong.stderr
    assert "Traceback" not in wrong.stderr and not typo.exists()
    mistyped = retire(data, "svc-gnoe", env)
    assert mistyped.returncode == 1, mistyped.stdout + mistyped.stderr
    assert "no session svc-gnoe on the broker: nothing to retire" in mistyped.stderr
    assert "Traceback" not in mistyped.stderr and not mistyped.stdout
    # Its one line alone: the ended connection is no failure to leave the old group.
    assert "shared group" not in mistyped.stderr, mistyped.stderr
    assert not await session_kept(fresh_mosquitto.url, "svc-gnoe")  # none made either
    right = retire(data, "svc-gone", env)  # the session still holds the three reports
    assert right.returncode == 0, right.stdout + right.stderr
    assert "ended the MQTT session svc-gone after handling 3 queued messages" in right.stdout
    stays = sync_service(data, fresh_mosquitto.url, **env)
    try:
        with stays.client() as api:
            assert get_twin(api, twin)["reported"] == {"n": 3}
    finally:
        stays.stop()


async def test_retiring_a_running_replicas_client_id_is_refused(
    fresh_mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """Given a running replica's client id (the wrong pod), retire took the session over:
    the replica was thrown off again and again ("another client may be using client id"),
    and the retire ended the session it was using, exit 0. The broker closes the retire's
    connection when the replica connects again: the retire stops there, session untouched."""
    data, twin = tmp_path / "data", "org.acme:running"
    env = {**QUIET, "TWIN_MQTT__SHARED_GROUP": "replicas", "TWIN_MQTT_URL": fresh_mosquitto.url}
    live = sync_service(data, fresh_mosquitto.url, client_id="svc-live", **env)
    device = await publisher(fresh_mosquitto.url, "dev-running")
    try:
        wait_mqtt_up(live)
        with live.client() as api:
            put_twin(api, twin, reported={"n": 0})
        refused = retire(data, "svc-live", env)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "client id svc-live is in use by a running client" in refused.stderr
        assert "Traceback" not in refused.stderr and not refused.stdout
        wait_mqtt_up(live)
        await send_reliably(device, f"twins/{twin}/reported/update", {"state": {"n": 1}})
        async with live.async_client() as api:
            await until_twin(api, twin, _counter_is(1), 15)
        await asyncio.sleep(2)  # no retire left behind throws the replica off again
        mqtt = httpx.get(f"{live.url}/ready", timeout=5).json()["checks"]["mqtt"]
        assert mqtt["status"] == "up" and mqtt["reconnects"] <= 1, mqtt
    finally:
        await device.stop()
        live.stop()


async def session_kept(url: str, client_id: str) -> bool:
    """Whether the broker holds a session for ``client_id``; it holds none afterwards."""
    options = MqttOptions(url=url, client_id=client_id, session_expiry=0)
    client = MqttClient(options)
    await client.start()
    try:
        await client.wait_connected(10)
        return client.session_present
    finally:
        await client.stop()


async def test_a_retained_request_is_applied_once_not_at_every_reconnection(
    mosquitto_server: Mosquitto, tmp_path: Path, unique_name: str
) -> None:
    """A report or live update published with the retain flag stays on the broker, which
    replays it at each new subscription: a restarted service put the device's stale values
    back (reported a=1 over a=2, live t=1 over t=2)."""
    twin = f"org.acme:{unique_name}"
    data, client_id = tmp_path / "svc", f"svc-{unique_name}"[:60]
    svc = sync_service(data, mosquitto_server.url, client_id=client_id)
    try:
        wait_mqtt_up(svc)
        with svc.client() as api:
            put_twin(api, twin, desired={"a": 2})
        device = await publisher(mosquitto_server.url, f"dev-{unique_name}"[:60])
        base = f"twins/{twin}"
        await device.publish(f"{base}/reported/update", b'{"state": {"a": 1}}', retain=True)
        await device.publish(f"{base}/live/update", b'{"t": 1}', retain=True)
        await device.publish(f"{base}/reported/update", b'{"state": {"a": 2}}')
        await device.publish(f"{base}/live/update", b'{"t": 2}')
        async with svc.async_client() as api:
            before = await until_twin(api, twin, lambda d: d["live"] == {"t": 2})
        assert before["reported"] == {"a": 2}
    finally:
        svc.stop()
    svc = sync_service(data, mosquitto_server.url, client_id=client_id)
    try:
        wait_mqtt_up(svc)
        # The replays arrive with the new subscriptions; a get after them is answered last.
        answered = await publisher(mosquitto_server.url, f"obs-{unique_name}"[:60])
        got: list[bytes] = []

        async def collect(msg: InboundMessage) -> None:
            got.append(msg.payload)

        await answered.subscribe(f"{base}/get/accepted", 1, collect)
        await answered.publish(f"{base}/get", b"")
        async with asyncio.timeout(15):
            while not got:
                await asyncio.sleep(0.05)
        await answered.stop()
        with svc.client() as api:
            after = get_twin(api, twin)
    finally:
        await device.stop()
        svc.stop()
    assert (after["reported"], after["live"]) == ({"a": 2}, {"t": 2})
    # Not written again either (a get writes lastSeen, so the revision moves).
    for section, key in (("reported", "a"), ("live", "t")):
        assert after["metadata"][section][key] == before["metadata"][section][key]
    log = svc.log_path.read_text(errors="replace")
    assert log.count("ignored a retained request the broker replayed") == 2, log
