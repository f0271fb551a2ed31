"""HEAD is GET without the body (RFC 9110 section 9.3.2), on every GET route, against the
real service. Every GET route used to answer HEAD 405."""

from __future__ import annotations

import select
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.service_process import ACME_TOKEN, ADMIN_TOKEN, ServiceProcess

MERGE = {"Content-Type": "application/merge-patch+json"}
#: Headers that may differ between two answers to the same request.
_PER_ANSWER = {"date"}


def _headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k not in _PER_ANSWER}


def head_like_get(
    api: httpx.Client, url: str, headers: dict[str, str] | None = None, **params: str
) -> httpx.Response:
    """HEAD ``url``, checked against GET of the same: the same status and headers, the
    Content-Length of GET's body, no body."""
    got = api.get(url, params=params, headers=headers)
    head = api.head(url, params=params, headers=headers)
    assert head.status_code == got.status_code, (url, head.status_code, got.text)
    assert head.content == b""
    assert _headers(head) == _headers(got), url
    if got.status_code != 304:
        assert head.headers["content-length"] == str(len(got.content)), url
    return head


@pytest.fixture
def twin(api: httpx.Client) -> str:
    twin_id = f"org.acme:head-{uuid.uuid4().hex[:10]}"
    body = {"attributes": {"site": "a"}, "desired": {"fan": {"speed": 3}, "on": True}}
    assert api.put(f"/api/v1/twins/{twin_id}", json=body).status_code == 201
    assert api.patch(f"/api/v1/twins/{twin_id}", json={"reported": {"on": True}}, headers=MERGE)
    return twin_id


def test_head_of_a_twin_and_its_parts(api: httpx.Client, twin: str) -> None:
    url = f"/api/v1/twins/{twin}"
    head = head_like_get(api, url)
    assert head.status_code == 200 and head.headers["etag"] == '"rev:2"'
    assert head.headers["content-type"] == "application/json"
    head_like_get(api, url, fields="attributes,desired/fan")
    head_like_get(api, url, at="1")
    for part in ("desired", "desired/fan/speed", "delta", "metadata/desired/on", "lifecycle"):
        assert head_like_get(api, f"{url}/{part}").status_code == 200, part
    assert head_like_get(api, f"{url}/history").status_code == 200
    head_like_get(api, f"{url}/history", since="2", limit="1")
    head_like_get(api, "/api/v1/twins", ids=f"{twin},org.acme:nosuch")


def test_head_of_search_and_count(api: httpx.Client, twin: str) -> None:
    found = head_like_get(api, "/api/v1/search/twins", filter=f'eq(twinId,"{twin}")')
    assert found.status_code == 200
    assert head_like_get(api, "/api/v1/search/twins/count").status_code == 200
    assert head_like_get(api, "/api/v1/search/twins", filter="eq(").status_code == 400


def test_head_answers_304_on_a_matching_tag(api: httpx.Client, twin: str) -> None:
    url = f"/api/v1/twins/{twin}"
    for path in (url, f"{url}/desired/fan", f"{url}/delta"):
        head = head_like_get(api, path, headers={"If-None-Match": '"rev:2"'})
        assert head.status_code == 304, path
        assert head.headers["etag"] == '"rev:2"'
    # A pointer that is not there is 404 whatever the tag, as for GET.
    missing = head_like_get(api, f"{url}/desired/nosuch", headers={"If-None-Match": "*"})
    assert missing.status_code == 404


def test_head_of_what_is_not_there_is_404_with_the_error_headers(
    api: httpx.Client, twin: str
) -> None:
    url = f"/api/v1/twins/{twin}"
    for path in (
        "/api/v1/twins/org.acme:nosuch",
        f"{url}/desired/nosuch",
        f"{url}/nosuch",
        "/api/v1/twins/org.acme:nosuch/history",
        "/api/v1/nosuch",
    ):
        head = head_like_get(api, path)
        assert head.status_code == 404, path
        assert head.headers["content-type"] == "application/json", path
    assert head_like_get(api, url, at="99").status_code == 404
    assert head_like_get(api, url, at="x").status_code == 400


def test_head_is_authenticated_as_get_is(service: ServiceProcess, twin: str) -> None:
    url = f"/api/v1/twins/{twin}"
    with service.client(token="") as anonymous:
        for path in (url, f"{url}/desired", f"{url}/history", "/api/v1/search/twins"):
            head = head_like_get(anonymous, path)
            assert head.status_code == 401, path
            assert head.headers["www-authenticate"] == "Bearer"
        # Open to anyone, as for GET.
        assert head_like_get(anonymous, "/health").status_code == 200
        ready = anonymous.head("/ready")
        assert ready.status_code == anonymous.get("/ready").status_code and not ready.content
        metrics = anonymous.head("/metrics")
        assert metrics.status_code == 200 and not metrics.content
        assert metrics.headers["content-type"].startswith("text/plain")
    with service.client(token=ACME_TOKEN) as acme:
        other = "/api/v1/twins/org.other:x"
        assert head_like_get(acme, other).status_code == 403
        assert head_like_get(acme, f"{other}/desired").status_code == 403


def test_head_is_counted_as_head_of_the_get_route(api: httpx.Client, twin: str) -> None:
    assert api.head(f"/api/v1/twins/{twin}/desired").status_code == 200
    assert api.head(f"/api/v1/twins/{twin}").status_code == 200
    metrics = api.get("/metrics").text
    for route in ("/api/v1/twins/{twin_id}", "/api/v1/twins/{twin_id}/{section}"):
        line = f'method="HEAD",route="{route}",status="200"'
        assert line in metrics, route


def test_a_405_allows_head_wherever_it_allows_get(api: httpx.Client, twin: str) -> None:
    for method, path, allowed in [
        ("POST", f"/api/v1/twins/{twin}", "DELETE, GET, HEAD, PATCH, PUT"),
        ("PUT", f"/api/v1/twins/{twin}/delta", "GET, HEAD"),
        ("DELETE", "/api/v1/search/twins", "GET, HEAD, POST"),
    ]:
        response = api.request(method, path)
        assert response.status_code == 405, path
        assert response.headers["allow"] == allowed, path


def test_head_of_the_event_stream_ends_at_once(service: ServiceProcess) -> None:
    """The headers of the stream, and the answer ends: the next request on the connection
    is answered next, and the stream's subscription is let go."""
    with socket.create_connection(("127.0.0.1", service.port), timeout=30) as sock:
        auth = f"Authorization: Bearer {ADMIN_TOKEN}\r\n".encode()
        sock.sendall(b"HEAD /api/v1/stream/twins HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n")
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while b'"status":"ok"' not in received:  # the end of /health's answer
            chunk = sock.recv(4096)
            assert chunk, received
            received += chunk
    head, _, rest = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"content-type: text/event-stream" in head.lower(), head
    # Nothing of a body: what follows the headers is the answer to the next request.
    assert rest.startswith(b"HTTP/1.1 200"), rest
    with service.client() as api:
        deadline = time.monotonic() + 30  # a bound for a busy machine, not a timing claim
        while _subscriptions(api) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _subscriptions(api) == 0


def _subscriptions(api: httpx.Client) -> int:
    count: int = api.get("/ready").json()["checks"]["streams"]["subscriptions"]
    return count


def _exchange(port: int, request: bytes) -> tuple[bytes, bytes]:
    """Send ``request`` on a connection of its own; the head of the answer and every byte
    after it, up to the close (each request here ends its connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(request)
        return _answer_and_rest(sock)


def _answer_and_rest(sock: socket.socket) -> tuple[bytes, bytes]:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    head, _, rest = received.partition(b"\r\n\r\n")
    return head, rest


def _length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise AssertionError(f"no Content-Length: {head!r}")


def _head_as_get(answers: Callable[[str], tuple[bytes, bytes]]) -> bytes:
    """The status line of the HEAD and GET answers of ``answers(method)``, checked: the
    same status and Content-Length (GET's body, not empty), and no byte of a body after
    the HEAD's headers."""
    got_head, got_body = answers("GET")
    head, rest = answers("HEAD")
    status = head.split(b"\r\n", 1)[0]
    assert status == got_head.split(b"\r\n", 1)[0], (head, got_head)
    assert _length(head) == _length(got_head) == len(got_body) > 0, (head, got_head)
    assert rest == b"", (head, rest)
    return status


def _busy(port: int, method: str) -> tuple[bytes, bytes]:
    """The answer of the connection refused as its head passed limits.incoming_bytes
    (1 MiB): eighteen heads of 60 KB, held unfinished."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(18)]
    try:
        for sock in socks:
            sock.sendall(f"{method} /health HTTP/1.1\r\nHost: x\r\nX-Pad: ".encode())
            sock.sendall(b"a" * 60_000)
        refused, _, _ = select.select(socks, [], [], 60)
        assert refused, "no connection was refused"
        return _answer_and_rest(refused[0])
    finally:
        for sock in socks:
            sock.close()


def test_refusals_outside_the_routes_send_no_body_to_a_head(
    service_factory: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    """The answers given before the application (uvicorn's protocol: a request it cannot
    parse, a head too large or too slow, the bytes of all requests arriving past their
    bound) carried their JSON error body to a HEAD as well (RFC 9110 section 9.3.2: a
    HEAD's answer has no content). The refusals of the application (authentication,
    stream.max_connections, a query string it cannot read) are checked alongside."""
    svc = service_factory(
        env={
            "TWIN_LIMITS__READ_TIMEOUT_SECONDS": "1",
            "TWIN_LIMITS__INCOMING_BYTES": str(1024 * 1024),
            "TWIN_STREAM__MAX_CONNECTIONS": "1",
        }
    )
    port = svc.port
    host = "Host: x\r\n"  # HTTP/1.1 needs one (RFC 9112 section 3.2)
    auth = f"Authorization: Bearer {ADMIN_TOKEN}\r\n"
    acme = f"Authorization: Bearer {ACME_TOKEN}\r\n"

    def send(text: str) -> Callable[[str], tuple[bytes, bytes]]:
        return lambda method: _exchange(port, text.replace("M", method, 1).encode("latin-1"))

    refusals = {
        # api.http_protocol, before the application
        "bad header": send("M /health HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n"),
        "bad target": send("M /a\x01b HTTP/1.1\r\nHost: x\r\n\r\n"),
        "head too large": send("M /health HTTP/1.1\r\nX-Pad: " + "a" * 70_000 + "\r\n\r\n"),
        "head too slow": send("M /health HTTP/1.1\r\nHost: x\r\n"),
        "busy": lambda method: _busy(port, method),
        # the application
        "no token": send(f"M /api/v1/twins/org.acme:x HTTP/1.1\r\n{host}Connection: close\r\n\r\n"),
        "other namespace": send(
            f"M /api/v1/twins/org.other:x HTTP/1.1\r\n{host}{acme}Connection: close\r\n\r\n"
        ),
        "bad query": send(
            f"M /api/v1/twins?ids=%FF HTTP/1.1\r\n{host}{auth}Connection: close\r\n\r\n"
        ),
    }
    expected = {
        "bad header": b"HTTP/1.1 400 Bad Request",
        "bad target": b"HTTP/1.1 400 Bad Request",
        "head too large": b"HTTP/1.1 431 Request Header Fields Too Large",
        "head too slow": b"HTTP/1.1 408 Request Timeout",
        "busy": b"HTTP/1.1 503 Service Unavailable",
        "no token": b"HTTP/1.1 401 Unauthorized",
        "other namespace": b"HTTP/1.1 403 Forbidden",
        "bad query": b"HTTP/1.1 400 Bad Request",
    }
    for kind, answers in refusals.items():
        assert _head_as_get(answers) == expected[kind], kind
    # stream.max_connections: one reader holds the only place.
    with socket.create_connection(("127.0.0.1", port), timeout=60) as reader:
        reader.sendall(f"GET /api/v1/stream/twins HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode())
        assert reader.recv(65536).startswith(b"HTTP/1.1 200"), "the reader was not served"
        stream = send(f"M /api/v1/stream/twins HTTP/1.1\r\n{host}{auth}Connection: close\r\n\r\n")
        assert _head_as_get(stream) == b"HTTP/1.1 503 Service Unavailable"
    # A HEAD refused after an answered GET on the same connection, and a GET after a HEAD:
    # the method is the refused request's, not the one before it.
    for first, second in (("GET", "HEAD"), ("HEAD", "GET")):
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(f"{first} /health HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            answered = b""
            while b"\r\n\r\n" not in answered or (
                first == "GET" and not answered.endswith(b"}")  # the end of /health's body
            ):
                chunk = sock.recv(65536)
                assert chunk, answered
                answered += chunk
            sock.sendall(f"{second} /health HTTP/1.1\r\nBad Header: y\r\n\r\n".encode())
            refused, rest = _answer_and_rest(sock)
        assert refused.startswith(b"HTTP/1.1 400"), (first, refused)
        assert len(rest) == (_length(refused) if second == "GET" else 0), (first, rest)
