"""A TLS front for a plain TCP server, for servers whose test build has no TLS listener.

The FerretDB the tests build listens in plain TCP only; a MongoDB in production is often
reached over TLS, with a CA of its own and sometimes a client certificate (x.509). This
proxy terminates real TLS (Python's ``ssl``, a certificate the tests make) and passes the
bytes on to the server unchanged, so the driver's TLS options are what is tested. It runs
on threads of its own: a test may block its event loop on a synchronous HTTP client while
the service under test talks through the proxy.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from pathlib import Path


class TlsProxy:
    def __init__(
        self, upstream_port: int, cert: Path, key: Path, client_ca: Path | None = None
    ) -> None:
        """Serve ``cert`` on a free port of 127.0.0.1 and forward to ``upstream_port``; with
        ``client_ca``, only to clients whose certificate it signed."""
        self._upstream = ("127.0.0.1", upstream_port)
        self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._tls.load_cert_chain(cert, key)
        if client_ca is not None:
            self._tls.verify_mode = ssl.CERT_REQUIRED
            self._tls.load_verify_locations(client_ca)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.accepted = 0
        #: Handshakes that failed (an untrusted certificate, no client certificate), by
        #: reason as ``ssl`` gives it.
        self.refused: list[str] = []
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = False

    def start(self) -> TlsProxy:
        threading.Thread(target=self._accept, name="tls-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopped = True
        self._listener.close()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._open.clear()

    def __enter__(self) -> TlsProxy:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                raw, _ = self._listener.accept()
            except OSError:  # stopped
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        self._track(raw)
        try:
            client = self._tls.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self.refused.append(str(exc))
            self._close(raw)
            return
        self._track(client)
        try:
            upstream = socket.create_connection(self._upstream)
        except OSError:
            self._close(client)
            return
        self._track(upstream)
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()
        self._pump(client, upstream)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        """Copy until either side ends, then end both (the driver sees a closed connection,
        as it would from the server itself)."""
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        self._close(source)
        self._close(sink)

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.add(sock)

    def _close(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.discard(sock)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
