"""Open streams follow a reload of the tokens (SIGHUP, real process, real signals).

WebSocket connections and server-sent-event streams kept the principal they authenticated
with for as long as they stayed open: a revoked token went on receiving every change, and
a token taken down to read went on writing over its WebSocket.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from tests.api.test_token_reload import write_tokens
from tests.service_process import ServiceProcess
from tests.streams.test_sse import iter_events
from tests.streams.test_websocket import command, connect, receive, subscribe, until

OPS = "ops-token-0123456789abcdef"
LEAKED = "leaked-token-0123456789abc"
Json = dict[str, Any]


def token(name: str, value: str, role: str, namespaces: list[str] | None = None) -> Json:
    entry: Json = {"name": name, "token": value, "role": role}
    if namespaces is not None:
        entry["namespaces"] = namespaces
    return entry


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    return tmp_path / "tokens.json"


@pytest.fixture
def proc(tmp_path: Path, tokens_file: Path) -> Iterator[ServiceProcess]:
    """A service whose tokens come from ``tokens_file`` only (written by the test first)."""
    write_tokens(tokens_file, [token("ops", OPS, "admin")])
    env = {"TWIN_AUTH__TOKENS": "[]", "TWIN_AUTH__TOKENS_FILE": str(tokens_file)}
    service = ServiceProcess(tmp_path / "data", env=env).start()
    try:
        yield service
    finally:
        service.stop()


def reload(proc: ServiceProcess, tokens_file: Path, entries: list[Json]) -> None:
    """Put ``entries`` in force: writes the file, sends SIGHUP, and waits until a token new
    in it is accepted (no deadline of its own: the run's timeout ends a wait that never
    ends)."""
    marker = f"marker-{uuid.uuid4().hex}"
    write_tokens(tokens_file, [*entries, token(marker[:20], marker, "read")])
    assert proc.proc is not None
    proc.proc.send_signal(signal.SIGHUP)
    while True:
        with proc.client(token=marker) as api:
            if api.get("/api/v1/twins/org.reload:marker").status_code != 401:
                return
        assert proc.proc.poll() is None, proc.log_tail()
        time.sleep(0.05)


async def reload_async(proc: ServiceProcess, tokens_file: Path, entries: list[Json]) -> None:
    await asyncio.to_thread(reload, proc, tokens_file, entries)


def test_a_websocket_of_a_revoked_token_is_closed_and_one_that_stays_goes_on(
    proc: ServiceProcess, tokens_file: Path
) -> None:
    ns = f"org.revoke{uuid.uuid4().hex[:8]}"
    ops, leaked = token("ops", OPS, "admin"), token("leaked", LEAKED, "read")

    async def run() -> None:
        reload(proc, tokens_file, [ops, leaked])
        async with (
            connect(proc, LEAKED) as revoked,
            connect(proc, OPS) as kept,
            proc.async_client(token=OPS) as api,
        ):
            for ws in (revoked, kept):
                await subscribe(ws, id="s", namespaces=[ns])
            await api.put(f"/api/v1/twins/{ns}:before", json={})
            for ws in (revoked, kept):
                assert (await receive(ws))["event"]["twinId"] == f"{ns}:before"

            await reload_async(proc, tokens_file, [ops])
            await api.put(f"/api/v1/twins/{ns}:after", json={})
            after = await receive(kept)
            assert after["type"] == "event" and after["event"]["twinId"] == f"{ns}:after"

            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    message = await receive(revoked)
                    assert message.get("type") != "event", f"a revoked token got {message}"
            received = closed.value.rcvd
            assert received is not None, "the connection was dropped without a close frame"
            assert received.code == 4401
            assert "revoked" in received.reason, received.reason
            # The token that stays still writes and reads over its connection.
            reply = await command(kept, "w", command="put", twinId=f"{ns}:kept", value={})
            assert reply["status"] == 201, reply
            event = await until(kept, lambda m: m.get("type") == "event")
            assert event["event"]["twinId"] == f"{ns}:kept"

    asyncio.run(run())


def test_an_sse_stream_of_a_revoked_token_ends_and_one_that_stays_goes_on(
    proc: ServiceProcess, tokens_file: Path
) -> None:
    ns = f"org.revoke{uuid.uuid4().hex[:8]}"
    ops, leaked = token("ops", OPS, "admin"), token("leaked", LEAKED, "read")
    reload(proc, tokens_file, [ops, leaked])
    params = {"namespaces": ns}
    url = "/api/v1/stream/twins"
    with (
        proc.client(token=LEAKED) as leaked_api,
        proc.client(token=OPS) as api,
        leaked_api.stream("GET", url, params=params, timeout=30) as revoked,
        api.stream("GET", url, params=params, timeout=30) as kept,
    ):
        assert revoked.status_code == kept.status_code == 200
        revoked_events, kept_events = iter_events(revoked), iter_events(kept)
        assert next(revoked_events)["event"] == "subscribed"
        assert next(kept_events)["event"] == "subscribed"

        reload(proc, tokens_file, [ops])
        assert api.put(f"/api/v1/twins/{ns}:after", json={}).status_code == 201
        after = next(kept_events)
        assert after["event"] == "event", after
        assert after["data"]["event"]["twinId"] == f"{ns}:after"

        # A `revoked` event (no change made after the reload), then the end of the stream.
        ended = next(revoked_events)
        assert ended["event"] == "revoked", ended
        assert ended["data"]["status"] == 401, ended
        assert ended["data"]["error"] == "auth.revoked", ended
        assert next(revoked_events, None) is None
    with proc.client(token=LEAKED) as leaked_api:
        assert leaked_api.get(url, params=params).status_code == 401


def test_a_websocket_of_a_downgraded_token_goes_on_with_its_new_role_and_namespaces(
    proc: ServiceProcess, tokens_file: Path
) -> None:
    kept_ns, lost_ns = (f"org.keep{uuid.uuid4().hex[:8]}", f"org.lose{uuid.uuid4().hex[:8]}")
    ops = token("ops", OPS, "admin")
    twin = f"{kept_ns}:pump"

    async def run() -> None:
        reload(proc, tokens_file, [ops, token("leaked", LEAKED, "write", [kept_ns, lost_ns])])
        async with connect(proc, LEAKED) as ws, proc.async_client(token=OPS) as api:
            await subscribe(ws, id="s", namespaces=[kept_ns, lost_ns])
            reply = await command(ws, "w1", command="put", twinId=twin, value={"desired": {"a": 1}})
            assert reply["status"] == 201, reply
            assert (await until(ws, lambda m: m.get("type") == "event"))["seq"]
            revision = (await api.get(f"/api/v1/twins/{twin}")).json()["revision"]

            await reload_async(proc, tokens_file, [ops, token("leaked", LEAKED, "read", [kept_ns])])
            reply = await command(ws, "w2", command="put", twinId=twin, path="/desired/a", value=2)
            assert reply["type"] == "error" and reply["status"] == 403, reply
            assert reply["error"]["error"] == "auth.forbidden", reply
            unchanged = (await api.get(f"/api/v1/twins/{twin}")).json()
            assert unchanged["revision"] == revision and unchanged["desired"] == {"a": 1}

            # The namespace taken away delivers nothing more; the one kept goes on (events
            # come in journal order: the second's, with none before it, tells).
            await api.put(f"/api/v1/twins/{lost_ns}:gone", json={})
            await api.put(f"/api/v1/twins/{kept_ns}:still", json={})
            event = await receive(ws)
            assert event["type"] == "event", event
            assert event["event"]["twinId"] == f"{kept_ns}:still", event
            read = await command(ws, "r", command="get", twinId=twin)
            assert read["status"] == 200 and read["body"]["desired"] == {"a": 1}, read

    asyncio.run(run())


def test_a_websocket_authenticated_by_its_first_message_is_closed_when_revoked(
    proc: ServiceProcess, tokens_file: Path
) -> None:
    ns = f"org.revoke{uuid.uuid4().hex[:8]}"
    ops, leaked = token("ops", OPS, "admin"), token("leaked", LEAKED, "write")

    async def run() -> None:
        reload(proc, tokens_file, [ops, leaked])
        async with connect(proc, None) as ws:
            await ws.send(json.dumps({"type": "auth", "token": LEAKED}))
            assert (await receive(ws))["type"] == "welcome"
            await subscribe(ws, id="s", namespaces=[ns])
            await reload_async(proc, tokens_file, [ops])
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    message = await receive(ws)
                    assert message.get("type") != "event", message
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
        with httpx.Client(base_url=proc.url) as plain:
            assert plain.get("/health").status_code == 200

    asyncio.run(run())
