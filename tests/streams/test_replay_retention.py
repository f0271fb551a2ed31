"""A replay that retention overtakes, against the real service.

A replay goes at its reader's pace (docs/api.md, Back-pressure); retention goes on meanwhile.
Events it removes after the subscribe was answered, before the replay read them, cannot be
replayed: the reader must learn that, as one resuming from there would (``resync.required``).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from tests.service_fixtures import mongodb_env
from tests.service_process import ServiceProcess
from tests.streams.test_websocket import Json, connect, receive, send, subscribe


def test_a_replay_overtaken_by_retention_ends_the_stream_rather_than_skip_events(
    service_factory: Callable[..., ServiceProcess],
) -> None:
    """The replay read the journal batch by batch after the one check of ``since`` against
    what was pruned: events of a twin pruned (stream.journal_max_per_twin) while the replay
    waited for its slow reader were skipped, and nothing told the reader."""
    env = {"TWIN_STREAM__JOURNAL_MAX_PER_TWIN": "1", "TWIN_STREAM__QUEUE_SIZE": "100"}
    proc = service_factory(env=env)
    twin = "org.acme:overtaken"

    async def run() -> tuple[list[dict[str, Any]], ConnectionClosed | None, dict[str, Any]]:
        async with proc.async_client() as api:
            # First, more than the socket buffers and half the queue hold: the replay waits
            # in them while the reader reads nothing. (Each filler twin stays below revision
            # 64, where retention prunes a twin.)
            blob = "y" * 30_000
            limit = asyncio.Semaphore(8)

            async def fill(i: int) -> None:
                async with limit:
                    body = {"attributes": {"i": i, "blob": blob}}
                    response = await api.put(f"/api/v1/twins/org.acme:filler{i % 20}", json=body)
                    assert response.status_code in (200, 201), response.text

            await asyncio.gather(*(fill(i) for i in range(1000)))
            for i in range(63):  # revisions 1-63, after the filler in the journal
                response = await api.put(f"/api/v1/twins/{twin}", json={"attributes": {"i": i}})
                assert response.status_code in (200, 201), response.text
            async with connect(proc) as ws:
                head = (await subscribe(ws, id="s", since=0))["seq"]
                await asyncio.sleep(2)  # a slow reader: the replay waits for room
                # Revision 64: retention removes the twin's revisions 1-63, not replayed yet.
                response = await api.put(f"/api/v1/twins/{twin}", json={"attributes": {"i": 63}})
                assert response.status_code == 200, response.text
                received: list[dict[str, Any]] = []
                closed: ConnectionClosed | None = None
                try:
                    while True:
                        received.append(await receive(ws, timeout=10))
                except ConnectionClosed as exc:
                    closed = exc
                except TimeoutError:
                    pass
            since = closed.rcvd.reason.rpartition("=")[2] if closed and closed.rcvd else ""
            async with connect(proc) as ws:
                await send(ws, {"type": "subscribe", "id": "s", "since": int(since or head)})
                resumed = await receive(ws)
        return received, closed, resumed

    received, closed, resumed = asyncio.run(run())
    assert {m["type"] for m in received} <= {"event"}, received
    revisions = [m["event"]["revision"] for m in received if m["event"]["twinId"] == twin]
    assert revisions == list(range(1, 65)) or closed is not None, (
        f"the replay skipped the twin's revisions {sorted(set(range(1, 64)) - set(revisions))} "
        "without a word"
    )
    # Ended as a slow consumer's stream: where to resume, and resumed there, a resync.
    assert closed is not None and closed.rcvd is not None
    assert closed.rcvd.code == 4408, closed
    assert closed.rcvd.reason.startswith("slow consumer: resume with since="), closed
    seqs = [m["seq"] for m in received]
    assert seqs == sorted(seqs) and all(s <= int(closed.rcvd.reason.split("=")[1]) for s in seqs)
    assert resumed["type"] == "resync.required", resumed


@pytest.mark.parametrize("store", ["sqlite", "mongodb"])
def test_retention_keeps_the_state_a_twins_next_change_is_classified_against(
    store: str,
    request: pytest.FixtureRequest,
    service_factory: Callable[..., ServiceProcess],
    unique_name: str,
) -> None:
    """Per-twin retention removed the event right before the oldest it kept: the twin's next
    change had no state "before", so a filter subscription neither got ``left`` when the twin
    stopped matching nor the deletion of a twin it matched: live where the hub had not cached
    the twin, and resumed (``since``) from right after the events retention removed."""
    env = {"TWIN_STREAM__JOURNAL_MAX_PER_TWIN": "1"}
    if store == "mongodb":
        env |= mongodb_env(request.getfixturevalue("ferretdb_server").url, unique_name)
    proc = service_factory(env=env)
    ns = f"org.kept{uuid.uuid4().hex[:8]}"
    leaving, deleted = f"{ns}:leaving", f"{ns}:deleted"
    subscription = {"filter": 'eq(attributes/site,"a")', "namespaces": [ns]}

    async def run() -> tuple[list[Json], list[Json]]:
        async with proc.async_client() as api:
            seq = 0
            for twin in (leaving, deleted):
                for i in range(63):  # revisions 1-63, matching
                    body = {"attributes": {"site": "a", "i": i}}
                    response = await api.put(f"/api/v1/twins/{twin}", json=body)
                    assert response.is_success, response.text
                    seq = int(response.headers["X-Twin-Seq"])
            # The hub passed them with nobody listening: it holds no state of either twin.
            while (await api.get("/ready")).json()["checks"]["streams"]["position"] < seq:
                await asyncio.sleep(0.05)
            async with connect(proc) as live:
                await subscribe(live, id="live", **subscription)
                # Revision 64, where retention prunes either twin down to one event.
                body = {"attributes": {"site": "b"}}
                response = await api.put(f"/api/v1/twins/{leaving}", json=body)
                assert response.status_code == 200, response.text
                response = await api.delete(f"/api/v1/twins/{deleted}")
                assert response.is_success, response.text
                live_got = await _changes(live, 2)
            async with connect(proc) as resumed:
                await subscribe(resumed, id="resumed", since=seq, **subscription)
                resumed_got = await _changes(resumed, 2)
        return live_got, resumed_got

    expected = [("left", leaving, "modified", 64), ("event", deleted, "deleted", 64)]
    assert asyncio.run(run()) == (expected, expected)


async def _changes(ws: ClientConnection, count: int) -> list[tuple[str, str, str, int]]:
    """The next ``count`` changes received (fewer if none comes for a second)."""
    got: list[tuple[str, str, str, int]] = []
    with contextlib.suppress(TimeoutError):
        while len(got) < count:
            message = await receive(ws, timeout=1)
            event = message["event"]
            got.append((message["type"], event["twinId"], event["action"], event["revision"]))
    return got
