"""paho-mqtt's network I/O run on the asyncio event loop, not on paho's thread.

Why: with paho's thread (``loop_start``) each device message crossed between that thread and
the loop several times (the message in, its PUBACK out, the reply out, the reply's PUBACK
in), each a wake-up through a socket pair and a hand-over of the interpreter lock. At a
steady few hundred reports a second that was most of the CPU of a report
(docs/performance.md). Here the loop watches the socket and calls paho's ``loop_read`` and
``loop_write`` itself (paho's socket callbacks), so paho's parsing and the service's handling
run in one thread and a publish goes out on the loop's next turn.

What stays off the loop: paho's ``reconnect`` resolves DNS, opens the TCP connection and runs
the TLS handshake synchronously, for as long as the network stalls. It runs in a worker
thread. The client is not connected then, so nothing else reaches paho meanwhile
(``MqttClient`` refuses to publish or acknowledge without a session).

Also done here, as paho's thread did: keepalive (``loop_misc`` every second) and reconnecting
with exponential backoff after a lost connection or a failed attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import socket
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho

log = logging.getLogger(__name__)

#: How often paho's keepalive bookkeeping runs (pings, a broker that stopped answering).
_MISC_SECONDS = 1.0
#: How long a stop waits for paho to write DISCONNECT and close the socket.
_CLOSE_SECONDS = 2.0


class PahoLoop:
    """Keeps one paho client connected, its socket served by the running event loop.

    ``on_unreachable(error)`` is called on the loop after each attempt that could not
    reach the broker (paho's ``on_connect_fail``); paho's other callbacks run on the loop,
    from inside ``loop_read``/``loop_write``/``loop_misc``.
    """

    def __init__(
        self,
        client: paho.Client,
        *,
        min_delay: float,
        max_delay: float,
        on_unreachable: Callable[[Exception], None],
    ) -> None:
        self._client = client
        self._min_delay = min_delay
        self._max_delay = max_delay
        self._on_unreachable = on_unreachable
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._delay: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._connecting: asyncio.Future[Any] | None = None
        #: The socket the loop watches, and whether it watches it for writing too.
        self._sock: Any = None
        self._writing = False
        #: Done when the current connection's socket has been closed.
        self._lost: asyncio.Future[None] | None = None
        client.on_socket_open = self._paho_opened
        client.on_socket_close = self._paho_closed
        client.on_socket_register_write = self._paho_want_write
        client.on_socket_unregister_write = self._paho_no_write

    def start(self) -> None:
        """Connect (``connect_async`` was called) and stay connected until :meth:`stop`."""
        self._task = self._loop.create_task(self._run(), name="mqtt-network")

    def connected(self) -> None:
        """The broker accepted a connection: the next wait before reconnecting is the shortest."""
        self._delay = None

    async def stop(self) -> None:
        """Stop reconnecting; let a DISCONNECT queued by ``client.disconnect()`` go out, close."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._connecting is not None:
            # A connect in the worker thread cannot be interrupted: wait for it, so its
            # socket is closed below and not left open and watched after the stop.
            with contextlib.suppress(Exception):
                await self._connecting
        if self._lost is not None and self._sock is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._lost), _CLOSE_SECONDS)
        sock = self._client.socket()
        if sock is not None:
            self._unwatch(sock)
            with contextlib.suppress(OSError):
                sock.close()

    async def _run(self) -> None:
        while True:
            lost = self._lost = self._loop.create_future()
            self._connecting = asyncio.ensure_future(asyncio.to_thread(self._client.reconnect))
            try:
                await asyncio.shield(self._connecting)
            except OSError as exc:  # DNS, refused, timed out, TLS: paho's on_connect_fail
                self._on_unreachable(exc)
            except Exception as exc:  # paho's thread died of these; here, try again later
                log.exception("MQTT connect to the broker failed")
                self._on_unreachable(exc)
            else:
                await self._serve(lost)
            finally:
                if self._connecting.done():
                    self._connecting = None
            self._delay = (
                self._min_delay if self._delay is None else min(self._delay * 2, self._max_delay)
            )
            await asyncio.sleep(self._delay)

    async def _serve(self, lost: asyncio.Future[None]) -> None:
        """Run paho's keepalive until the connection's socket is closed."""
        while not lost.done() and self._client.socket() is not None:
            await asyncio.wait([lost], timeout=_MISC_SECONDS)
            if not lost.done():
                self._client.loop_misc()
                self._look_for_an_end()

    def _look_for_an_end(self) -> None:
        """uvloop can close its poll handle of a socket (libuv reported an error for it, or
        would not watch the descriptor) and then never calls the reader again. Seen when
        mosquitto restarted: the next publish failed with "the handler is closed", and
        paho learnt of the lost connection only from its keepalive, 30-45 s later. Once a
        second, look: a socket with an error or at its end reads as readable, and paho's
        read of it ends the connection."""
        sock = self._sock
        if sock is None:
            return
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            readable = [sock]
        if readable:
            self._readable()

    # -- the socket, on the loop -----------------------------------------------------------

    def _readable(self) -> None:
        client, sock = self._client, self._sock
        client.loop_read()
        # TLS: a record holds more than the packet paho read; what is left is decrypted and
        # waiting in the SSL object, where the selector does not see it.
        while sock is not None and client.socket() is sock and _pending(sock):
            client.loop_read()

    def _writable(self) -> None:
        self._client.loop_write()

    def _watch(self, sock: Any) -> None:
        current: Any = self._client.socket()
        if sock.fileno() == -1 or current is not sock:
            return  # closed before the loop got to it
        self._sock = sock
        try:
            self._loop.add_reader(sock, self._readable)
        except (RuntimeError, OSError):
            # A poll handle uvloop closed (see _look_for_an_end) under this descriptor's
            # number, which the new socket got again: drop it and watch again.
            with _closed_by_someone_else():
                self._loop.remove_reader(sock)
            try:
                self._loop.add_reader(sock, self._readable)
            except (RuntimeError, OSError) as exc:
                self._end(sock, exc)

    def _watch_writes(self, sock: Any) -> None:
        if sock is not self._sock or self._writing or sock.fileno() == -1:
            return
        try:
            self._loop.add_writer(sock, self._writable)
        except (RuntimeError, OSError) as exc:  # uvloop closed its poll: _look_for_an_end
            self._end(sock, exc)
            return
        self._writing = True

    def _end(self, sock: Any, exc: Exception) -> None:
        """End a connection the loop cannot watch: paho's read of the shut socket closes
        it, and the next connection sends again what paho had not had acknowledged."""
        log.warning("MQTT: the loop cannot watch the broker connection (%s); reconnecting", exc)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        self._loop.call_soon(self._readable)

    def _unwatch_writes(self, sock: Any) -> None:
        if sock is self._sock and self._writing:
            self._writing = False
            with _closed_by_someone_else():
                self._loop.remove_writer(sock)

    def _unwatch(self, sock: Any) -> None:
        if sock is not self._sock:
            return
        self._unwatch_writes(sock)
        with _closed_by_someone_else():
            self._loop.remove_reader(sock)
        self._sock = None
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    # -- paho's socket callbacks: on the loop, or on the worker thread while it connects ----

    def _on_loop(self, fn: Callable[[Any], None], sock: Any) -> None:
        if threading.get_ident() == self._loop_thread:
            fn(sock)
        else:  # in order with the thread's other calls
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to watch
                self._loop.call_soon_threadsafe(fn, sock)

    def _paho_opened(self, _c: paho.Client, _u: Any, sock: Any) -> None:
        _send_at_once(sock)
        self._on_loop(self._watch, sock)

    def _paho_closed(self, _c: paho.Client, _u: Any, sock: Any) -> None:
        self._on_loop(self._unwatch, sock)

    def _paho_want_write(self, _c: paho.Client, _u: Any, sock: Any) -> None:
        self._on_loop(self._watch_writes, sock)

    def _paho_no_write(self, _c: paho.Client, _u: Any, sock: Any) -> None:
        self._on_loop(self._unwatch_writes, sock)


def _closed_by_someone_else() -> contextlib.AbstractContextManager[None]:
    """paho tells before it closes the socket; a socket closed under its feet (no one
    should) cannot be found in the selector any more: then the reconnection goes on."""
    return contextlib.suppress(ValueError, OSError)


def _pending(sock: Any) -> int:
    pending = getattr(sock, "pending", None)
    return int(pending()) if pending is not None else 0


def _send_at_once(sock: Any) -> None:
    """Turn Nagle's algorithm off on the broker connection (paho leaves it on).

    MQTT is request and answer in small packets: with Nagle, an answer written right after
    the PUBACK of its request waits for the broker's delayed ACK of that PUBACK (40 ms on
    Linux), so every device round trip through the service took over 40 ms more.
    """
    with contextlib.suppress(OSError, AttributeError):  # a socket without TCP options
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
