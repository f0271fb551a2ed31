"""WebSocket change streams and commands against the real service."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from tests.service_process import ACME_TOKEN, ADMIN_TOKEN, READER_TOKEN, ServiceProcess

Json = dict[str, Any]


def ws_url(service: ServiceProcess) -> str:
    return service.url.replace("http://", "ws://") + "/api/v1/ws"


@asynccontextmanager
async def connect(
    service: ServiceProcess, token: str | None = ADMIN_TOKEN, **kwargs: Any
) -> AsyncIterator[ClientConnection]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with websockets.connect(ws_url(service), additional_headers=headers, **kwargs) as ws:
        if token:
            welcome = await receive(ws)
            assert welcome["type"] == "welcome"
        yield ws


async def receive(ws: ClientConnection, timeout: float = 15.0) -> Json:
    message: Json = json.loads(await asyncio.wait_for(ws.recv(), timeout))
    return message


async def send(ws: ClientConnection, message: Json) -> None:
    await ws.send(json.dumps(message))


async def until(ws: ClientConnection, predicate: Callable[[Json], bool]) -> Json:
    while True:
        message = await receive(ws)
        if predicate(message):
            return message


async def subscribe(ws: ClientConnection, **fields: Any) -> Json:
    await send(ws, {"type": "subscribe", **fields})
    reply = await receive(ws)
    assert reply["type"] == "subscribed", reply
    return reply


async def command(ws: ClientConnection, correlation: str, **fields: Any) -> Json:
    await send(ws, {"type": "command", "correlationId": correlation, **fields})
    return await until(ws, lambda m: m.get("correlationId") == correlation)


def namespace() -> str:
    return f"org.ws{uuid.uuid4().hex[:10]}"


def test_subscribe_filter_enter_leave_fields_unsubscribe(service: ServiceProcess) -> None:
    ns = namespace()

    async def run() -> None:
        async with connect(service) as ws, service.async_client() as api:
            await subscribe(
                ws,
                id="s1",
                filter='eq(attributes/site,"a")',
                namespaces=[ns],
                fields="attributes,revision",
            )
            await api.put(f"/api/v1/twins/{ns}:x", json={"attributes": {"site": "b"}})
            await api.put(f"/api/v1/twins/{ns}:y", json={"attributes": {"site": "a"}})
            entered = await receive(ws)
            assert entered["type"] == "event" and entered["subscription"] == "s1"
            assert entered["event"]["twinId"] == f"{ns}:y"
            assert entered["event"]["action"] == "created"
            assert entered["twin"] == {"attributes": {"site": "a"}, "revision": 1}
            await api.put(f"/api/v1/twins/{ns}:y/attributes/site", json="c")
            left = await receive(ws)
            assert left["type"] == "left" and left["event"]["twinId"] == f"{ns}:y"
            assert left["event"]["changes"] == {"attributes": {"site": "c"}}
            assert left["seq"] > entered["seq"]
            # A twin that did not match before and does not match now produces nothing.
            await api.put(f"/api/v1/twins/{ns}:y/attributes/site", json="d")
            await api.put(f"/api/v1/twins/{ns}:x/attributes/site", json="a")
            entered_x = await receive(ws)
            assert entered_x["event"]["twinId"] == f"{ns}:x"
            await api.delete(f"/api/v1/twins/{ns}:x")
            deleted = await receive(ws)
            assert deleted["type"] == "event" and deleted["event"]["action"] == "deleted"
            assert deleted["twin"] is None
            await send(ws, {"type": "unsubscribe", "id": "s1"})
            assert (await receive(ws))["type"] == "unsubscribed"
            await api.put(f"/api/v1/twins/{ns}:z", json={"attributes": {"site": "a"}})
            result = await command(ws, "probe", command="get", twinId=f"{ns}:z")
            assert result["type"] == "response"  # nothing else arrived in between

    asyncio.run(run())


def test_twins_subscription_and_namespace_visibility(service: ServiceProcess) -> None:
    async def run() -> None:
        async with connect(service, ACME_TOKEN) as ws, service.async_client() as api:
            await subscribe(ws, id="all")
            await api.put("/api/v1/twins/org.other:hidden", json={"desired": {"a": 1}})
            await api.put(f"/api/v1/twins/org.acme:{uuid.uuid4().hex}", json={})
            event = await receive(ws)
            assert event["event"]["twinId"].startswith("org.acme:")
        async with connect(service) as ws, service.async_client() as api:
            twin = f"{namespace()}:only"
            await subscribe(ws, id="one", twins=[twin])
            await api.put(f"/api/v1/twins/{namespace()}:other", json={})
            await api.put(f"/api/v1/twins/{twin}", json={})
            assert (await receive(ws))["event"]["twinId"] == twin

    asyncio.run(run())


def test_commands_with_correlation_ids(service: ServiceProcess) -> None:
    ns = namespace()
    twin = f"{ns}:cmd"

    async def run() -> None:
        async with connect(service) as ws:
            created = await command(
                ws, "c1", command="put", twinId=twin, value={"desired": {"fan": {"speed": 1}}}
            )
            assert created["status"] == 201 and created["body"]["revision"] == 1
            value = await command(
                ws, "c2", command="put", twinId=twin, path="/desired/fan/speed", value=3
            )
            assert value["status"] == 200 and value["body"]["revision"] == 2
            merged = await command(
                ws, "c3", command="patch", twinId=twin, value={"reported": {"fan": {"speed": 3}}}
            )
            assert merged["status"] == 200
            patched = await command(
                ws,
                "c4",
                command="patch",
                patchType="json",
                twinId=twin,
                value=[{"op": "add", "path": "/attributes/site", "value": "s"}],
            )
            assert patched["body"]["revision"] == 4
            got = await command(ws, "c5", command="get", twinId=twin, fields="desired,delta")
            assert got["body"] == {"desired": {"fan": {"speed": 3}}, "delta": {}}
            leaf = await command(ws, "c6", command="get", twinId=twin, path="/attributes/site")
            assert leaf["body"] == "s"
            found = await command(
                ws,
                "c7",
                command="search",
                filter='eq(attributes/site,"s")',
                namespaces=ns,
                fields="twinId",
            )
            assert found["body"] == {"items": [{"twinId": twin}]}
            failed = await command(
                ws, "c8", command="delete", twinId=twin, condition='eq(attributes/site,"x")'
            )
            assert failed["type"] == "error" and failed["status"] == 412
            assert failed["error"]["error"] == "twin.condition.failed"
            stale = await command(
                ws, "c9", command="put", twinId=twin, path="/live/a", value=1, ifMatch=1
            )
            assert stale["error"]["error"] == "twin.precondition.failed"
            bad = await command(ws, "c10", command="get", twinId="no separator")
            assert bad["status"] == 400 and bad["error"]["error"] == "twin.id.invalid"
            bad_rql = await command(ws, "c11", command="search", filter="eq(")
            assert bad_rql["error"]["error"] == "rql.syntax" and "position" in bad_rql["error"]
            unknown = await command(ws, "c12", command="explode", twinId=twin)
            assert unknown["status"] == 400
            await ws.send("{not json")
            malformed = await until(ws, lambda m: m["type"] == "error")
            assert malformed["error"]["error"] == "json.invalid"
            deleted = await command(ws, "c13", command="delete", twinId=twin)
            assert deleted["status"] == 204
            gone = await command(ws, "c14", command="get", twinId=twin)
            assert gone["status"] == 404 and gone["error"]["error"] == "twin.notfound"
        async with connect(service, READER_TOKEN) as ws:
            denied = await command(ws, "r1", command="put", twinId=twin, value={})
            assert denied["status"] == 403 and denied["error"]["error"] == "auth.forbidden"

    asyncio.run(run())


def test_a_command_that_would_store_a_null_is_refused_as_over_rest(
    service: ServiceProcess,
) -> None:
    """The WebSocket's writes take the same rule as REST's (docs/api.md, No nulls): a null
    member is 400 twin.invalid naming its pointer and changes nothing; null in a merge
    patch deletes."""
    twin = f"{namespace()}:nulls"

    async def run() -> None:
        async with connect(service) as ws:
            created = await command(
                ws, "c0", command="put", twinId=twin, value={"desired": {"a": 1}}
            )
            assert created["status"] == 201, created
            refusals = [
                {"command": "put", "value": {"desired": {"a": 1, "b": None}}},
                {"command": "put", "path": "/desired/a", "value": None},
                {"command": "put", "path": "/reported", "value": {"x/y": {"z": None}}},
                {
                    "command": "patch",
                    "patchType": "json",
                    "value": [{"op": "add", "path": "/live/t", "value": None}],
                },
            ]
            pointers = ["/desired/b", "/desired/a", "/reported/x~1y/z", "/live/t"]
            for n, (fields, pointer) in enumerate(zip(refusals, pointers, strict=True)):
                refused = await command(ws, f"n{n}", twinId=twin, **fields)
                assert refused["type"] == "error" and refused["status"] == 400, refused
                assert refused["error"]["error"] == "twin.invalid", refused
                assert f"The value at {pointer} is null" in refused["error"]["message"]
            got = await command(ws, "g", command="get", twinId=twin)
            assert got["body"]["revision"] == 1 and got["body"]["desired"] == {"a": 1}
            merged = await command(
                ws, "m", command="patch", twinId=twin, value={"desired": {"a": None}}
            )
            assert merged["status"] == 200 and merged["body"]["revision"] == 2, merged
            after = await command(ws, "g2", command="get", twinId=twin, path="/desired")
            assert after["body"] == {}, after

    asyncio.run(run())


def test_commands_give_a_time_to_live_as_rest_does(service: ServiceProcess) -> None:
    """``ttl`` on a put or patch, as REST's ``?ttl=``: the desired value expires unapplied.
    The WebSocket used to ignore it (and an ``ifNoneMatch`` other than ``*``) silently."""
    twin = f"{namespace()}:ttl"

    async def run() -> None:
        async with connect(service) as ws:
            created = await command(ws, "c", command="put", twinId=twin, value={}, ttl=60)
            assert created["status"] == 201, created
            refused = [
                await command(ws, f"b{n}", command="put", twinId=twin, value=1, **fields)
                for n, fields in enumerate(
                    [
                        {"path": "/desired/led", "ttl": ttl}
                        for ttl in (0, -1, "5", True, 1e300, 100 * 365 * 24 * 3600 + 1)
                    ]
                    + [{"path": "/desired/led", "ifNoneMatch": "x"}]
                )
            ]
            for reply in refused:
                assert (reply["status"], reply["error"]["error"]) == (400, "request.invalid")
            put = await command(
                ws, "p", command="patch", twinId=twin, path="/desired", value={"led": 1}, ttl=0.3
            )
            assert put["body"]["revision"] == 2, put  # nothing refused was written
            led = await command(ws, "g", command="get", twinId=twin, path="/lifecycle/led")
            assert (
                led["body"]["state"] == "pending" and led["body"]["expires"] > led["body"]["since"]
            )
            for attempt in range(100):
                await asyncio.sleep(0.05)
                led = await command(
                    ws, f"g{attempt}", command="get", twinId=twin, path="/lifecycle/led"
                )
                if led["body"]["state"] == "expired":
                    break
            assert led["body"]["state"] == "expired", led

    asyncio.run(run())


def test_authentication_failures_and_first_message_auth(service: ServiceProcess) -> None:
    async def run() -> None:
        async with connect(service, token=None) as ws:
            await send(ws, {"type": "subscribe", "id": "x"})
            with pytest.raises(ConnectionClosed) as closed:
                await receive(ws)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
        async with connect(service, token=None) as ws:
            await send(ws, {"type": "auth", "token": "wrong-token-wrong-token"})
            with pytest.raises(ConnectionClosed) as closed:
                await receive(ws)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
        headers = {"Authorization": "Bearer nope-nope-nope-nope"}
        async with websockets.connect(ws_url(service), additional_headers=headers) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await receive(ws)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
        async with connect(service, token=None) as ws:
            await send(ws, {"type": "auth", "token": ADMIN_TOKEN})
            assert (await receive(ws))["type"] == "welcome"
            await subscribe(ws, id="ok")

    asyncio.run(run())


def test_an_encoded_slash_in_the_websocket_path_is_refused_as_no_such_path(
    service: ServiceProcess,
) -> None:
    """``/api%2Fv1/ws`` was accepted as ``/api/v1/ws`` (HTTP routes refuse an encoded slash
    outside a JSON pointer): a proxy rule on the path prefix let it through. Refused before
    the accept, as a path that names no WebSocket route is."""
    base = service.url.replace("http://", "ws://")
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    async def refused(path: str) -> int:
        with pytest.raises(websockets.exceptions.InvalidStatus) as refusal:
            async with websockets.connect(base + path, additional_headers=headers):
                pass
        return refusal.value.response.status_code

    async def run() -> None:
        unknown = await refused("/api/v1/nosuch")
        assert unknown == 403
        for path in ("/api%2Fv1/ws", "/api/v1%2Fws", "/api/v1%2fws", "/api/v1/ws%2F"):
            assert await refused(path) == unknown, path
        async with connect(service) as ws:  # the plain path still connects
            await subscribe(ws, id="ok")

    asyncio.run(run())


def test_no_token_nor_message_of_a_websocket_is_logged_at_debug(
    service_factory: Callable[..., ServiceProcess],
) -> None:
    """websockets traced each handshake header and frame at DEBUG on uvicorn's logger: the
    bearer tokens, rejected ones too, and every message's content."""
    proc = service_factory(env={"TWIN_LOG_LEVEL": "debug"})
    rejected = "rejected-token-0123456789"

    async def run() -> None:
        async with connect(proc, token=READER_TOKEN) as ws:
            await subscribe(ws, id="by-header")
        async with connect(proc, token=None) as ws:
            await send(ws, {"type": "auth", "token": ADMIN_TOKEN})
            assert (await receive(ws))["type"] == "welcome"
            await subscribe(ws, id="by-message")
        async with connect(proc, token=None) as ws:
            await send(ws, {"type": "auth", "token": rejected})
            with pytest.raises(ConnectionClosed):
                await receive(ws)

    asyncio.run(run())
    proc.stop()
    log = proc.log_path.read_text()
    assert "DEBUG" in log  # the service did log at debug
    for secret in (READER_TOKEN, ADMIN_TOKEN, rejected, "by-message"):
        assert secret not in log, [line for line in log.splitlines() if secret in line]


def test_binary_and_oversized_frames_close_the_socket_and_replies_echo_only_short_correlations(
    service: ServiceProcess,
) -> None:
    async def closed_by(ws: ClientConnection) -> tuple[int, str]:
        with pytest.raises(ConnectionClosed) as closed:
            await receive(ws)
        assert closed.value.rcvd is not None
        return closed.value.rcvd.code, closed.value.rcvd.reason

    async def run() -> None:
        async with connect(service) as ws:
            await subscribe(ws, id="before")
            await ws.send(b'{"type": "subscribe", "id": "binary"}')
            assert await closed_by(ws) == (1003, "Messages are JSON in text frames.")
        async with connect(service, token=None) as ws:  # instead of the auth message
            await ws.send(json.dumps({"type": "auth", "token": ADMIN_TOKEN}).encode())
            assert (await closed_by(ws))[0] == 1003
        async with connect(service) as ws:
            long_id = "x" * 10_000
            await send(ws, {"type": "subscribe", "id": long_id})
            refused = await receive(ws)
            assert refused["type"] == "error" and refused["correlationId"] is None
            await send(ws, {"type": "command", "correlationId": {"a": 1}})
            assert (await receive(ws))["correlationId"] is None
            await send(ws, {"type": "command", "correlationId": 7})
            assert (await receive(ws))["correlationId"] == 7
        # limits.max_request_bytes (1 MiB) bounds a message as it bounds a request body:
        # just under it gets its answer, just over it closes the socket (1009, too big).
        async with connect(service, max_size=None) as ws:
            head = '{"type": "command", "correlationId": "big", "value": "'
            padding = 1024 * 1024 - len(head) - 2
            await ws.send(head + "x" * padding + '"}')
            assert (await receive(ws))["correlationId"] == "big"
            await ws.send(head + "x" * (padding + 1) + '"}')
            assert (await closed_by(ws))[0] == 1009
        # The service logged no failure of its own for any of it.
        assert "Traceback" not in service.log_tail(100_000)

    asyncio.run(run())


def test_resume_after_disconnect_during_burst(service: ServiceProcess) -> None:
    """A burst of writes; the client drops mid-burst and resumes with since: no gap, no
    duplicate."""
    ns = namespace()
    # FerretDB (the MongoDB-wire server of the tests) takes about 15 PATCHes a second: 1,000
    # took 70-80 s there, for the same property as 300.
    total = 300 if service.env.get("TWIN_STORE") == "mongodb" else 1000

    async def writer(api: httpx.AsyncClient) -> None:
        semaphore = asyncio.Semaphore(16)

        async def one(i: int) -> None:
            async with semaphore:
                response = await api.put(f"/api/v1/twins/{ns}:t{i % 20}/reported/n{i}", json=i)
                assert response.status_code in (201, 204)

        await asyncio.gather(*(one(i) for i in range(total)))

    async def run() -> None:
        seen: list[int] = []
        async with service.async_client() as api:
            for t in range(20):
                assert (await api.put(f"/api/v1/twins/{ns}:t{t}", json={})).status_code == 201
            async with connect(service) as ws:
                start = (await subscribe(ws, id="s", namespaces=[ns]))["seq"]
                burst = asyncio.create_task(writer(api))
                while len(seen) < total * 3 // 10:
                    message = await receive(ws)
                    assert message["type"] == "event"
                    seen.append(message["seq"])
            # Disconnected while the burst goes on; resume from the last seq received.
            await asyncio.sleep(0.2)
            async with connect(service) as ws:
                await subscribe(ws, id="s", namespaces=[ns], since=seen[-1])
                while len(seen) < total:
                    message = await receive(ws)
                    assert message["type"] == "event"
                    seen.append(message["seq"])
                await burst
        assert len(seen) == len(set(seen)) == total, "duplicates"
        assert seen == sorted(seen), "out of order"
        assert seen[0] > start
        # Every event of the namespace is there: compare with the journal's own history.
        async with service.async_client() as api:
            revisions = 0
            for t in range(20):
                url = f"/api/v1/twins/{ns}:t{t}/history"
                history = (await api.get(url, params={"limit": 1000})).json()["items"]
                revisions += len(history)
        # 20 creations before the subscription + the writes it saw.
        assert revisions == total + 20

    asyncio.run(run())


def test_resync_required_when_journal_was_pruned(
    service_factory: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    proc = service_factory(env={"TWIN_STREAM__JOURNAL_MAX_PER_TWIN": "1"})
    twin = "org.acme:pruned"

    async def run() -> None:
        async with proc.async_client() as api:
            await api.put(f"/api/v1/twins/{twin}", json={})
            for i in range(130):  # pruning runs every 64 revisions
                await api.put(f"/api/v1/twins/{twin}/desired/n", json=i)
            history = (await api.get(f"/api/v1/twins/{twin}/history")).json()["items"]
            assert len(history) < 130
            expired = await api.get(f"/api/v1/twins/{twin}", params={"at": 3})
            assert expired.status_code == 410 and expired.json()["error"] == "history.expired"
            expired = await api.get(f"/api/v1/twins/{twin}/history", params={"since": 2})
            assert expired.status_code == 410
        async with connect(proc) as ws:
            await send(ws, {"type": "subscribe", "id": "old", "since": 0})
            reply = await receive(ws)
            assert reply["type"] == "resync.required" and reply["subscription"] == "old"
            async with proc.async_client() as api:
                await api.put(f"/api/v1/twins/{twin}/desired/n", json=-1)
            live = await receive(ws)  # still subscribed live from the current position
            assert live["type"] == "event" and live["seq"] > reply["seq"]
            head = live["seq"]
            # Resuming at the newest event is the normal case; beyond it, the reader's
            # position comes from another journal (a restored or replaced database).
            await subscribe(ws, id="current", since=head)
            await send(ws, {"type": "subscribe", "id": "other", "since": head + 1000})
            reply = await until(ws, lambda m: m.get("subscription") == "other")
            assert reply["type"] == "resync.required" and reply["seq"] == head, reply
            assert f"beyond the newest event of this journal ({head})" in reply["message"]
            async with proc.async_client() as api:
                await api.put(f"/api/v1/twins/{twin}/desired/n", json=-2)
            # Both go on live.
            live = [await receive(ws), await receive(ws), await receive(ws)]
            got = sorted(m["subscription"] for m in live if m["type"] == "event")
            assert got == ["current", "old", "other"], live

    asyncio.run(run())


def _masked_text_frame(text: str) -> bytes:
    data = text.encode()
    mask = os.urandom(4)
    length = (
        bytes([0x80 | len(data)])
        if len(data) < 126
        else bytes([0xFE]) + len(data).to_bytes(2, "big")
    )
    return bytes([0x81]) + length + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def test_slow_consumer_is_closed_with_resume_hint(
    service_factory: Callable[..., ServiceProcess],
) -> None:
    """A client that reads far slower than its stream is written: the server must cut it
    off with the resume hint, not buffer without bound.

    A raw socket with a tiny receive buffer stands for the slow consumer (client libraries
    keep reading into their own buffers, which would hide the server's behaviour). It reads
    a little all along: one that read nothing for 5 s would be aborted, no close frame
    (api/closing.py's UnreadCut), and under load the burst alone took longer than that.
    """
    proc = service_factory(env={"TWIN_STREAM__QUEUE_SIZE": "10"})
    twin = "org.acme:firehose"
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", proc.port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            "GET /api/v1/ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\r\n"
        ).encode()
    )
    handshake = sock.recv(4096)
    assert handshake.startswith(b"HTTP/1.1 101")
    sock.sendall(_masked_text_frame(json.dumps({"type": "subscribe", "id": "s", "fields": "live"})))

    async def write_burst() -> None:
        async with proc.async_client() as api:
            await api.put(f"/api/v1/twins/{twin}", json={})
            blob = "x" * 30_000
            for i in range(400):
                response = await api.put(f"/api/v1/twins/{twin}/live/blob", json=f"{i}{blob}")
                assert response.status_code in (201, 204)  # a stuck reader never blocks writers

    burst_done = threading.Event()
    received = bytearray()

    def read_slowly_then_all() -> None:
        sock.settimeout(20)
        while not burst_done.is_set():  # 4 KiB every 50 ms, far below the burst's rate
            chunk = sock.recv(4096)
            if not chunk:
                return
            received.extend(chunk)
            time.sleep(0.05)
        while chunk := sock.recv(1 << 20):
            received.extend(chunk)

    reader = threading.Thread(target=read_slowly_then_all)
    reader.start()
    try:
        asyncio.run(write_burst())
    finally:
        burst_done.set()
        reader.join()
    sock.close()
    # The last frame is a close frame: 0x88, length, code 4408, then the reason.
    close_at = received.rfind(b"\x88")
    assert close_at > 0
    code = int.from_bytes(received[close_at + 2 : close_at + 4], "big")
    reason = received[close_at + 4 :].decode()
    assert code == 4408
    assert reason.startswith("slow consumer: resume with since=")
    assert received.count(b'"type":"event"') < 400


async def _two_events_in_order(proc: ServiceProcess, ws: ClientConnection) -> None:
    ns = namespace()
    await subscribe(ws, id="d", namespaces=[ns])
    async with proc.async_client() as api:
        for i in range(2):
            await api.put(f"/api/v1/twins/{ns}:t", json={"attributes": {"n": i, "pad": "ab" * 200}})
    first, second = await receive(ws), await receive(ws)
    assert first["type"] == second["type"] == "event"
    assert [first["event"]["action"], second["event"]["action"]] == ["created", "modified"]
    assert second["seq"] > first["seq"]


def test_server_declines_per_message_deflate_by_default(service: ServiceProcess) -> None:
    async def run() -> None:
        async with connect(service, compression="deflate") as ws:
            assert ws.protocol.extensions == []
            await _two_events_in_order(service, ws)

    asyncio.run(run())


def test_per_message_deflate_when_enabled(
    service_factory: Callable[..., ServiceProcess],
) -> None:
    proc = service_factory(env={"TWIN_STREAM__WEBSOCKET_DEFLATE": "true"})

    async def run() -> None:
        async with connect(proc, compression="deflate") as ws:
            assert [type(e).__name__ for e in ws.protocol.extensions] == ["PerMessageDeflate"]
            await _two_events_in_order(proc, ws)

    asyncio.run(run())


def test_subscribers_after_unobserved_changes_see_the_right_before_state(
    service_factory: Callable[..., ServiceProcess],
) -> None:
    """With nobody subscribed the hub skips the journal; a twin deleted and created again
    meanwhile must not be judged on what the hub remembered of its first incarnation."""
    proc = service_factory()
    ns = namespace()
    url = f"/api/v1/twins/{ns}:x"

    async def run() -> None:
        async with proc.async_client() as api:
            async with connect(proc) as ws:
                await subscribe(ws, id="all", namespaces=[ns])
                await api.put(url, json={"attributes": {"site": "a"}})
                for n in (1, 2):
                    await api.put(f"{url}/desired/n", json=n)
                for _ in range(3):
                    assert (await receive(ws))["type"] == "event"
            await asyncio.sleep(0.3)  # the session is gone: nobody listens
            assert (await api.delete(url)).status_code == 204
            await api.put(url, json={"attributes": {"site": "b"}})
            for n in (1, 2):
                await api.put(f"{url}/desired/n", json=n)  # revision 3 again
            await asyncio.sleep(0.3)
            async with connect(proc) as ws:
                await subscribe(ws, id="a", filter='eq(attributes/site,"a")', namespaces=[ns])
                # Site b before and after: nothing for this subscription (a stale "before"
                # of the first incarnation, site a, would make it a "left").
                await api.put(f"{url}/desired/n", json=3)
                await api.put(f"/api/v1/twins/{ns}:probe", json={"attributes": {"site": "a"}})
                message = await receive(ws)
                assert message["type"] == "event", message
                assert message["event"]["twinId"] == f"{ns}:probe"

    asyncio.run(run())


def test_resuming_ahead_of_a_replica_that_has_not_seen_the_commit_yet_repeats_nothing(
    service_factory: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    """A reader that saw seq S on replica A resumes on replica B before B learned of S
    (two processes on one SQLite file; B polls the journal every 2 s). S reaches B later,
    as a live event: the reader must not get it a second time."""
    data = tmp_path / "shared"
    a = service_factory(data)
    b = service_factory(data, env={"TWIN_STREAM__POLL_INTERVAL_SECONDS": "2"})
    twin = "org.acme:ahead"

    async def run() -> None:
        async with a.async_client() as api_a, connect(b) as ws:
            assert (await api_a.put(f"/api/v1/twins/{twin}", json={})).status_code == 201
            for attempt in range(5):
                write = await api_a.put(f"/api/v1/twins/{twin}/desired/n", json=attempt)
                seen = int(write.headers["X-Twin-Seq"])
                reply = await subscribe(ws, id=f"s{attempt}", twins=[twin], since=seen)
                if reply["seq"] < seen:  # B had not polled since the write: the case
                    break
                await send(ws, {"type": "unsubscribe", "id": f"s{attempt}"})
                await until(ws, lambda m: m["type"] == "unsubscribed")
            else:
                pytest.fail("replica B saw every write at once: the case did not arise")
            # B's next poll brings `seen` to it; then a write the reader has not seen.
            await asyncio.sleep(3)
            later = await api_a.put(f"/api/v1/twins/{twin}/desired/n", json="later")
            event = await receive(ws, timeout=10)
            assert event["type"] == "event", event
            assert event["seq"] == int(later.headers["X-Twin-Seq"]) > seen, (event, seen)

    asyncio.run(run())


def test_a_connection_holds_at_most_max_subscriptions(service: ServiceProcess) -> None:
    async def run() -> None:
        async with connect(service) as ws:
            for number in range(100):  # stream.max_subscriptions, by default
                await subscribe(ws, id=f"s{number}")
            await send(ws, {"type": "subscribe", "id": "one-too-many"})
            refused = await receive(ws)
            assert (refused["type"], refused["status"]) == ("error", 400), refused
            assert refused["error"]["error"] == "limits.exceeded"
            assert "stream.max_subscriptions" in refused["error"]["message"]
            await send(ws, {"type": "unsubscribe", "id": "s0"})
            assert (await receive(ws))["found"] is True
            await subscribe(ws, id="one-too-many")

    asyncio.run(run())


def test_a_connection_lists_at_most_max_listed_twins_and_namespaces(
    service: ServiceProcess,
) -> None:
    """Each id a subscription lists is held by the connection: 25,000 in one message took
    7 MB of the service's memory, a hundred times over per connection, before the limit."""
    ids = [f"org.listed:t{n}" for n in range(10_001)]

    async def run() -> None:
        async with connect(service) as ws:
            await subscribe(ws, id="a", twins=ids[:6000], namespaces=["org.listed"])
            await send(ws, {"type": "subscribe", "id": "b", "twins": ids[6000:]})
            refused = await receive(ws)  # 6,001 + 4,001 > 10,000 (stream.max_listed)
            assert (refused["type"], refused["status"]) == ("error", 400), refused
            assert refused["error"]["error"] == "limits.exceeded"
            assert "stream.max_listed" in refused["error"]["message"]
            await subscribe(ws, id="b", twins=ids[6000:9999])  # exactly 10,000 in all
            await send(ws, {"type": "unsubscribe", "id": "a"})
            assert (await receive(ws))["found"] is True
            await subscribe(ws, id="c", twins=ids[:6000])

    asyncio.run(run())


async def by_subscription_until_quiet(ws: ClientConnection) -> dict[str, list[Json]]:
    """The messages received until none comes for a second, by subscription (or
    correlation id)."""
    by_subscription: dict[str, list[Json]] = {}
    with pytest.raises(TimeoutError):
        while True:
            message = await receive(ws, timeout=1.0)
            key = message.get("subscription", message.get("correlationId"))
            by_subscription.setdefault(key, []).append(message)
    return by_subscription


@pytest.mark.parametrize("since", [0, 10**12])
def test_nothing_of_a_subscription_follows_its_unsubscribed(
    service: ServiceProcess, since: int
) -> None:
    """An unsubscribe sent right behind a subscribe with ``since`` is handled while the
    subscribe consults the journal: its ``subscribed`` (or, from beyond the journal, its
    ``resync.required``) came after the ``unsubscribed``, for a subscription gone. Then the
    subscribe got no answer at all: each gets its one answer, before the ``unsubscribed``."""

    async def run() -> None:
        async with connect(service) as ws:
            for n in range(10):
                await send(ws, {"type": "subscribe", "id": f"s{n}", "since": since})
                await send(ws, {"type": "unsubscribe", "id": f"s{n}"})
            by_subscription = await by_subscription_until_quiet(ws)
            for n in range(10):
                messages = by_subscription[f"s{n}"]
                types = [m["type"] for m in messages]
                assert types.count("unsubscribed") == 1, messages
                unsubscribed = types.index("unsubscribed")
                answers = [t for t in types if t in ("subscribed", "resync.required", "error")]
                assert len(answers) == 1 and types.index(answers[0]) < unsubscribed, types
                assert unsubscribed == len(types) - 1, types

    asyncio.run(run())


def test_the_values_of_a_filters_in_lists_count_in_max_listed(service: ServiceProcess) -> None:
    """A filter's in() values are held like listed ids (and tested by a set of them): 20
    subscriptions of an in of 65,536 values took 600 MB before they counted."""
    values = ",".join(str(n) for n in range(6000))

    async def run() -> None:
        async with connect(service) as ws:
            await subscribe(ws, id="a", filter=f"in(attributes/n,{values})")
            more = ",".join(str(n) for n in range(4500))
            too_many = f"or(in(attributes/n,{more}),eq(attributes/m,1))"
            await send(ws, {"type": "subscribe", "id": "b", "filter": too_many})
            refused = await receive(ws)  # 6,000 + 4,500 > 10,000 (stream.max_listed)
            assert (refused["type"], refused["status"]) == ("error", 400), refused
            assert refused["error"]["error"] == "limits.exceeded"
            assert "in values" in refused["error"]["message"], refused
            await subscribe(ws, id="b", twins=[f"org.listed:t{n}" for n in range(4000)])
            await send(ws, {"type": "unsubscribe", "id": "a"})
            assert (await receive(ws))["found"] is True
            await subscribe(ws, id="c", filter=too_many)

    asyncio.run(run())


def test_one_connection_gets_at_most_max_in_flight_messages_handled_at_once(
    service_factory: Callable[..., ServiceProcess],
) -> None:
    """With ``stream.max_in_flight`` 1, a burst of writes (each waits for its commit) and
    reads (none does) is answered strictly in the order sent: the next message is not even
    read before the one ahead is done. Handled side by side, the reads overtake the writes."""
    svc = service_factory(env={"TWIN_STREAM__MAX_IN_FLIGHT": "1"})
    ns = namespace()

    async def run() -> tuple[list[str], list[str]]:
        async with connect(svc) as ws:
            for name in ("written", "read"):
                reply = await command(ws, name, command="put", twinId=f"{ns}:{name}", value={})
                assert reply["status"] == 201, reply
            sent = []
            for i in range(40):
                sent.append(f"w{i}")
                await send(
                    ws,
                    {
                        "type": "command",
                        "correlationId": f"w{i}",
                        "command": "patch",
                        "twinId": f"{ns}:written",
                        "path": "/desired",
                        "value": {f"k{i}": "x" * 500},
                    },
                )
                sent.append(f"r{i}")
                await send(
                    ws,
                    {
                        "type": "command",
                        "correlationId": f"r{i}",
                        "command": "get",
                        "twinId": f"{ns}:read",
                    },
                )
            answered = []
            for _ in sent:
                reply = await receive(ws)
                assert reply["type"] == "response" and reply["status"] == 200, reply
                answered.append(reply["correlationId"])
            return answered, sent

    answered, sent = asyncio.run(run())
    assert answered == sent


def test_a_since_no_store_can_hold_is_refused(service: ServiceProcess) -> None:
    async def run() -> None:
        async with connect(service) as ws:
            await send(ws, {"type": "subscribe", "id": "s", "since": 2**63})
            refused = await receive(ws)
            assert (refused["type"], refused["status"]) == ("error", 400), refused
            assert "'since'" in refused["error"]["message"]
            await send(ws, {"type": "subscribe", "id": "s", "since": 2**63 - 1})
            beyond = await receive(ws)  # a number, beyond this journal: reload
            assert beyond["type"] == "resync.required", beyond

    asyncio.run(run())


@pytest.mark.parametrize("since", [None, 0])
def test_an_unsubscribe_and_subscribe_again_take_effect_in_the_order_sent(
    service: ServiceProcess, since: int | None
) -> None:
    """Subscribe with ``since``, unsubscribe, subscribe again under the same id, sent at once
    (a resume retried, as docs/api.md advises): the second subscribe was handled while the
    unsubscribe waited for the first one's answer, found the id still taken, and was refused
    ("already exists"); then the unsubscribe took the first one away, and the connection had
    no subscription at all. Those of one id take effect in the order sent."""
    ns = namespace()
    again = {} if since is None else {"since": since}

    async def run() -> None:
        async with connect(service) as ws:
            for n in range(10):
                first = {"type": "subscribe", "id": f"s{n}", "since": 0, "namespaces": [ns]}
                await send(ws, first)
                await send(ws, {"type": "unsubscribe", "id": f"s{n}"})
                await send(ws, {**first, **again})
            by_subscription = await by_subscription_until_quiet(ws)
            for n in range(10):
                messages = by_subscription[f"s{n}"]
                answers = [(m["type"], m.get("found")) for m in messages]
                expected = [("subscribed", None), ("unsubscribed", True), ("subscribed", None)]
                assert answers == expected, messages
            async with service.async_client() as api:
                assert (await api.put(f"/api/v1/twins/{ns}:t", json={})).status_code == 201
            events = [await receive(ws) for _ in range(10)]
            assert sorted(e["subscription"] for e in events) == [f"s{n}" for n in range(10)]

    asyncio.run(run())


def test_commands_answer_the_status_and_error_rest_does(service: ServiceProcess) -> None:
    """docs/api.md: commands have REST's semantics and errors. A write to a read-only view
    was 400 twin.readonly (REST: 405 request.method), a section that names nothing 400
    request.invalid (REST: 404 resource.notfound), and a put at a pointer always 200 (REST:
    201 for a new value; 204, here 200 since the reply has a body, otherwise)."""
    twin = f"{namespace()}:parity"

    async def run() -> None:
        async with connect(service) as ws, service.async_client() as api:
            assert (await api.put(f"/api/v1/twins/{twin}", json={})).status_code == 201
            cases: list[tuple[Json, str, str, Any]] = [
                ({"command": "put", "path": "/delta", "value": {}}, "PUT", "/delta", {}),
                ({"command": "patch", "path": "/metadata", "value": {}}, "PATCH", "/metadata", {}),
                ({"command": "delete", "path": "/lifecycle/x"}, "DELETE", "/lifecycle/x", None),
                ({"command": "get", "path": "/bogus"}, "GET", "/bogus", None),
                ({"command": "put", "path": "/bogus/a", "value": 1}, "PUT", "/bogus/a", 1),
            ]
            for n, (fields, method, path, body) in enumerate(cases):
                kwargs: Json = {} if body is None else {"json": body}
                if method == "PATCH":
                    kwargs["headers"] = {"Content-Type": "application/merge-patch+json"}
                rest = await api.request(method, f"/api/v1/twins/{twin}{path}", **kwargs)
                reply = await command(ws, f"e{n}", twinId=twin, **fields)
                assert reply["type"] == "error", reply
                assert (reply["status"], reply["error"]["error"]) == (
                    rest.status_code,
                    rest.json()["error"],
                ), (fields, rest.text)
            async with connect(service, READER_TOKEN) as reader:
                refused = await command(reader, "r", command="put", twinId=twin, path="/delta")
                assert (refused["status"], refused["error"]["error"]) == (405, "request.method")
            new = await command(ws, "p1", command="put", twinId=twin, path="/desired/a/b", value=1)
            assert new["status"] == 201 and set(new["body"]) == {"revision", "seq"}, new
            again = await command(
                ws, "p2", command="put", twinId=twin, path="/desired/a/b", value=2
            )
            assert again["status"] == 200, again
            rest_new = await api.put(f"/api/v1/twins/{twin}/desired/c", json=1)
            rest_again = await api.put(f"/api/v1/twins/{twin}/desired/c", json=2)
            assert (rest_new.status_code, rest_again.status_code) == (201, 204)
            patched = await command(
                ws, "p3", command="patch", twinId=twin, path="/desired/d", value=1
            )
            assert patched["status"] == 200, patched

    asyncio.run(run())
