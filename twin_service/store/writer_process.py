"""The parent's end of the SQLite writer process (:mod:`.sqlite_writer`).

Requests are pickled onto a socket pair in the caller's thread, so they reach the writer
in the order they were made, and several can be in flight: the writer starts the next
batch the moment it has committed one, instead of waiting for its answer to travel back to
the event loop and a new batch to come out. The event loop given to :meth:`listen` reads
the answers (the socket is one more reader of that loop) and runs the callback registered
with each request, in the same order. A thread reading them instead cost a wake-up, a
hand-over of the interpreter lock and a wake-up of the loop per batch: about a tenth of a
PATCH's CPU.

The parent's end of the socket is non-blocking once the loop listens (uvloop makes it so in
``add_reader``, and a blocking one would let the loop and the writer each wait to send to the
other): what the socket does not take at once waits in :attr:`WriterProcess.unsent` and the
listening loop sends it as the writer reads. A request is never cut short: a frame written
in part, the rest dropped, corrupted the stream and killed the writer (big twins written by
many clients at once).

When the process dies, every request in flight is answered with :class:`WriterGone`
(whether its transaction committed is unknown: the callers were not acknowledged), and
:meth:`WriterProcess.start` may be called again. The loop learns of the death from the end of
the channel; :meth:`WriterProcess.check`, called now and then, learns it from the process,
for the case where the loop no longer watches the channel.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import pickle
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from twin_service.store.sqlite_writer import WriterConfig

log = logging.getLogger(__name__)

#: Called with ``("ok", result)`` or ``("error", exception)``.
Callback = Callable[[str, Any], None]


class WriterGone(Exception):
    """The writer process exited (or could not be reached) before answering."""


class WriterProcess:
    def __init__(self, config: WriterConfig) -> None:
        self._config = config
        self._proc: subprocess.Popen[bytes] | None = None
        self._channel: Connection | None = None
        # (loop, callback) per request in flight, oldest first; appended by the requesting
        # thread before the request is sent, taken by the loop reading the answers.
        self._waiting: collections.deque[tuple[asyncio.AbstractEventLoop, Callback]] = (
            collections.deque()
        )
        self._lock = threading.Lock()
        # The loop reading the answers, and the bytes read of answers not yet complete.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending = bytearray()
        # Framed requests the socket did not take yet (guarded by _lock), in order.
        self._unsent = bytearray()
        # Set once the loop has stopped reading a channel that ended.
        self._done = threading.Event()
        self._done.set()
        #: Whether a start found the database restored from a backup (the first one does).
        self.restored = False

    @property
    def alive(self) -> bool:
        return self._channel is not None

    @property
    def unsent(self) -> int:
        """Bytes of requests waiting for the writer to read what was sent before them."""
        return len(self._unsent)

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and self._channel is not None else None

    def start(self) -> None:
        """Start the process and wait until its database is open (blocking).

        Waits as long as the process lives: opening may rebuild the built-in index
        (``search`` back to builtin), which takes long on a large database, and a start
        that gave up would roll the rebuild back and begin it again next time.
        """
        self._reap()
        ours, theirs = socket.socketpair()
        # The child imports this package from wherever the parent did.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "twin_service.store.sqlite_writer", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        finally:
            theirs.close()
        channel = Connection(ours.detach())
        try:
            channel.send_bytes(pickle.dumps(self._config))
            _wait_open(channel, proc)
            kind, result = pickle.loads(channel.recv_bytes())
        except BaseException as exc:
            channel.close()
            proc.kill()
            proc.wait()
            if isinstance(exc, (EOFError, OSError)):
                raise WriterGone(f"the SQLite writer process exited at start: {exc}") from exc
            raise
        if kind != "ok":
            channel.close()
            proc.wait()
            raise result
        self._proc, self._channel = proc, channel
        self.restored = self.restored or bool(result)
        self._done.clear()

    def listen(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read the answers on ``loop`` (its own thread), after each :meth:`start`."""
        channel = self._channel
        if channel is None:
            return
        self._loop = loop
        self._pending.clear()
        os.set_blocking(channel.fileno(), False)
        loop.add_reader(channel.fileno(), self._readable, channel)

    def request(self, kind: str, payload: Any, callback: Callback) -> None:
        """Send a request; ``callback`` runs on the running event loop with its answer."""
        loop = asyncio.get_running_loop()
        data = pickle.dumps((kind, payload), protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            channel = self._channel
            if channel is None:
                loop.call_soon(callback, "error", WriterGone("the SQLite writer is not running"))
                return
            self._waiting.append((loop, callback))
            self._send(channel, data)

    def _send(self, channel: Connection, data: bytes) -> None:
        """Send one message framed as ``multiprocessing.connection`` does (``_lock`` held)."""
        loop = self._loop
        if loop is None:  # nobody listens yet, so the socket blocks: this sends it all
            with contextlib.suppress(OSError):  # broken: the next read sees the end
                channel.send_bytes(data)
            return
        size = len(data)
        head = struct.pack("!i", size) if size <= 0x7FFFFFFF else struct.pack("!iQ", -1, size)
        if self._unsent:  # behind what waits already
            self._unsent += head
            self._unsent += data
            return
        frame = head + data
        try:
            sent = os.write(channel.fileno(), frame)
        except BlockingIOError:
            sent = 0
        except OSError:  # broken: the reader sees the end, and answers every waiter
            return
        if sent == len(frame):
            return
        self._unsent += memoryview(frame)[sent:]
        try:
            here = asyncio.get_running_loop() is loop
        except RuntimeError:
            here = False
        if here:
            loop.add_writer(channel.fileno(), self._writable, channel)
        else:
            with contextlib.suppress(RuntimeError):  # a closed loop: the channel ends too
                loop.call_soon_threadsafe(
                    loop.add_writer, channel.fileno(), self._writable, channel
                )

    def _writable(self, channel: Connection) -> None:
        with self._lock:
            if self._channel is not channel:
                return
            try:
                sent = os.write(channel.fileno(), self._unsent)
            except BlockingIOError:
                return
            except OSError:  # broken: the reader sees the end, and answers every waiter
                sent = len(self._unsent)
            del self._unsent[:sent]
            if not self._unsent and self._loop is not None:
                self._loop.remove_writer(channel.fileno())

    def check(self) -> None:
        """If the process exited and its channel is still open, read the channel to its end
        here, so that every request in flight is answered.

        Called on the listening loop. Normally the loop reads the end of the channel the
        moment the process dies, and this finds nothing to do. It is the backstop for a loop
        that stopped watching the channel: uvloop gives up a descriptor's watch for good
        after libuv reports an error on it (docs/performance.md, twenty-second session,
        where a replica hung that way). The requests in flight would then wait forever, and
        the store would believe its writer runs and never start another.
        """
        channel, proc = self._channel, self._proc
        if channel is None or proc is None or proc.poll() is None:
            return
        log.error(
            "the SQLite writer process exited (status %s) and the event loop had not read "
            "the end of its channel; answering what it left in flight",
            proc.returncode,
        )
        while self._channel is channel:
            if not self._readable(channel):  # an exited writer's channel always ends
                self._ended(channel)

    def _readable(self, channel: Connection) -> bool:
        """Take the answers that arrived; False if nothing could be read."""
        try:
            data = os.read(channel.fileno(), _READ_SIZE)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self._ended(channel)
            return True
        pending = self._pending
        pending += data
        # multiprocessing.connection's frames: a signed 32-bit big-endian length, or -1
        # and a 64-bit one.
        while len(pending) >= 4:
            (size,) = struct.unpack_from("!i", pending)
            start = 4
            if size == -1:
                if len(pending) < 12:
                    break
                (size,) = struct.unpack_from("!Q", pending, 4)
                start = 12
            if len(pending) < start + size:
                break
            kind, result = pickle.loads(pending[start : start + size])
            del pending[: start + size]
            loop, callback = self._waiting.popleft()
            if loop is not self._loop:  # made on another loop: hand it over
                self._call(loop, callback, kind, result)
                continue
            try:
                callback(kind, result)
            except Exception:  # one broken callback must not strand the answers after it
                log.exception("a callback of the SQLite writer's answers failed")
        return True

    def _ended(self, channel: Connection) -> None:
        if self._loop is not None:
            self._loop.remove_reader(channel.fileno())
            self._loop.remove_writer(channel.fileno())
        with self._lock:
            if self._channel is channel:
                self._channel = None
            self._unsent.clear()
            waiting = list(self._waiting)
            self._waiting.clear()
        self._done.set()
        if waiting:
            log.error("the SQLite writer process exited with %d requests in flight", len(waiting))
        for loop, callback in waiting:
            self._call(loop, callback, "error", WriterGone("the SQLite writer process exited"))

    @staticmethod
    def _call(loop: asyncio.AbstractEventLoop, callback: Callback, kind: str, result: Any) -> None:
        # A closed loop raises RuntimeError: nobody is waiting there any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(callback, kind, result)

    def _reap(self) -> None:
        """Collect a process that exited (it would stay a zombie otherwise)."""
        proc = self._proc
        if proc is not None and self._channel is None:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:  # its channel broke, yet it runs on
                proc.kill()
                proc.wait()
            self._proc = None

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the process to stop after the requests sent so far, and wait (blocking)."""
        with self._lock:
            channel, proc = self._channel, self._proc
            if channel is not None:
                self._send(channel, pickle.dumps(("stop", None)))
        if proc is not None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.error("the SQLite writer did not stop in %s s; killing it", timeout)
                proc.kill()
                proc.wait()
        # The listening loop reads the end of the channel and answers what is in flight.
        if not self._done.wait(timeout) and channel is not None:
            log.error("the SQLite writer's answers were not read to their end")
        with self._lock:
            # Normally the reader has done this on the end of the channel; a request
            # after this is answered at once instead of waiting on a closed channel.
            if self._channel is channel:
                self._channel = None
        if channel is not None:
            channel.close()
        self._proc = None


def _wait_open(channel: Connection, proc: subprocess.Popen[bytes]) -> None:
    """Until the writer's first answer (or its exit: the channel then reads EOF)."""
    waited = 0.0
    while not channel.poll(_OPEN_NOTICE_SECONDS):
        waited += _OPEN_NOTICE_SECONDS
        if proc.poll() is not None:
            return
        log.warning(
            "the SQLite writer is still opening the database after %.0f s "
            "(after search was off or external, it rebuilds the built-in search index)",
            waited,
        )


_OPEN_NOTICE_SECONDS = 30.0
#: Bytes read from the channel at a time (answers are a few bytes per write).
_READ_SIZE = 1 << 16
