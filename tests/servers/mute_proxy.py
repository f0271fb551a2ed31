"""A TCP proxy whose server falls silent after its first few answers.

A broker stopped with SIGSTOP is silent from the start, or from whenever the test stops it,
which is too late for a step that takes milliseconds (a client's first SUBSCRIBE, its first
PUBLISH). This proxy passes the client's bytes on for good, and the server's first
``answers`` reads back to the client; then it keeps the connection open and swallows the
rest, as a server that stopped answering would. One read is one answer for a client that
waits for each answer before its next request (CONNACK, then SUBACK, then PUBACK).
"""

from __future__ import annotations

import contextlib
import socket
import threading


class MuteProxy:
    def __init__(self, upstream_port: int, answers: int) -> None:
        self._upstream = ("127.0.0.1", upstream_port)
        self._answers = answers
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()

    def __enter__(self) -> MuteProxy:
        threading.Thread(target=self._accept, name="mute-proxy", daemon=True).start()
        return self

    def __exit__(self, *_: object) -> None:
        self._listener.close()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(self._upstream)
            except OSError:  # closed
                return
            with self._lock:
                self._open += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, None), daemon=True).start()
            threading.Thread(
                target=self._pump, args=(upstream, client, self._answers), daemon=True
            ).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, passed: int | None) -> None:
        """Copy ``source`` to ``sink``: everything, or only its first ``passed`` reads."""
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if passed is None or passed > 0:
                    sink.sendall(data)
                    passed = None if passed is None else passed - 1
