"""The built-in index stays exact when two processes write the same twins in turn.

Each SQLite writer process diffs a twin's index rows against the document it indexed last
(twin_service.store.sqlite_writer). When the other process wrote in between, or deleted the
twin and created it again, that document is stale and must not be used: the searches
below would then find values the twin no longer has, or miss the ones it has.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx

from tests.legacy import forget_sqlite_tombstone
from tests.service_process import ServiceProcess

TWIN = "/api/v1/twins/org.turns:pump"
MERGE = {"Content-Type": "application/merge-patch+json"}


def _found(api: httpx.Client, rql: str) -> list[str]:
    response = api.get("/api/v1/search/twins", params={"filter": rql})
    response.raise_for_status()
    return [item["twinId"] for item in response.json()["items"]]


def _patch(api: httpx.Client, body: str) -> None:
    api.patch(TWIN, content=body, headers=MERGE).raise_for_status()


def test_writes_in_turn_from_two_processes_keep_the_index_exact(
    tmp_path: Path, service_factory: Callable[..., ServiceProcess]
) -> None:
    data = tmp_path / "data"
    a, b = service_factory(data), service_factory(data)
    with a.client() as api_a, b.client() as api_b:
        api_a.put(TWIN, json={"desired": {"x": 0, "keep": "k"}}).raise_for_status()
        _patch(api_a, '{"desired": {"x": 1}}')  # a's writer indexed revision 2
        _patch(api_b, '{"desired": {"x": 2, "y": "b"}}')  # revision 3, by b
        # a's remembered revision 2 is stale: it knows no y to take out of the index.
        _patch(api_a, '{"desired": {"y": null, "z": 3}}')
        for api in (api_a, api_b):
            assert _found(api, "eq(desired/x,2)") == ["org.turns:pump"]
            assert _found(api, "eq(desired/x,1)") == []
            assert _found(api, "exists(desired/y)") == []
            assert _found(api, "eq(desired/z,3)") == ["org.turns:pump"]
            assert _found(api, 'eq(desired/keep,"k")') == ["org.turns:pump"]

        # b deletes the twin and creates it again up to the revision a remembers (revisions
        # started again at 1 in a database from before tombstones).
        assert api_b.delete(TWIN).status_code == 204
        forget_sqlite_tombstone(data / "twins.sqlite3", "org.turns:pump")
        api_b.put(TWIN, json={"desired": {"x": 10, "q": "b"}}).raise_for_status()
        for value in range(11, 14):
            _patch(api_b, f'{{"desired": {{"x": {value}}}}}')
        assert api_b.get(TWIN).json()["revision"] == 4  # as a's last write
        _patch(api_a, '{"desired": {"w": 1, "q": null}}')
        for api in (api_a, api_b):
            assert _found(api, "exists(desired/q)") == []
            assert _found(api, "eq(desired/x,13)") == ["org.turns:pump"]
            assert _found(api, "exists(desired/z)") == []
            assert _found(api, "exists(desired/keep)") == []
            assert _found(api, "eq(desired/w,1)") == ["org.turns:pump"]
