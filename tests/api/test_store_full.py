"""A store with no room left (SQLite at ``sqlite.max_database_mib``, which SQLite answers as it
answers a full disk): writes get 507 store.full and change nothing; every write acknowledged
before is kept; writes go on once there is room."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx

from tests.service_process import ServiceProcess

BLOB = "x" * 8000  # a few pages per twin: a 1 MiB database fills within about a hundred


def _fill(api: httpx.Client) -> tuple[dict[str, int], httpx.Response]:
    """Create twins until the store refuses one; the twins created and the refusal."""
    created: dict[str, int] = {}
    for i in range(1000):
        response = api.put(
            f"/api/v1/twins/org.full:t{i}", json={"attributes": {"blob": BLOB, "i": i}}
        )
        if response.status_code != 201:
            return created, response
        created[f"org.full:t{i}"] = i
    raise AssertionError("the store never filled up")


def test_a_full_store_refuses_writes_with_507_and_keeps_what_it_acknowledged(
    service_factory: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    proc = service_factory(data, env={"TWIN_SQLITE__MAX_DATABASE_MIB": "1"})
    with proc.client() as api:
        created, refused = _fill(api)
        assert created, "not even one twin fitted"
        assert refused.status_code == 507, refused.text
        body = refused.json()
        assert body["error"] == "store.full"
        assert "max_database_mib" in body["description"]
        assert "Retry-After" not in refused.headers  # it takes an operator, not time
        refused_id = refused.request.url.path.rsplit("/", 1)[1]
        assert api.get(f"/api/v1/twins/{refused_id}").status_code == 404

        # A write that grows an existing twin is refused too, and leaves it as it was.
        first = next(iter(created))
        before = api.get(f"/api/v1/twins/{first}").json()
        grown = api.patch(
            f"/api/v1/twins/{first}",
            json={"desired": {f"k{n}": BLOB for n in range(6)}},
            headers={"Content-Type": "application/merge-patch+json"},
        )
        assert grown.status_code == 507, grown.text
        assert api.get(f"/api/v1/twins/{first}").json() == before

        # /ready: the store answers (reads work), and its writes show the refusals.
        store = httpx.get(f"{proc.url}/ready", timeout=10).json()["checks"]["store"]
        assert store["status"] == "up"
        assert store["writes"]["failed"] == 2
        assert store["writes"]["committed"] == len(created)
        assert store["writes"]["lastError"].startswith("store.full: ")
        assert store["writes"]["lastErrorAt"].endswith("Z")
    proc.stop()

    # Room again (a larger limit): every acknowledged write is there, nothing refused is,
    # and the store takes writes again.
    proc = service_factory(data, env={"TWIN_SQLITE__MAX_DATABASE_MIB": "8"})
    with proc.client() as api:
        for twin_id, i in created.items():
            assert api.get(f"/api/v1/twins/{twin_id}").json()["attributes"]["i"] == i
        count = api.get("/api/v1/search/twins/count", params={"filter": "exists(attributes/i)"})
        assert count.json() == {"count": len(created)}  # the index kept no refused write
        after = api.put(f"/api/v1/twins/{refused_id}", json={"attributes": {"i": -1}})
        assert after.status_code == 201, after.text
