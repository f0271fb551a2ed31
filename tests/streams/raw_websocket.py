"""What a raw-socket WebSocket client sends to open a connection, for tests that need to
do what a WebSocket library never does (send without reading, send too much)."""

from __future__ import annotations

import base64
import os


def upgrade_request(token: str | None) -> bytes:
    """The handshake of a connection to /api/v1/ws, with the bearer ``token`` if given."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        "GET /api/v1/ws HTTP/1.1\r\nHost: twins\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"{auth}\r\n"
    ).encode()
