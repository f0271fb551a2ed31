"""``index rebuild`` opens the store the service uses, and only that: a mistyped data
directory (or MongoDB database) once created an empty store, and the rebuild then moved the
alias to an empty index and deleted the full one, exit 0. Nor does it rewrite what the
database records about its search (the outbox and the built-in index are the service's)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import cast

import pytest
from pymongo import MongoClient

from tests.index.helpers import es_env, es_settings, index_name
from tests.servers.ferretdb import FerretDB
from tests.servers.process import free_port
from tests.servers.search_engine import SearchEngine
from tests.service_process import ServiceProcess, service_env
from twin_service.index.elasticsearch import ElasticsearchIndex
from twin_service.store.base import TwinStore

TWINS = 12


def rebuild(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "twin_service", "index", "rebuild", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=service_env(env),
    )


def fill(service: ServiceProcess) -> None:
    """``TWINS`` twins written, and in the index when the service uses one."""
    try:
        with service.client() as api:
            for i in range(TWINS):
                response = api.put(f"/api/v1/twins/org.acme:t{i}", json={"attributes": {"i": i}})
                assert response.status_code == 201, response.text
            count = api.get("/api/v1/search/twins/count", params={"waitFor": "latest"})
            assert count.json() == {"count": TWINS}, count.text
    finally:
        service.stop()


async def indexed(engine: SearchEngine, alias: str, tmp_path: Path) -> tuple[set[str], int]:
    """The indices behind ``alias`` and the twins they hold."""
    settings = es_settings(engine, tmp_path, alias)
    index = ElasticsearchIndex(settings, cast(TwinStore, None), run_indexer=False)
    await index.start()
    try:
        names = set(await index.client.indices.get_alias(name=alias))
        await index.client.indices.refresh(index=alias)
        count = (await index.client.count(index=alias))["count"]
        return names, int(count)
    finally:
        await index.stop()


def assert_one_line(run: subprocess.CompletedProcess[str], status: int, text: str) -> None:
    assert run.returncode == status, run.stdout + run.stderr
    assert text in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and "rebuilt the index" not in run.stderr


@pytest.mark.server("elasticsearch")
async def test_a_data_dir_with_no_store_leaves_the_index_alone(
    search_engine: SearchEngine, tmp_path: Path
) -> None:
    alias = index_name("nostore")
    env = es_env(search_engine, alias)
    fill(ServiceProcess(tmp_path / "data", env=env).start())
    before = await indexed(search_engine, alias, tmp_path)
    assert before[1] == TWINS
    typo = tmp_path / "dat"
    run = rebuild(env, "--data-dir", str(typo))
    assert_one_line(run, 1, f"there is no twin store at {typo / 'twins.sqlite3'}")
    assert not typo.exists()
    assert await indexed(search_engine, alias, tmp_path) == before
    # From the wrong directory (the default data dir, ./data, is not there).
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = subprocess.run(
        [sys.executable, "-m", "twin_service", "index", "rebuild"],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=elsewhere,
        env=service_env(env),
    )
    assert_one_line(run, 1, "there is no twin store at ")
    assert "data/twins.sqlite3" in run.stderr
    assert list(elsewhere.iterdir()) == []
    assert await indexed(search_engine, alias, tmp_path) == before


@pytest.mark.server("elasticsearch")
async def test_a_mongodb_database_that_does_not_exist_leaves_the_index_alone(
    search_engine: SearchEngine, ferretdb_server: FerretDB, tmp_path: Path, unique_name: str
) -> None:
    alias = index_name("nodb")
    env = es_env(search_engine, alias) | {
        "TWIN_STORE": "mongodb",
        "TWIN_MONGODB_URL": ferretdb_server.url,
        "TWIN_MONGODB__DATABASE": unique_name,
    }
    fill(ServiceProcess(tmp_path / "data", env=env).start())
    before = await indexed(search_engine, alias, tmp_path)
    assert before[1] == TWINS
    typo = unique_name + "x"
    run = rebuild(env | {"TWIN_MONGODB__DATABASE": typo}, "--data-dir", str(tmp_path / "data"))
    assert_one_line(run, 1, f"there is no twin store in the MongoDB database {typo}")
    assert await indexed(search_engine, alias, tmp_path) == before
    client: MongoClient[dict[str, object]] = MongoClient(ferretdb_server.url)
    try:
        assert typo not in client.list_database_names()
    finally:
        client.close()


@pytest.mark.server("elasticsearch")
async def test_an_empty_store_replaces_a_full_index_only_when_asked(
    search_engine: SearchEngine, tmp_path: Path
) -> None:
    alias = index_name("empty")
    env = es_env(search_engine, alias)
    fill(ServiceProcess(tmp_path / "full", env=env).start())
    before = await indexed(search_engine, alias, tmp_path)
    empty = tmp_path / "empty"
    ServiceProcess(empty).start().stop()  # a store with no twins (built-in search)
    run = rebuild(env, "--data-dir", str(empty))
    assert_one_line(run, 1, "--allow-empty")
    assert await indexed(search_engine, alias, tmp_path) == before
    allowed = rebuild(env, "--data-dir", str(empty), "--allow-empty")
    assert allowed.returncode == 0, allowed.stderr
    names, count = await indexed(search_engine, alias, tmp_path)
    assert count == 0 and names != before[0]


def search_records(database: Path) -> tuple[dict[str, int], int]:
    conn = sqlite3.connect(database)
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        (queued,) = conn.execute("SELECT count(*) FROM index_outbox").fetchone()
    finally:
        conn.close()
    return meta, int(queued)


def test_a_rebuild_leaves_the_search_records_of_the_database_alone(tmp_path: Path) -> None:
    """Run against the data dir of a built-in search service (the index out of reach, so it
    fails as it should): it once recorded the built-in index as off and queued every twin,
    and the service's next start rebuilt its index ("it was off")."""
    data = tmp_path / "data"
    service = ServiceProcess(data).start()
    with service.client() as api:
        for i in range(TWINS):
            assert api.put(f"/api/v1/twins/org.acme:b{i}", json={}).status_code == 201
    service.stop()
    before = search_records(data / "twins.sqlite3")
    assert before[0]["builtin_index"] == 1 and before[1] == 0
    run = rebuild(
        {
            "TWIN_SEARCH": "elasticsearch",
            "TWIN_ELASTICSEARCH_URL": f"http://127.0.0.1:{free_port()}",
        },
        "--data-dir",
        str(data),
    )
    assert_one_line(run, 1, "rebuild failed: The search index")
    assert search_records(data / "twins.sqlite3") == before
    again = ServiceProcess(data).start()
    try:
        with again.client() as api:
            found = api.get("/api/v1/search/twins/count")
            assert found.json() == {"count": TWINS}
    finally:
        again.stop()
    assert "rebuilding the built-in search index" not in again.log_path.read_text()
