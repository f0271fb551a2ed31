"""uvicorn's WebSocket protocol (with the direct stream writes) and bounds on what clients may
make the service hold of messages they have not finished sending.

websockets buffers an incoming message until it is whole, up to ``limits.max_request_bytes``
(1 MiB), for as long as its sender likes: a client that sent most of a message and stopped
held that much for good. Two bounds:

- until the application has authenticated the connection, a message may be at most
  :data:`UNAUTHENTICATED_MAX_BYTES` (the auth message is a token): anyone could otherwise
  hold 1 MiB per connection for the ten seconds a connection may take to authenticate;
- the messages still arriving on all connections of the process, with the requests
  (api.http_protocol), hold at most ``limits.incoming_bytes``; the connection whose bytes
  pass it is closed with 1013 (try again later).

And on what a client that does not read makes it hold: the protocol answers each ping with
a pong, whether the client reads or not, so a connection is not read while its transport
has paused writing (its buffer is full). A connection whose client reads nothing of its
full buffers for ``UNREAD_SECONDS`` is aborted (api.closing): its writer waited for room
for good, so a reader that fell behind was never even closed with 4408, and kept its place
until the keepalive ping timed out. A connection being closed is ended, aborted if need be, when its
client leaves what was written to it unread for as long: the close frame cannot reach it,
and uvicorn's close waits for the buffer to drain, which it never does.

And on what it logs: nothing of the handshake's headers or of the frames (see ``__init__``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.websockets import WebSocket
from uvicorn._types import ASGIReceiveEvent, ASGISendEvent
from uvicorn.config import Config
from uvicorn.server import ServerState
from websockets.frames import CloseCode
from websockets.http11 import Request
from websockets.protocol import State

from twin_service.api.closing import UNREAD_SECONDS, QuietClose, UnreadCut
from twin_service.budget import ByteBudget
from twin_service.streams.direct_ws import DirectWebSocketProtocol

log = logging.getLogger(__name__)

#: Largest message before the connection is authenticated (the auth message).
UNAUTHENTICATED_MAX_BYTES = 16 * 1024
EXTENSION = "twin.websocket.bounds"


class BoundedWebSocketProtocol(DirectWebSocketProtocol):
    #: Bytes still arriving, of every connection of the process (HTTP requests too).
    incoming = ByteBudget(64 * 1024 * 1024)
    #: This connection's part of ``incoming``.
    _held = 0
    #: After a close on an error, what closes the socket (see api.closing).
    _closing: QuietClose | None = None
    #: Ends the connection if its client leaves the close unread (:meth:`_end_unread`).
    _unread: asyncio.TimerHandle | None = None
    #: Ends the connection if its client stops reading while it is open.
    _stalled: UnreadCut | None = None

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        # uvicorn gives the websockets connection its own logger, uvicorn.error, which
        # follows log_level: at debug, websockets traced every handshake header and frame
        # there, bearer tokens (rejected ones too) and every message's content. Its errors
        # still go there; its traces are what ``debug`` (set from the logger) turns on.
        self.conn.debug = False

    @classmethod
    def bounded(cls, incoming: ByteBudget) -> type[BoundedWebSocketProtocol]:
        """This protocol counting in ``incoming`` (for uvicorn's ``ws``)."""
        return type(cls.__name__, (cls,), {"incoming": incoming})

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is None:  # the handshake was refused
            return
        full = self.conn.max_size
        self.conn.max_size = (
            UNAUTHENTICATED_MAX_BYTES if full is None else min(full, UNAUTHENTICATED_MAX_BYTES)
        )

        def authenticated() -> None:
            self.conn.max_size = full

        extensions = scope.setdefault("extensions", {})
        if extensions is not None:
            extensions[EXTENSION] = {"authenticated": authenticated}

    def data_received(self, data: bytes) -> None:
        if self._closing is not None:  # the parser drops what comes after the close frame
            self._closing.heard()
        super().data_received(data)
        # What the parser keeps of an unfinished frame, and the frames of an unfinished
        # fragmented message (uvicorn joins them when the last one comes).
        held = len(self.conn.reader.buffer) + sum(map(len, self.frames))
        self._held = self.incoming.move(self._held, held)
        if held and self.incoming.used > self.incoming.limit and self.conn.state is State.OPEN:
            self.conn.fail(CloseCode.TRY_AGAIN_LATER, "too much incoming data; try again later")
            self.frames = []
            self._release()
            self.handle_parser_exception()

    def send_receive_event_to_app(self) -> None:
        if self.curr_msg_data_type == "text" and not self.close_sent:
            # uvicorn logs a traceback at ERROR for each such message, from any client,
            # authenticated or not. Decoded twice when valid: uvicorn keeps the queueing.
            data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
            self.frames = [data]
            try:
                data.decode()
            except UnicodeDecodeError:
                self.frames = []
                log.debug("closed a WebSocket from %s: a text frame not UTF-8", self.client)
                if self.conn.state is State.OPEN:
                    self.conn.fail(CloseCode.INVALID_DATA, "Text frames must be UTF-8.")
                    self.handle_parser_exception()
                return
        super().send_receive_event_to_app()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stalled is None:
            self._stalled = UnreadCut(self.loop, self.transport)
        self._stalled.paused()
        # Each ping read would add a pong to the buffer that is not draining.
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stalled is not None:
            self._stalled.resumed()
        if not self.read_paused:  # uvicorn's pause: a message the app has not taken yet
            self.transport.resume_reading()

    def _writes_wait(self) -> None:
        """Keep reading paused while writes are: uvicorn resumes it after the app takes a
        message and after a close, whatever the writes do."""
        if not self.writable.is_set():
            self.transport.pause_reading()

    async def receive(self) -> ASGIReceiveEvent:
        message = await super().receive()
        self._writes_wait()
        return message

    async def send(self, message: ASGISendEvent) -> None:
        if message["type"] == "websocket.close" and not self.writable.is_set():
            # uvicorn waits for the client to read, for good: a client that never reads
            # kept its connection (a first-message auth timeout never closed it).
            try:
                async with asyncio.timeout(UNREAD_SECONDS):
                    await self.writable.wait()
            except TimeoutError:
                self.transport.abort()  # super().send then finds the client gone
        await super().send(message)
        self._writes_wait()
        if self.close_sent:
            self._end_unread()

    def keepalive_timeout(self) -> None:
        super().keepalive_timeout()
        self._end_unread()

    def on_task_complete(self, task: asyncio.Task[None]) -> None:
        super().on_task_complete(task)
        self._end_unread()  # uvicorn closes the transport when the application returns

    def _end_unread(self) -> None:
        """Abort the connection if what was written to it is still unwritten in
        :data:`UNREAD_SECONDS` (and look again then until it is gone): closing the
        transport waits for its buffer to drain, for good when the client does not read."""
        if self._unread is not None or self.disconnected:
            return

        def check() -> None:
            self._unread = None
            if self.disconnected:
                return
            if self.transport.get_write_buffer_size():
                self.transport.abort()
            else:
                self._end_unread()

        self._unread = self.loop.call_later(UNREAD_SECONDS, check)

    def handle_parser_exception(self) -> None:
        """Send the close frame, then drop what the client still sends and close once it is
        quiet (api.closing; uvicorn closed at once, and a client still sending lost the
        frame saying why, a message too big say). Its reply to the close frame is dropped
        with the rest (the parser has failed), so the service does not wait for it."""
        if self._closing is not None:  # uvicorn calls this again on every later read
            return
        close = self.conn.close_sent
        assert close is not None
        self.queue.put_nowait(
            {"type": "websocket.disconnect", "code": close.code, "reason": close.reason}
        )
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
            self._writes_wait()
        self._closing = QuietClose(self.loop, self.transport, self.close_timeout)
        # uvicorn closes the socket when the application returns unless a close is timed.
        self.close_timer = self._closing.deadline
        self._end_unread()

    def _release(self) -> None:
        self._held = self.incoming.move(self._held, 0)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._closing is not None:
            self._closing.cancel()
        if self._unread is not None:
            self._unread.cancel()
        if self._stalled is not None:
            self._stalled.cancel()
        self._release()
        super().connection_lost(exc)


def allow_full_messages(websocket: WebSocket) -> None:
    """Lift the bound of an unauthenticated connection to ``limits.max_request_bytes``."""
    extension = (websocket.scope.get("extensions") or {}).get(EXTENSION)
    if isinstance(extension, dict):
        extension["authenticated"]()
