"""/ready and /metrics while a dependency hangs (accepts connections, never answers)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service_process import ServiceProcess


@pytest.fixture
def hung_server() -> Iterator[int]:
    """A port whose server takes connections into its backlog and never answers them, as a
    search engine stopped with SIGSTOP or stuck in a long GC pause does."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        yield sock.getsockname()[1]


def test_a_hung_search_engine_does_not_hold_a_store_readiness_probe(
    tmp_path: Path, hung_server: int
) -> None:
    """Every check ran one after the other and without a bound: with the engine hung,
    ``/ready?require=store`` answered only after the client's request timeout (30 s), so a
    Kubernetes probe (1 s) took every replica out of the Service while twins were served."""
    service = ServiceProcess(
        tmp_path,
        {
            "TWIN_SEARCH": "elasticsearch",
            "TWIN_ELASTICSEARCH_URL": f"http://127.0.0.1:{hung_server}",
            # Start-up waits this long for the engine once; the checks must not.
            "TWIN_ELASTICSEARCH__REQUEST_TIMEOUT_SECONDS": "8",
            "TWIN_READY_CHECK_TIMEOUT_SECONDS": "0.5",
        },
    ).start(timeout=60)
    try:
        with service.client(token="") as client:
            assert client.put("/api/v1/twins/org.ready:a", json={}).status_code == 401
        with service.client() as api:
            assert api.put("/api/v1/twins/org.ready:a", json={}).status_code == 201
            ready = api.get("/ready", params={"require": "store"})
            assert ready.status_code == 200, ready.text
            checks = ready.json()["checks"]
            assert checks["store"]["status"] == "up"
            # The index answers within the bound itself, with what it knows without the
            # engine (the backlog of writes to index).
            index = checks["index"]
            assert index["status"] == "down" and index["backlog"] == 1, index  # the PUT
            assert index["error"] == "The search index did not answer within 0.375 s.", index
            everything = api.get("/ready")
            assert everything.status_code == 503
            assert everything.json()["checks"]["index"]["status"] == "down"
            metrics = api.get("/metrics")
            assert metrics.status_code == 200
            assert 'twin_service_check_up{check="index"} 0' in metrics.text, metrics.text
            assert 'twin_service_check_up{check="store"} 1' in metrics.text
    finally:
        service.stop()
