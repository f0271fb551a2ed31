"""Numbers in query strings are plain ASCII decimals, on every route, against the real
service: history's ``since``, ``until`` and ``limit`` were read by pydantic's int, and
``ttl`` by float(), which both take more than a client should be able to send."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import httpx
import pytest

MERGE = {"Content-Type": "application/merge-patch+json"}

#: What pydantic's int took as an integer (30, 3, 3, 3, 3, 0).
LOOSE_INTEGERS = ["3_0", "+3", " 3", "3 ", "3.0", "-0"]
#: What float() took as a number of seconds (10, 1, 1, 1, 1, 100, 1, 0.5, 1).
LOOSE_SECONDS = ["1_0", " 1", "1 ", "\u0661", "+1", "1e2", "1.", ".5", "\uff11"]
#: Refused before too (by the bounds on float()'s value); kept refused.
NOT_NUMBERS = ["nan", "inf", "1e400", "-1", "0", "0.0", "", "x"]


def _refused(response: httpx.Response, name: str, raw: str) -> None:
    assert response.status_code == 400, (name, raw, response.text)
    body = response.json()
    assert body["error"] == "request.invalid", body
    assert body["message"].startswith(f"Invalid request at query/{name}: "), body
    assert repr(raw) in body["message"], body


@pytest.fixture
def twin(api: httpx.Client) -> str:
    twin_id = f"org.acme:numbers-{uuid.uuid4().hex[:10]}"
    assert api.put(f"/api/v1/twins/{twin_id}", json={"desired": {"a": 1}}).status_code == 201
    for n in range(2, 5):
        patched = api.patch(f"/api/v1/twins/{twin_id}", json={"desired": {"a": n}}, headers=MERGE)
        assert patched.status_code == 200
    return twin_id


@pytest.mark.parametrize("name", ["since", "until", "limit"])
@pytest.mark.parametrize("raw", LOOSE_INTEGERS)
def test_history_takes_only_ascii_digits(api: httpx.Client, twin: str, name: str, raw: str) -> None:
    response = api.get(f"/api/v1/twins/{twin}/history", params={name: raw})
    _refused(response, name, raw)


@pytest.mark.parametrize(
    ("name", "raw"),
    [("since", "\u0663"), ("since", "1e1"), ("until", "-1"), ("limit", "0"), ("limit", "1001")],
)
def test_history_refuses_other_integers_naming_the_parameter(
    api: httpx.Client, twin: str, name: str, raw: str
) -> None:
    _refused(api.get(f"/api/v1/twins/{twin}/history", params={name: raw}), name, raw)


def test_history_pages_with_plain_integers(api: httpx.Client, twin: str) -> None:
    url = f"/api/v1/twins/{twin}/history"
    page = api.get(url, params={"since": "02", "until": "3", "limit": "1"}).json()
    assert [e["revision"] for e in page["items"]] == [2] and page["nextSince"] == 3
    assert [e["revision"] for e in api.get(url).json()["items"]] == [1, 2, 3, 4]


@pytest.mark.parametrize("raw", LOOSE_SECONDS + NOT_NUMBERS)
def test_a_ttl_is_a_plain_decimal_number_and_a_refused_one_writes_nothing(
    api: httpx.Client, twin: str, raw: str
) -> None:
    url = f"/api/v1/twins/{twin}"
    before = api.get(url)
    for method, path, body, headers in [
        ("PATCH", url, b'{"desired": {"a": 9}}', MERGE),  # the hot route
        ("PUT", url, b'{"desired": {"a": 9}}', {"Content-Type": "application/json"}),
        ("PUT", f"{url}/desired/b", b"9", {"Content-Type": "application/json"}),
        ("POST", "/api/v1/twins", b'{"desired": {"a": 9}}', {"Content-Type": "application/json"}),
    ]:
        response = api.request(method, path, params={"ttl": raw}, content=body, headers=headers)
        _refused(response, "ttl", raw)
    after = api.get(url)
    assert after.headers["etag"] == before.headers["etag"]
    assert after.json() == before.json()


@pytest.mark.parametrize(
    ("raw", "seconds"), [("1", 1), ("0.5", 0.5), ("3600", 3600), ("007.25", 7.25)]
)
def test_a_plain_decimal_ttl_is_taken(
    api: httpx.Client, twin: str, raw: str, seconds: float
) -> None:
    response = api.put(f"/api/v1/twins/{twin}/desired/b", params={"ttl": raw}, json=1)
    assert response.status_code == 201, response.text
    pending = api.get(f"/api/v1/twins/{twin}/lifecycle/b").json()
    assert pending["state"] == "pending", pending
    expires = datetime.fromisoformat(pending["expires"])
    assert expires - datetime.fromisoformat(pending["since"]) == timedelta(seconds=seconds)


@pytest.mark.parametrize("raw", LOOSE_INTEGERS)
def test_the_event_stream_since_takes_only_ascii_digits(api: httpx.Client, raw: str) -> None:
    """Read by pydantic's int too: these opened a stream."""
    with api.stream("GET", "/api/v1/stream/twins", params={"since": raw}) as response:
        # Before reading: an open stream's body never ends.
        assert response.status_code == 400, raw
        response.read()
    _refused(response, "since", raw)
