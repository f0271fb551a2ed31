"""The HTTP listening sockets, bound before the service starts anything.

uvicorn binds its port once the application has started: with the port taken, the store,
the broker and their clients started, were stopped again, and uvicorn said why in its own
words (``[Errno 98] error while attempting to bind...``). Bound first, the port taken is a
start that fails before anything runs, in the service's one line; and the port cannot be
taken by another process between the start and the bind.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

import uvicorn

from twin_service.settings import Settings

log = logging.getLogger(__name__)


def bind_http(host: str, port: int) -> list[socket.socket]:
    """Sockets listening on each address of ``host`` at ``port``, as uvicorn's own would.

    Listening, not only bound: on Linux another socket with SO_REUSEADDR (uvicorn's) may
    bind the port of one that does not listen yet. A connection made before the service
    has started waits for it (the service serves no request before). Raises OSError (the
    address taken, not of this host, a name that does not resolve).
    """
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # "::" would take IPv4's port too: 0.0.0.0 bound next
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen()
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _url(sock: socket.socket) -> str:
    """``http://host:port`` of a bound socket (the port the system picked for port 0)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if sock.family == socket.AF_INET6 else f"http://{host}:{port}"


def http_port_problem(settings: Settings, exc: OSError) -> str:
    """Why the HTTP port of ``settings`` cannot be bound, in words (no errno prefix)."""
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"the HTTP port {host}:{settings.port} cannot be bound: {exc.strerror or exc}"


class BoundServer(uvicorn.Server):
    """uvicorn's server on the sockets of :func:`bind_http`."""

    def run_on(self, sockets: list[socket.socket], recognised: Callable[[], bool]) -> None:
        """Serve on ``sockets`` until stopped (or the start fails: then ``started`` is
        false), and close them. ``recognised`` tells whether the service recognised the
        failure of its start, and will say why in its own line: uvicorn's ``Application
        startup failed. Exiting.`` would be a second one."""

        def quiet(record: logging.LogRecord) -> bool:
            return not (record.msg == "Application startup failed. Exiting." and recognised())

        uvicorn_log = logging.getLogger("uvicorn.error")
        uvicorn_log.addFilter(quiet)
        try:
            self.run(sockets)
        except SystemExit:  # how uvicorn ends a failed start
            pass
        finally:
            uvicorn_log.removeFilter(quiet)
            for sock in sockets:
                sock.close()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:  # what uvicorn says when it binds the port itself
            urls = ", ".join(_url(sock) for sock in sockets or ())
            log.info("Uvicorn running on %s (Press CTRL+C to quit)", urls)
