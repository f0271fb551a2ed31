"""The embedded broker lets go of a device connection once it has ended."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import uvloop
from amqtt.session import Session

from connectivity.broker import EmbeddedBroker, EmbeddedBrokerConfig
from connectivity.broker_delivery import AckingHandler
from connectivity.broker_packets import PacketReader
from connectivity.credentials import CredentialStore
from tests import mqtt_packets
from tests.connectivity.helpers import eventually
from tests.servers.process import free_port

TWIN = "org.acme:pump-1"
_Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]
_ACCEPTED = b"\x20\x02\x00\x00"


async def _login_and_reset(port: int, password: str, keep_alive: int) -> None:
    """A device logs in, gets its CONNACK, and its connection ends with a TCP reset (no
    DISCONNECT): a device losing power, a NAT forgetting it, a client killed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(mqtt_packets.connect("flapper", TWIN, password, keep_alive=keep_alive))
    assert await asyncio.wait_for(reader.readexactly(4), 10) == _ACCEPTED
    _reset(writer)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Ends a connection with a TCP reset: closed with SO_LINGER 0, not with a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _broker(tmp_path: Path, **limits: int) -> tuple[EmbeddedBroker, str]:
    """A broker with the service account and one device (TWIN), and its password."""
    store = CredentialStore(tmp_path / "creds.json")
    password = store.add(TWIN)
    config = EmbeddedBrokerConfig(
        service_username="service",
        service_password="svc-pw",
        credentials_path=store.path,
        port=free_port(),
        **limits,  # type: ignore[arg-type]
    )
    return EmbeddedBroker(config), password


def _sessions(broker: EmbeddedBroker) -> list[tuple[str, tuple[Session, Any]]]:
    return list(broker._broker.sessions.items())  # type: ignore[union-attr]


def _connections_held() -> int:
    return sum(isinstance(o, AckingHandler | PacketReader | Session) for o in gc.get_objects())


@contextmanager
def _reference_counting_only() -> Iterator[None]:
    """No garbage collection meanwhile: what a connection leaves in reference cycles stays,
    as it does in the service, whose thresholds make full collections rare (tune_gc), and
    where a connection lives long enough to reach the oldest generation."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def test_connections_ended_by_a_reset_are_let_go(tmp_path: Path) -> None:
    """One device reconnecting in a loop, each connection ended by a reset, grew the
    service by 43 KB a connection (6,000 of them: 67 to 282 MB). The keep-alive timer of
    each held it (1.5 keep-alive periods; 30 minutes for a device asking for none), and the
    reset's error, kept in the stream with a traceback through the handler's frames, held
    it in a cycle after that, and amqtt's session in another (its state machine is its own
    model). Now reference counting frees each connection, handler, reader and session, as
    it ends."""
    broker, password = _broker(tmp_path)
    await broker.start()
    port = broker.config.port

    def let_go() -> bool:
        """Every connection ended, and its clean session dropped (amqtt drops it within
        a second, or when the client id logs in again)."""
        return broker.devices == 0 and not broker._broker.sessions  # type: ignore[union-attr]

    try:
        with _reference_counting_only():
            await _login_and_reset(port, password, 4)  # what the first connection sets up
            await eventually(let_go)
            before = _connections_held()
            for keep_alive in (4, 0, 60_000):
                for _ in range(20):
                    await _login_and_reset(port, password, keep_alive)
                await eventually(let_go)
                assert _connections_held() == before, keep_alive
    finally:
        await broker.stop()


async def _login(port: int, username: str, password: str, client_id: str) -> _Stream:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(mqtt_packets.connect(client_id, username, password))
    assert await asyncio.wait_for(reader.readexactly(4), 10) == _ACCEPTED
    return reader, writer


async def _next(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    return await asyncio.wait_for(mqtt_packets.read_packet(reader), 10)


def test_a_message_sent_as_the_connection_resets_logs_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """On uvloop (as the service runs), a write to a connection that has ended raises
    RuntimeError ("the handler is closed"), which amqtt did not expect: a message the broker
    sent a device whose connection had just reset logged "Unhandled exception: unable to
    perform operation on <TCPTransport closed=True ...>" and failed its delivery task. It is
    the reset it is, and ends the connection quietly. Here the device's reader is held back
    by its in-flight bound, so that the broker sends before it notices the reset."""

    async def scenario() -> None:
        broker, password = _broker(tmp_path, max_inflight=1)
        await broker.start()
        port = broker.config.port
        service_reader, service = await _login(port, "service", "svc-pw", "svc")
        try:
            service.write(mqtt_packets.subscribe(1, f"twins/{TWIN}/reported/update", 1))
            assert (await _next(service_reader))[0] == 0x90
            device_reader, device = await _login(port, TWIN, password, "dev")
            device.write(mqtt_packets.subscribe(1, f"twins/{TWIN}/desired/delta", 1))
            assert (await _next(device_reader))[0] == 0x90
            device.write(mqtt_packets.publish(f"twins/{TWIN}/reported/update", b"{}", 1, 1))
            first, body = await _next(service_reader)  # not acknowledged yet: the device's
            assert first & 0xF0 == 0x30  # reader waits at its in-flight bound
            _reset(device)
            (_, handler), *_ = [held for cid, held in _sessions(broker) if cid == "dev"]
            await eventually(lambda: handler.writer._writer.transport.is_closing())
            service.write(mqtt_packets.publish(f"twins/{TWIN}/desired/delta", b"{}", 1, 2))
            # Sent (or not) to the device; the device's message to the service still waits.
            await eventually(lambda: len(broker._broker._tasks_queue) <= 1)  # type: ignore[union-attr]
            _, packet_id = mqtt_packets.published(body)[:2]
            service.write(mqtt_packets.ack(mqtt_packets.PUBACK, packet_id))
            await eventually(lambda: broker.devices == 0)
        finally:
            service.transport.abort()
            await broker.stop()

    with (
        caplog.at_level(logging.WARNING),
        asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner,
    ):
        runner.run(scenario())
    assert "Unhandled exception" not in caplog.text
