"""MqttClient over TLS (``mqtts://``) against a real mosquitto TLS listener."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from pathlib import Path

from connectivity.mqtt_client import MqttClient
from connectivity.options import MqttOptions
from tests.certificates import self_signed
from tests.connectivity.helpers import Collector, started
from tests.mqtt_packets import packet, string
from tests.servers.mosquitto import Mosquitto
from tests.servers.process import free_port


async def test_a_burst_over_tls_arrives_whole_and_answers_go_back(
    mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path, unique_name: str
) -> None:
    """mqtts:// end to end: a burst in (the end of it too, with nothing on the wire after
    it) and the answers out, through mosquitto's TLS listener, the certificate checked
    against its CA. The service's TLS path had no test against a real broker."""
    cert, key = self_signed(tmp_path, "broker")
    tls_port = free_port()
    plain = mosquitto_factory(
        extra_config=[f"listener {tls_port} 127.0.0.1", f"certfile {cert}", f"keyfile {key}"]
    )
    tls_url = f"mqtts://127.0.0.1:{tls_port}"
    device = await started(tls_url, f"{unique_name}-tls", ca_file=str(cert))
    other = await started(plain.url, f"{unique_name}-plain")
    try:
        to_device, to_other = Collector(), Collector()
        await device.subscribe(f"{unique_name}/in/#", 1, to_device)
        await other.subscribe(f"{unique_name}/out/#", 1, to_other)
        count = 500
        await asyncio.gather(
            *(other.publish(f"{unique_name}/in/{n}", b"%d" % n * 40) for n in range(count))
        )
        received = await to_device.wait_for(count, timeout=15)
        assert sorted(int(m.topic.rsplit("/", 1)[1]) for m in received) == list(range(count))
        assert all(m.payload == m.topic.rsplit("/", 1)[1].encode() * 40 for m in received)
        await asyncio.gather(
            *(device.publish(f"{unique_name}/out/{n}", b"ok") for n in range(count))
        )
        assert len(await to_other.wait_for(count, timeout=15)) == count
    finally:
        await device.stop()
        await other.stop()


async def test_packets_sharing_a_tls_record_are_all_read(tmp_path: Path, unique_name: str) -> None:
    """Brokers that coalesce writes (Netty's, for one) put many packets in one TLS record.
    A select on the socket sees the record's bytes once; paho reads one packet of them,
    and the rest wait decrypted in the SSL object, where select does not look (paho's
    loop asks the SSL object; a loop of our own must too: it failed without)."""
    cert, key = self_signed(tmp_path, "broker")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    count = 50
    burst = packet(0x20, b"\x00\x00") + b"".join(
        packet(0x30, string(f"{unique_name}/{n}") + b"x") for n in range(count)
    )

    async def broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)  # the CONNECT
        writer.write(burst)  # the CONNACK and every message: one TLS record
        await writer.drain()
        while await reader.read(1024):  # SUBSCRIBE (unanswered), PINGREQ
            pass
        writer.close()

    server = await asyncio.start_server(broker, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    client = MqttClient(
        MqttOptions(
            url=f"mqtts://127.0.0.1:{port}",
            client_id=unique_name,
            ca_file=str(cert),
            protocol=4,
            persistent_session=False,
        )
    )
    got = Collector()
    await client.subscribe(f"{unique_name}/#", 0, got)
    try:
        await client.start()
        messages = await got.wait_for(count, timeout=15)
        assert [m.topic for m in messages] == [f"{unique_name}/{n}" for n in range(count)]
    finally:
        await client.stop(grace=0)
        server.close()
