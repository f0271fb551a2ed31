"""Closing a connection after a refusal without losing the refusal, and ending one whose
client reads nothing.

A server that closes a socket while the client's bytes are still arriving, unread, makes
the kernel reset the connection, and a reset discards what the client had not read yet:
the answer that said why (a head too large, a WebSocket message too big) was lost to a
client still sending. So the refused connection is read on, what comes is dropped, and
it is closed once the client has been quiet for :data:`QUIET_SECONDS`, or after
``most`` seconds whatever it does.

The other way round, a stream (a WebSocket, a server-sent-event response) whose client
stops reading: its writer waits for room in the socket for good, and asyncio calls no one
while it waits. :class:`UnreadCut` aborts such a connection once its client has read
nothing of its full buffers for :data:`UNREAD_SECONDS`, which is what makes the writer, the
reader's place (``stream.max_connections``), its queue and the socket's buffers go.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import struct
import termios

log = logging.getLogger(__name__)

#: Silence after which a refused connection is closed.
QUIET_SECONDS = 0.5


class QuietClose:
    """Closes ``transport`` once :meth:`heard` has not been called for
    :data:`QUIET_SECONDS`, or ``most`` seconds from now."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, transport: asyncio.BaseTransport, most: float
    ) -> None:
        self._loop = loop
        self._transport = transport
        #: The timer that closes at ``most`` seconds.
        self.deadline = loop.call_later(most, transport.close)
        self._quiet = loop.call_later(QUIET_SECONDS, transport.close)

    def heard(self) -> None:
        """The client sent something (dropped): wait for quiet again."""
        self._quiet.cancel()
        self._quiet = self._loop.call_later(QUIET_SECONDS, self._transport.close)

    def cancel(self) -> None:
        """The connection is gone."""
        self._quiet.cancel()
        self.deadline.cancel()


#: How long a stream's client may read nothing of what is written to it, the socket's
#: buffers full (the kernel's, then the transport's past its high-water mark), before the
#: connection is cut. One that did not read held its place, queue and buffers until it
#: reset the connection itself (an SSE client for 390 s and more; a WebSocket until the
#: keepalive ping, 40 s, had timed out).
UNREAD_SECONDS = 5.0


class UnreadCut:
    """Aborts ``transport`` when its writes stay paused and the client acknowledges nothing
    of what was written for :data:`UNREAD_SECONDS`.

    The protocol calls :meth:`paused` and :meth:`resumed` from its ``pause_writing`` and
    ``resume_writing``, and :meth:`cancel` when the connection is lost. What was read counts,
    not how long the writes stay paused: a slow client that reads a large burst (an event
    stream writes all it has queued at once, up to ``stream.queue_bytes``) stays paused for
    longer than this and is not stuck. An abort, not a close: a close waits for the buffer
    to drain, which it never does."""

    __slots__ = ("_left", "_loop", "_timer", "_transport")

    def __init__(self, loop: asyncio.AbstractEventLoop, transport: asyncio.WriteTransport) -> None:
        self._loop = loop
        self._transport = transport
        self._timer: asyncio.TimerHandle | None = None
        #: What was unread at the last look (:meth:`_unread`).
        self._left = 0

    def paused(self) -> None:
        if self._timer is None:
            self._look_later()

    def resumed(self) -> None:
        self.cancel()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _look_later(self) -> None:
        self._left = self._unread()
        self._timer = self._loop.call_later(UNREAD_SECONDS, self._look)

    def _look(self) -> None:
        if self._unread() < self._left:  # the client read some
            self._look_later()
            return
        self._timer = None
        log.info("cut a connection whose client left its stream unread for %g s", UNREAD_SECONDS)
        self._transport.abort()  # closing too: a close waits for what stays unread

    def _unread(self) -> int:
        """Bytes written that the client has not acknowledged: the transport's buffer and
        the socket's send queue. The transport's alone moves only when the kernel wakes it,
        once a good part of its queue (MiBs) has gone: a client reading 4 KiB every 50 ms
        was cut by that measure (tests/streams/test_unread_streams.py)."""
        unread = self._transport.get_write_buffer_size()
        sock = self._transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(4))
                unread += int(struct.unpack("i", queued)[0])
        return unread
