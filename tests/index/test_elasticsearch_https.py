"""The service's search engine over HTTPS with a CA of its own and an API key
(``elasticsearch.ca_file``, ``elasticsearch.api_key``): how ECK and Elastic Cloud serve it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.certificates import self_signed
from tests.index.helpers import es_env, index_name
from tests.index.https_gateway import HttpsGateway
from tests.servers.search_engine import SearchEngine
from tests.service_process import ServiceProcess

pytestmark = pytest.mark.server("elasticsearch")

API_KEY = "a2V5LWlkOmtleS1zZWNyZXQtMDEyMzQ1Njc4OQ=="


@pytest.fixture
async def gateway(search_engine: SearchEngine, tmp_path: Path) -> AsyncIterator[HttpsGateway]:
    cert, key = self_signed(tmp_path, "gateway")
    gateway = await HttpsGateway(search_engine.url, cert, key, API_KEY).start()
    try:
        yield gateway
    finally:
        await gateway.stop()


def _env(search_engine: SearchEngine, gateway: HttpsGateway, **es: str) -> dict[str, str]:
    settings = {f"TWIN_ELASTICSEARCH__{name.upper()}": value for name, value in es.items()}
    return es_env(
        search_engine, index_name("https"), TWIN_ELASTICSEARCH_URL=gateway.url, **settings
    )


async def _index_check(proc: ServiceProcess) -> dict[str, Any]:
    async with proc.async_client() as api:
        check: dict[str, Any] = (await api.get("/ready")).json()["checks"]["index"]
        return check


async def test_searches_through_https_with_the_ca_and_the_api_key(
    search_engine: SearchEngine, gateway: HttpsGateway, tmp_path: Path
) -> None:
    cert = tmp_path / "gateway.crt"
    env = _env(search_engine, gateway, ca_file=str(cert), api_key=API_KEY)
    # Started off the loop: the gateway serves on it.
    proc = await asyncio.to_thread(ServiceProcess(tmp_path / "svc", env=env).start)
    try:
        async with proc.async_client() as api:
            put = await api.put("/api/v1/twins/org.acme:tls", json={"attributes": {"k": "tls"}})
            assert put.status_code == 201, put.text
            found = await api.get(
                "/api/v1/search/twins",
                params={"filter": 'eq(attributes/k,"tls")', "waitFor": put.headers["X-Twin-Seq"]},
            )
            assert found.status_code == 200, found.text
            assert [t["twinId"] for t in found.json()["items"]] == ["org.acme:tls"]
        assert (await _index_check(proc))["status"] == "up"
        assert gateway.forwarded > 0
        assert gateway.refused == 0  # every request carried the key
        assert API_KEY not in proc.log_tail(400)
    finally:
        await asyncio.to_thread(proc.stop)


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        ({"api_key": API_KEY}, "CERTIFICATE_VERIFY_FAILED"),  # no CA: the certificate is unknown
        ({"ca_file": "gateway.crt", "api_key": "d3Jvbmc="}, "401"),  # a wrong key
    ],
)
async def test_an_engine_it_cannot_trust_or_that_refuses_it_is_down_with_the_reason(
    search_engine: SearchEngine,
    gateway: HttpsGateway,
    tmp_path: Path,
    settings: dict[str, str],
    error: str,
) -> None:
    """The service starts (twins are served without the engine), and /ready says why the
    index is down."""
    if "ca_file" in settings:
        settings = {**settings, "ca_file": str(tmp_path / settings["ca_file"])}
    proc = await asyncio.to_thread(
        ServiceProcess(tmp_path / "svc", env=_env(search_engine, gateway, **settings)).start
    )
    try:
        check = await _index_check(proc)
        assert check["status"] != "up", check
        assert error in str(check), check
        assert API_KEY not in str(check)
        async with proc.async_client() as api:
            search = await api.get("/api/v1/search/twins")
            assert search.status_code == 503, search.text
            assert search.json()["error"] == "index.unavailable"
    finally:
        await asyncio.to_thread(proc.stop)
