"""What a WebSocket client may make the service hold of messages it has not finished sending:
at most 16 KiB before it has authenticated, and ``limits.incoming_bytes`` on all
connections of the process together. Raw sockets: a client library sends whole messages."""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from tests.api.test_hostile_requests import _partial_heads
from tests.service_process import ADMIN_TOKEN, ServiceProcess
from tests.streams.raw_websocket import upgrade_request

Factory = Callable[..., ServiceProcess]
Socket = tuple[asyncio.StreamReader, asyncio.StreamWriter]
CLOSE = 0x8


@asynccontextmanager
async def _raw_websocket(proc: ServiceProcess, token: str | None) -> AsyncIterator[Socket]:
    reader, writer = await asyncio.open_connection("127.0.0.1", proc.port)
    writer.write(upgrade_request(token))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
    assert head.startswith(b"HTTP/1.1 101"), head
    try:
        yield reader, writer
    finally:
        writer.close()


def _text_header(size: int) -> bytes:
    """A final text frame's header, masked with a zero key (the payload goes as it is)."""
    return struct.pack("!BBQ", 0x81, 0x80 | 127, size) + bytes(4)


def _message(pad: int) -> bytes:
    """A command padded to about ``pad`` bytes, as a whole frame."""
    body = json.dumps(
        {"type": "command", "id": "c", "command": "get", "twinId": "org.acme:x", "x": "a" * pad}
    ).encode()
    return _text_header(len(body)) + body


async def _frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first, second = await asyncio.wait_for(reader.readexactly(2), 15)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", await reader.readexactly(8))
    return first & 0x0F, await asyncio.wait_for(reader.readexactly(length), 15)


async def _next_text(reader: asyncio.StreamReader) -> dict[str, Any]:
    opcode, payload = await _frame(reader)
    assert opcode == 0x1, (opcode, payload[:200])
    message: dict[str, Any] = json.loads(payload)
    return message


async def _close(reader: asyncio.StreamReader) -> tuple[int, str]:
    """The code and reason of the close frame, past any other frame."""
    while True:
        opcode, payload = await _frame(reader)
        if opcode == CLOSE:
            code: int = struct.unpack("!H", payload[:2])[0]
            return code, payload[2:].decode()


async def _close_code(reader: asyncio.StreamReader) -> int:
    return (await _close(reader))[0]


async def test_a_large_message_before_authentication_is_refused_at_its_header(
    service_factory: Factory,
) -> None:
    service = service_factory()
    async with _raw_websocket(service, None) as (reader, writer):
        writer.write(_text_header(20_000))  # no payload: refused on the length alone
        assert await _close_code(reader) == 1009  # message too big
    # Sent whole, before reading: the client still gets the close code, not a reset
    # connection (the service closed the socket with the rest of the message unread, and
    # the reset took the close frame with it).
    async with _raw_websocket(service, None) as (reader, writer):
        writer.write(_text_header(500_000) + b"a" * 500_000)
        await writer.drain()
        assert await _close_code(reader) == 1009
    async with _raw_websocket(service, None) as (reader, writer):
        auth = json.dumps({"type": "auth", "token": ADMIN_TOKEN}).encode()
        writer.write(_text_header(len(auth)) + auth)
        assert (await _next_text(reader))["type"] == "welcome"
        writer.write(_message(100_000))  # authenticated: up to limits.max_request_bytes
        reply = await _next_text(reader)
        assert reply["type"] == "error" and reply["correlationId"] == "c", reply


async def test_messages_still_arriving_are_bounded_for_the_whole_process(
    service_factory: Factory,
) -> None:
    proc = service_factory(env={"TWIN_LIMITS__INCOMING_BYTES": str(1024 * 1024)})
    half = 600 * 1024
    async with (
        _raw_websocket(proc, ADMIN_TOKEN) as (first, first_out),
        _raw_websocket(proc, ADMIN_TOKEN) as (second, second_out),
    ):
        assert (await _next_text(first))["type"] == "welcome"
        assert (await _next_text(second))["type"] == "welcome"
        whole = _message(900 * 1024)
        first_out.write(whole[:half])
        await first_out.drain()
        await asyncio.sleep(0.3)  # held by the service
        second_out.write(whole[:half])  # both would pass 1 MiB: this one is closed
        assert await _close_code(second) == 1013  # try again later
        first_out.write(whole[half:])  # the first one was not cut, and is answered
        assert (await _next_text(first))["correlationId"] == "c"
        first_out.write(whole[:half])  # and it left the budget once whole
        await first_out.drain()
    # A connection that leaves half-way gives its bytes back too.
    async with _raw_websocket(proc, ADMIN_TOKEN) as (third, third_out):
        assert (await _next_text(third))["type"] == "welcome"
        third_out.write(_message(900 * 1024))
        assert (await _next_text(third))["correlationId"] == "c"


async def test_request_heads_still_arriving_count_in_the_same_bound(
    service_factory: Factory,
) -> None:
    proc = service_factory(env={"TWIN_LIMITS__INCOMING_BYTES": str(1024 * 1024)})
    heads = _partial_heads(proc, 16, 60_000)  # 960 KB, held
    try:
        async with _raw_websocket(proc, ADMIN_TOKEN) as (reader, writer):
            assert (await _next_text(reader))["type"] == "welcome"
            writer.write(_text_header(200_000) + b"a" * 150_000)  # and this passes 1 MiB
            code, reason = await _close(reader)
        assert code == 1013 and reason.startswith("too much incoming data"), reason
    finally:
        for sock in heads:
            sock.close()
