"""Shared helpers of the index tests: settings and an index on the test node."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from tests.servers.search_engine import SearchEngine
from twin_service.settings import Settings


def index_name(stem: str) -> str:
    """A fresh alias name on the shared node."""
    return f"twins-{stem}-{uuid.uuid4().hex[:8]}"


def es_settings(engine: SearchEngine, data_dir: Path, index: str, **es: Any) -> Settings:
    """Settings for an Elasticsearch-backed service on the test node (no replicas: one node)."""
    return Settings(
        data_dir=data_dir,
        search="elasticsearch",
        elasticsearch_url=engine.url,
        elasticsearch={"index_name": index, "replicas": 0, **es},
    )


def es_env(engine: SearchEngine, index: str, **extra: str) -> dict[str, str]:
    """The same as ``TWIN_*`` variables for :class:`tests.service_process.ServiceProcess`."""
    return {
        "TWIN_SEARCH": "elasticsearch",
        "TWIN_ELASTICSEARCH_URL": engine.url,
        "TWIN_ELASTICSEARCH__INDEX_NAME": index,
        "TWIN_ELASTICSEARCH__REPLICAS": "0",
        **extra,
    }
