"""Claims on FerretDB (its updates are not atomic, so each version of a twin is claimed with
a unique insert before it is replaced): a writer that died holding one does not keep the
twin from every other writer, and a live claim is not taken from its holder."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pymongo import monitoring

from tests.servers.ferretdb import FerretDB
from tests.service_fixtures import mongodb_env
from tests.service_process import ServiceProcess
from tests.store.contract import change
from tests.store_fixtures import StoreFactory, mongodb_settings, raw_database
from twin_service.errors import StoreUnreachable
from twin_service.store.base import RevisionConflict, TwinStore
from twin_service.store.mongodb import MongoStore

GAP = 1.0  # gap_timeout_seconds: a claim is taken for dead after 1.5 of them


# The store fixture on the MongoDB store only (FerretDB is the one with claims).
on_ferretdb = pytest.mark.parametrize("store_factory", ["mongodb"], indirect=True)


@pytest.fixture
async def store(store_factory: StoreFactory) -> TwinStore:
    return await store_factory(gap_timeout_seconds=GAP)


async def left_claim(url: str, database: str, twin_id: str, at: datetime | None = None) -> None:
    """What a writer killed between its claim and its update leaves: the claim of the twin's
    current version, and the twin unchanged."""
    async with raw_database(url, database) as db:
        raw = await db.twins.find_one({"_id": twin_id}, {"seq": 1})
        assert raw is not None
        claim = {"_id": f"{twin_id}@{raw['seq']}", "at": at or datetime.now(UTC)}
        await db.claims.insert_one(claim)


async def write_once_the_claim_lapses(
    store: TwinStore, twin_id: str, give_up_after: float = math.inf
) -> int:
    """Write ``{"desired": {"n": 1}}`` to ``twin_id``, again while a claim refuses it; the
    number of refusals."""
    start = time.monotonic()
    conflicts = 0
    while True:
        current = await store.get(twin_id)
        assert current is not None
        try:
            await store.write(change(current, twin_id, {"desired": {"n": 1}}))
            return conflicts
        except RevisionConflict:
            conflicts += 1
            assert time.monotonic() - start < give_up_after, "the dead writer's claim never lapsed"
            await asyncio.sleep(0.1)


@on_ferretdb
async def test_a_dead_writers_claim_lapses(
    store: TwinStore, ferretdb_server: FerretDB, unique_name: str
) -> None:
    twin_id = "org.acme:claimed"
    await store.write(change(None, twin_id, {"desired": {"n": 0}}))
    await left_claim(ferretdb_server.url, unique_name, twin_id)
    conflicts = await write_once_the_claim_lapses(store, twin_id, give_up_after=30)
    # Refused while the claim could still be a live writer's, then written once.
    assert conflicts > 0
    twin = await store.get(twin_id)
    assert twin is not None and twin.desired == {"n": 1} and twin.revision == 2
    # The twin is free again for the next writer at once.
    await store.write(change(twin, twin_id, {"desired": {"n": 2}}))


def taken_for_dead(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "taken for dead" in r.getMessage()]


@on_ferretdb
async def test_the_log_gives_how_long_a_dead_writers_claim_was_seen_held(
    store: TwinStore, ferretdb_server: FerretDB, unique_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="twin_service.store.mongodb")
    twin_id = "org.acme:logged"
    await store.write(change(None, twin_id, {"desired": {"n": 0}}))
    await left_claim(ferretdb_server.url, unique_name, twin_id)
    await write_once_the_claim_lapses(store, twin_id)
    [record] = taken_for_dead(caplog)
    assert isinstance(record.args, tuple)
    held = record.args[1]
    assert isinstance(held, float) and GAP * 1.5 <= held < math.inf
    assert "seen held for" in record.getMessage()


@on_ferretdb
async def test_this_processs_own_lapsed_claim_is_not_logged_as_a_dead_writers(
    store_factory: StoreFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A claim whose update this process never sent (here: a gap timeout so short that every
    claim is too old to send by the time its seq is allocated) is taken again at once by
    this process, and that is no dead writer: the log said it was, held for the lease."""
    caplog.set_level(logging.WARNING, logger="twin_service.store.mongodb")
    store = await store_factory(gap_timeout_seconds=1e-6)
    write = change(None, "org.acme:own", {"desired": {"n": 0}})
    for _ in range(3):
        with pytest.raises(RevisionConflict, match="lapsed"):
            await store.write(write)
    assert taken_for_dead(caplog) == []


@on_ferretdb
async def test_a_live_claim_is_not_taken(
    store: TwinStore, ferretdb_server: FerretDB, unique_name: str
) -> None:
    """Another store (a replica) that sees a claim for the first time leaves it to its
    holder, however old the claim's own timestamp says it is: replicas' clocks differ."""
    twin_id = "org.acme:held"
    await store.write(change(None, twin_id, {"desired": {"n": 0}}))
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    await left_claim(ferretdb_server.url, unique_name, twin_id, an_hour_ago)
    current = await store.get(twin_id)
    assert current is not None
    for _ in range(3):
        with pytest.raises(RevisionConflict):
            await store.write(change(current, twin_id, {"desired": {"n": 1}}))
    twin = await store.get(twin_id)
    assert twin is not None and twin.revision == 1


def test_a_write_through_the_service_outlasts_a_dead_writers_claim(
    ferretdb_server: FerretDB, service_factory: Callable[..., ServiceProcess], unique_name: str
) -> None:
    """The service's retries of a twin whose claim a dead writer holds wait for the lease to
    end rather than spend their attempts in the first seconds and answer 409
    twin.contention (a device's report was rejected that way)."""
    env = mongodb_env(ferretdb_server.url, unique_name)
    env["TWIN_MONGODB__GAP_TIMEOUT_SECONDS"] = "4"  # a lease of 6 s
    proc = service_factory(env=env)
    twin_id = "org.acme:outlasts"
    with proc.client() as api:
        assert api.put(f"/api/v1/twins/{twin_id}", json={"desired": {"n": 0}}).status_code == 201
        asyncio.run(left_claim(ferretdb_server.url, unique_name, twin_id))
        response = api.put(f"/api/v1/twins/{twin_id}/desired/n", json=1, timeout=120)
        assert response.status_code == 204, response.text
        twin = api.get(f"/api/v1/twins/{twin_id}").json()
    assert twin["desired"] == {"n": 1} and twin["revision"] == 2
    assert "taken for dead" in proc.log_tail(100_000)


async def claim_lands(url: str, database: str, claim: str) -> None:
    async with raw_database(url, database) as db, asyncio.timeout(10):
        while await db.claims.find_one({"_id": claim}) is None:
            await asyncio.sleep(0.1)


def freeze(pid: int) -> None:
    """SIGSTOP ``pid`` and wait until it is stopped: the command about to be sent must find
    it so (a stop is not instant, and the server answered a find in the meantime)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    # The state follows the name, which is in parentheses.
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "Tt":
        assert time.monotonic() < deadline, f"{pid} did not stop"
        time.sleep(0.001)


class FreezeWrite(monitoring.CommandListener):
    """Stops the server (SIGSTOP of ``pid``) in the middle of a write on ``database``: as the
    claim's insert starts (``on("claims")``), or as the first ``find`` on another collection
    starts after the claim insert succeeded (``on("numbers")``). That command and the rest of
    the write go unanswered. Global: clients made after it is registered see it."""

    def __init__(self) -> None:
        self.arm(None, 0)

    def arm(self, database: str | None, pid: int) -> None:
        self.database = database
        self.pid = pid
        self.frozen = False
        self.on("")

    def on(self, collection: str) -> None:
        self.collection = collection
        self._claims: set[int] = set()  # request ids of claim inserts
        self._claimed = False

    def thaw(self) -> None:
        """SIGCONT the server, once for all."""
        if self.frozen:
            os.kill(self.pid, signal.SIGCONT)
        self.database = None

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.database_name != self.database or self.frozen or not self.collection:
            return
        command = event.command
        if event.command_name == "insert" and command.get("insert") == "claims":
            self._claims.add(event.request_id)
            self._freeze_if(self.collection == "claims")
        elif event.command_name == "find":
            self._freeze_if(self._claimed and command["find"] == self.collection)

    def _freeze_if(self, now: bool) -> None:
        if now:
            freeze(self.pid)
            self.frozen = True

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        if event.request_id in self._claims and not event.reply.get("writeErrors"):
            self._claimed = True

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        self._claims.discard(event.request_id)


_FREEZE = FreezeWrite()
monitoring.register(_FREEZE)


@pytest.fixture
def freeze_write(unique_name: str, fresh_ferretdb: FerretDB) -> Iterator[FreezeWrite]:
    """Armed on ``fresh_ferretdb`` and this test's database; the server goes on after."""
    assert fresh_ferretdb.pid is not None
    _FREEZE.arm(unique_name, fresh_ferretdb.pid)
    try:
        yield _FREEZE
    finally:
        _FREEZE.thaw()


@pytest.mark.parametrize(
    ("existing", "frozen_on"),
    [(False, "numbers"), (True, "events"), (False, "claims")],
    ids=["allocation", "journaling-the-previous-event", "the-claim-itself"],
)
async def test_a_write_that_fails_once_claimed_leaves_the_twin_free_to_this_process(
    fresh_ferretdb: FerretDB,
    freeze_write: FreezeWrite,
    tmp_path: Path,
    unique_name: str,
    existing: bool,
    frozen_on: str,
) -> None:
    """The server stops answering after a write's claim: the allocation of its seq (a new
    twin), or the check that the twin's previous event is journaled, times out; or the
    claim's own insert times out, and lands once the server goes on. Nothing of the write
    was sent, but the claim was left standing as a live writer's: this process's next write
    of the twin was refused for the whole lease (1.5 gap timeouts, 15 s by default; logged
    as a dead writer's claim)."""
    settings = mongodb_settings(
        tmp_path, fresh_ferretdb.url, unique_name, operation_timeout_ms=1000
    )
    store = MongoStore(settings)
    await store.open()
    try:
        twin_id = "org.acme:frozen-after-claim"
        current = None
        if existing:
            await store.write(change(None, twin_id, {"desired": {"n": 0}}))
            current = await store.get(twin_id)
        freeze_write.on(frozen_on)
        with pytest.raises(StoreUnreachable):
            await store.write(change(current, twin_id, {"desired": {"n": 1}}))
        assert freeze_write.frozen
        freeze_write.thaw()
        if frozen_on == "claims":  # the case: the insert the server got while stopped lands
            await claim_lands(fresh_ferretdb.url, unique_name, f"{twin_id}@0")
        deadline = time.monotonic() + 10  # within the lease (15 s)
        while True:  # the server may take a moment to answer again
            try:
                await store.write(change(current, twin_id, {"desired": {"n": 1}}))
                break
            except StoreUnreachable:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)
        twin = await store.get(twin_id)
        assert twin is not None and twin.desired == {"n": 1}
    finally:
        await store.close()
