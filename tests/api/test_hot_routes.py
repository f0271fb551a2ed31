"""The whole-twin GET and PATCH answer the same with and without the hot routes.

``api_hot_routes`` serves them ahead of FastAPI's machinery (twin_service.api.hot_routes);
a service with it off goes through FastAPI. The same script of requests, good and bad, runs
against both, and every answer (status, error body, the headers a client reads, the
document) must be the same.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.service_process import ACME_TOKEN, ADMIN_TOKEN, READER_TOKEN, ServiceProcess

MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
TWIN = "/api/v1/twins/org.hot:pump"
OTHER_NS = "/api/v1/twins/org.other:pump"

#: (method, path, token, headers, body) in order; each runs against a fresh service.
SCRIPT: list[tuple[str, str, str | None, dict[str, str], bytes | None]] = [
    (
        "PUT",
        TWIN,
        ADMIN_TOKEN,
        {"Content-Type": "application/json"},
        b'{"attributes": {"site": "a"}, "desired": {"fan": {"speed": 1}}, '
        b'"reported": {"mode": "x"}}',
    ),
    ("GET", TWIN, ADMIN_TOKEN, {}, None),
    ("GET", TWIN, None, {}, None),  # 401
    ("GET", TWIN, "not-a-token", {}, None),  # 401
    ("GET", "/api/v1/twins/not-an-id", ADMIN_TOKEN, {}, None),  # 400
    ("GET", "/api/v1/twins/org.hot:missing", ADMIN_TOKEN, {}, None),  # 404
    ("GET", OTHER_NS, ACME_TOKEN, {}, None),  # 403 (namespace)
    ("GET", TWIN, ADMIN_TOKEN, {"If-None-Match": '"rev:1"'}, None),  # 304
    ("GET", TWIN, ADMIN_TOKEN, {"If-Match": '"rev:9"'}, None),  # 412
    ("GET", TWIN, ADMIN_TOKEN, {"If-Match": "bogus"}, None),  # 400
    ("GET", TWIN + "?fields=desired,attributes/site", ADMIN_TOKEN, {}, None),
    ("GET", TWIN + "?at=0", ADMIN_TOKEN, {}, None),  # 400
    ("GET", TWIN + "?at=9", ADMIN_TOKEN, {}, None),  # 404 revision
    # HEAD is served as the GET (api.head), hot or not.
    ("HEAD", TWIN, ADMIN_TOKEN, {}, None),
    ("HEAD", TWIN, None, {}, None),  # 401
    ("HEAD", TWIN, ADMIN_TOKEN, {"If-None-Match": '"rev:1"'}, None),  # 304
    ("HEAD", "/api/v1/twins/org.hot:missing", ADMIN_TOKEN, {}, None),  # 404
    ("PATCH", TWIN, ADMIN_TOKEN, {"Content-Type": MERGE}, b'{"desired": {"fan": {"speed": 2}}}'),
    ("PATCH", TWIN, READER_TOKEN, {"Content-Type": MERGE}, b'{"desired": {"x": 1}}'),  # 403
    ("PATCH", TWIN, ADMIN_TOKEN, {"Content-Type": "text/plain"}, b"{}"),  # 415
    ("PATCH", TWIN, ADMIN_TOKEN, {"Content-Type": MERGE}, b'{"desired": '),  # 400 json
    ("PATCH", TWIN, ADMIN_TOKEN, {"Content-Type": MERGE}, b'{"a": 1, "a": 2}'),  # 400 dup
    ("PATCH", TWIN, ADMIN_TOKEN, {"Content-Type": MERGE}, b""),  # 400 empty
    ("PATCH", TWIN, ADMIN_TOKEN, {"Content-Type": MERGE}, b'{"delta": {}}'),  # 400 read-only
    (
        "PATCH",
        TWIN,
        ADMIN_TOKEN,
        {"Content-Type": MERGE, "If-Match": '"rev:1"'},
        b'{"desired": {"x": 1}}',
    ),  # 412
    (
        "PATCH",
        TWIN,
        ADMIN_TOKEN,
        {"Content-Type": MERGE, "If-Match": "bogus"},
        b'{"desired": {"x": 1}}',
    ),  # 400
    (
        "PATCH",
        TWIN + "?condition=eq(attributes/site,%22b%22)",
        ADMIN_TOKEN,
        {"Content-Type": MERGE},
        b'{"desired": {"x": 1}}',
    ),  # 412 condition
    (
        "PATCH",
        TWIN + "?condition=eq(",
        ADMIN_TOKEN,
        {"Content-Type": MERGE},
        b'{"desired": {"x": 1}}',
    ),  # 400 rql
    (
        "PATCH",
        TWIN,
        ADMIN_TOKEN,
        {"Content-Type": MERGE},
        b'{"desired": {"big": "' + b"x" * 70_000 + b'"}}',
    ),  # 413
    (
        "PATCH",
        TWIN,
        ADMIN_TOKEN,
        {"Content-Type": JSON_PATCH},
        b'[{"op": "replace", "path": "/desired/fan/speed", "value": 3}]',
    ),
    (
        "PATCH",
        TWIN,
        ADMIN_TOKEN,
        {"Content-Type": JSON_PATCH},
        b'[{"op": "remove", "path": "/desired/nothing"}]',
    ),  # 400/409 bad pointer
    (
        "PATCH",
        "/api/v1/twins/org.hot:missing",
        ADMIN_TOKEN,
        {"Content-Type": MERGE},
        b'{"desired": {"x": 1}}',
    ),  # 404
    (
        "PATCH",
        TWIN + "?ttl=60",
        ADMIN_TOKEN,
        {"Content-Type": MERGE},
        b'{"desired": {"fan": {"speed": 4}}}',
    ),
    ("PATCH", TWIN + "?ttl=-1", ADMIN_TOKEN, {"Content-Type": MERGE}, b'{"desired": {}}'),  # 400
    ("GET", TWIN, ADMIN_TOKEN, {}, None),
]

#: Headers a client relies on; the rest (date, server) differ by nature.
HEADERS = ("content-type", "content-length", "etag", "x-twin-seq", "www-authenticate", "location")
#: Values that differ between two services by nature: timestamps and the incarnation.
_VOLATILE = re.compile(rb'"\d{4}-\d\d-\d\dT[0-9:.]+Z"')


def _normalise(body: bytes) -> bytes:
    return _VOLATILE.sub(b'"T"', body)


def _run(service: ServiceProcess) -> list[dict[str, Any]]:
    answers = []
    with httpx.Client(base_url=service.url, timeout=30) as client:
        for method, path, token, headers, body in SCRIPT:
            sent = dict(headers)
            if token is not None:
                sent["Authorization"] = f"Bearer {token}"
            response = client.request(method, path, headers=sent, content=body)
            answers.append(
                {
                    "request": f"{method} {path[:80]}",
                    "status": response.status_code,
                    "headers": {h: response.headers.get(h) for h in HEADERS},
                    "body": _normalise(response.content),
                }
            )
    return answers


def test_hot_routes_answer_exactly_as_fastapi_does(
    tmp_path: Path, service_factory: Callable[..., ServiceProcess]
) -> None:
    hot = _run(service_factory(tmp_path / "hot"))
    routed = _run(service_factory(tmp_path / "routed", env={"TWIN_API_HOT_ROUTES": "false"}))
    statuses = [a["status"] for a in hot]
    # The script reaches every kind of answer, not only successes.
    assert {200, 201, 304, 400, 401, 403, 404, 412, 413, 415} <= set(statuses), statuses
    for got, expected in zip(hot, routed, strict=True):
        assert got == expected


def test_other_requests_on_twin_paths_still_reach_fastapi(
    tmp_path: Path, service_factory: Callable[..., ServiceProcess]
) -> None:
    service = service_factory(tmp_path / "svc")
    with service.client() as api:
        assert api.put(TWIN, json={"desired": {"a": 1}}).status_code == 201
        # Sub-resources, HEAD, other methods and the collection are routed as before.
        assert api.get(TWIN + "/desired/a").json() == 1
        head = api.head(TWIN)  # the GET's answer without its body (api.head)
        assert head.status_code == 200 and head.content == b"" and head.headers["etag"]
        assert api.post(TWIN).status_code == 405
        assert api.get("/api/v1/twins", params={"ids": "org.hot:pump"}).status_code == 200
        assert api.get("/api/v1/twins/").status_code == 404
        assert api.delete(TWIN).status_code == 204
        assert api.get(TWIN).json()["error"] == "twin.notfound"
