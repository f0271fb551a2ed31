"""The embedded amqtt broker end to end: CLI-made credentials, delta sync, ACL refusal."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from connectivity.credentials import CredentialStore, mqtt_username
from connectivity.errors import ConnectRefused
from connectivity.mqtt_client import MqttClient
from connectivity.options import MqttOptions
from tests import mqtt_packets
from tests.servers.process import free_port
from tests.service_process import ServiceProcess
from tests.sync.helpers import (
    QUIET,
    RawDevice,
    add_device,
    device,
    embedded_env,
    embedded_service,
    patch_desired,
    put_twin,
    put_twin_once_up,
    until,
    until_twin,
    wait_mqtt_up,
)


async def test_embedded_broker_device_syncs_delta(tmp_path: Path) -> None:
    data = tmp_path / "svc"
    twin, other = "org.acme:emb-1", "org.acme:emb-2"
    password = add_device(data, twin)
    port = free_port()
    proc = embedded_service(
        data,
        port,
        TWIN_MQTT__LASTSEEN_COALESCE_SECONDS="0",
        TWIN_MQTT__EMBEDDED_MAX_DEVICES="5",
    )
    url = f"mqtt://127.0.0.1:{port}"
    try:
        wait_mqtt_up(proc)
        with proc.client() as api:
            put_twin(api, twin, desired={"fan": {"speed": 1}})
            put_twin(api, other, desired={"x": 1})
            patch_desired(api, twin, {"fan": {"speed": 5}})
        dev = device(url, twin, password=password, protocol=4, client_id="emb-1")
        await dev.start()
        try:
            delta = await dev.deltas.get()
            while delta["state"] != {"fan": {"speed": 5}}:
                delta = await dev.deltas.get()
            await dev.report(delta["state"], desired_version=delta["desiredVersion"])
            async with proc.async_client() as api:
                mqtt = (await api.get("/ready")).json()["checks"]["mqtt"]
            assert (mqtt["devices"], mqtt["maxDevices"]) == (1, 5), mqtt
            # The broker refuses the topics of another twin: MQTT 3.1.1 has no way to say so
            # in a PUBACK, so amqtt acknowledges and drops it (checked below: twin unchanged).
            await dev.mqtt.publish(
                f"twins/{other}/reported/update", b'{"state":{"x":1}}', timeout=2
            )
        finally:
            await dev.stop()
        async with proc.async_client() as api:
            doc = await until_twin(api, twin, lambda d: d["delta"] == {})
            assert doc["connection"]["status"] == "offline"
            assert (await api.get(f"/api/v1/twins/{other}")).json()["reported"] == {}
        bad = device(url, twin, password="wrong", protocol=4, client_id="emb-bad")
        with pytest.raises(ConnectRefused):
            await bad.start(timeout=5)
        await bad.mqtt.stop(grace=0)
    finally:
        proc.stop()


@pytest.mark.parametrize(
    ("keep_alive", "env"), [(1, {}), (0, {"TWIN_MQTT__EMBEDDED_MAX_KEEP_ALIVE_SECONDS": "1"})]
)
async def test_a_device_whose_network_vanished_goes_offline(
    tmp_path: Path, keep_alive: int, env: dict[str, str]
) -> None:
    """A device whose network goes away without closing its TCP connection sends nothing
    more: the broker ends the connection after one and a half keep-alive periods and sends
    its last will, and the twin goes offline. With amqtt's broker alone it stayed online.
    A device that asked for no keep-alive (0) is held to mqtt.embedded_max_keep_alive_seconds."""
    data = tmp_path / "svc"
    twin = "org.acme:vanishing"
    password = add_device(data, twin)
    port = free_port()
    proc = embedded_service(data, port, **env)
    try:
        put_twin_once_up(proc, twin, desired={"x": 1})
        status = f"twins/{twin}/status"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        username = mqtt_username(twin)
        writer.write(
            mqtt_packets.connect(twin, username, password, (status, b"offline"), keep_alive)
        )
        assert await asyncio.wait_for(reader.readexactly(4), 10) == b"\x20\x02\x00\x00"
        writer.write(mqtt_packets.publish(status, b"online", 1, 1))
        async with proc.async_client() as api:
            await until_twin(api, twin, lambda d: d["connection"]["status"] == "online")
            # Silent from here on, its socket open, as after a power cut.
            doc = await until_twin(api, twin, lambda d: d["connection"]["status"] == "offline")
        assert doc["connection"]["status"] == "offline"
        writer.close()
    finally:
        proc.stop()


async def test_a_device_gone_while_the_service_restarts_is_offline(tmp_path: Path) -> None:
    """A graceful stop closes every device connection; the broker sends their last wills, and
    the service takes them before it stops. The embedded broker keeps no retained message
    across a restart: a device that does not come back stayed ``online`` for good."""
    data = tmp_path / "svc"
    twin = "org.acme:gone-meanwhile"
    password = add_device(data, twin)
    port = free_port()
    proc = embedded_service(data, port)
    status = f"twins/{twin}/status"
    try:
        put_twin_once_up(proc, twin, desired={"x": 1})
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        connect = mqtt_packets.connect(twin, mqtt_username(twin), password, (status, b"offline"))
        writer.write(connect)
        assert await asyncio.wait_for(reader.readexactly(4), 10) == b"\x20\x02\x00\x00"
        writer.write(mqtt_packets.publish(status, b"online", 1, 1))
        async with proc.async_client() as api:
            await until_twin(api, twin, lambda d: d["connection"]["status"] == "online")
        proc.stop()  # SIGTERM; the device never comes back
        writer.close()
    finally:
        proc.stop()
    proc = embedded_service(data, port)
    try:
        async with proc.async_client() as api:
            doc = (await api.get(f"/api/v1/twins/{twin}")).json()
            assert doc["connection"]["status"] == "offline", doc["connection"]
            found = await api.get(
                "/api/v1/search/twins", params={"filter": 'eq(connection/status,"online")'}
            )
            assert found.json()["items"] == [], found.json()
    finally:
        proc.stop()


@pytest.mark.parametrize("search", ["builtin", "off"])
async def test_a_restarted_service_publishes_pending_deltas_again(
    tmp_path: Path, search: str
) -> None:
    """The embedded broker keeps no retained message across a restart: the service publishes
    every pending delta again when it connects, with or without a search index (without
    one it finds them by reading every twin)."""
    data = tmp_path / "svc"
    twin, synced = "org.acme:emb-pending", "org.acme:emb-synced"
    password = add_device(data, twin)
    port = free_port()
    first = embedded_service(data, port, TWIN_SEARCH=search)
    try:
        wait_mqtt_up(first)
        with first.client() as api:
            put_twin(api, twin, desired={"fan": {"speed": 3}})
            put_twin(api, synced, desired={"x": 1}, reported={"x": 1})
    finally:
        first.stop()
    second = embedded_service(data, port, TWIN_SEARCH=search)
    try:
        wait_mqtt_up(second)
        url = f"mqtt://127.0.0.1:{port}"
        # A raw subscriber, not the device library: that one also asks for the twin on
        # connect, which would deliver the delta even if nothing had been republished.
        async with RawDevice(url, twin, username=twin, password=password, protocol=4) as raw:
            delta = await raw.reply("delta")
        assert delta["state"] == {"fan": {"speed": 3}}
        assert delta["desiredVersion"] == 1
    finally:
        second.stop()
    log = second.log_path.read_text(errors="replace")
    assert "republishing deltas failed" not in log, log
    assert "Traceback" not in log, log


async def test_a_damaged_credentials_file_refuses_devices_and_says_why(tmp_path: Path) -> None:
    """The broker reads the file at each login: damaged, it refuses every device (never lets
    one in unchecked, never fails the broker) and logs the reason; mended, logins work."""
    data = tmp_path / "svc"
    twin = "org.acme:emb-damaged"
    password = add_device(data, twin)
    credentials = CredentialStore.in_data_dir(data).path
    good = credentials.read_bytes()
    port = free_port()
    # QUIET: the rig's tests count a revision per report; a lastSeen write came in too once
    # a run took longer than the coalescing period (5 s) on a busy machine.
    proc = embedded_service(data, port, **QUIET)
    url = f"mqtt://127.0.0.1:{port}"
    try:
        wait_mqtt_up(proc)
        credentials.write_text('{"format": 1, "devices": {"org.acme:emb-damaged": ')
        refused = device(url, twin, password=password, protocol=4, client_id="emb-damaged")
        with pytest.raises(ConnectRefused):
            await refused.start(timeout=5)
        await refused.mqtt.stop(grace=0)
        credentials.write_bytes(good)
        mended = device(url, twin, password=password, protocol=4, client_id="emb-mended")
        await mended.start(timeout=5)
        await mended.stop()
        with proc.client() as api:
            assert api.get("/ready").status_code == 200
    finally:
        proc.stop()
    log = proc.log_path.read_text(errors="replace")
    assert f"refused login for '{mqtt_username(twin)}': {credentials} cannot be read" in log, log
    assert "Traceback" not in log, log


@pytest.mark.parametrize("level", ["info", "warning"])
def test_the_services_own_log_lines_follow_log_level(tmp_path: Path, level: str) -> None:
    svc = embedded_service(tmp_path / "svc", free_port(), TWIN_LOG_LEVEL=level)
    try:
        wait_mqtt_up(svc)
        log = svc.log_tail(10_000)
    finally:
        svc.stop()
    # Named and levelled like the writer process's lines; uvicorn's lines are its own.
    connected = "INFO connectivity.mqtt_client: MQTT connected as twin-service "
    assert (connected in log) == (level == "info"), log


@pytest.mark.parametrize("level", ["info", "warning"])
async def test_library_warnings_are_named_and_levelled_too(tmp_path: Path, level: str) -> None:
    """amqtt's warnings printed bare, through Python's last-resort handler; they now share the
    service's format, and only from WARNING up (its INFO lines are one per connection)."""
    data = tmp_path / "svc"
    twin = "org.acme:emb-v5"
    password = add_device(data, twin)
    port = free_port()
    svc = embedded_service(data, port, TWIN_LOG_LEVEL=level)
    try:
        wait_mqtt_up(svc)
        # A TCP health check: connects and hangs up without a CONNECT. It is not worth a
        # line; a CONNECT cut short is.
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
        await writer.wait_closed()
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x10\x0c\x00\x04MQTT")
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        v5 = device(f"mqtt://127.0.0.1:{port}", twin, password=password, client_id="emb-v5")
        with pytest.raises(ConnectRefused, match="Unsupported protocol version"):
            await v5.start(timeout=5)
        await v5.mqtt.stop(grace=0)
        # A CONNECT the service lets in and amqtt refuses: a protocol name not "MQTT".
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        connect = mqtt_packets.connect("emb-x", mqtt_username(twin), password)
        writer.write(connect.replace(b"MQTT", b"MQTX", 1))
        await writer.drain()
        await until(lambda: "WARNING amqtt.broker: " in svc.log_tail(10_000))
        writer.close()
    finally:
        svc.stop()
    log = svc.log_path.read_text(errors="replace")
    # Once: for the CONNECT cut short, not for the health check.
    assert log.count("a CONNECT cut short") == 1, log
    assert log.count("WARNING amqtt.broker: Failed to initialize client session: ") == 1, log
    assert (
        "WARNING connectivity.broker: embedded broker refused client 'emb-v5': it connects with "
        "MQTT 5, and the embedded broker speaks MQTT 3.1.1 only; connect with MQTT 3.1.1 or "
        "configure an external broker (TWIN_MQTT_URL)"
    ) in log, log
    assert "\nFailed to initialize" not in log, log  # no bare line
    assert "INFO amqtt" not in log, log
    # uvicorn's lines are its own, once: its loggers do not propagate to the root logger.
    assert "uvicorn.error" not in log, log


@dataclass
class _Rig:
    """A service on the embedded broker, a device of one twin connected to it."""

    data: Path
    env: dict[str, str]
    proc: ServiceProcess
    device: MqttClient
    twin: dict[str, Any]  # as created
    writer: int  # the SQLite writer process's pid

    def report(self, count: int, prefix: str, qos: int = 1) -> list[asyncio.Task[None]]:
        """``count`` reports of a counter (0 to count - 1), each awaiting its PUBACK (QoS 1)
        or its PUBCOMP (QoS 2)."""
        topic = f"twins/{self.twin['twinId']}/reported/update"
        bodies = ({"state": {"counter": i}, "clientToken": f"{prefix}{i}"} for i in range(count))
        return [
            asyncio.create_task(
                self.device.publish(topic, json.dumps(b).encode(), qos, timeout=120)
            )
            for b in bodies
        ]

    async def until_counter(self, value: int) -> dict[str, Any]:
        async with self.proc.async_client() as api:
            twin_id = self.twin["twinId"]
            return await until_twin(api, twin_id, lambda d: d["reported"]["counter"] == value, 30)


@contextlib.asynccontextmanager
async def _rig(tmp_path: Path, twin: str) -> AsyncIterator[_Rig]:
    data = tmp_path / "svc"
    password = add_device(data, twin)
    port = free_port()
    # QUIET: the rig's tests count one revision per report; past the coalescing period (5 s,
    # a long run on a busy machine) a lastSeen write of its own added one more.
    env = embedded_env(port, **QUIET)
    proc = ServiceProcess(data, env=env).start()
    device = MqttClient(
        MqttOptions(
            url=f"mqtt://127.0.0.1:{port}",
            client_id=twin.replace(":", "-"),
            protocol=4,
            username=mqtt_username(twin),
            password=password,
            reconnect_min_delay=0.1,
            reconnect_max_delay=0.5,
        )
    )
    rig = None
    try:
        wait_mqtt_up(proc)
        with proc.client() as api:
            created = put_twin(api, twin, reported={"counter": -1})
        writer = proc.writer_pid()
        await device.start()
        await device.wait_connected(10)
        rig = _Rig(data, env, proc, device, created, writer)
        yield rig
    finally:
        await device.stop()
        (rig.proc if rig else proc).stop()


@pytest.mark.parametrize("qos", [1, 2])
async def test_a_report_is_acknowledged_to_the_device_only_once_committed(
    tmp_path: Path, qos: int
) -> None:
    """The embedded broker lives and dies with the service: a report it had acknowledged to
    the device before the service committed it was lost with a crash of the process. The
    device's PUBACK (QoS 1) or PUBREC (QoS 2) now waits for the service's PUBACK, which
    follows the commit, so a device keeps (and sends again after the restart) every report
    the crash took."""
    async with _rig(tmp_path, f"org.acme:emb-crash-{qos}") as rig:
        os.kill(rig.writer, signal.SIGSTOP)  # nothing commits from here on
        sends = rig.report(20, "k", qos)
        await asyncio.sleep(2)
        assert not any(send.done() for send in sends), "acknowledged before the commit"
        rig.proc.kill()
        os.kill(rig.writer, signal.SIGKILL)
        rig.proc = ServiceProcess(rig.data, env=rig.env).start()
        # The device reconnects and sends again what was never acknowledged.
        await asyncio.wait_for(asyncio.gather(*sends), 60)
        doc = await rig.until_counter(19)
        assert doc["revision"] == rig.twin["revision"] + 20, doc


async def test_a_commit_slower_than_five_seconds_is_waited_for(tmp_path: Path) -> None:
    """amqtt gave a subscriber 5 s for its PUBACK, then forgot the message with a warning;
    the service acknowledges after its commit, which may take longer under a burst."""
    async with _rig(tmp_path, "org.acme:emb-slow") as rig:
        os.kill(rig.writer, signal.SIGSTOP)
        try:
            sends = rig.report(5, "s")
            await asyncio.sleep(6.5)
        finally:
            os.kill(rig.writer, signal.SIGCONT)
        await asyncio.wait_for(asyncio.gather(*sends), 30)
        doc = await rig.until_counter(4)
        assert doc["revision"] == rig.twin["revision"] + 5, doc
    log = rig.proc.log_path.read_text(errors="replace")
    assert "Timeout waiting for PUBACK" not in log, log
    assert "not acknowledged by every subscriber" not in log, log


async def test_a_graceful_restart_loses_no_report(tmp_path: Path) -> None:
    """Reports that keep coming while the service shuts down and starts again: each is
    applied once. In 3 runs of 8 this lost a report or applied hundreds twice: a broadcast
    broke when the subscription table changed under it (the service's clients subscribe
    and leave at start-up while the device sends again)."""
    async with _rig(tmp_path, "org.acme:emb-restart") as rig:
        sends = rig.report(2000, "g")
        await until(lambda: sum(send.done() for send in sends) >= 100)
        rig.proc.stop()  # SIGTERM, mid-stream
        assert not all(send.done() for send in sends), "the stream ended before the restart"
        rig.proc = ServiceProcess(rig.data, env=rig.env).start()
        await asyncio.wait_for(asyncio.gather(*sends), 60)
        doc = await rig.until_counter(1999)
        assert doc["revision"] == rig.twin["revision"] + 2000, doc
