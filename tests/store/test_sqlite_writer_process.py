"""The SQLite store's writer process: it starts and stops with the store, a crash of it
costs at most the writes in flight (answered 503, never left hanging), and it never
outlives the service."""

from __future__ import annotations

import asyncio
import gc
import os
import pickle
import signal
import threading
import time
from multiprocessing import Pipe
from pathlib import Path

import pytest
import uvloop

from tests.service_process import ServiceProcess
from tests.store.contract import change
from twin_service.errors import Unavailable
from twin_service.settings import SqliteSettings, StreamSettings
from twin_service.store.sqlite import SqliteStore
from twin_service.store.sqlite_writer import WriterConfig, serve


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers signal 0; its state says it is gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def writer_pid(store: SqliteStore) -> int:
    writer = store.describe()["writer"]
    assert writer["running"], writer
    return int(writer["pid"])


def test_the_writer_runs_beside_the_store_and_stops_with_it(tmp_path: Path) -> None:
    async def run() -> int:
        store = SqliteStore(tmp_path / "twins.sqlite3", SqliteSettings(), StreamSettings())
        await store.open()
        pid = writer_pid(store)
        assert pid != os.getpid() and alive(pid)
        await store.write(change(None, "org.acme:a", {"desired": {"n": 1}}))
        await store.close()
        return pid

    pid = asyncio.run(run())
    assert wait_gone(pid, 1.0)


def test_a_killed_writer_is_replaced_and_costs_only_writes_in_flight(tmp_path: Path) -> None:
    async def run() -> None:
        store = SqliteStore(tmp_path / "twins.sqlite3", SqliteSettings(), StreamSettings())
        await store.open()
        try:
            await store.write(change(None, "org.acme:a", {"desired": {"n": 1}}))
            first = writer_pid(store)
            os.kill(first, signal.SIGKILL)
            assert wait_gone(first)
            # The write that finds the dead writer may be refused with 503 (it could not be
            # acknowledged); the next one gets a new writer. Nothing hangs.
            refused = 0
            for attempt in range(3):
                try:
                    await asyncio.wait_for(
                        store.write(change(None, "org.acme:b", {"desired": {"n": attempt}})), 30
                    )
                    break
                except Unavailable:
                    refused += 1
            else:
                pytest.fail("the store never wrote again after its writer was killed")
            assert refused <= 1
            assert writer_pid(store) != first
            a, b = await store.get("org.acme:a"), await store.get("org.acme:b")
            assert a is not None and a.desired == {"n": 1}
            assert b is not None and b.revision == 1
        finally:
            await store.close()

    asyncio.run(run())


def test_writes_in_flight_when_the_writer_dies_are_answered(tmp_path: Path) -> None:
    async def run() -> None:
        store = SqliteStore(tmp_path / "twins.sqlite3", SqliteSettings(), StreamSettings())
        await store.open()
        try:
            pid = writer_pid(store)
            writes = [
                asyncio.ensure_future(
                    store.write(change(None, f"org.acme:w{i}", {"desired": {"i": i}}))
                )
                for i in range(200)
            ]
            await asyncio.sleep(0)  # the first batches are on their way
            os.kill(pid, signal.SIGKILL)
            results = await asyncio.wait_for(asyncio.gather(*writes, return_exceptions=True), 60)
            failed = [r for r in results if isinstance(r, BaseException)]
            assert all(isinstance(r, Unavailable) for r in failed), failed
            # The writer may have committed them before it died: never "failed", which had
            # clients write the same change again.
            assert all("may or may not have been committed" in str(r) for r in failed), failed
            # Every acknowledged write is there.
            for i, result in enumerate(results):
                if not isinstance(result, BaseException):
                    twin = await store.get(f"org.acme:w{i}")
                    assert twin is not None and twin.desired == {"i": i}
        finally:
            await store.close()

    asyncio.run(run())


def test_a_writer_that_dies_unwatched_is_noticed(tmp_path: Path) -> None:
    """The loop reads the end of the writer's channel when the writer dies. If it stopped
    watching the channel (uvloop drops a descriptor's watch for good after an error on it),
    the store still learns of the death from the process, answers the writes in flight and
    starts another writer: a replica once hung for good that way."""

    async def run() -> None:
        store = SqliteStore(tmp_path / "twins.sqlite3", SqliteSettings(), StreamSettings())
        await store.open()
        try:
            await store.write(change(None, "org.acme:a", {"desired": {"n": 1}}))
            pid = writer_pid(store)
            # What uvloop does to a watch it gave up: the channel is no longer read.
            channel = store._writer._channel
            assert channel is not None
            asyncio.get_running_loop().remove_reader(channel.fileno())
            os.kill(pid, signal.SIGSTOP)  # the writes below are in flight, not yet answered
            writes = [
                asyncio.ensure_future(
                    store.write(change(None, f"org.acme:w{i}", {"desired": {"i": i}}))
                )
                for i in range(20)
            ]
            await asyncio.sleep(0.1)
            os.kill(pid, signal.SIGKILL)
            results = await asyncio.wait_for(asyncio.gather(*writes, return_exceptions=True), 30)
            assert results and all(isinstance(r, Unavailable) for r in results), results
            assert all("may or may not have been committed" in str(r) for r in results)
            assert wait_gone(pid)
            # A new writer takes the next write, and the store says it runs.
            await asyncio.wait_for(store.write(change(None, "org.acme:b", {"desired": {}})), 30)
            assert writer_pid(store) != pid
        finally:  # a store whose writes were never answered would wait for them forever
            await asyncio.wait_for(store.close(), 30)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run())


def test_requests_larger_than_the_socket_takes_wait_whole(tmp_path: Path) -> None:
    """On uvloop (as the service runs) the parent's end of the channel is non-blocking. With
    the writer stopped, 2 MB of requests cannot go out at once: what is left waits, whole,
    and goes when the writer reads again. A frame cut short used to kill the writer."""

    async def run() -> None:
        store = SqliteStore(tmp_path / "twins.sqlite3", SqliteSettings(), StreamSettings())
        await store.open()
        try:
            pid = writer_pid(store)
            big = "x" * 50_000
            os.kill(pid, signal.SIGSTOP)
            try:
                writes = [
                    asyncio.ensure_future(
                        store.write(change(None, f"org.acme:big{i}", {"desired": {"v": big}}))
                    )
                    for i in range(40)
                ]
                deadline = time.monotonic() + 10
                while store.describe()["writer"]["unsent"] == 0:
                    assert time.monotonic() < deadline, "the requests all fit the socket"
                    await asyncio.sleep(0.01)
            finally:
                os.kill(pid, signal.SIGCONT)
            await asyncio.wait_for(asyncio.gather(*writes), 60)
            assert writer_pid(store) == pid  # the same writer: it never choked
            assert store.describe()["writer"]["unsent"] == 0
            for i in range(40):
                twin = await store.get(f"org.acme:big{i}")
                assert twin is not None and twin.desired == {"v": big}
        finally:
            await store.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run())


def test_the_writer_does_not_outlive_a_killed_service(tmp_path: Path) -> None:
    service = ServiceProcess(tmp_path / "data").start()
    try:
        with service.client() as api:
            assert (
                api.put("/api/v1/twins/org.acme:x", json={"desired": {"n": 1}}).status_code == 201
            )
        pid = service.writer_pid()
        assert alive(pid)
    finally:
        service.stop(signal.SIGKILL)
    assert wait_gone(pid), "the writer process outlived the service"
    # And the acknowledged write survived both.
    again = ServiceProcess(tmp_path / "data").start()
    try:
        with again.client() as api:
            response = api.get("/api/v1/twins/org.acme:x")
            assert response.status_code == 200 and response.json()["desired"] == {"n": 1}
    finally:
        again.stop()


def test_a_hangup_of_the_process_group_leaves_the_writer_serving(tmp_path: Path) -> None:
    """A closed terminal sends SIGHUP to the whole process group: the service takes it as
    "reload the tokens file", and the writer died of it (replaced, writes in flight lost)."""
    service = ServiceProcess(tmp_path / "data").start()
    try:
        with service.client() as api:
            assert (
                api.put("/api/v1/twins/org.acme:hup", json={"desired": {"n": -1}}).status_code
                == 201
            )
            pid = service.writer_pid()
            assert service.proc is not None
            for member in (service.proc.pid, pid):  # what killpg would reach
                os.kill(member, signal.SIGHUP)
            for n in range(20):
                put = api.put("/api/v1/twins/org.acme:hup/desired/n", json=n)
                assert put.status_code == 204, put.text
            assert service.writer_pid() == pid and alive(pid)
            assert service.proc.poll() is None
    finally:
        service.stop()


def test_the_writer_keeps_full_collections_rare(tmp_path: Path) -> None:
    """What the writer process runs applies the service's ``gc_thresholds`` once its
    database is open (run here on a thread, so the collector seen is this process's)."""
    before = gc.get_threshold()
    parent, child = Pipe()
    config = WriterConfig(
        tmp_path / "twins.sqlite3",
        SqliteSettings(),
        StreamSettings(),
        outbox=False,
        builtin_index=True,
        gc_thresholds=(900, 12, 345),
    )
    writer = threading.Thread(target=serve, args=(child,))
    writer.start()
    try:
        parent.send_bytes(pickle.dumps(config))
        assert pickle.loads(parent.recv_bytes()) == ("ok", False)  # False: not restored
        assert gc.get_threshold() == (900, 12, 345)
        assert gc.get_freeze_count() > 0
    finally:
        parent.send_bytes(pickle.dumps(("stop", None)))
        writer.join(timeout=10)
        gc.unfreeze()
        gc.set_threshold(*before)
    assert not writer.is_alive()
