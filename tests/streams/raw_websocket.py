"""What a raw-socket WebSocket client sends to open a connection, for tests that need to
do what a WebSocket library never does (send without reading, send too much)."""

from __future__ import annotations

import base64
import os
import socket


def upgrade_request(token: str | None) -> bytes:
    """The handshake of a connection to /api/v1/ws, with the bearer ``token`` if given."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        "GET /api/v1/ws HTTP/1.1\r\nHost: twins\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"{auth}\r\n"
    ).encode()


def read_upgrade_answer(sock: socket.socket) -> None:
    """Read the handshake's answer, a byte at a time so nothing after it is read, and check
    it is the switch to WebSocket."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        assert byte, head
        head += byte
    assert head.startswith(b"HTTP/1.1 101"), head
