"""Random hostile requests against the real service: never a 5xx, always the one error body,
and a refused write never changes the twin.

The requests come from a seeded generator (the same ones on every run): malformed and
oversized bodies, wrong media types, bad JSON pointers and percent escapes, bad RQL,
`fields` and preconditions, mixed with well-formed writes so that the refusals happen to a
twin that keeps changing.
"""

from __future__ import annotations

import json
import random
import select
import socket
import string
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import httpx
from fastapi.routing import APIRoute
from starlette.routing import Match

from tests.hostile_json import JsonValues
from tests.service_process import ADMIN_TOKEN, ServiceProcess
from twin_service.api.app import create_app
from twin_service.settings import load_settings

REQUESTS = 1200
WRITES = ("PUT", "PATCH", "DELETE", "POST")

_RAW_BODIES = [
    b"",
    b"{",
    b"null",
    b"[]",
    b'{"a": 1, "a": 2}',
    b'{"desired": {"a": NaN}}',
    b'{"desired": {"a": Infinity}}',
    b'{"desired": {"a": 1e999}}',
    b"\xff\xfe",
    b'{"desired": {"a": "\xc3"}}',
    b'"\\ud800"',
    b'{"desired": {"\\ud800": 1}}',
    b'{"\\u0000": 1}',
    b"[" * 2000 + b"]" * 2000,
    b'{"desired": ' + b'{"k": ' * 40 + b"1" + b"}" * 41,
    b'{"desired": {"a": ' + b"[" * 600 + b"]" * 600 + b"}}",
    b'{"desired": {"blob": "' + b"x" * 70_000 + b'"}}',
    b'{"live": {"blob": "' + b"x" * 40_000 + b'", "more": "' + b"x" * 30_000 + b'"}}',
    b'[{"op": "add", "path": "/desired/blob", "value": "' + b"x" * 70_000 + b'"}]',
]
_CONTENT_TYPES = [
    "application/json",
    "application/merge-patch+json",
    "application/json-patch+json",
    "application/merge-patch+json; charset=utf-8",
    "application/json; charset=latin1",
    "text/plain",
    "multipart/form-data",
    "",
]
_SECTIONS = ["attributes", "desired", "reported", "live", "delta", "connection", "metadata"]
_SECTIONS += ["lifecycle", "history", "nosuch", ""]
_TOKENS = ["", "~", "~0", "~1", "~2", "..", "-", "0", "00", "99999999999999999999", "fan"]
_TOKENS += ["speed", "arr", "a b", "é", "%", "%ZZ", "%2F", "%00"]
_KEYS = ["", "a", "fan", "speed", "arr", "a/b", "~1", "\u0000", "é", "x" * 300, "$x", "a.b"]
_JSON_PATCH_PATHS = ["/desired/a", "/desired", "", "/", "/reported/x/0", "/desired/arr/-"]
_JSON_PATCH_PATHS += ["/revision", "/delta", "/attributes/~1x", "/desired/arr/9"]
_RQL = ["eq(desired/a,1)", "eq(", "and()", "or(eq(a,1))", "like(a,'*')", "in(a)", "exists()"]
_RQL += ["gt(revision,0)", "eq(desired/a,1e999)", "not(not(not(eq(a,1))))", "eq(a,'\\", ")"]
_RQL += ["not(" * 200 + "exists(desired/a)" + ")" * 200, "or(" + "exists(x)," * 300 + "exists(x))"]
_FIELDS = ["attributes", "desired/fan", "", ",", "x", "desired(a)", "//", "~", "revision"]


@dataclass
class Hostile:
    """Makes the requests; ``twin_id`` is the twin most of them aim at."""

    rng: random.Random
    twin_id: str

    def text(self) -> str:
        pick = self.rng.random()
        if pick < 0.5:
            return self.rng.choice(_KEYS + _TOKENS)
        if pick < 0.9:
            size = self.rng.randint(0, 8)
            return "".join(self.rng.choice(string.printable) for _ in range(size))
        # Long names, and more digits than int() converts (a JSON pointer index).
        return self.rng.choice("y9") * self.rng.choice([257, 5000])

    def value(self, depth: int = 0) -> Any:
        numbers = [0, -1, 1.5, 3, 10**20, 2**63, -(2**64), 1e308]
        return JsonValues(self.rng, self.text, self.text, numbers).value(depth)

    def json_patch(self) -> bytes:
        ops = []
        for _ in range(self.rng.randint(0, 4)):
            op: dict[str, Any] = {
                "op": self.rng.choice(["add", "remove", "replace", "move", "copy", "test", "x"]),
                "path": self.rng.choice([*_JSON_PATCH_PATHS, self.text()]),
            }
            if self.rng.random() < 0.7:
                op["value"] = self.value()
            if self.rng.random() < 0.3:
                op["from"] = self.rng.choice(["/desired/a", "/desired", "", self.text()])
            ops.append(op)
        return json.dumps(ops).encode()

    def body(self) -> bytes:
        pick = self.rng.random()
        if pick < 0.25:
            return self.rng.choice(_RAW_BODIES)
        if pick < 0.5:
            return self.json_patch()
        if pick < 0.8:
            section = self.rng.choice(["desired", "reported", "attributes", "live"])
            return json.dumps({section: self.value(1)}).encode()
        ascii_only = self.rng.random() < 0.5
        return json.dumps(self.value(), ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")

    def segment(self) -> str:
        raw = self.text().encode("utf-8", "surrogatepass")
        return quote(raw, safe="~%") if self.rng.random() < 0.85 else quote(raw, safe="")

    def twin_path(self) -> str:
        twin_id = self.rng.choice(
            [self.twin_id] * 6 + ["org.hostile:missing", "bad", "a:b/c", "x" * 300, ":", "org.:x"]
        )
        path = f"/api/v1/twins/{quote(twin_id, safe=':')}"
        if self.rng.random() < 0.6:
            path += "/" + self.rng.choice(_SECTIONS)
            for _ in range(self.rng.randint(0, 3)):
                path += "/" + self.segment()
        if self.rng.random() < 0.05:  # was a 307 to the path without it
            path += self.rng.choice(["/", "%2F"])
        return path

    def query(self) -> dict[str, str]:
        query: dict[str, str] = {}
        for name, chance, choices in [
            ("fields", 0.3, _FIELDS),
            ("condition", 0.1, _RQL),
            ("at", 0.1, ["0", "-1", "1", "x", "99999999999999999999", "²"]),
            ("ttl", 0.1, ["0", "-1", "1", "x", "1e9", "nan", "inf", "1e300", "1e-320"]),
            ("since", 0.1, ["0", "-1", "x", "99999999999999999999", str(2**63 - 1)]),
            ("until", 0.05, ["0", "-1", "99999999999999999999", str(2**63)]),
            ("limit", 0.05, ["0", "1", "1000", "1001", "-1", "99999999999999999999"]),
        ]:
            if self.rng.random() < chance:
                query[name] = self.rng.choice([*choices, self.text()])
        return query

    def collection(self) -> tuple[str, str, dict[str, str]]:
        method, path = self.rng.choice(
            [
                ("GET", "/api/v1/twins"),
                ("POST", "/api/v1/twins"),
                ("GET", "/api/v1/search/twins"),
                ("POST", "/api/v1/search/twins"),
                ("GET", "/api/v1/search/twins/count"),
            ]
        )
        query: dict[str, str] = {}
        if self.rng.random() < 0.5:
            query["filter"] = self.rng.choice([*_RQL, self.text()])
        if self.rng.random() < 0.3:
            query["option"] = self.rng.choice(
                ["size(0)", "size(1000)", "cursor(zz)", "sort(+x)", "sort(", self.text()]
            )
        if self.rng.random() < 0.3:
            query["ids"] = self.rng.choice(["", ",", self.twin_id, ",".join([self.twin_id] * 300)])
        if self.rng.random() < 0.1:
            query["waitFor"] = self.rng.choice(["latest", "0", "x", "9" * 5000, self.text()])
        if self.rng.random() < 0.2:
            query["namespace"] = self.rng.choice(["org.hostile", "", "1x", self.text()])
        return method, path, query

    def headers(self) -> dict[str, str]:
        headers = {}
        if self.rng.random() < 0.8:
            headers["Content-Type"] = self.rng.choice(_CONTENT_TYPES)
        if self.rng.random() < 0.1:
            headers["If-Match"] = self.rng.choice(
                ['"rev:1"', "*", "rev:x", '"rev:-1"', 'W/"x"', f'"rev:{"9" * 5000}"']
            )
        if self.rng.random() < 0.1:
            headers["If-None-Match"] = self.rng.choice(["*", '"rev:1"', "x", ""])
        return headers

    def request(self) -> tuple[str, str, dict[str, str], dict[str, str], bytes | None]:
        if self.rng.random() < 0.15:
            method, path, query = self.collection()
        else:
            method = self.rng.choice(["GET", "GET", "PUT", "PATCH", "PATCH", "DELETE", "POST"])
            path, query = self.twin_path(), self.query()
        body = self.body() if method in ("PUT", "PATCH", "POST") else None
        return method, path, query, self.headers(), body


def _assert_error_body(response: httpx.Response, where: str) -> None:
    try:
        body = response.json()
    except ValueError:
        raise AssertionError(f"{where}: not JSON: {response.text[:200]!r}") from None
    assert body.get("status") == response.status_code, where
    assert isinstance(body.get("error"), str) and body["error"], where
    assert isinstance(body.get("message"), str) and body["message"], where


def _reset(api: httpx.Client, twin_id: str) -> dict[str, Any]:
    created = api.put(
        f"/api/v1/twins/{twin_id}",
        json={"attributes": {"m": "x"}, "desired": {"fan": {"speed": 3}, "arr": [1, 2]}},
    )
    assert created.status_code in (200, 201), created.text
    doc: dict[str, Any] = created.json()
    return doc


class Operations:
    """Which documented operation a request reaches, found with the service's own routes
    (an app built in process, never started), and the statuses its OpenAPI entry lists."""

    def __init__(self, spec: dict[str, Any], data_dir: Path) -> None:
        app = create_app(load_settings(data_dir=data_dir, auth={"disabled": True}))
        self._routes = [r for r in app.router.routes if isinstance(r, APIRoute)]
        self._spec = spec

    def documented(self, method: str, path: str) -> set[str] | None:
        """The statuses of the operation ``method path`` reaches; ``None`` when it reaches
        none (the router answers 404 or 405 itself: request.method, resource.notfound)."""
        scope = {"type": "http", "method": method, "path": unquote(path), "root_path": ""}
        for route in self._routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                operation = self._spec["paths"][route.path_format][method.lower()]
                return set(operation["responses"])
        return None


def test_hostile_requests_get_a_4xx_and_leave_the_twin_alone(
    service: ServiceProcess, tmp_path: Path
) -> None:
    twin_id = f"org.hostile:t-{uuid.uuid4().hex[:8]}"
    hostile = Hostile(random.Random(20261205), twin_id)
    statuses: dict[int, int] = {}
    with service.client() as api:
        operations = Operations(api.get("/openapi.json").json(), tmp_path)
        doc = _reset(api, twin_id)
        for number in range(REQUESTS):
            method, path, query, headers, body = hostile.request()
            where = f"request {number}: {method} {path[:120]} {query} {headers}"
            response = api.request(method, path, params=query, headers=headers, content=body)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code < 500, f"{where}: {response.text[:300]}"
            assert "location" not in response.headers or response.status_code == 201, (
                f"{where}: {response.status_code} to {response.headers['location']}"
            )
            documented = operations.documented(method, path)
            if documented is not None:  # every status an operation answers is in its entry
                assert str(response.status_code) in documented, f"{where}: {response.text[:200]}"
            if response.status_code >= 400:
                _assert_error_body(response, where)
            if method not in WRITES or not path.startswith(f"/api/v1/twins/{twin_id}"):
                continue
            now = api.get(f"/api/v1/twins/{twin_id}")
            if response.status_code >= 400:
                # A refused write leaves every byte of the twin as it was.
                assert now.status_code == 200 and now.json() == doc, where
            elif now.status_code == 404:
                doc = _reset(api, twin_id)
            else:
                doc = now.json()
                assert response.headers.get("ETag", f'"rev:{doc["revision"]}"') == (
                    f'"rev:{doc["revision"]}"'
                ), where
        assert api.get("/ready").status_code == 200
    # The mix reached the service's refusals and its successes, not only one kind.
    assert {200, 201, 204, 400, 404, 412, 413, 415} <= set(statuses), statuses
    assert "unexpected error" not in service.log_tail(10_000)


_UNPARSABLE = [
    b"GET /api/v1/twins HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    b"\x00\x01\x02 binary garbage\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"GET /api/v1/twins HTTP/1.1\r\nHo st: x\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
]


def _connect(service: ServiceProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", service.port), timeout=10)


def _raw_exchange(
    service: ServiceProcess, request: bytes, piece: bytes = b"", most: int = 0
) -> bytes:
    """Send ``request``, then ``piece`` again and again (up to ``most`` bytes) until the
    service answers; its answer, up to its close. Sent whole, a large request could be
    reset by the service's close before its answer was read."""
    with _connect(service) as sock:
        sock.sendall(request)
        sent = 0
        while sent < most and not select.select([sock], [], [], 0.001)[0]:
            sock.sendall(piece)
            sent += len(piece)
        return _raw_answer(sock)


def _raw_answer(sock: socket.socket) -> bytes:
    """What the service sends on ``sock`` until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _head(head: bytes) -> tuple[str, dict[str, str]]:
    """The status line and the headers (names in lower case) of a response's head."""
    lines = head.decode("latin-1").split("\r\n")
    return lines[0], dict(line.lower().split(": ", 1) for line in lines[1:])


def _json_error(answer: bytes) -> tuple[str, dict[str, Any]]:
    """The status line and the JSON error body of an answer the service closed after."""
    head, _, body = answer.partition(b"\r\n\r\n")
    status, headers = _head(head)
    assert headers["content-type"] == "application/json", answer
    assert headers["connection"] == "close" and int(headers["content-length"]) == len(body)
    return status, json.loads(body)


def test_a_request_without_one_valid_host_is_400(service: ServiceProcess) -> None:
    """RFC 9112 section 3.2: an HTTP/1.1 request with no Host, and any request with two, or
    one that is not ``host[:port]``, is answered 400; all three were served (200)."""
    for version, hosts in (
        ("1.1", ""),
        ("1.1", "Host: a\r\nHost: b\r\n"),
        ("1.0", "Host: a\r\nHost: a\r\n"),
        ("1.1", "Host: a b/c\r\n"),
        ("1.1", "Host: a@b\r\n"),
        ("1.1", "Host: a:8x\r\n"),
        ("1.1", "Host: [::1\r\n"),
    ):
        request = f"GET /health HTTP/{version}\r\n{hosts}\r\n".encode()
        status, error = _json_error(_raw_exchange(service, request))
        assert status == "HTTP/1.1 400 Bad Request", request
        assert (error["status"], error["error"]) == (400, "request.invalid"), error
        assert "Host" in error["message"], error
    for version, hosts in (
        ("1.0", ""),  # HTTP/1.0 had no Host
        ("1.1", "Host: \r\n"),  # empty: a target URI without an authority
        ("1.1", "Host: [::1]:8080\r\n"),
        ("1.1", "Host: 127.0.0.1:\r\n"),
        ("1.1", "Host: Example.COM\r\n"),
        ("1.1", "Host: xn--bcher-kva.example%2D:80\r\n"),
    ):
        request = f"GET /health HTTP/{version}\r\n{hosts}Connection: close\r\n\r\n"
        answer = _raw_exchange(service, request.encode())
        assert answer.split(b"\r\n")[0].endswith(b" 200 OK"), (request, answer)


def test_requests_the_http_parser_refuses_get_the_json_error_body(
    service: ServiceProcess,
) -> None:
    """Refused before the application sees them, by the server itself, which answered in
    plain text before."""
    for request in _UNPARSABLE:
        status, error = _json_error(_raw_exchange(service, request))
        assert status == "HTTP/1.1 400 Bad Request", request
        assert set(error) == {"status", "error", "message", "description"}, error
        assert (error["status"], error["error"]) == (400, "request.invalid"), error
    # And the service goes on serving.
    with service.client() as api:
        assert api.get("/health").status_code == 200


_UPGRADE = (
    b"GET /api/v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


def test_a_request_head_past_the_bound_is_a_431(service: ServiceProcess) -> None:
    """Neither uvicorn nor its parser bounds the headers: a 10 MB header, or 200,000 small
    ones, were read whole and answered 200."""
    too_large = "HTTP/1.1 431 Request Header Fields Too Large"
    heads = [
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 70_000 + b"\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 10_000 + b"\r\n",
        _UPGRADE + b"X-A: " + b"a" * 70_000 + b"\r\n\r\n",
    ]
    answers = [_raw_exchange(service, head) for head in heads]
    # One header that never ends: refused while it is still being read.
    start = b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: "
    answers.append(_raw_exchange(service, start, b"a" * 4096, 10_000_000))
    for answer in answers:
        status, error = _json_error(answer)
        assert status == too_large, answer[:300]
        assert (error["status"], error["error"]) == (431, "request.head.toolarge"), error
        assert "limits.max_head_bytes (65536 bytes)" in error["message"], error
    # Under the bound, all is as before.
    with service.client() as api:
        assert api.get("/health", headers={"X-A": "a" * 60_000}).status_code == 200


def test_the_bound_on_a_request_head_is_a_setting(tmp_path: Path) -> None:
    proc = ServiceProcess(tmp_path, env={"TWIN_LIMITS__MAX_HEAD_BYTES": "16384"}).start()
    try:
        status, error = _json_error(
            _raw_exchange(proc, b"GET /health HTTP/1.1\r\nX-A: " + b"a" * 20_000 + b"\r\n\r\n")
        )
        assert status.startswith("HTTP/1.1 431") and "(16384 bytes)" in error["message"]
        with proc.client() as api:
            assert api.get("/health", headers={"X-A": "a" * 15_000}).status_code == 200
    finally:
        proc.stop()


def _answer(sock: socket.socket) -> tuple[str, bytes]:
    """The status line and body of the next response on ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed without an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, headers = _head(head)
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    return status, body


def _put_head(twin_id: str, size: int, token: str | None = ADMIN_TOKEN) -> bytes:
    auth = b"" if token is None else f"Authorization: Bearer {token}\r\n".encode()
    return (
        f"PUT /api/v1/twins/{twin_id} HTTP/1.1\r\nHost: x\r\n".encode()
        + auth
        + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % size
    )


def test_a_request_that_stops_arriving_is_a_408(tmp_path: Path) -> None:
    """uvicorn waited for good for a connection that sent nothing, a head sent a piece at a
    time, or a body that stopped half-way: a few thousand such, and the process had no
    descriptors left. A head must arrive within limits.read_timeout_seconds (1 s here);
    a body may take longer, but may not pause that long."""
    proc = ServiceProcess(tmp_path, env={"TWIN_LIMITS__READ_TIMEOUT_SECONDS": "1"}).start()
    body = b'{"desired": {"a": 1}}'
    put = _put_head("org.slow:t", len(body))
    try:
        head = "The request line and headers did not arrive within"
        with _connect(proc) as idle:
            status, error = _answer(idle)
        assert status == "HTTP/1.1 408 Request Timeout"
        assert json.loads(error)["message"].startswith(head), error
        with _connect(proc) as trickle:
            for piece in (b"GET /health HTTP/1.1\r\n", b"Host: x\r\n", b"X-A: b\r\n"):
                trickle.sendall(piece)
                time.sleep(0.4)
            status, error = _answer(trickle)
        assert status == "HTTP/1.1 408 Request Timeout" and head in error.decode()
        with _connect(proc) as stalled:
            stalled.sendall(put + body[:5])
            status, error = _answer(stalled)
        assert status == "HTTP/1.1 408 Request Timeout"
        assert json.loads(error)["error"] == "request.timeout"
        assert "body paused" in json.loads(error)["message"], error
        with proc.client() as api:
            assert api.get("/api/v1/twins/org.slow:t").status_code == 404
        # A body that keeps coming may take longer than the timeout in all, and a
        # kept-alive connection may wait between requests as long as uvicorn lets it.
        with _connect(proc) as steady:
            steady.sendall(put)
            for at in range(0, len(body), 4):
                steady.sendall(body[at : at + 4])
                time.sleep(0.3)
            assert _answer(steady)[0] == "HTTP/1.1 201 Created"
            time.sleep(0.8)
            steady.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _answer(steady)[0] == "HTTP/1.1 200 OK"
    finally:
        proc.stop()


def test_requests_refused_before_the_application_are_counted(tmp_path: Path) -> None:
    """The answers the HTTP server gives itself (api.http_protocol) were missing from
    twin_service_http_requests_total, and a body that stopped half-way was counted with
    the status nobody got (499), not its 408."""
    proc = ServiceProcess(tmp_path, env={"TWIN_LIMITS__READ_TIMEOUT_SECONDS": "1"}).start()
    body = b'{"desired": {"a": 1}}'
    try:
        assert _raw_exchange(proc, b"\x00\x01 garbage\r\n\r\n").startswith(b"HTTP/1.1 400")
        huge = b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 70_000 + b"\r\n\r\n"
        assert _raw_exchange(proc, huge).startswith(b"HTTP/1.1 431")
        with _connect(proc) as idle:
            assert _answer(idle)[0] == "HTTP/1.1 408 Request Timeout"
        with _connect(proc) as stalled:
            stalled.sendall(_put_head("org.slow:t", len(body)) + body[:5])
            assert _answer(stalled)[0] == "HTTP/1.1 408 Request Timeout"
        with proc.client() as api:
            exposition = api.get("/metrics").text
    finally:
        proc.stop()
    total = "twin_service_http_requests_total"
    counted = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in exposition.splitlines()
        if line.startswith(total) and "/health" not in line  # the start's probes
    }
    assert counted == {
        f'{total}{{method="other",route="refused",status="400"}}': 1,
        f'{total}{{method="GET",route="refused",status="431"}}': 1,
        f'{total}{{method="other",route="refused",status="408"}}': 1,
        f'{total}{{method="PUT",route="/api/v1/twins/{{twin_id}}",status="408"}}': 1,
    }, exposition
    duration = "twin_service_http_request_duration_seconds"
    assert f'{duration}_count{{method="other",route="refused"}} 2' in exposition


def _partial_heads(proc: ServiceProcess, count: int, size: int) -> list[socket.socket]:
    """``count`` connections, each having sent about ``size`` bytes of a head, and stopped."""
    socks = []
    for _ in range(count):
        sock = _connect(proc)
        sock.sendall(b"GET /health HTTP/1.1\r\nX-A: " + b"a" * size)
        socks.append(sock)
    time.sleep(0.5)  # read by the service
    return socks


def _refused(socks: list[socket.socket]) -> list[bytes]:
    """The answers of the connections the service answered (before their heads were whole)."""
    ready, _, _ = select.select(socks, [], [], 0.5)
    return [_raw_answer(sock) for sock in ready]


def test_heads_still_arriving_are_bounded_for_the_whole_process(tmp_path: Path) -> None:
    """Each head was bounded (limits.max_head_bytes), not all of them: 3,000 connections
    sending 60 KB of one held 193 MB for the 30 s a head may take. The WebSocket messages
    still arriving count in the same bound (tests/streams/test_incoming_bounds.py)."""
    proc = ServiceProcess(tmp_path, env={"TWIN_LIMITS__INCOMING_BYTES": str(1024 * 1024)})
    proc.start()
    try:
        socks = _partial_heads(proc, 20, 60_000)  # 1.2 MB: the last few pass the bound
        refused = _refused(socks)
        assert 3 <= len(refused) <= 4, refused
        for answer in refused:
            status, error = _json_error(answer)
            assert status == "HTTP/1.1 503 Service Unavailable", answer
            assert error["error"] == "service.busy"
            assert _head(answer.partition(b"\r\n\r\n")[0])[1]["retry-after"] == "1"
        for sock in socks:
            sock.close()
        time.sleep(0.5)
        # Closed connections gave their bytes back: as many again are held.
        socks = _partial_heads(proc, 16, 60_000)
        assert _refused(socks) == []
        for sock in socks:
            sock.close()
    finally:
        proc.stop()


def test_a_refusal_reaches_a_client_still_sending(service: ServiceProcess) -> None:
    """The service closed the connection as it answered: with the rest of the client's head
    unread, the close reset the connection, and the reset took the answer with it (a client
    sending 5 MB at once got a broken pipe or a reset, never the 431). The service now reads
    on, drops what comes, and closes once the client is quiet."""
    with _connect(service) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nX-A: " + b"a" * 5_000_000)
        status, error = _json_error(_raw_answer(sock))
    assert status == "HTTP/1.1 431 Request Header Fields Too Large", error
    assert error["error"] == "request.head.toolarge"


#: A twin's PUT body of 400,000 bytes: JSON allows the whitespace after the value.
_PADDED = b'{"desired": {"a": 1}}'.ljust(400_000)


def _partial_bodies(
    proc: ServiceProcess, names: list[str], token: str | None = ADMIN_TOKEN
) -> list[socket.socket]:
    """A connection per name, each having sent 300 KB of the body of a PUT of
    ``org.body:<name>``, and stopped."""
    socks = []
    for name in names:
        sock = _connect(proc)
        sock.sendall(_put_head(f"org.body:{name}", len(_PADDED), token) + _PADDED[:300_000])
        socks.append(sock)
        time.sleep(0.1)  # read by the service, in this order
    return socks


def test_bodies_still_arriving_are_bounded_for_the_whole_process(tmp_path: Path) -> None:
    """Each body was bounded (limits.max_request_bytes), not all of them: 300 clients each
    stopping short of a 1 MB body held 295 MB for as long as they sent a byte now and then.
    Bodies count in limits.incoming_bytes with the heads and WebSocket messages."""
    proc = ServiceProcess(tmp_path, env={"TWIN_LIMITS__INCOMING_BYTES": str(1024 * 1024)})
    proc.start()
    try:
        held = _partial_bodies(proc, ["a", "b", "c"])  # 900 KB
        refused = _partial_bodies(proc, ["d"])  # and this one passes 1 MiB
        assert _refused(held) == []
        [answer] = _refused(refused)
        status, error = _json_error(answer)
        assert status == "HTTP/1.1 503 Service Unavailable", answer
        assert error["error"] == "service.busy"
        assert _head(answer.partition(b"\r\n\r\n")[0])[1]["retry-after"] == "1"
        # A client still sending its whole body gets its answer too (the service reads
        # on and drops what comes).
        with _connect(proc) as sock:
            sock.sendall(_put_head("org.body:e", len(_PADDED)) + _PADDED)
            status, error = _json_error(_raw_answer(sock))
        assert status == "HTTP/1.1 503 Service Unavailable" and error["status"] == 503
        # A body held is not cut: it completes, and its bytes leave the budget.
        held[0].sendall(_PADDED[300_000:])
        assert _answer(held[0])[0] == "HTTP/1.1 201 Created"
        with _connect(proc) as sock:
            sock.sendall(_put_head("org.body:f", len(_PADDED)) + _PADDED)
            assert _answer(sock)[0] == "HTTP/1.1 201 Created"
        for sock in held:
            sock.close()
        time.sleep(0.5)
        # Closed connections gave their bytes back, and a body refused before the
        # application read it (401 here) holds nothing: three held again, and a fourth
        # written whole.
        strangers = _partial_bodies(proc, ["g", "h", "i", "j"], token=None)
        held = _partial_bodies(proc, ["k", "l", "m"])
        assert _refused(held) == []
        with _connect(proc) as sock:
            sock.sendall(_put_head("org.body:n", 1000) + _PADDED[:1000])
            assert _answer(sock)[0] == "HTTP/1.1 201 Created"
        for sock in held + strangers:
            sock.close()
        with proc.client() as api:
            created = {"a", "f", "n"}
            for name in "abcdefghijklmn":
                found = api.get(f"/api/v1/twins/org.body:{name}").status_code
                assert found == (200 if name in created else 404), name
        assert "Traceback" not in proc.log_tail(400)
    finally:
        proc.stop()
