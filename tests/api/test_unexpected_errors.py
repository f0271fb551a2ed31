"""A request that fails unexpectedly (500 ``service.internal``) does not cost the client its
next request: the server closes the connection after such an answer, so the answer says
``Connection: close`` and the client opens a new one (without it, the next request on the
kept-alive connection failed with a reset)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tests.service_process import ServiceProcess


def test_a_500_closes_the_connection_and_says_so(tmp_path: Path) -> None:
    data = tmp_path / "data"
    service = ServiceProcess(data).start()
    try:
        with service.client() as api:
            assert api.put("/api/v1/twins/org.acme:ok", json={}).status_code == 201
            assert api.put("/api/v1/twins/org.acme:bad", json={}).status_code == 201
    finally:
        service.stop()
    # A row no version of the service writes: what a hand edit or a damaged restore leaves.
    conn = sqlite3.connect(data / "twins.sqlite3")
    conn.execute("UPDATE twins SET doc = '{not json' WHERE twin_id = 'org.acme:bad'")
    conn.commit()
    conn.close()
    service.start()
    try:
        with service.client() as api:
            for path in ("/api/v1/twins/org.acme:bad", "/api/v1/search/twins"):
                failed = api.get(path)
                assert failed.status_code == 500, failed.text
                assert failed.json()["error"] == "service.internal"
                assert failed.headers["connection"] == "close"
                # The same client: a new connection, not the one the server closed.
                after = api.get("/api/v1/twins/org.acme:ok")
                assert after.status_code == 200, after.text
    finally:
        service.stop()
    assert "unexpected error" in service.log_path.read_text()
