"""MongoDB stops answering after the store opened: the store says it is unreachable (the
error a starting service waits out), not that it failed, at every step of a start."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tests.servers.ferretdb import FerretDB
from tests.service_fixtures import mongodb_env
from tests.service_process import ServiceProcess
from tests.store_fixtures import mongodb_settings
from twin_service.errors import StoreUnreachable
from twin_service.store.mongodb import MongoStore
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
