"""Closing a connection after a refusal without losing the refusal.

A server that closes a socket while the client's bytes are still arriving, unread, makes
the kernel reset the connection, and a reset discards what the client had not read yet:
the answer that said why (a head too large, a WebSocket message too big) was lost to a
client still sending. So the refused connection is read on, what comes is dropped, and
it is closed once the client has been quiet for :data:`QUIET_SECONDS`, or after
``most`` seconds whatever it does.
"""

from __future__ import annotations

import asyncio

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
