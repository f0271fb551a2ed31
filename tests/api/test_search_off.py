"""``search = "off"``: the service keeps no index and every search says so, while twins,
conditional writes and change streams work as before; turning the built-in index on again
rebuilds it from the stored twins."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path

import websockets

from tests.service_process import ADMIN_TOKEN, READER_TOKEN, ServiceProcess

MERGE = {"Content-Type": "application/merge-patch+json"}
SEARCH = "/api/v1/search/twins"
COUNT = "/api/v1/search/twins/count"
OFF = {"TWIN_SEARCH": "off"}


def _index_rows(data_dir: Path) -> int:
    with sqlite3.connect(data_dir / "twins.sqlite3") as conn:
        return int(conn.execute("SELECT count(*) FROM search_leaf").fetchone()[0])


def _assert_disabled(body: dict[str, object]) -> None:
    assert body["status"] == 404
    assert body["error"] == "search.disabled"
    assert "turned off" in str(body["message"])
    assert "TWIN_SEARCH" in str(body["description"])


def test_every_search_is_refused_with_search_disabled(
    tmp_path: Path, service_factory: Callable[..., ServiceProcess]
) -> None:
    service = service_factory(tmp_path / "data", env=OFF)
    with service.client() as api, service.client(READER_TOKEN) as reader:
        assert api.put("/api/v1/twins/org.off:a", json={"attributes": {"x": 1}}).status_code == 201
        answers = [
            api.get(SEARCH, params={"filter": "eq(attributes/x,1)"}),
            api.get(SEARCH),
            api.post(SEARCH, data={"filter": "eq(attributes/x,1)"}),
            api.get(COUNT, params={"filter": "eq(attributes/x,1)"}),
            # The same answer whatever the query: not a syntax error, not an empty page.
            api.get(SEARCH, params={"filter": "eq("}),
            reader.get(SEARCH, params={"namespaces": "org.off"}),
        ]
        for response in answers:
            assert response.status_code == 404, response.text
            _assert_disabled(response.json())
        ready = api.get("/ready")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"]["index"] == {"status": "up", "kind": "off"}


def test_search_command_over_websocket_is_refused(
    tmp_path: Path, service_factory: Callable[..., ServiceProcess]
) -> None:
    service = service_factory(tmp_path / "data", env=OFF)
    url = service.url.replace("http://", "ws://") + "/api/v1/ws"

    async def run() -> dict[str, object]:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with websockets.connect(url, additional_headers=headers) as ws:
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "welcome"
            command = {"type": "command", "correlationId": "s1", "command": "search"}
            await ws.send(json.dumps(command))
            while True:
                message: dict[str, object] = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if message.get("correlationId") == "s1":
                    return message

    answer = asyncio.run(run())
    assert answer["type"] == "error" and answer["status"] == 404, answer
    body = answer["error"]
    assert isinstance(body, dict)
    _assert_disabled(body)


def test_twins_and_conditional_writes_work_without_an_index(
    tmp_path: Path, service_factory: Callable[..., ServiceProcess]
) -> None:
    data = tmp_path / "data"
    service = service_factory(data, env=OFF)
    with service.client() as api:
        twin = "org.off:pump"
        assert api.put(f"/api/v1/twins/{twin}", json={"desired": {"speed": 1}}).status_code == 201
        # condition= is evaluated against the twin itself, not through the index.
        refused, accepted = (
            api.patch(
                f"/api/v1/twins/{twin}",
                params={"condition": f"eq(desired/speed,{expected})"},
                content=json.dumps({"desired": {"speed": 3}}),
                headers=MERGE,
            )
            for expected in (2, 1)
        )
        assert refused.status_code == 412, refused.text
        assert refused.json()["error"] == "twin.condition.failed"
        assert accepted.status_code == 200, accepted.text
        assert accepted.json()["desired"] == {"speed": 3}
        assert accepted.json()["revision"] == 2
    # Nothing was indexed: that is the write cost saved.
    assert _index_rows(data) == 0


def test_turning_the_builtin_index_on_again_rebuilds_it(
    tmp_path: Path, service_factory: Callable[..., ServiceProcess]
) -> None:
    data = tmp_path / "data"
    ns = f"org.r{uuid.uuid4().hex[:8]}"
    indexed = service_factory(data)
    with indexed.client() as api:
        for name, site in (("a", "north"), ("b", "south")):
            put = api.put(f"/api/v1/twins/{ns}:{name}", json={"attributes": {"site": site}})
            assert put.status_code == 201, put.text
    indexed.stop()

    off = service_factory(data, env=OFF)
    with off.client() as api:
        # Written while the index is off: a changed value, a new twin and a deleted one.
        moved = api.patch(
            f"/api/v1/twins/{ns}:a",
            content=json.dumps({"attributes": {"site": "south"}}),
            headers=MERGE,
        )
        assert moved.status_code == 200, moved.text
        created = api.put(f"/api/v1/twins/{ns}:c", json={"attributes": {"site": "south"}})
        assert created.status_code == 201, created.text
        assert api.delete(f"/api/v1/twins/{ns}:b").status_code == 204
    off.stop()

    on_again = service_factory(data)
    with on_again.client() as api:
        found = api.get(SEARCH, params={"filter": 'eq(attributes/site,"south")', "namespaces": ns})
        assert found.status_code == 200, found.text
        assert [item["twinId"] for item in found.json()["items"]] == [f"{ns}:a", f"{ns}:c"]
        north = api.get(COUNT, params={"filter": 'eq(attributes/site,"north")', "namespaces": ns})
        assert north.json() == {"count": 0}


def test_the_rebuild_reads_the_twins_page_by_page(
    tmp_path: Path, service_factory: Callable[..., ServiceProcess]
) -> None:
    """More twins than one page of the rebuild, so every page boundary is crossed."""
    from twin_service.store.sqlite_writer import REBUILD_PAGE

    data = tmp_path / "data"
    ns = f"org.p{uuid.uuid4().hex[:8]}"
    total = 2 * REBUILD_PAGE + 1
    off = service_factory(data, env=OFF)

    async def create_all() -> None:
        async with off.async_client() as api:
            sem = asyncio.Semaphore(16)

            async def put(index: int) -> None:
                async with sem:
                    body = {"attributes": {"n": index, "site": "x"}}
                    response = await api.put(f"/api/v1/twins/{ns}:t{index:05d}", json=body)
                    assert response.status_code == 201, response.text

            await asyncio.gather(*(put(i) for i in range(total)))

    asyncio.run(create_all())
    off.stop()

    on_again = service_factory(data)
    with on_again.client() as api:
        count = api.get(COUNT, params={"filter": 'eq(attributes/site,"x")', "namespaces": ns})
        assert count.json() == {"count": total}
        for index in (0, REBUILD_PAGE - 1, REBUILD_PAGE, 2 * REBUILD_PAGE):
            found = api.get(COUNT, params={"filter": f"eq(attributes/n,{index})", "namespaces": ns})
            assert found.json() == {"count": 1}, index
