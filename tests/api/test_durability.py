"""Concurrency, multi-process and restart guarantees of the SQLite store, end to end."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import websockets

from tests.legacy import forget_sqlite_tombstone
from tests.service_process import ServiceProcess

MERGE = {"Content-Type": "application/merge-patch+json"}


async def _patch_keys(client: httpx.AsyncClient, twin_id: str, keys: list[str]) -> list[int]:
    async def one(key: str) -> int:
        response = await client.patch(
            f"/api/v1/twins/{twin_id}", json={"desired": {key: key}}, headers=MERGE
        )
        return response.status_code

    return list(await asyncio.gather(*(one(k) for k in keys)))


def _writes(proc: ServiceProcess) -> dict[str, int]:
    with proc.client() as api:
        writes: dict[str, int] = api.get("/ready").json()["checks"]["store"]["writes"]
    return writes


def test_fifty_concurrent_patches_all_survive(service: ServiceProcess) -> None:
    twin_id = "org.acme:concurrent-50"
    with service.client() as api:
        assert api.put(f"/api/v1/twins/{twin_id}", json={}).status_code == 201
    before = _writes(service)

    async def run() -> list[int]:
        async with service.async_client(limits=httpx.Limits(max_connections=50)) as client:
            return await _patch_keys(client, twin_id, [f"k{i}" for i in range(50)])

    assert asyncio.run(run()) == [200] * 50
    with service.client() as api:
        doc = api.get(f"/api/v1/twins/{twin_id}").json()
    assert doc["revision"] == 51
    assert doc["desired"] == {f"k{i}": f"k{i}" for i in range(50)}
    # One process: its writers of the twin took turns, so none lost a compare-and-set (side
    # by side, each round of them had one winner and the rest read again and retried).
    after = _writes(service)
    assert after["committed"] - before["committed"] == 50
    assert after["retried"] == before["retried"], (before, after)


def test_two_processes_on_one_database_lose_nothing(
    service_factory: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    first = service_factory(shared)
    second = service_factory(shared)
    twin_id = "org.acme:two-processes"
    with first.client() as api:
        assert api.put(f"/api/v1/twins/{twin_id}", json={}).status_code == 201

    async def run() -> list[int]:
        async with first.async_client() as a, second.async_client() as b:
            results = await asyncio.gather(
                _patch_keys(a, twin_id, [f"a{i}" for i in range(40)]),
                _patch_keys(b, twin_id, [f"b{i}" for i in range(40)]),
            )
            return results[0] + results[1]

    assert asyncio.run(run()) == [200] * 80
    for proc in (first, second):
        with proc.client() as api:
            doc = api.get(f"/api/v1/twins/{twin_id}").json()
        assert doc["revision"] == 81
        assert len(doc["desired"]) == 80


def test_reads_never_serve_a_twin_another_process_replaced(
    service_factory: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    """Each process caches the twins it read; a write by the other one must show at once,
    including a delete and re-create that brings the twin back to the same revision (as in
    a database from before tombstones, where revisions started again at 1)."""
    shared = tmp_path / "shared-reads"
    first = service_factory(shared)
    second = service_factory(shared)
    twin_id = "org.acme:cached"
    url = f"/api/v1/twins/{twin_id}"
    with first.client() as a, second.client() as b:
        assert a.put(url, json={"desired": {"v": 1}}).status_code == 201
        assert a.get(url).json()["desired"] == {"v": 1}  # now cached in the first process
        assert b.patch(url, json={"desired": {"v": 2}}, headers=MERGE).status_code == 200
        doc = a.get(url).json()
        assert (doc["revision"], doc["desired"]) == (2, {"v": 2})
        before = a.get(url).json()
        assert b.delete(url).status_code == 204
        forget_sqlite_tombstone(shared / "twins.sqlite3", twin_id)
        assert b.put(url, json={"desired": {"v": 3}}).status_code == 201
        assert b.patch(url, json={"desired": {"v": 4}}, headers=MERGE).status_code == 200
        doc = a.get(url).json()
        assert doc["revision"] == before["revision"] == 2
        assert doc["desired"] == {"v": 4} and doc["created"] != before["created"]
        assert b.delete(url).status_code == 204
        assert a.get(url).status_code == 404
        assert b.put(url, json={"desired": {"v": 4}}).status_code == 201
        # The other way round: the first process wrote, the second had it cached.
        assert b.get(url).json()["desired"] == {"v": 4}
        assert a.patch(url, json={"desired": {"v": 5}}, headers=MERGE).status_code == 200
        assert b.get(url).json()["desired"] == {"v": 5}


def test_restart_and_sigkill_keep_acknowledged_writes(
    service_factory: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    data = tmp_path / "restart"
    proc = service_factory(data)
    twin_id = "org.acme:durable"
    with proc.client() as api:
        assert api.put(f"/api/v1/twins/{twin_id}", json={}).status_code == 201
        for i in range(100):
            response = api.put(f"/api/v1/twins/{twin_id}/reported/counter", json=i)
            assert response.status_code in (201, 204)
    proc.kill()  # SIGKILL: no shutdown hook runs
    again = service_factory(data)
    with again.client() as api:
        doc = api.get(f"/api/v1/twins/{twin_id}").json()
    assert doc["reported"]["counter"] == 99
    assert doc["revision"] == 101
    again.stop()
    third = service_factory(data)
    with third.client() as api:
        assert api.get(f"/api/v1/twins/{twin_id}").json()["revision"] == 101


def test_a_new_store_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    """Twins are the fleet's data: under the usual umask (022) the database, its -wal and
    -shm were created readable by every local user, beside the 0600 admin token."""
    data = tmp_path / "fresh"
    umask = os.umask(0o022)
    try:
        proc = ServiceProcess(data).start()
    finally:
        os.umask(umask)
    try:
        with proc.client() as api:
            assert api.put("/api/v1/twins/org.acme:x", json={}).status_code == 201
        files = sorted(p.name for p in data.glob("twins.sqlite3*"))
        assert files == ["twins.sqlite3", "twins.sqlite3-shm", "twins.sqlite3-wal"]
        for name in files:
            assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
    finally:
        proc.stop()


def test_first_start_creates_admin_token_file(tmp_path: Path) -> None:
    data = tmp_path / "fresh"
    proc = ServiceProcess(data, env={"TWIN_AUTH__TOKENS": "[]"})
    proc.start()
    try:
        token_file = data / "admin-token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert token in proc.log_path.read_text()
        with proc.client(token=token) as api:
            assert api.put("/api/v1/twins/org.acme:x", json={}).status_code == 201
        with proc.client(token="") as api:
            assert api.get("/api/v1/twins/org.acme:x").status_code == 401
    finally:
        proc.stop()
    # The second start reuses the token and does not print it again.
    proc2 = ServiceProcess(data, env={"TWIN_AUTH__TOKENS": "[]"})
    proc2.log_path = data / "second.log"
    proc2.start()
    try:
        assert token not in proc2.log_path.read_text()
        with proc2.client(token=token) as api:
            assert api.get("/api/v1/twins/org.acme:x").status_code == 200
    finally:
        proc2.stop()


def test_auth_disabled_is_refused_off_loopback(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWIN_")}
    env["TWIN_AUTH__DISABLED"] = "true"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "twin_service",
            "serve",
            "--host",
            "0.0.0.0",
            "--data-dir",
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "loopback" in result.stderr


def test_auth_disabled_on_loopback_serves_without_token(tmp_path: Path) -> None:
    proc = ServiceProcess(tmp_path / "dev", env={"TWIN_AUTH__DISABLED": "true"}).start()
    try:
        with proc.client(token="") as api:
            assert api.put("/api/v1/twins/org.acme:dev", json={}).status_code == 201
        asyncio.run(_websocket_without_token(proc))
    finally:
        proc.stop()


async def _websocket_without_token(proc: ServiceProcess) -> None:
    url = proc.url.replace("http://", "ws://") + "/api/v1/ws"
    async with websockets.connect(url) as ws:
        welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert welcome["type"] == "welcome", welcome
        # What a client written for tokens sends first: answered, and the socket stays.
        await ws.send(json.dumps({"type": "auth", "token": "any"}))
        reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert reply["type"] == "error" and reply["error"]["error"] == "auth.done", reply
        get = {"type": "command", "correlationId": "g", "command": "get", "twinId": "org.acme:dev"}
        await ws.send(json.dumps(get))
        reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert reply["type"] == "response" and reply["status"] == 200, reply
