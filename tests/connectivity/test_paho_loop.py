"""The event loop that serves paho's socket, on uvloop (which uvicorn runs the service on)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Iterator

import pytest
import uvloop

from connectivity.errors import NotConnected
from connectivity.mqtt_client import MqttClient
from connectivity.options import MqttOptions
from tests.mqtt_packets import packet


class _ResettingBroker:
    """Accepts MQTT connections and answers CONNECT; resets the first (RST, as a broker that
    is killed or restarts does) shortly after accepting it, and keeps the later ones."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.connections: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            conn.recv(1024)  # the CONNECT
            conn.sendall(packet(0x20, b"\x00\x00"))
            self.connections.append(conn)
            if len(self.connections) == 1:
                threading.Timer(0.3, self._reset, (conn,)).start()

    @staticmethod
    def _reset(conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    def close(self) -> None:
        self.listener.close()
        for conn in self.connections:
            conn.close()


@pytest.fixture
def resetting_broker() -> Iterator[_ResettingBroker]:
    broker = _ResettingBroker()
    try:
        yield broker
    finally:
        broker.close()


def test_a_reset_connection_is_noticed_and_replaced_on_uvloop(
    resetting_broker: _ResettingBroker, unique_name: str
) -> None:
    """A broker that resets the connection while the service sends: the loop's reader
    sees it at once (paho's keepalive would take 30 s and more), and the client connects
    again. (A poll handle uvloop closes, seen once in six restarts of mosquitto in
    tests/sync/test_delivery.py, is what ``PahoLoop._look_for_an_end`` is for; this reset
    does not bring it about.)"""

    async def run() -> None:
        client = MqttClient(
            MqttOptions(
                url=f"mqtt://127.0.0.1:{resetting_broker.port}",
                client_id=unique_name,
                protocol=4,
                persistent_session=False,
                reconnect_min_delay=0.1,
            )
        )
        await client.start()
        try:
            await client.wait_connected(5)
            # Sending when the reset comes, as the service does (its replies).
            async with asyncio.timeout(5):
                while client.connected:
                    with contextlib.suppress(NotConnected):
                        await client.publish(f"{unique_name}/x", b"x" * 100, qos=0)
                    await asyncio.sleep(0.005)
            await client.wait_connected(5)
            assert client.health().reconnect_count == 1
        finally:
            await client.stop(grace=0)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run())
