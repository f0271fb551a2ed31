"""Server-Sent Events with Last-Event-ID resume, against the real service."""

from __future__ import annotations

import itertools
import json
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from tests.legacy import age_sqlite_journal
from tests.service_process import ADMIN_TOKEN, ServiceProcess


def read_events(response: httpx.Response, count: int) -> list[dict[str, Any]]:
    """Parse ``count`` SSE events (id, event, data) from a streaming response."""
    return list(itertools.islice(iter_events(response), count))


def iter_events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """The SSE events (id, event, data...) of a streaming response, to the end of its body
    (a response's body can be iterated once)."""
    current: dict[str, Any] = {}
    for line in response.iter_lines():
        if line.startswith(":"):
            continue
        if not line:
            if current:
                yield current
                current = {}
            continue
        name, _, value = line.partition(": ")
        current[name] = json.loads(value) if name == "data" else value


def live_position(api: httpx.Client) -> int:
    """The journal position a stream starts from now (its ``subscribed`` event's seq)."""
    with api.stream("GET", "/api/v1/stream/twins", timeout=30) as stream:
        (subscribed,) = read_events(stream, 1)
    assert subscribed["event"] == "subscribed", subscribed
    return int(subscribed["data"]["seq"])


def test_sse_stream_and_last_event_id_resume(service: ServiceProcess) -> None:
    ns = f"org.sse{uuid.uuid4().hex[:8]}"
    params = {"filter": "exists(desired/mode)", "fields": "desired", "namespaces": ns}
    with service.client() as api:
        api.put(f"/api/v1/twins/{ns}:a", json={})

        def write_later() -> None:
            with service.client() as writer:
                writer.put(f"/api/v1/twins/{ns}:a/desired/mode", json="eco")
                writer.put(f"/api/v1/twins/{ns}:b", json={"desired": {"mode": "max"}})
                writer.put(f"/api/v1/twins/{ns}:c", json={"desired": {"other": 1}})
                writer.delete(f"/api/v1/twins/{ns}:a/desired/mode")

        timer = threading.Timer(0.5, write_later)
        timer.start()
        with api.stream("GET", "/api/v1/stream/twins", params=params, timeout=30) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = read_events(response, 4)
        timer.join()
        assert events[0]["event"] == "subscribed"
        first, second, third = events[1:]
        assert first["event"] == "event" and first["data"]["twin"] == {"desired": {"mode": "eco"}}
        assert second["data"]["event"]["twinId"] == f"{ns}:b"
        assert third["event"] == "left" and third["data"]["event"]["twinId"] == f"{ns}:a"
        assert int(first["id"]) < int(second["id"]) < int(third["id"])
        # Resume after the first event: the next two come again, nothing before them.
        headers = {"Last-Event-ID": first["id"]}
        with api.stream(
            "GET", "/api/v1/stream/twins", params=params, headers=headers, timeout=30
        ) as response:
            replayed = read_events(response, 3)
        assert [e["id"] for e in replayed[1:]] == [second["id"], third["id"]]
        # An empty Last-Event-ID is none (it was a 400): `since` says where to start.
        again_params = {**params, "since": first["id"]}
        headers = {"Last-Event-ID": ""}
        with api.stream(
            "GET", "/api/v1/stream/twins", params=again_params, headers=headers, timeout=30
        ) as response:
            again = read_events(response, 3)
        assert [e["id"] for e in again[1:]] == [second["id"], third["id"]]
        bad = api.get("/api/v1/stream/twins", headers={"Last-Event-ID": "abc"})
        assert bad.status_code == 400
        bad_rql = api.get("/api/v1/stream/twins", params={"filter": "eq(attributes/a"})
        assert bad_rql.status_code == 400 and bad_rql.json()["error"] == "rql.syntax"
    with service.client(token="") as anonymous:
        assert anonymous.get("/api/v1/stream/twins").status_code == 401


def test_a_resume_further_back_than_the_queue_holds_is_streamed_whole(tmp_path: Path) -> None:
    """The replay of a resume used to be queued whole before the response started: one
    longer than ``stream.queue_size`` ended at once with an overflow, every time the
    EventSource came back, so a reader that far behind could never catch up. (Its hint,
    ``resumeWith``, was 0 as well.)"""
    proc = ServiceProcess(tmp_path, env={"TWIN_STREAM__QUEUE_SIZE": "20"}).start()
    try:
        with proc.client() as api:
            for n in range(5):
                assert api.put(f"/api/v1/twins/org.sse:t{n}", json={}).status_code == 201
            for n in range(100):
                merge = {"Content-Type": "application/merge-patch+json"}
                patch = {"desired": {"n": n}}
                response = api.patch(f"/api/v1/twins/org.sse:t{n % 5}", json=patch, headers=merge)
                assert response.status_code == 200, response.text
            headers = {"Last-Event-ID": "3"}
            with api.stream("GET", "/api/v1/stream/twins", headers=headers, timeout=30) as stream:
                events = read_events(stream, 103)
    finally:
        proc.stop()
    assert events[0]["event"] == "subscribed", events[0]
    assert [int(e["id"]) for e in events[1:]] == list(range(4, 106))
    assert all(e["event"] == "event" for e in events[1:])


def test_a_reader_that_leaves_during_its_replay_is_let_go(tmp_path: Path) -> None:
    """The replay waits for a reader that does not read (large events fill the socket's
    buffers, then the queue); when that reader leaves, its subscription and its replay
    end. A replay used to run before the response started, where nothing noticed a
    reader leave."""
    proc = ServiceProcess(tmp_path, env={"TWIN_STREAM__QUEUE_SIZE": "10"}).start()
    try:
        with proc.client() as api:
            for n in range(40):
                body = {"desired": {"blob": f"{n}" + "x" * 50_000}}
                assert api.put("/api/v1/twins/org.sse:big", json=body).is_success
            with socket.create_connection(("127.0.0.1", proc.port)) as reader:
                reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                reader.sendall(
                    b"GET /api/v1/stream/twins HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 0\r\n"
                    + f"Authorization: Bearer {ADMIN_TOKEN}\r\n\r\n".encode()
                )
                assert reader.recv(200).startswith(b"HTTP/1.1 200")
                time.sleep(1)  # the replay fills what it can, and waits
                assert _subscriptions(api) == 1
            deadline = time.monotonic() + 10
            while _subscriptions(api) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _subscriptions(api) == 0
    finally:
        proc.stop()


def test_a_reader_behind_is_cut_at_the_process_bound_before_its_own(tmp_path: Path) -> None:
    """``stream.total_queue_bytes`` bounds what all readers of a process hold: a reader
    that does not read is cut once the process's readers hold it, though its own bound
    (``queue_bytes``, 64 MiB here) is far off."""
    env = {
        "TWIN_STREAM__TOTAL_QUEUE_BYTES": str(1 << 20),
        "TWIN_STREAM__QUEUE_BYTES": str(64 << 20),
    }
    proc = ServiceProcess(tmp_path, env=env).start()
    try:
        with proc.client() as api, socket.create_connection(("127.0.0.1", proc.port)) as reader:
            reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            reader.sendall(
                b"GET /api/v1/stream/twins HTTP/1.1\r\nHost: x\r\n"
                + f"Authorization: Bearer {ADMIN_TOKEN}\r\n\r\n".encode()
            )
            assert reader.recv(200).startswith(b"HTTP/1.1 200")
            held = []
            for n in range(100):  # about 6 MB of events, a few of them in socket buffers
                body = {"desired": {"blob": f"{n}" + "x" * 20_000}}
                assert api.put("/api/v1/twins/org.sse:bound", json=body).is_success
                held.append(_streams(api)["queuedBytes"])
            # It was cut, what it held let go, and its subscription too (the overflow
            # event waits in vain for room in its socket).
            assert 900_000 < max(held) <= 1 << 20, held
            assert held[-1] == 0 and _subscriptions(api) == 0
    finally:
        proc.stop()


def _subscriptions(api: httpx.Client) -> int:
    count: int = _streams(api)["subscriptions"]
    return count


def _streams(api: httpx.Client) -> dict[str, Any]:
    """The ``streams`` check of ``/ready``."""
    check: dict[str, Any] = api.get("/ready").json()["checks"]["streams"]
    return check


def test_events_queued_together_go_out_in_one_chunk(service: ServiceProcess) -> None:
    """One write for everything queued, as over WebSocket: one write per event made an SSE
    reader fall behind at a few hundred commits a second (bench.chaos --sse-watchers)."""
    ns = f"org.chunk{uuid.uuid4().hex[:8]}"
    with service.client() as api:
        assert api.put(f"/api/v1/twins/{ns}:a", json={}).status_code == 201
        for n in range(20):
            merge = {"Content-Type": "application/merge-patch+json"}
            api.patch(f"/api/v1/twins/{ns}:a", json={"desired": {"n": n}}, headers=merge)
        # A replay of the journal (the 21 events of this namespace among the module's).
        params = {"namespaces": ns, "since": 0}
        with api.stream("GET", "/api/v1/stream/twins", params=params, timeout=30) as stream:
            pieces: list[bytes] = []
            events = 0
            for piece in stream.iter_raw():
                pieces.append(piece)
                events += piece.count(b"\nid: ") + piece.startswith(b"id: ")
                if events >= 21:
                    break
    assert events == 21
    assert max(piece.count(b"id: ") for piece in pieces) > 1, [len(p) for p in pieces]


def test_a_resync_carries_the_id_to_resume_from(tmp_path: Path) -> None:
    """A resume from before the journal's start gets ``resync.required``; its id is where
    the stream goes on, so a reader cut off before the next event does not resync again."""
    env = {"TWIN_STREAM__JOURNAL_MAX_PER_TWIN": "1"}
    proc = ServiceProcess(tmp_path, env=env).start()
    try:
        with proc.client() as api:
            api.put("/api/v1/twins/org.sse:pruned", json={})
            for n in range(130):  # pruning runs every 64 revisions
                api.put("/api/v1/twins/org.sse:pruned/desired/n", json=n)
            # The streams learn of a commit after its answer: on a busy machine the position
            # a stream started from was still 130 (the resync's id then said 130, rightly).
            deadline = time.monotonic() + 30
            while live_position(api) < 131 and time.monotonic() < deadline:
                time.sleep(0.05)
            headers = {"Last-Event-ID": "1"}
            with api.stream("GET", "/api/v1/stream/twins", headers=headers, timeout=30) as stream:
                (resync,) = read_events(stream, 1)
    finally:
        proc.stop()
    assert resync["event"] == "resync.required", resync
    assert int(resync["id"]) == resync["data"]["seq"] == 131


def test_events_past_the_age_limit_go_on_a_service_no_longer_written(tmp_path: Path) -> None:
    """The SQLite store pruned by age every 100th commit only: a few writes and then none,
    and their events stayed in the journal for good, a reader resuming from before them
    replayed them rather than being told to resync."""
    env = {"TWIN_STREAM__JOURNAL_MAX_AGE_SECONDS": "60"}
    proc = ServiceProcess(tmp_path, env=env).start()
    try:
        with proc.client() as api:
            for name in "abc":
                assert api.put(f"/api/v1/twins/org.sse:aged-{name}", json={}).status_code == 201
                api.put(f"/api/v1/twins/org.sse:aged-{name}/desired/n", json=1)
            assert len(api.get("/api/v1/twins/org.sse:aged-c/history").json()["items"]) == 2
            headers = {"Last-Event-ID": "1"}
            deadline = time.monotonic() + 240  # a bound for a busy machine, not a timing claim
            while True:
                with api.stream(
                    "GET", "/api/v1/stream/twins", headers=headers, timeout=30
                ) as stream:
                    (first,) = read_events(stream, 1)
                if first["event"] == "resync.required" or time.monotonic() > deadline:
                    break
                time.sleep(1)
            history = api.get("/api/v1/twins/org.sse:aged-c/history")
    finally:
        proc.stop()
    assert first["event"] == "resync.required", first
    # Each twin's newest event stays: its next change is compared with it.
    assert history.status_code == 200, history.text
    assert [item["revision"] for item in history.json()["items"]] == [2], history.text


def test_changes_after_the_journal_aged_out_reach_the_streams(tmp_path: Path) -> None:
    """Pruning by age removed every twin's newest event too: the next change of a twin
    idle for longer than journal_max_age_seconds had no state before it, so its deletion
    reached no stream (not even an unfiltered one) and its leaving a filter no ``left``."""
    env = {"TWIN_STREAM__JOURNAL_MAX_AGE_SECONDS": "60"}
    proc = ServiceProcess(tmp_path, env=env).start()
    ns = "org.sseaged"
    try:
        with proc.client() as api:
            api.put(f"{TWINS}/{ns}:leaves", json={"attributes": {"on": True}})
            api.put(f"{TWINS}/{ns}:deleted", json={"attributes": {"on": True}})
            age_sqlite_journal(proc.data_dir / "twins.sqlite3")
            wait_for_resync(api, since=1)  # pruned by age (every 6 s here)
            since = str(live_position(api))
            assert api.put(f"{TWINS}/{ns}:leaves/attributes/on", json=False).status_code < 300
            assert api.delete(f"{TWINS}/{ns}:deleted").status_code == 204
            api.put(f"{TWINS}/{ns}:last", json={"attributes": {"on": True}})
            seen = {}
            for name, params in {
                "all": {},
                "filtered": {"filter": "eq(attributes/on,true)", "namespaces": ns},
            }.items():
                headers = {"Last-Event-ID": since}
                with api.stream(
                    "GET", "/api/v1/stream/twins", params=params, headers=headers, timeout=30
                ) as stream:
                    seen[name] = list(until_twin(iter_events(stream), f"{ns}:last"))
    finally:
        proc.stop()
    assert seen["all"] == [
        ("event", f"{ns}:leaves", "modified"),
        ("event", f"{ns}:deleted", "deleted"),
        ("event", f"{ns}:last", "created"),
    ]
    assert seen["filtered"] == [
        ("left", f"{ns}:leaves", "modified"),
        ("event", f"{ns}:deleted", "deleted"),
        ("event", f"{ns}:last", "created"),
    ]


def test_a_process_started_after_the_newest_events_aged_out_resumes_from_them(
    tmp_path: Path,
) -> None:
    """The SQLite store took the end of the journal from the newest event left in it: once
    the newest events aged out (a deletion goes whole), a process started afterwards put the
    end before them. A reader resuming from the deletion was told it came from another
    journal, and a stream that started live there was given an id before it, to be told to
    resync again at every reconnection until the next write."""
    env = {"TWIN_STREAM__JOURNAL_MAX_AGE_SECONDS": "60"}
    proc = ServiceProcess(tmp_path, env=env).start()
    try:
        with proc.client() as api:
            assert api.put(f"{TWINS}/org.sse:keep", json={}).status_code == 201
            assert api.put(f"{TWINS}/org.sse:gone", json={}).status_code == 201
            deleted = api.delete(f"{TWINS}/org.sse:gone")
            assert deleted.status_code == 204
            last = int(deleted.headers["X-Twin-Seq"])  # the reader's last event
            age_sqlite_journal(proc.data_dir / "twins.sqlite3")
            wait_for_resync(api, since=last - 1)  # the deletion was pruned by age
        proc.stop()
        proc.start()
        with proc.client() as api:
            headers = {"Last-Event-ID": str(last)}
            with api.stream("GET", "/api/v1/stream/twins", headers=headers, timeout=30) as stream:
                (resumed,) = read_events(stream, 1)
            live = live_position(api)
            history = api.get(f"{TWINS}/org.sse:keep/history")
    finally:
        proc.stop()
    assert resumed["event"] == "subscribed" and resumed["data"]["seq"] == last, resumed
    assert live == last
    # The creation of the twin that exists stays: the journal was not empty.
    assert [item["revision"] for item in history.json()["items"]] == [1], history.text


TWINS = "/api/v1/twins"


def wait_for_resync(api: httpx.Client, since: int) -> None:
    """Until a reader resuming after ``since`` is told to resync (the journal was pruned)."""
    headers = {"Last-Event-ID": str(since)}
    deadline = time.monotonic() + 240  # a bound for a busy machine, not a timing claim
    while time.monotonic() < deadline:
        with api.stream("GET", "/api/v1/stream/twins", headers=headers, timeout=30) as stream:
            (first,) = read_events(stream, 1)
        if first["event"] == "resync.required":
            return
        time.sleep(0.5)
    raise AssertionError(f"the journal was not pruned: {first}")


def until_twin(events: Iterator[dict[str, Any]], twin_id: str) -> Iterator[tuple[str, str, str]]:
    """(kind, twin id, action) of the change events, up to the first of ``twin_id``."""
    for message in events:
        if message["event"] in ("event", "left"):
            change = message["data"]["event"]
            yield message["event"], change["twinId"], change["action"]
            if change["twinId"] == twin_id:
                return


def test_a_stream_that_starts_live_gives_its_start_as_an_id(service: ServiceProcess) -> None:
    """An EventSource cut off before its first event comes back with the id of
    ``subscribed``, and gets what was committed while it was away. Without that id it came
    back live from a later point, and missed those (bench.chaos, a replica killed)."""
    ns = f"org.sse{uuid.uuid4().hex[:8]}"
    params = {"namespaces": ns}
    with service.client() as api:
        with api.stream("GET", "/api/v1/stream/twins", params=params, timeout=30) as stream:
            (subscribed,) = read_events(stream, 1)
        assert subscribed["event"] == "subscribed"
        assert int(subscribed["id"]) == subscribed["data"]["seq"]
        assert api.put(f"/api/v1/twins/{ns}:away", json={}).status_code == 201
        headers = {"Last-Event-ID": subscribed["id"]}
        with api.stream(
            "GET", "/api/v1/stream/twins", params=params, headers=headers, timeout=30
        ) as stream:
            resumed, missed = read_events(stream, 2)
    assert resumed["event"] == "subscribed" and "id" not in resumed  # the reader's id stays
    assert missed["data"]["event"]["twinId"] == f"{ns}:away"


def test_a_stream_filter_lists_at_most_max_listed_in_values(service: ServiceProcess) -> None:
    """A stream's filter is held as long as the stream: its in() values are bounded like a
    WebSocket connection's (stream.max_listed)."""
    values = ",".join(["1"] * 10_001)
    with service.client() as api:
        refused = api.get("/api/v1/stream/twins", params={"filter": f"in(attributes/n,{values})"})
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"] == "limits.exceeded"
        assert "stream.max_listed" in refused.json()["message"]
        values = ",".join(["1"] * 10_000)
        params = {"filter": f"in(attributes/n,{values})"}
        with api.stream("GET", "/api/v1/stream/twins", params=params, timeout=30) as stream:
            assert read_events(stream, 1)[0]["event"] == "subscribed"


def test_a_stop_ends_a_stream_with_where_to_resume(tmp_path: Path) -> None:
    """SIGTERM ends an open stream at once, as it closes a WebSocket with 1012: what was
    queued, then a ``stopping`` event (where to resume, as its id, and a ``retry`` hint),
    then the end of the body; the process then stops without waiting out
    ``shutdown_timeout_seconds``. The stream used to stay open for the whole timeout, then
    be cut mid-body (``incomplete chunked read``): every stop of a replica with one idle
    event reader took the timeout. Resumed from that id on the restarted service, the
    reader gets every event once, none missing."""
    timeout = 120
    env = {"TWIN_SHUTDOWN_TIMEOUT_SECONDS": str(timeout)}
    params = {"namespaces": "org.stop"}
    proc = ServiceProcess(tmp_path, env=env).start()
    assert proc.proc is not None
    try:
        with (
            proc.client() as api,
            api.stream("GET", "/api/v1/stream/twins", params=params) as stream,
        ):
            events = iter_events(stream)
            subscribed = next(events)
            assert api.put("/api/v1/twins/org.stop:a", json={}).status_code == 201
            for n in range(3):
                assert api.put("/api/v1/twins/org.stop:a/desired/n", json=n).is_success
            proc.proc.send_signal(signal.SIGTERM)
            # To the end of the body: httpx raises RemoteProtocolError if it is cut.
            *before, stopping = events
        # Would time out only if the stop waited for the whole timeout.
        proc.proc.wait(timeout / 2)
    finally:
        proc.stop()
    assert subscribed["event"] == "subscribed", subscribed
    assert stopping["event"] == "stopping", stopping
    assert int(stopping["retry"]) > 0
    assert int(stopping["id"]) == stopping["data"]["resumeWith"]
    assert all(e["event"] == "event" for e in before), before

    again = ServiceProcess(tmp_path, env=env).start()
    try:
        with again.client() as api:
            assert api.put("/api/v1/twins/org.stop:a/desired/n", json=3).is_success
            headers = {"Last-Event-ID": stopping["id"]}
            with api.stream(
                "GET", "/api/v1/stream/twins", params=params, headers=headers
            ) as stream:
                resumed: list[dict[str, Any]] = []
                for event in iter_events(stream):
                    if event["event"] != "subscribed":
                        resumed.append(event)
                    if resumed and resumed[-1]["data"]["event"]["revision"] == 5:
                        break
    finally:
        again.stop()
    revisions = [e["data"]["event"]["revision"] for e in before + resumed]
    assert revisions == [1, 2, 3, 4, 5]
