"""A process serves at most ``stream.max_connections`` change-stream readers, WebSocket and
server-sent events together; it raises its open files limit for them at start."""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from tests.service_process import ADMIN_TOKEN, ServiceProcess
from tests.streams.test_websocket import connect
from twin_service.open_files import readers_bound

Factory = Callable[..., ServiceProcess]


async def _readers(api: httpx.AsyncClient, expected: int) -> None:
    """Wait until the process counts ``expected`` readers (a close is seen a moment later)."""
    deadline = time.monotonic() + 15
    while (readers := (await api.get("/ready")).json()["checks"]["streams"]["readers"]) != (
        expected
    ):
        assert time.monotonic() < deadline, f"{readers} readers, not {expected}"
        await asyncio.sleep(0.05)


async def _refused(proc: ServiceProcess, token: str = ADMIN_TOKEN) -> ConnectionClosed:
    """How the service closed a WebSocket it refused instead of welcoming it."""
    with pytest.raises(ConnectionClosed) as closed:
        async with connect(proc, token):
            pass
    return closed.value


async def test_readers_past_the_bound_are_refused_until_one_leaves(
    service_factory: Factory,
) -> None:
    proc = service_factory(env={"TWIN_STREAM__MAX_CONNECTIONS": "3"})
    async with AsyncExitStack() as stack, proc.async_client() as api:
        first = await stack.enter_async_context(connect(proc))  # welcomed
        await stack.enter_async_context(connect(proc))
        # A connection that has not authenticated holds no reader's place.
        unauthenticated = await _refused(proc, "wrong-token")
        assert unauthenticated.rcvd is not None
        assert unauthenticated.rcvd.code == 4401
        sse = await stack.enter_async_context(api.stream("GET", "/api/v1/stream/twins"))
        assert sse.status_code == 200
        await _readers(api, 3)

        closed = await _refused(proc)
        assert closed.rcvd is not None and closed.rcvd.code == 1013, closed
        assert "stream.max_connections" in closed.rcvd.reason
        refused = await api.get("/api/v1/stream/twins")
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"] == "stream.toomany"
        assert refused.headers["retry-after"] == "5"
        metrics = (await api.get("/metrics")).text.splitlines()
        assert "twin_service_stream_readers 3" in metrics
        await _readers(api, 3)  # the refused ones hold nothing

        await first.close()  # a WebSocket that leaves frees its place
        await _readers(api, 2)
        await stack.enter_async_context(connect(proc))
        await _readers(api, 3)
        await sse.aclose()  # and so does a server-sent-event stream
        await _readers(api, 2)
        again = await stack.enter_async_context(api.stream("GET", "/api/v1/stream/twins"))
        assert again.status_code == 200
        await _readers(api, 3)
    async with proc.async_client() as api:
        await _readers(api, 0)


def _limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open files limit")


def test_the_open_files_limit_is_raised_to_the_hard_one(service_factory: Factory) -> None:
    """A shell's soft limit is often 1,024: past it the server accepted nobody, REST included."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard != resource.RLIM_INFINITY and hard > 1000, (soft, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1000, hard))
    try:
        proc = service_factory()  # inherits the lowered soft limit
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert proc.proc is not None
    assert _limits(proc.proc.pid) == (hard, hard)
    if hard >= 2000 + 1024:  # room for the default bound
        assert "open files limit" not in proc.log_tail()
        with proc.client() as api:
            assert api.get("/ready").json()["checks"]["streams"]["maxReaders"] == 2000


def test_a_limit_with_no_room_for_the_bound_lowers_it(tmp_path: Path) -> None:
    proc = ServiceProcess(tmp_path, open_files=1100).start()
    try:
        assert proc.proc is not None and _limits(proc.proc.pid) == (1100, 1100)
        with proc.client() as api:
            assert api.get("/ready").json()["checks"]["streams"]["maxReaders"] == 550
        assert (
            "the open files limit is 1100: change-stream readers are bounded at 550, not "
            "stream.max_connections (2000)"
        ) in proc.log_tail()
    finally:
        proc.stop()


def test_the_bound_keeps_room_for_the_embedded_brokers_devices() -> None:
    """In this process, under a soft limit of 3,000: 1,024 descriptors are kept for the
    rest, and the embedded broker's connections besides (mqtt.embedded_max_devices and
    mqtt.embedded_max_connecting)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard == resource.RLIM_INFINITY or hard >= 3000, (soft, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (3000, hard))
    try:
        assert readers_bound(2000) == 3000 - 1024
        assert readers_bound(2000, broker_connections=200) == 3000 - 1024 - 200
        assert readers_bound(2000, broker_connections=1000) == 1500  # half the limit
        # Never more than asked for: half the limit was, with a smaller bound.
        assert readers_bound(100, broker_connections=2000) == 100
        assert readers_bound(1976) == 1976
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
