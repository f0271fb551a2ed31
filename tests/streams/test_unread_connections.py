"""A WebSocket client that sends but never reads: each ping it sends is answered with a pong
that can only pile up in the service, so the service stops reading it while its writes
wait, and a connection it closes is ended even though the close frame is never read.
Raw blocking sockets: a client library reads."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from tests.service_process import ADMIN_TOKEN, ServiceProcess
from tests.streams.raw_websocket import read_upgrade_answer, upgrade_request
from twin_service.api.routes.streams import AUTH_TIMEOUT

Factory = Callable[..., ServiceProcess]

#: A masked ping with the largest payload a control frame may carry (masked with a zero key:
#: the payload goes as it is), and a batch of them.
PING = bytes((0x89, 0x80 | 125)) + bytes(4) + b"p" * 125
BATCH = PING * 8000
#: What a never-reading client can send before the service stops reading it: the socket
#: buffers of both sides (a few MiB each at most) and what fills the service's write
#: buffer. Without the bound the service read 400 MB in 20 s, holding the pongs.
MOST_SENT = 64 * 1024 * 1024
#: A send blocked this long: the service no longer reads the connection.
STALLED = 3.0


def _unread_websocket(proc: ServiceProcess, token: str | None) -> socket.socket:
    """An open WebSocket whose client reads only the handshake answer."""
    sock = socket.socket()
    # A small receive window: the pongs fill it, and then the service's buffers, at once.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(15)
    sock.connect(("127.0.0.1", proc.port))
    sock.sendall(upgrade_request(token))
    read_upgrade_answer(sock)
    return sock


def _flood_until_stalled(sock: socket.socket) -> int:
    """Send pings until a send blocks for :data:`STALLED` seconds; the bytes sent."""
    sock.settimeout(STALLED)
    sent = 0
    try:
        while sent < MOST_SENT:
            sent += sock.send(BATCH)
    except TimeoutError:
        return sent
    raise AssertionError(f"the service read {sent} bytes of pings and went on reading")


def test_a_client_that_pings_and_never_reads_is_read_no_more(
    service_factory: Factory,
) -> None:
    proc = service_factory()
    with _unread_websocket(proc, ADMIN_TOKEN) as sock:
        _flood_until_stalled(sock)
        with proc.client() as api:  # the service itself goes on
            assert api.get("/health").status_code == 200


def test_an_unauthenticated_client_that_never_reads_is_cut_after_the_auth_timeout(
    service_factory: Factory,
) -> None:
    proc = service_factory()
    with _unread_websocket(proc, None) as sock:
        connected = time.monotonic()
        _flood_until_stalled(sock)
        # Its 4401 close frame can never reach it: the service ends the connection anyway
        # (it waited for the client to read it, for good, reading on meanwhile).
        deadline = connected + AUTH_TIMEOUT + 15
        sock.settimeout(1)
        while time.monotonic() < deadline:
            try:
                sock.send(BATCH)
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                break
        else:
            raise AssertionError("the connection is still open")
