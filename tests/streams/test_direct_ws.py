"""The direct WebSocket output: frame headers and session flushes, no sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
import uvicorn
from uvicorn.server import ServerState
from websockets.frames import Frame, Opcode

from twin_service.auth import Credential, Principal
from twin_service.streams.direct_ws import (
    DirectWebSocketProtocol,
    supports_direct_writes,
    text_frame_header,
)
from twin_service.streams.hub import EventHub
from twin_service.streams.session import StreamSession


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_text_frame_header_is_what_websockets_serializes(length: int) -> None:
    payload = b"x" * length
    expected = Frame(Opcode.TEXT, payload).serialize(mask=False)
    assert text_frame_header(length) + payload == expected


def test_installed_uvicorn_supports_direct_writes() -> None:
    """The writer uses uvicorn internals: an upgrade that moved them fails here, loudly,
    instead of only slowing streams down through the fallback."""

    async def app(scope: object, receive: object, send: object) -> None:
        raise AssertionError("not called")

    async def build() -> DirectWebSocketProtocol:
        config = uvicorn.Config(app, ws=DirectWebSocketProtocol, log_config=None)
        config.load()
        return DirectWebSocketProtocol(config=config, server_state=ServerState(), app_state={})

    assert supports_direct_writes(asyncio.run(build()))
    assert not supports_direct_writes(object())


class FakeOutput:
    def __init__(self) -> None:
        self.ready = True
        self.writes: list[list[str]] = []

    def write_texts(self, texts: Sequence[str]) -> None:
        self.writes.append(list(texts))


def session(queue_size: int = 10) -> StreamSession:
    """A session of a real hub that is never started (these tests need no store)."""
    credential = Credential(None, "", Principal(name="t", role="admin"))
    return StreamSession(EventHub(None), None, credential, queue_size)  # type: ignore[arg-type]


def test_flush_writes_everything_queued_at_once_in_order() -> None:
    async def run() -> None:
        s, out = session(), FakeOutput()
        s.attach(out)
        for n in (1, 2, 3):
            s.send({"type": "event", "seq": n})
        s.flush()
        assert out.writes == [['{"type":"event","seq":1}', '{"type":"event","seq":2}',
                               '{"type":"event","seq":3}']]  # fmt: skip
        assert s.delivered_seq == 3
        s.flush()  # nothing left
        assert len(out.writes) == 1

    asyncio.run(run())


def test_flush_leaves_messages_queued_while_the_output_is_not_ready() -> None:
    async def run() -> None:
        s, out = session(), FakeOutput()
        s.attach(out)
        out.ready = False
        s.send({"type": "event", "seq": 1})
        s.flush()
        assert out.writes == [] and s.delivered_seq == 0
        assert await asyncio.wait_for(s.wait(), 1) is True  # the writer task is woken
        out.ready = True
        s.flush()
        assert out.writes == [['{"type":"event","seq":1}']]

    asyncio.run(run())


def test_overflow_while_not_ready_is_reported_to_the_writer() -> None:
    async def run() -> None:
        s, out = session(queue_size=10), FakeOutput()
        s.attach(out)
        out.ready = False
        for n in range(11):
            s.send({"type": "event", "seq": n})
        s.flush()
        assert s.overflowed and out.writes == []
        assert await asyncio.wait_for(s.wait(), 1) is False

    asyncio.run(run())
