"""MongoDB stops answering after the store opened: the store says it is unreachable (the
error a starting service waits out), not that it failed, at every step of a start."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pymongo
import pytest
import websockets
from pymongo import AsyncMongoClient

from tests.servers.ferretdb import FerretDB
from tests.service_fixtures import mongodb_env
from tests.service_process import ADMIN_TOKEN, ServiceProcess
from tests.store_fixtures import mongodb_settings
from twin_service.errors import StoreUnreachable
from twin_service.store.mongodb import MongoStore
from twin_service.store.mongodb_journal import SeqAllocator
from twin_service.streams.hub import EventHub


async def test_a_server_gone_after_the_open_is_unreachable_not_failed(
    fresh_ferretdb: FerretDB, tmp_path: Path, unique_name: str
) -> None:
    """A replica whose MongoDB went away between the store's open and the event hub's first
    read used to exit (status 3) instead of waiting for it: the read failed with a plain
    ``Unavailable``, which the start does not wait for."""
    settings = mongodb_settings(
        tmp_path, fresh_ferretdb.url, unique_name, server_selection_timeout_ms=300
    )
    store = MongoStore(settings)
    await store.open()
    try:
        fresh_ferretdb.stop()
        steps: list[Callable[[], Awaitable[object]]] = [
            EventHub(store).start,
            store.last_seq,
            functools.partial(store.get, "org.acme:gone"),
            store.ping,
        ]
        for step in steps:
            with pytest.raises(StoreUnreachable, match=r"failed to read|does not answer"):
                await step()
        await fresh_ferretdb.astart()
        assert await store.get("org.acme:gone") is None
    finally:
        await store.close()


def test_ready_names_why_a_stopped_server_does_not_answer(
    fresh_ferretdb: FerretDB, tmp_path: Path, unique_name: str
) -> None:
    """The store's check waited for server selection (5 s by default) and /ready gave up on
    it first (2 s): a stopped MongoDB showed as "no answer within 2 s", not as the refused
    connection the driver knew of. The check now bounds its ping within /ready's own bound,
    so the driver's reason is the answer."""
    service = ServiceProcess(tmp_path / "svc", env=mongodb_env(fresh_ferretdb.url, unique_name))
    service.start()
    try:
        with service.client() as api:
            assert api.get("/ready").status_code == 200
            fresh_ferretdb.stop()
            # The first ping may meet its pooled connection closed; the next ones wait for
            # a server to select, as every later one does.
            for _ in range(3):
                ready = api.get("/ready")
                assert ready.status_code == 503, ready.text
                store = ready.json()["checks"]["store"]
                assert store["status"] == "down", store
                assert store["error"].startswith("MongoDB does not answer: "), store
            assert "[Errno 111]" in store["error"], store  # ECONNREFUSED
            assert "Topology Description" not in store["error"], store
            assert "configured timeouts" not in store["error"], store
    finally:
        service.stop()


async def test_closing_does_not_wait_on_a_server_that_stopped_answering(
    fresh_ferretdb: FerretDB, tmp_path: Path, unique_name: str
) -> None:
    """The driver's close ends the server sessions with a command, which waited the whole
    socket timeout (20 s) on a frozen server: SIGTERM of a replica took 20 s more than its
    requests did (past the pod's grace period after a full shutdown timeout). The bound
    here only tells a hang from the close's own (2 s)."""
    store = MongoStore(mongodb_settings(tmp_path, fresh_ferretdb.url, unique_name))
    await store.open()
    assert await store.get("org.acme:x") is None  # a session to end
    assert fresh_ferretdb.pid is not None
    os.kill(fresh_ferretdb.pid, signal.SIGSTOP)  # takes connections, answers nothing
    try:
        async with asyncio.timeout(10):
            await store.close()
    finally:
        os.kill(fresh_ferretdb.pid, signal.SIGCONT)


async def test_a_request_on_a_frozen_server_is_answered_503_within_the_operation_timeout(
    fresh_ferretdb: FerretDB, tmp_path: Path, unique_name: str
) -> None:
    """A request on a MongoDB that takes connections and answers nothing waited 25.8 s
    (measured; the driver's socket timeouts and a retry) before its 503: clients, load
    balancers and probes hung with it. Each store operation is now bounded by
    ``mongodb.operation_timeout_ms``; the event hub, the expiry sweeper and the maintenance
    loop outlive the freeze and go on once the server answers again."""
    env = mongodb_env(fresh_ferretdb.url, unique_name)
    env["TWIN_MONGODB__OPERATION_TIMEOUT_MS"] = "1500"
    env["TWIN_LOG_LEVEL"] = "info"
    service = ServiceProcess(tmp_path / "svc", env=env).start()
    twin = "org.acme:frozen"
    try:
        async with (
            service.async_client() as api,
            websockets.connect(
                service.url.replace("http://", "ws://") + "/api/v1/ws",
                additional_headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            ) as ws,
        ):
            assert (await api.put(f"/api/v1/twins/{twin}", json={"desired": {"n": 1}})).is_success
            await ws.send(json.dumps({"type": "subscribe", "id": "s", "twins": [twin]}))
            while json.loads(await asyncio.wait_for(ws.recv(), 15))["type"] != "subscribed":
                pass
            assert fresh_ferretdb.pid is not None
            os.kill(fresh_ferretdb.pid, signal.SIGSTOP)  # takes connections, answers nothing
            try:
                for request in (
                    api.get(f"/api/v1/twins/{twin}"),
                    api.put(f"/api/v1/twins/{twin}", json={"desired": {"n": 2}}),
                    api.get("/api/v1/search/twins"),
                ):
                    started = time.monotonic()
                    response = await request
                    took = time.monotonic() - started
                    assert response.status_code == 503, response.text
                    assert response.json()["error"] == "service.unavailable", response.text
                    assert took < 1.5 + 1.5, f"answered after {took:.1f} s"
                # The background loops meet the timeout too, a few times over.
                await asyncio.sleep(5)
            finally:
                os.kill(fresh_ferretdb.pid, signal.SIGCONT)
            assert service.proc is not None and service.proc.poll() is None
            deadline = time.monotonic() + 30
            while (
                await api.put(f"/api/v1/twins/{twin}", json={"desired": {"n": 3}})
            ).status_code == 503:
                assert time.monotonic() < deadline, "the store did not come back"
                await asyncio.sleep(0.2)
            # The event hub follows the journal again: the subscriber gets the write.
            while json.loads(await asyncio.wait_for(ws.recv(), 30))["type"] != "event":
                pass
        # Timeouts are failures the loops expect (logged in a line), not a crash of theirs.
        assert "Traceback" not in service.log_tail(1000), service.log_tail(1000)
    finally:
        service.stop()


async def test_allocations_are_not_bound_by_the_deadline_of_the_caller_that_started_them(
    fresh_ferretdb: FerretDB, unique_name: str
) -> None:
    """Concurrent allocations share one task, started by the first caller. It ran under
    that caller's pymongo.timeout deadline (a maintenance round's, the setup's), and failed
    the allocations of everyone after it once that deadline had passed."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        fresh_ferretdb.url, timeoutMS=10_000
    )
    allocator = SeqAllocator(client.get_database(unique_name).get_collection("meta"))
    try:
        assert await allocator.next() == 1  # connected
        assert fresh_ferretdb.pid is not None
        os.kill(fresh_ferretdb.pid, signal.SIGSTOP)
        try:
            with pymongo.timeout(0.5):
                first = asyncio.ensure_future(allocator.next())
            await asyncio.sleep(0.1)
            second = asyncio.ensure_future(allocator.next())  # waits for the first's batch
            await asyncio.sleep(1.0)  # past the first caller's deadline
        finally:
            os.kill(fresh_ferretdb.pid, signal.SIGCONT)
        assert sorted(await asyncio.gather(first, second)) == [2, 3]
    finally:
        await client.close()
