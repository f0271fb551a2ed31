"""WebSocket output of a stream session, with a direct path to the socket under uvicorn.

Through ASGI, every message costs an ``await send(...)`` through Starlette and uvicorn, a frame
object, and one ``transport.write`` (one system call) per message. With a thousand subscribers
that per-message overhead was most of the server's CPU (docs/performance.md, issue 5).

:class:`DirectWebSocketProtocol` is uvicorn's websockets (sans-I/O) protocol plus one ASGI
extension, ``twin.websocket.direct``: a :class:`DirectWriter` that frames text messages and
writes all of a session's queued messages with one ``transport.write``, synchronously, from the
hub's fan-out. It only ever writes whole frames, only while the connection is open and the
transport is not paused (back-pressure still fills the session's bounded outbox), and goes
through the websockets protocol object when per-message deflate was negotiated, so the
compression context stays right. Accept, close, pings and everything else stay uvicorn's.

Without the extension (another ASGI server, a test client), :func:`pump_websocket` sends each
message with ``websocket.send_text`` as before.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Sequence

from starlette.websockets import WebSocket
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request
from websockets.protocol import State

from twin_service.auth import revoked
from twin_service.streams.session import StreamSession

log = logging.getLogger(__name__)

EXTENSION = "twin.websocket.direct"

_TEXT_FIN = 0x81


def text_frame_header(length: int) -> bytes:
    """RFC 6455 header of an unmasked, final text frame of ``length`` payload bytes."""
    if length < 126:
        return bytes((_TEXT_FIN, length))
    if length < 1 << 16:
        return struct.pack("!BBH", _TEXT_FIN, 126, length)
    return struct.pack("!BBQ", _TEXT_FIN, 127, length)


class DirectWriter:
    """Writes text messages of one accepted WebSocket straight to its transport."""

    __slots__ = ("_protocol", "_writable")

    def __init__(self, protocol: WebSocketsSansIOProtocol) -> None:
        self._protocol = protocol
        self._writable = protocol.writable

    @property
    def ready(self) -> bool:
        """Open (handshake done, no close sent or received) and the transport not paused."""
        p = self._protocol
        return (
            self._writable.is_set()
            and not p.close_sent
            and not p.disconnected
            and p.handshake_complete
            and p.conn.state is State.OPEN
            and not p.transport.is_closing()
        )

    @property
    def paused(self) -> bool:
        return not self._writable.is_set()

    async def wait_writable(self) -> None:
        await self._writable.wait()

    def write_texts(self, texts: Sequence[str]) -> None:
        """Frame ``texts`` as text messages and write them with one ``transport.write``."""
        p = self._protocol
        if p.conn.extensions:  # per-message deflate: its context lives in the protocol
            for text in texts:
                p.conn.send_text(text.encode())
            p.transport.write(b"".join(p.conn.data_to_send()))
            return
        parts: list[bytes] = []
        for text in texts:
            payload = text.encode()
            parts.append(text_frame_header(len(payload)))
            parts.append(payload)
        p.transport.write(b"".join(parts))


#: What :class:`DirectWriter` uses of uvicorn's protocol object and of its websockets
#: connection: not a public API, so checked before the extension is offered.
_PROTOCOL_ATTRIBUTES = (
    "writable",
    "close_sent",
    "disconnected",
    "handshake_complete",
    "conn",
    "transport",
)
_CONNECTION_ATTRIBUTES = ("state", "extensions", "send_text", "data_to_send")


def supports_direct_writes(protocol: object) -> bool:
    """True when ``protocol`` has everything :class:`DirectWriter` reads and calls."""
    return (
        all(hasattr(protocol, name) for name in _PROTOCOL_ATTRIBUTES)
        and isinstance(getattr(protocol, "writable", None), asyncio.Event)
        and all(hasattr(getattr(protocol, "conn", None), n) for n in _CONNECTION_ATTRIBUTES)
    )


class DirectWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets protocol offering a :class:`DirectWriter` as an ASGI extension.

    A uvicorn release that changed the internals the writer uses gets the plain ASGI path
    (slower with many subscribers, same messages) and one warning, not a failure.
    """

    _warned = False

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if not supports_direct_writes(self):
            if not DirectWebSocketProtocol._warned:
                DirectWebSocketProtocol._warned = True
                log.warning(
                    "this uvicorn's WebSocket protocol lacks what direct stream writes use; "
                    "streams go through ASGI instead"
                )
            return
        if scope is not None:  # the app task is created but has not run yet
            extensions = scope.setdefault("extensions", {})
            if extensions is not None:
                extensions[EXTENSION] = {"writer": DirectWriter(self)}


def direct_writer(websocket: WebSocket) -> DirectWriter | None:
    extension = (websocket.scope.get("extensions") or {}).get(EXTENSION)
    writer = extension.get("writer") if isinstance(extension, dict) else None
    return writer if isinstance(writer, DirectWriter) else None


async def pump_websocket(
    websocket: WebSocket, session: StreamSession, overflow_code: int, revoked_code: int
) -> None:
    """Send the session's messages until it is cut off: close with ``overflow_code`` when
    it overflowed, with ``revoked_code`` when a reload revoked its token."""
    writer = direct_writer(websocket)
    if writer is not None:
        session.attach(writer)
    while True:
        if not await session.wait():
            if session.revoked:
                await websocket.close(revoked_code, revoked().message)
                return
            reason = f"slow consumer: resume with since={session.resume_hint()}"
            await websocket.close(overflow_code, reason)
            return
        if writer is not None and writer.ready:
            session.flush()
            continue
        if writer is not None and writer.paused:
            await writer.wait_writable()
            continue
        item = await session.next()  # not open (closing): let ASGI report it
        if item is None:
            continue
        await websocket.send_text(item.text)
