"""A change-stream client that subscribes and then never reads gives its place back: the
service cuts the connection (docs/api.md), so one stuck client cannot hold a reader's
place, its queue and its socket buffers for good. Raw blocking sockets with a tiny
receive buffer: a client library reads."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx

from tests.service_process import ADMIN_TOKEN, ServiceProcess
from tests.streams.raw_websocket import read_upgrade_answer, upgrade_request
from tests.streams.test_sse import read_events

Factory = Callable[..., ServiceProcess]

#: One reader at most: a stuck one locks every other out until the service lets it go.
#: At info, the service logs the cut.
ONE_READER = {"TWIN_STREAM__MAX_CONNECTIONS": "1", "TWIN_LOG_LEVEL": "info"}
#: A change of about 50 KB, and enough of them to fill the socket buffers of both sides
#: (a few MiB at most) and the reader's queue (8 MiB) several times over.
BLOB = "x" * 50_000
CHANGES = 400
#: Generous: the service cuts a client seconds after its writes stall.
DEADLINE = 120.0


def _streams(api: httpx.Client) -> dict[str, int]:
    return dict(api.get("/ready").json()["checks"]["streams"])


def _wait(api: httpx.Client, deadline: float, **expected: int) -> None:
    while {k: (streams := _streams(api))[k] for k in expected} != expected:
        assert time.monotonic() < deadline, f"{streams}, not {expected}"
        time.sleep(0.2)


@contextmanager
def _unread(proc: ServiceProcess, request: bytes) -> Iterator[socket.socket]:
    """A connection that sends ``request`` and then reads nothing; reset when done."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", proc.port))
    sock.settimeout(30)
    try:
        sock.sendall(request)
        yield sock
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


def _commit_changes(api: httpx.Client, namespace: str) -> None:
    for n in range(CHANGES):
        twin = {"attributes": {"blob": f"{n}{BLOB}"}}
        response = api.put(f"/api/v1/twins/{namespace}:t{n % 10}", json=twin)
        assert response.status_code in (200, 201), response.text


def _released(proc: ServiceProcess, api: httpx.Client, namespace: str) -> None:
    """Changes pile up for the stuck reader; the service lets it go by itself, and the one
    reader's place is free for a new client. The service's log says it was the unread rule
    (a WebSocket was let go without it too, 40 s after it opened: the keepalive ping it
    never answered)."""
    _wait(api, time.monotonic() + 30, readers=1, subscriptions=1)
    _commit_changes(api, namespace)
    _wait(api, time.monotonic() + DEADLINE, readers=0, subscriptions=0)
    with api.stream("GET", "/api/v1/stream/twins", timeout=30) as stream:
        assert stream.status_code == 200, stream.read()
        (subscribed,) = read_events(stream, 1)
        assert subscribed["event"] == "subscribed", subscribed
    assert proc.proc is not None and proc.proc.poll() is None
    assert "left its stream unread" in proc.log_path.read_text()


def test_an_event_stream_client_that_never_reads_is_cut(service_factory: Factory) -> None:
    proc = service_factory(env=ONE_READER)
    namespace = f"org.unread{uuid.uuid4().hex[:8]}"
    request = (
        f"GET /api/v1/stream/twins?namespaces={namespace} HTTP/1.1\r\nHost: twins\r\n"
        f"Authorization: Bearer {ADMIN_TOKEN}\r\n\r\n"
    ).encode()
    with proc.client() as api, _unread(proc, request):
        _released(proc, api, namespace)


def test_a_websocket_client_that_never_reads_is_cut(service_factory: Factory) -> None:
    proc = service_factory(env=ONE_READER)
    namespace = f"org.unread{uuid.uuid4().hex[:8]}"
    subscribe = json.dumps({"type": "subscribe", "id": "s", "namespaces": [namespace]})
    payload = subscribe.encode()
    assert len(payload) < 126
    # A masked text frame (a zero key: the payload goes as it is).
    frame = bytes((0x81, 0x80 | len(payload))) + bytes(4) + payload
    with proc.client() as api, _unread(proc, upgrade_request(ADMIN_TOKEN)) as sock:
        read_upgrade_answer(sock)
        sock.sendall(frame)
        _released(proc, api, namespace)


def test_an_event_stream_client_that_reads_slowly_is_not_cut(service_factory: Factory) -> None:
    """A stream writes all it has queued at once: a client reading such a burst slowly
    leaves the service's writes paused for longer than the unread bound, reading all along.
    It gets every event (a rule on how long writes stayed paused cut it)."""
    proc = service_factory(env={"TWIN_STREAM__QUEUE_BYTES": str(64 << 20)})
    namespace = f"org.slow{uuid.uuid4().hex[:8]}"
    changes = 120  # 6 MB: a few MiB more than the socket buffers hold
    request = (
        f"GET /api/v1/stream/twins?namespaces={namespace} HTTP/1.1\r\nHost: twins\r\n"
        f"Authorization: Bearer {ADMIN_TOKEN}\r\n\r\n"
    ).encode()
    received = bytearray()
    error: list[BaseException] = []

    def read_slowly(sock: socket.socket) -> None:
        try:  # what its 4 KiB buffer holds every 10 ms: at most 400 KB/s
            while received.count(b"event: event\n") < changes:
                chunk = sock.recv(16384)
                if not chunk:
                    return
                received.extend(chunk)
                time.sleep(0.01)
        except OSError as exc:
            error.append(exc)

    with proc.client() as api, _unread(proc, request) as sock:
        _wait(api, time.monotonic() + 30, readers=1, subscriptions=1)
        reader = threading.Thread(target=read_slowly, args=(sock,), daemon=True)
        reader.start()
        for n in range(changes):
            twin = {"attributes": {"blob": f"{n}{BLOB}"}}
            response = api.put(f"/api/v1/twins/{namespace}:t{n % 10}", json=twin)
            assert response.status_code in (200, 201), response.text
        reader.join(5 * DEADLINE)
        assert not error, error
        assert received.count(b"event: event\n") == changes, bytes(received).replace(b"x", b"")[
            -600:
        ]
        assert b"event: overflow" not in received
        assert _streams(api)["readers"] == 1
