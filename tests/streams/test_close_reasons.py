"""A WebSocket close frame's reason is at most 123 bytes of UTF-8 (RFC 6455: a control
frame's payload is at most 125 bytes, two of them the code): a reason cut to 123
characters could pass that, the close failed, and the client lost the code with it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from tests.service_process import ServiceProcess
from tests.streams.test_websocket import ws_url
from twin_service.api.routes.streams import close_reason

Factory = Callable[..., ServiceProcess]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("short", "short"),
        ("a" * 200, "a" * 123),
        ("é" * 100, "é" * 61),  # two bytes each: a character is never split
        ("a" + "€" * 50, "a" + "€" * 40),  # three bytes each
        ("\ud800", "?"),  # a lone surrogate has no UTF-8
    ],
)
def test_a_reason_is_cut_to_whole_characters_of_at_most_123_bytes(text: str, reason: str) -> None:
    assert close_reason(text) == reason


async def test_a_non_ascii_auth_error_still_closes_with_4401_and_its_reason(
    service_factory: Factory,
) -> None:
    service = service_factory()
    key = "é" * 100  # the error names the duplicate key: 232 bytes
    async with websockets.connect(ws_url(service)) as ws:
        await ws.send(f'{{"type": "auth", "{key}": 1, "{key}": 2}}')
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 15)
    received = closed.value.rcvd
    assert received is not None, "the connection was dropped without a close frame"
    assert received.code == 4401
    assert received.reason.startswith("Duplicate key 'éé"), received.reason
