"""``index rebuild`` refuses a page size below 1 before it touches any index: pages of no
twins read nothing, and the rebuild then moved the alias to an empty index and deleted the
full one. No Elasticsearch is needed: the refusal comes first."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers.process import free_port
from tests.service_process import service_env
from twin_service.index.elasticsearch import ElasticsearchIndex, _rebuild, rebuild
from twin_service.settings import Settings
from twin_service.store.sqlite import SqliteStore


@pytest.mark.parametrize("page_size", ["0", "-5", "many"])
def test_the_command_refuses_a_page_size_below_one(tmp_path: Path, page_size: str) -> None:
    rebuild_command = ["index", "rebuild", "--page-size", page_size]
    run = subprocess.run(
        [sys.executable, "-m", "twin_service", "--data-dir", str(tmp_path), *rebuild_command],
        capture_output=True,
        text=True,
        timeout=60,
        env=service_env(
            {
                "TWIN_SEARCH": "elasticsearch",
                "TWIN_ELASTICSEARCH_URL": f"http://127.0.0.1:{free_port()}",
            }
        ),
    )
    assert run.returncode == 2, run.stderr
    assert "error: argument --page-size: must be" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("page_size", [0, -1])
def test_rebuild_refuses_a_page_size_below_one(tmp_path: Path, page_size: int) -> None:
    settings = Settings(
        data_dir=tmp_path,
        search="elasticsearch",
        elasticsearch_url=f"http://127.0.0.1:{free_port()}",
        elasticsearch={"wait_timeout_seconds": 1},
    )

    async def run() -> None:
        store = SqliteStore(tmp_path / "twins.sqlite3", settings.sqlite, settings.stream)
        await store.open()
        try:
            with pytest.raises(ValueError, match="page size must be at least 1"):
                await rebuild(settings, store, page_size=page_size)
            index = ElasticsearchIndex(settings, store, run_indexer=False)
            with pytest.raises(ValueError, match="page size must be at least 1"):
                await _rebuild(index, store, None, page_size)
        finally:
            await store.close()

    asyncio.run(run())
