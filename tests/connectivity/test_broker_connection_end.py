"""The embedded broker lets go of a device connection once it has ended."""

from __future__ import annotations

import asyncio
import gc
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from amqtt.session import Session

from connectivity.broker import EmbeddedBroker, EmbeddedBrokerConfig
from connectivity.broker_delivery import AckingHandler
from connectivity.broker_packets import PacketReader
from connectivity.credentials import CredentialStore
from tests import mqtt_packets
from tests.connectivity.helpers import eventually
from tests.servers.process import free_port

TWIN = "org.acme:pump-1"
_ACCEPTED = b"\x20\x02\x00\x00"


async def _login_and_reset(port: int, password: str, keep_alive: int) -> None:
    """A device logs in, gets its CONNACK, and its connection ends with a TCP reset (no
    DISCONNECT): a device losing power, a NAT forgetting it, a client killed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(mqtt_packets.connect("flapper", TWIN, password, keep_alive=keep_alive))
    assert await asyncio.wait_for(reader.readexactly(4), 10) == _ACCEPTED
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()  # closed with SO_LINGER 0: an RST, not a FIN


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
    store = CredentialStore(tmp_path / "creds.json")
    password = store.add(TWIN)
    broker = EmbeddedBroker(
        EmbeddedBrokerConfig(
            service_username="service",
            service_password="svc-pw",
            credentials_path=store.path,
            port=free_port(),
        )
    )
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
