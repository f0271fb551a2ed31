"""The parent's end of the SQLite writer process (:mod:`.sqlite_writer`).

Requests are pickled onto a socket pair in the caller's thread, so they reach the writer
in the order they were made, and several can be in flight: the writer starts the next
batch the moment it has committed one, instead of waiting for its answer to travel back to
the event loop and a new batch to come out. A receiver thread hands each answer to the
callback registered with its request, on the event loop that made it, in the same order.

When the process dies, every request in flight is answered with :class:`WriterGone`
(whether its transaction committed is unknown: the callers were not acknowledged), and
:meth:`WriterProcess.start` may be called again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import pickle
import socket
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
        self._receiver: threading.Thread | None = None
        # (loop, callback) per request in flight, oldest first; appended by the requesting
        # thread before the request is sent, taken by the receiver thread.
        self._waiting: collections.deque[tuple[asyncio.AbstractEventLoop, Callback]] = (
            collections.deque()
        )
        self._lock = threading.Lock()

    @property
    def alive(self) -> bool:
        return self._channel is not None

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
        self._receiver = threading.Thread(
            target=self._receive, args=(channel,), name="sqlite-writer-answers", daemon=True
        )
        self._receiver.start()

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
            # On a broken channel the receiver sees the same, and answers every waiter.
            with contextlib.suppress(OSError):
                channel.send_bytes(data)

    def _receive(self, channel: Connection) -> None:
        while True:
            try:
                kind, result = pickle.loads(channel.recv_bytes())
            except (EOFError, OSError):
                break
            loop, callback = self._waiting.popleft()
            self._call(loop, callback, kind, result)
        with self._lock:
            if self._channel is channel:
                self._channel = None
            waiting = list(self._waiting)
            self._waiting.clear()
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
                with contextlib.suppress(OSError):
                    channel.send_bytes(pickle.dumps(("stop", None)))
        if proc is not None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.error("the SQLite writer did not stop in %s s; killing it", timeout)
                proc.kill()
                proc.wait()
        if self._receiver is not None:
            self._receiver.join(timeout)
        with self._lock:
            # Normally the receiver has done this on the end of the channel; a request
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
